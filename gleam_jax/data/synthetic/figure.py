"""A figure of one location's views side by side.

    python -m gleam_jax.data.synthetic.figure --out docs/synthetic_world.png [--preset s128] [--location 4000]
"""
import argparse

from gleam_jax.data.synthetic import render
from gleam_jax.data.synthetic import spec as spec_lib


def save_views_figure(spec, location_id, path, rows=1):
  """Writes a PNG of the satellite, streetmap, panorama, ground and UAV views of `location_id`
  (and of the next `rows - 1` locations, one row each)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n_uav = min(spec.uav_views, 3)
  widths = [1, 1, 2, 1] + [1] * n_uav
  fig, axes = plt.subplots(rows, len(widths), figsize=(2.2 * sum(widths), 2.5 * rows),
                           gridspec_kw={"width_ratios": widths}, squeeze=False)
  for r in range(rows):
    lid = int(location_id) + r
    views = render.render_location(spec, lid)
    panels = [("satellite", views["satellite"]), ("streetmap", views["streetmap"]),
              ("panorama (N at left, E at 1/4)", views["panorama"]),
              (f"ground (heading {views['ground_heading_deg']:.0f}°)", views["ground"])]
    for k in range(n_uav):
      cam = views["uav_cameras"][k]
      panels.append((f"uav {k} (from {(cam['heading_deg'] + 180) % 360:.0f}°)", views["uav"][k]))
    for ax, (title, img) in zip(axes[r], panels):
      ax.imshow(img, interpolation="nearest")
      ax.set_title(title, fontsize=9)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r][0].set_ylabel(f"#{lid} {views['city_name']}\n({spec_lib.location_split(spec, lid)})",
                          fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/synthetic_world.png")
  parser.add_argument("--preset", default="s128", choices=sorted(spec_lib.PRESETS))
  parser.add_argument("--location", type=int, default=None, help="default: the first test location")
  parser.add_argument("--rows", type=int, default=3)
  args = parser.parse_args(argv)
  spec = spec_lib.spec_from_name(args.preset)
  location = args.location
  if location is None:
    location = int(spec_lib.split_location_ids(spec, "test")[0])
  save_views_figure(spec, location, args.out, rows=args.rows)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
