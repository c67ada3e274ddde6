"""Non-learned retrieval baselines on the synthetic world: they must stay near chance, so that
matching a query to its satellite tile needs a learned model.

    python -m gleam_jax.data.synthetic.baselines [--preset s64] [--split test] [--limit 1000]

For every modality, each query of a held-out location is matched against the satellite tiles of
all locations of the split by exact (numpy argmax) search, with
- raw pixels: both images resized (box filter) to 32 x 32, flattened, cosine similarity;
- colour histograms: 8 x 8 x 8 RGB bins, normalised, cosine similarity and chi-squared distance.
UAV views all count as queries. Prints R@1 (%) per modality and method.
"""
import argparse
import time

import numpy as np
from PIL import Image

from gleam_jax.data.synthetic import render
from gleam_jax.data.synthetic import spec as spec_lib
from gleam_jax.utils.progress import RateEta
from gleam_jax.utils.progress import format_eta

COMMON_SIZE = 32
BINS = 8


def raw_pixels(img):
  small = Image.fromarray(img).resize((COMMON_SIZE, COMMON_SIZE), Image.BOX)
  v = np.asarray(small, np.float32).reshape(-1)
  return v / max(float(np.linalg.norm(v)), 1e-9)


def colour_histogram(img):
  q = (img.reshape(-1, 3).astype(np.int32) * BINS) // 256
  h = np.bincount((q[:, 0] * BINS + q[:, 1]) * BINS + q[:, 2], minlength=BINS ** 3).astype(np.float32)
  return h / h.sum()


def recall_at_1_cosine(queries, gallery, labels):
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-9)
  g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-9)
  return float(np.mean(np.argmax(q @ g.T, axis=1) == labels))


def recall_at_1_chi2(queries, gallery, labels, chunk=256):
  hits = 0
  for s in range(0, len(queries), chunk):
    q = queries[s:s + chunk, None, :]
    d = ((q - gallery[None]) ** 2 / (q + gallery[None] + 1e-9)).sum(-1)
    hits += int(np.sum(np.argmin(d, axis=1) == labels[s:s + chunk]))
  return hits / len(queries)


def baseline_table(spec, split="test", limit=None, log=print):
  """{modality: {method: R@1}} over the first `limit` locations of `split`."""
  ids = spec_lib.split_location_ids(spec, split)[:limit]
  feats = {m: {"raw": [], "hist": [], "label": []} for m in ("satellite",) + spec_lib.MODALITIES}
  rate = RateEta(len(ids))
  for n, lid in enumerate(ids):
    views = render.render_location(spec, int(lid))
    for m in feats:
      imgs = views[m] if m == "uav" else [views[m]]
      for img in imgs:
        feats[m]["raw"].append(raw_pixels(img))
        feats[m]["hist"].append(colour_histogram(img))
        feats[m]["label"].append(n)
    if log and (n + 1) % 250 == 0:
      r, eta = rate.update(n + 1)
      log(f"rendered {n + 1}/{len(ids)} locations ({r:.0f}/s, eta {format_eta(eta)})")
  gallery = {k: np.stack(feats["satellite"][k]) for k in ("raw", "hist")}
  table = {}
  for m in spec_lib.MODALITIES:
    raw, hist, labels = np.stack(feats[m]["raw"]), np.stack(feats[m]["hist"]), np.array(feats[m]["label"])
    table[m] = {"raw_cosine": recall_at_1_cosine(raw, gallery["raw"], labels),
                "hist_cosine": recall_at_1_cosine(hist, gallery["hist"], labels),
                "hist_chi2": recall_at_1_chi2(hist, gallery["hist"], labels),
                "queries": len(labels)}
  return table


def format_table(table, gallery_size):
  lines = [f"| query -> satellite ({gallery_size} locations) | raw-pixel cosine | "
           f"RGB histogram cosine | RGB histogram chi2 |", "| --- | --- | --- | --- |"]
  for m, r in table.items():
    lines.append(f"| {m} ({r['queries']} queries) | {100 * r['raw_cosine']:.1f}% | "
                 f"{100 * r['hist_cosine']:.1f}% | {100 * r['hist_chi2']:.1f}% |")
  lines.append(f"chance: {100 / gallery_size:.1f}%")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description="R@1 of non-learned baselines on the synthetic world.")
  parser.add_argument("--preset", default=spec_lib.DEFAULT_PRESET, choices=sorted(spec_lib.PRESETS))
  parser.add_argument("--split", default="test", choices=spec_lib.SPLITS)
  parser.add_argument("--limit", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  spec = spec_lib.spec_from_name(args.preset, seed=args.seed)
  t0 = time.perf_counter()
  table = baseline_table(spec, args.split, args.limit)
  size = len(spec_lib.split_location_ids(spec, args.split)[:args.limit])
  print(f"preset {args.preset}, split {args.split}, seed {args.seed} ({time.perf_counter() - t0:.0f} s)")
  print(format_table(table, size))


if __name__ == "__main__":
  main()
