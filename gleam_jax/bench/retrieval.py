"""ScaNN against exact brute force (NumPy and JAX) on clustered, embedding-like galleries.

  python -m gleam_jax.bench.retrieval --gallery_sizes=100000,1000000 --num_queries=10000 --dim=1024

Galleries are L2-normalised mixtures of Gaussian clusters on the sphere whose tightness varies from
cluster to cluster (neighbouring satellite tiles look alike); queries are noisy copies of gallery
items at the cosine a trained model gives true pairs (0.6-0.8). Reported per gallery size:
build time, memory (RSS delta, index bytes), queries/s, ScaNN recall@1 / recall@10 against the
exact answers, the true-item R@1 of every method, and the ratios against exact search. On the first
gallery size a few ScaNN settings are swept (`--sweep`) around the defaults of `search_config()`;
the larger galleries run those defaults.
"""
import gc
import os
import tempfile
import time

from absl import app
from absl import flags

_SIZES = flags.DEFINE_list("gallery_sizes", ["100000", "1000000"], "Gallery sizes.")
_QUERIES = flags.DEFINE_integer("num_queries", 10_000, "Queries (noisy copies of gallery items).")
_DIM = flags.DEFINE_integer("dim", 1024, "Embedding dimension.")
_CLUSTERS = flags.DEFINE_integer("num_clusters", 4000, "Gaussian clusters in the gallery.")
_EXACT_QUERIES = flags.DEFINE_integer("exact_timed_queries", 1000, "Queries timed for the NumPy exact search.")
_SWEEP = flags.DEFINE_bool("sweep", True, "Sweep ScaNN settings on the first gallery size.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")

K = 10


