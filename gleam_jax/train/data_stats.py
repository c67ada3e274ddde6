"""Trainer of data-only configs: build the dataset named in `config.data` (if needed) and report it.

    python -m gleam_jax.main --config=<config with trainer='data_stats'> --workdir=DIR

Prints records per split and modality, locations, cities, image sizes and the build time, and
writes them to `<workdir>/data_stats.json`.
"""
import json
import os
import time

import numpy as np

from gleam_jax.data import sources
from gleam_jax.data.config import MODALITIES
from gleam_jax.errors import make_dir


def split_stats(data_cfg, split, source):
  index = sources.get_index(data_cfg, split, source)
  stats = {
      "records": int(len(source)),
      "locations": int(len(np.unique(index["location_id"]))),
      "cities": sorted(set(index["city"].tolist())),
      "records_per_modality": {},
      "image_size": {},
  }
  for m_id, m in enumerate(MODALITIES):
    rows = np.flatnonzero(index["modality"] == m_id)
    stats["records_per_modality"][m] = int(len(rows))
    if len(rows):
      stats["image_size"][m] = list(source.image(int(rows[0]), "query").shape[:2])
  if len(source):
    stats["image_size"]["satellite"] = list(source.image(0, "satellite").shape[:2])
  return stats


def collect(data_cfg):
  start = time.perf_counter()
  builder = sources.get_builder(data_cfg)
  ready_seconds = time.perf_counter() - start
  info = sources.build_info(builder)
  stats = {
      "dataset": f"{data_cfg.name}/{builder.builder_config.name}",
      "path": builder.data_dir,
      "build_seconds": info.get("build_seconds"),
      "build_workers": info.get("build_workers"),
      "ready_seconds": ready_seconds,
      "splits": {},
  }
  for split in builder.info.splits.keys():
    stats["splits"][split] = split_stats(data_cfg, split, sources.Source(builder, split))
  return stats


def format_stats(stats):
  lines = [f"{stats['dataset']} at {stats['path']}"]
  if stats["build_seconds"] is not None:
    lines.append(f"built in {stats['build_seconds']:.1f} s with {stats['build_workers']} worker(s)")
  header = f"{'split':<16}{'records':>9}{'locations':>11}{'cities':>8}" + "".join(f"{m:>11}" for m in MODALITIES)
  lines.append(header)
  for split, s in stats["splits"].items():
    lines.append(f"{split:<16}{s['records']:>9}{s['locations']:>11}{len(s['cities']):>8}"
                 + "".join(f"{s['records_per_modality'][m]:>11}" for m in MODALITIES))
  for split, s in stats["splits"].items():
    sizes = ", ".join(f"{k} {h}x{w}" for k, (h, w) in s["image_size"].items())
    lines.append(f"{split} image sizes (HxW): {sizes}; cities: {', '.join(s['cities'])}")
  return "\n".join(lines)


def run(config, workdir):
  stats = collect(config.data)
  print(format_stats(stats), flush=True)
  make_dir(workdir, "--workdir")
  with open(os.path.join(workdir, "data_stats.json"), "w") as f:
    json.dump(stats, f, indent=2, ensure_ascii=False)
  return stats
