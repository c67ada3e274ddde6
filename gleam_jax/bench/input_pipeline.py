"""Input pipeline throughput: the grain train stream against a plain Python loop.

    python -m gleam_jax.bench.input_pipeline [--config=s64] [--batch=64] [--batches=30] [--workers=2]

Both read the same records of the same epoch order from the same source, decode, augment
(same functions), resize, normalise and stack. The last rows read the second epoch through the
decoded-record cache (`data.decoded_cache_mb`, on in training by default), after the first filled
it: in the main process, and in each of the worker processes, which live across epochs. Reported:
steady-state pairs/s (after the first `warmup` batches) and the time to the first batch; ratios are
against the plain loop, measured in this run.
"""
import argparse
import os
import time

import numpy as np

from gleam_jax.data import pipeline, samplers, sources
from gleam_jax.data.augment import AugmentPair, PreparePair
from gleam_jax.data.config import data_config


def plain_loop(data_cfg, source, order, batch_size, seed):
  augment, prepare = AugmentPair(data_cfg), PreparePair(data_cfg)
  for start in range(0, len(order) - batch_size + 1, batch_size):
    examples = []
    for pos in range(start, start + batch_size):
      rng = np.random.default_rng([seed, pos])
      examples.append(prepare(augment(source[int(order[pos])], rng)))
    yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def measure(batches, warmup, count, batch_size):
  """(pairs/s over `count` batches after `warmup` ones, seconds to the first batch)."""
  t0 = time.perf_counter()
  next(batches)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    next(batches)
  t1 = time.perf_counter()
  for _ in range(count):
    next(batches)
  return count * batch_size / (time.perf_counter() - t1), first


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="s64", help="synthetic_cvgl builder config (world preset)")
  p.add_argument("--data_dir", default=None, help="default: data_config()'s")
  p.add_argument("--modalities", default="uav,streetmap,panorama,ground")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=30, help="timed batches")
  p.add_argument("--warmup", type=int, default=8, help="batches read before timing (fills worker buffers)")
  p.add_argument("--workers", type=int, default=2, help="grain worker processes of the multi-worker run")
  args = p.parse_args()

  kw = {"data_dir": args.data_dir} if args.data_dir else {}
  modalities = tuple(args.modalities.split(","))
  if len(modalities) > 1:  # one batch array: panoramas read at the square query size
    kw["panorama_size"] = data_config().query_size
  cfg = data_config(config=args.config, modalities=modalities, **kw)
  source = sources.get_source(cfg, cfg.train_split)
  index = sources.get_index(cfg, cfg.train_split, source)
  sampler = samplers.make_sampler(cfg, index)
  order = sampler.epoch_order(0, args.batch)
  count = min(args.batches, len(order) // args.batch - args.warmup)
  if count < 1:
    raise SystemExit(f"the epoch has {len(order) // args.batch} batches: lower --warmup or --batch")
  print(f"{cfg.name}/{args.config} {cfg.train_split}: {len(source)} records; batch {args.batch}, "
        f"{count} batches, modalities {args.modalities}; {os.cpu_count()} CPUs")

  rows = [("plain Python loop",
           *measure(plain_loop(cfg, source, order, args.batch, 0), args.warmup, count, args.batch))]
  # data.decoded_cache_mb (the training default): the first epoch fills the cache, later ones read it;
  # grain's workers live across epochs, each with its own cache
  for cached in (False, True):
    for workers in (0, args.workers):
      run_cfg = data_config(**{**cfg.to_dict(), "worker_count": workers})
      run_source = sources.DecodedCache(source, 1 << 16) if cached else source
      stream = pipeline.make_train_stream(run_cfg, args.batch, samplers.make_sampler(run_cfg, index), 0,
                                          source=run_source, process_index=0, process_count=1)
      while cached and stream.epoch == 0:
        next(stream)
      name = f"grain, {workers} workers" + (", decoded cache, 2nd epoch" if cached else "")
      rows.append((name, *measure(stream, args.warmup, count, args.batch)))
      stream.close()
      if cached and not workers:
        print(f"decoded cache: {len(run_source._records)} records, {run_source._bytes / 2**20:.0f} MB")

  base = rows[0][1]
  print(f"{'pipeline':<44}{'pairs/s':>10}{'vs plain':>10}{'first batch s':>15}")
  for name, rate, first in rows:
    print(f"{name:<44}{rate:>10.1f}{rate / base:>9.2f}x{first:>15.2f}")


if __name__ == "__main__":
  main()