def clustered_embeddings(num, dim, num_clusters, seed=0, chunk=50_000):
  """(num, dim) float32 unit vectors: cluster centre + Gaussian offset, the cosine to the centre
  drawn per cluster from [0.55, 0.95]. Generated in float32 chunks (no float64 copy)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  cos_to_centre = rng.uniform(0.55, 0.95, num_clusters).astype(np.float32)
  spread = np.sqrt(1 / cos_to_centre**2 - 1) / np.sqrt(dim)  # |offset| = tan(angle)
  out = np.empty((num, dim), np.float32)
  for start in range(0, num, chunk):
    n = min(chunk, num - start)
    cluster = rng.integers(0, num_clusters, n)
    part = rng.standard_normal((n, dim), dtype=np.float32)
    part *= spread[cluster, None]
    part += centres[cluster]
    part /= np.linalg.norm(part, axis=1, keepdims=True)
    out[start:start + n] = part
  return out


def noisy_queries(gallery, num, seed=1, cos_range=(0.6, 0.8)):
  """(queries (num, dim) float32 unit vectors, true gallery index (num,)): each a gallery item plus
  noise at a cosine drawn from `cos_range`."""
  import numpy as np
  rng = np.random.default_rng(seed)
  true_index = rng.choice(len(gallery), num, replace=False)
  cos = rng.uniform(*cos_range, num).astype(np.float32)
  noise = rng.standard_normal((num, gallery.shape[1]), dtype=np.float32)
  noise -= np.sum(noise * gallery[true_index], axis=1, keepdims=True) * gallery[true_index]
  noise /= np.linalg.norm(noise, axis=1, keepdims=True)
  queries = cos[:, None] * gallery[true_index] + np.sqrt(1 - cos**2)[:, None] * noise
  return queries.astype(np.float32), true_index


def numpy_exact_topk(queries, gallery, k, chunk=1000):
  """Exact top-k by NumPy matmul in query chunks (argpartition, then sort of the k)."""
  import numpy as np
  idx_out = np.empty((len(queries), k), np.int64)
  for start in range(0, len(queries), chunk):
    sim = queries[start:start + chunk] @ gallery.T
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1, kind="stable")
    idx_out[start:start + chunk] = np.take_along_axis(part, order, axis=1)
    del sim
  return idx_out


def rss_bytes():
  import psutil
  return psutil.Process(os.getpid()).memory_info().rss


def dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def recall_vs_exact(approx, exact):
  import numpy as np
  r1 = float(np.mean(approx[:, 0] == exact[:, 0]))
  k = exact.shape[1]
  r10 = float(np.mean([len(np.intersect1d(a[:k], e)) / k for a, e in zip(approx, exact)]))
  return r1, r10


def true_r1(indices, true_index):
  import numpy as np
  return float(np.mean(indices[:, 0] == true_index))


def run_scann(gallery, queries, exact, true_index, cfg):
  from gleam_jax.eval import retrieval
  gc.collect()
  rss0 = rss_bytes()
  t0 = time.perf_counter()
  index = retrieval.ScannIndex.build(gallery, cfg)
  build_s = time.perf_counter() - t0
  rss_delta = rss_bytes() - rss0
  with tempfile.TemporaryDirectory() as tmp:
    index.save(os.path.join(tmp, "scann_index"))
    index_bytes = dir_bytes(os.path.join(tmp, "scann_index"))
  index.search(queries[:100], K)  # warm up
  t0 = time.perf_counter()
  _, indices = index.search(queries, K)
  search_s = time.perf_counter() - t0
  r1, r10 = recall_vs_exact(indices, exact)
  del index
  gc.collect()
  return dict(build_s=build_s, rss_delta=rss_delta, index_bytes=index_bytes, qps=len(queries) / search_s,
              recall1=r1, recall10=r10, true_r1=true_r1(indices, true_index))


def run_jax_exact(gallery, queries, true_index):
  """JAX ExactIndex over all queries: the exact answers every other method is scored against."""
  import jax
  from gleam_jax.eval import retrieval
  gc.collect()
  rss0 = rss_bytes()
  t0 = time.perf_counter()
  index = retrieval.ExactIndex(gallery, query_chunk=256, gallery_chunk=262_144)
  jax.block_until_ready([c for c, _ in index._chunks])
  build_s = time.perf_counter() - t0
  rss_delta = rss_bytes() - rss0
  index.search(queries[:256], K)  # compile
  t0 = time.perf_counter()
  _, indices = index.search(queries, K)
  search_s = time.perf_counter() - t0
  del index
  gc.collect()
  return indices, dict(build_s=build_s, rss_delta=rss_delta, index_bytes=gallery.nbytes,
                       qps=len(queries) / search_s, recall1=1.0, recall10=1.0, true_r1=true_r1(indices, true_index))


def run_numpy_exact(gallery, queries, exact, true_index):
  t0 = time.perf_counter()
  indices = numpy_exact_topk(queries, gallery, K, chunk=100)
  search_s = time.perf_counter() - t0
  r1, r10 = recall_vs_exact(indices, exact[:len(queries)])
  return dict(build_s=0.0, rss_delta=0, index_bytes=gallery.nbytes, qps=len(queries) / search_s,
              recall1=r1, recall10=r10, true_r1=true_r1(indices, true_index[:len(queries)]))


def sweep_settings():
  """(name, settings) of the ScaNN settings tried on the first gallery size: the shipped defaults of
  `search_config()` first, then variants (leaves N/100, fraction of leaves searched, AH block)."""
  out = [("defaults of search_config()", {})]
  for search_frac, dims_per_block in [(0.02, 4), (0.03, 4), (0.03, 2)]:
    out.append((f"leaves N/100, search {search_frac:.0%}, AH {dims_per_block} dims/block",
                dict(search_frac=search_frac, dims_per_block=dims_per_block)))
  return out


def scann_cfg(size, search_frac=None, dims_per_block=None):
  """`search_config()`, or with N/100 leaves of which `search_frac` are searched."""
  from gleam_jax.eval import retrieval
  cfg = retrieval.search_config()
  if search_frac is not None:
    cfg.num_leaves = max(1, size // 100)
    cfg.num_leaves_to_search = max(1, round(cfg.num_leaves * search_frac))
    cfg.dimensions_per_block = dims_per_block
  return cfg


def describe(cfg, size):
  from gleam_jax.eval import retrieval
  leaves, to_search, sample = retrieval.scann_tree_settings(cfg, size)
  return (f"ScaNN {leaves} leaves, {to_search} searched, AH {cfg.dimensions_per_block} dims/block, "
          f"reorder {cfg.reorder_k}")


def fmt_row(name, r, np_qps, jax_qps):
  mb = lambda b: f"{b / 2**20:,.0f}"
  recall10 = f"{r['recall10']:.4f}" if "recall10" in r else "-"
  return (f"| {name} | {r['build_s']:.1f} | {mb(r['rss_delta'])} | {mb(r['index_bytes'])} | {r['qps']:,.0f} | "
          f"{r['qps'] / np_qps:.1f}x | {r['qps'] / jax_qps:.1f}x | {r['recall1']:.4f} | {recall10} | {r['true_r1']:.4f} |")


HEADER = ("| method | build s | RSS delta MiB | index MiB | queries/s | vs NumPy exact | vs JAX exact | "
          "recall@1 vs exact | recall@10 vs exact | true-item R@1 |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main(argv):
  del argv
  for n, size in enumerate(int(s) for s in _SIZES.value):
    t0 = time.perf_counter()
    rss0 = rss_bytes()
    gallery = clustered_embeddings(size, _DIM.value, _CLUSTERS.value, _SEED.value)
    queries, true_index = noisy_queries(gallery, _QUERIES.value, _SEED.value + 1)
    print(f"\n## Gallery {size:,} x {_DIM.value}, {len(queries):,} queries (data {time.perf_counter() - t0:.0f}s, "
          f"RSS +{(rss_bytes() - rss0) / 2**20:,.0f} MiB)", flush=True)
    exact, jax_row = run_jax_exact(gallery, queries, true_index)
    print(f"JAX exact: {jax_row['qps']:,.1f} queries/s over all {len(queries):,} queries", flush=True)
    timed = min(_EXACT_QUERIES.value, len(queries))
    np_row = run_numpy_exact(gallery, queries[:timed], exact, true_index)
    print(f"NumPy exact: {np_row['qps']:,.1f} queries/s on {timed:,} queries; top-1 agreement with JAX "
          f"{np_row['recall1']:.4f}", flush=True)
    rows = [(f"NumPy exact (matmul + argpartition; first {timed:,} queries)", np_row),
            ("JAX exact (ExactIndex: jit matmul + top_k)", jax_row)]
    if n == 0 and _SWEEP.value:
      for name, settings in sweep_settings():
        cfg = scann_cfg(size, **settings)
        r = run_scann(gallery, queries, exact, true_index, cfg)
        print(f"{describe(cfg, size)} ({name}): recall@1 {r['recall1']:.4f} recall@10 {r['recall10']:.4f} "
              f"{r['qps']:,.0f} q/s, build {r['build_s']:.0f}s", flush=True)
        rows.append((f"{describe(cfg, size)} ({name})", r))
    else:
      cfg = scann_cfg(size)
      r = run_scann(gallery, queries, exact, true_index, cfg)
      rows.append((f"{describe(cfg, size)} (defaults of search_config())", r))
    print("\n" + HEADER)
    for name, r in rows:
      print(fmt_row(name, r, np_row["qps"], jax_row["qps"]))
    del gallery, queries, exact
    gc.collect()


if __name__ == "__main__":
  app.run(main)
