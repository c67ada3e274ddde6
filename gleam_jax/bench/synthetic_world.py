"""Rendering speed of the synthetic world, per preset and per view.

    python -m gleam_jax.bench.synthetic_world [--presets tiny,s64,s128] [--locations 60]

Reports process CPU time (robust to other load on a shared machine) and wall time per location
for all views, the split per view, the time to build one city, and the projected time to render
every location of the preset in 2 processes against the 2-minute budget of the default dataset.
"""
import argparse
import time

from gleam_jax.data.synthetic import city as city_lib
from gleam_jax.data.synthetic import render
from gleam_jax.data.synthetic import spec as spec_lib

BUDGET_S = 120.0  # all locations of the default preset, 2 processes, PNG encoding included


def _timed(fn, repeat):
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(repeat):
    fn()
  return (time.process_time() - c0) / repeat * 1e3, (time.perf_counter() - w0) / repeat * 1e3


def bench_preset(name, locations):
  spec = spec_lib.spec_from_name(name)
  city_lib.build_city.cache_clear()
  c0 = time.process_time()
  city_lib.build_city(spec.seed, 0, spec.city_size_m)
  city_s = time.process_time() - c0
  ids = [i for i in range(spec.num_locations) if spec_lib.location_city(spec, i) == 0][:locations]
  it = iter(ids * 2)
  cpu, wall = _timed(lambda: render.render_location(spec, next(it)), len(ids))
  _, scene = render.location_scene(spec, ids[0])
  cam = render.uav_cameras(spec, ids[0])[0]
  views = {
      "satellite": lambda: render._ortho(scene, scene.top, spec, spec.sat_size),
      "streetmap": lambda: render._ortho(scene, scene.map_rgb, spec, spec.sat_size),
      "panorama": lambda: render.render_panorama(spec, scene),
      "ground": lambda: render.render_ground(spec, scene, 30.0),
      "uav (one view)": lambda: render.render_uav(spec, scene, cam),
  }
  per_view = {k: _timed(f, 20)[0] for k, f in views.items()}
  total_s = spec.num_locations * cpu / 1e3 / 2 + spec.num_cities * city_s / 2
  return dict(cpu=cpu, wall=wall, city_s=city_s, per_view=per_view, total_s=total_s,
              n=spec.num_locations)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="tiny,s64,s128")
  parser.add_argument("--locations", type=int, default=60)
  args = parser.parse_args(argv)
  for name in args.presets.split(","):
    r = bench_preset(name, args.locations)
    views = ", ".join(f"{k} {v:.2f}" for k, v in r["per_view"].items())
    print(f"{name}: {r['cpu']:.1f} ms CPU / location ({r['wall']:.1f} ms wall); city build "
          f"{r['city_s']:.2f} s CPU; per view (ms CPU): {views}")
    print(f"  all {r['n']} locations in 2 processes: ~{r['total_s']:.0f} s of rendering = "
          f"{r['total_s'] / BUDGET_S:.2f} x the {BUDGET_S:.0f} s dataset budget")


if __name__ == "__main__":
  main()
