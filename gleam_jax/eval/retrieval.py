"""Embedding of eval sets and nearest-neighbour search over a satellite gallery.

- `embed`: runs a jitted encoder over batches with the batch sharded over the mesh's data axes;
  the last batch is padded to the full batch size and the padded rows are dropped.
- `build_index(gallery, cfg)`: one interface, `.search(queries, k) -> (scores, indices)`, for
  `ExactIndex` (sharded matmul + `lax.top_k`, chunked over queries and gallery) and `ScannIndex`
  (ScaNN tree + anisotropic hashing + exact reorder, saved under `<workdir>/scann_index/`).
Similarity is the dot product (embeddings are L2-normalised by the encoders, so it is the cosine).
"""
import hashlib
import json
import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from gleam_jax.errors import GleamError
from gleam_jax.train import sharding as shd
from gleam_jax.train.sharding import MESH_AXES, single_device_mesh  # noqa: F401  (part of this module's API)

NON_LABEL_KEYS = ("image", "raw", "rows", "padded_size")
MIN_SCANN_TREE_SIZE = 256  # smaller galleries are scored by brute force inside ScaNN (AH needs data)


def search_config():
  """Defaults of the `search` config block (chosen with `python -m gleam_jax.bench.retrieval`,
  see docs/bench_retrieval.md)."""
  c = ml_collections.ConfigDict()
  c.backend = "auto"  # 'exact' | 'scann' | 'auto' (exact below `auto_threshold` gallery items)
  c.auto_threshold = 250_000
  # Exact search: rows of queries and of gallery per jitted step.
  c.query_chunk = 512
  c.gallery_chunk = 262_144
  # ScaNN: tree partitioning, anisotropic hashing (AH), exact reorder of the best candidates.
  c.num_leaves = 2000  # capped at gallery_size // 100 for small galleries
  c.num_leaves_to_search = 80  # 4% of the leaves; scaled down with num_leaves when capped
  c.training_sample_size = 250_000  # capped at the gallery size
  c.spherical = True  # spherical k-means leaves: right for L2-normalised embeddings
  c.dimensions_per_block = 4
  c.anisotropic_quantization_threshold = 0.2
  c.reorder_k = 250
  return c


def to_host(x):
  """A jax.Array as NumPy. In a multi-process job the shards held by other processes are gathered,
  so every process gets the whole array."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed(encode_fn, batches, mesh=None, batch_size=None, what="an eval set"):
  """Embeds every example of `batches` (dicts with 'image' NHWC float32 and label fields).

  encode_fn(images (B,H,W,C)) -> (B, D). The batch dimension is sharded over the ('data', 'fsdp')
  axes of `mesh` (a 1-device mesh when None). Each batch is cut into pieces of `batch_size` (default:
  the first batch's size rounded up to the data-parallel size); a short piece is padded with zeros
  to the full size and its padded rows are removed from the result, so nothing is dropped and
  there is one compilation. Returns (embeddings (N, D) float32 NumPy, {label: (N, ...) NumPy}) with
  the labels of every key but `NON_LABEL_KEYS`. In a multi-process job every process passes the
  same batches and gets every embedding (each computes its devices' rows; the rows are gathered).
  A batch with `rows` and `padded_size` (`pipeline.EvalBatches` with `process_rows`) holds only
  this process's rows of a `padded_size` batch, already padded: they form the global batch as they are.
  An embedding that is not finite stops with a GleamError naming `what` (comparisons with NaN are
  false, so a NaN query would count as ranked first: a broken model would score well).
  """
  mesh = mesh or single_device_mesh()
  dp = shd.batch_shards(mesh)
  sharding = shd.batch_sharding(mesh)
  encode = jax.jit(encode_fn, in_shardings=sharding, out_shardings=sharding)
  embeddings, labels = [], {}
  pending = None  # (device array, valid rows): converted after the next step is dispatched

  def flush(item):
    if item is not None:
      embeddings.append(to_host(item[0]).astype(np.float32)[:item[1]])

  for batch in batches:
    if "image" not in batch:
      raise GleamError(f"an eval batch has no 'image' (keys: {sorted(batch)}): the input pipeline must yield "
                       "dicts with 'image' (float32 NHWC) and 'location_id'.")
    images = np.asarray(batch["image"], np.float32)
    if "rows" in batch:
      pieces = [(_process_local_batch(images, batch["rows"], int(batch["padded_size"]), mesh, sharding),
                 len(batch["location_id"]))]
    else:
      if batch_size is None:
        batch_size = int(math.ceil(len(images) / dp) * dp)
      if batch_size % dp:
        raise GleamError(f"eval batch_size {batch_size} is not a multiple of the data-parallel size {dp} "
                         "(mesh axes 'data' x 'fsdp'): choose a multiple.")
      pieces = (_padded_piece(images[start:start + batch_size], batch_size, sharding)
                for start in range(0, len(images), batch_size))
    for piece, valid in pieces:
      out = encode(piece)
      flush(pending)
      pending = (out, valid)
    for key, value in batch.items():
      if key not in NON_LABEL_KEYS:
        labels.setdefault(key, []).append(np.asarray(value))
  flush(pending)
  if not embeddings:
    raise GleamError(f"{what}: the set is empty: the eval input pipeline yielded no batches.")
  embeddings = np.concatenate(embeddings)
  broken = ~np.isfinite(embeddings).all(axis=1)
  if broken.any():
    raise GleamError(f"{what}: {int(broken.sum())} of {len(embeddings)} embeddings are not finite (NaN or inf, first "
                     f"at row {int(np.flatnonzero(broken)[0])}): the model's parameters or its input images are "
                     "broken (a checkpoint of a diverged run?); evaluate another checkpoint or check the images.")
  return embeddings, {k: np.concatenate(v) for k, v in labels.items()}


def mean_per_location(embeddings, location_ids):
  """University-1652's multiple-query setting: all views of one location as one query, the mean of
  their embeddings, L2-normalised (which changes no ranking). Returns (means (L, D) float32 NumPy,
  {'location_id': (L,)}), one row per location in increasing id."""
  embeddings = np.asarray(embeddings, np.float64)
  ids, group = np.unique(np.asarray(location_ids).reshape(-1), return_inverse=True)
  sums = np.zeros((len(ids), embeddings.shape[1]))
  np.add.at(sums, group, embeddings)
  norms = np.linalg.norm(sums, axis=1, keepdims=True)
  return (sums / np.maximum(norms, 1e-12)).astype(np.float32), {"location_id": ids}


def _padded_piece(piece, batch_size, sharding):
  """(up to `batch_size` rows, zero-padded to it and placed, the number of real rows)."""
  valid = len(piece)
  if valid < batch_size:
    piece = np.concatenate([piece, np.zeros((batch_size - valid,) + piece.shape[1:], piece.dtype)])
  return jax.device_put(piece, sharding), valid


def _process_local_batch(images, rows, padded_size, mesh, sharding):
  """This process's `rows` of a `padded_size` batch -> the global batch array."""
  shd.check_batch_divides(padded_size, mesh, what="eval batch size")
  held = shd.process_rows(mesh, padded_size)
  if not np.array_equal(rows, held):
    raise GleamError(f"eval batches give this process rows {np.asarray(rows).tolist()} of every {padded_size}, "
                     f"but its devices hold rows {held.tolist()}: build them with "
                     "`process_rows=sharding.process_rows(mesh, batch_size)` of the mesh that embeds them.")
  return jax.make_array_from_process_local_data(sharding, images, (padded_size,) + images.shape[1:])


def brute_force_topk(queries, gallery, k):
  """NumPy reference: (scores (Q,k), indices (Q,k)) by full dot products, best first; ties broken
  by the lower gallery index."""
  sim = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
  k = min(k, sim.shape[1])
  idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(sim, idx, axis=1), idx


class ExactIndex:
  """Exact inner-product search: the gallery sharded by rows over all devices of `mesh`, queries in
  chunks of `query_chunk` (replicated), gallery in chunks of `gallery_chunk` rows whose partial
  top-ks are merged."""

  def __init__(self, gallery, mesh=None, query_chunk=512, gallery_chunk=262_144):
    gallery = np.asarray(gallery, np.float32)
    self.mesh = mesh or single_device_mesh()
    self.size, self.dim = gallery.shape
    self.query_chunk = int(query_chunk)
    n_dev = self.mesh.size
    chunk = min(int(gallery_chunk), self.size)
    self.gallery_chunk = int(math.ceil(chunk / n_dev) * n_dev)
    self._rows = NamedSharding(self.mesh, P(MESH_AXES, None))
    self._replicated = NamedSharding(self.mesh, P())
    self._chunks = []  # (device gallery chunk, number of valid rows)
    for start in range(0, self.size, self.gallery_chunk):
      part = gallery[start:start + self.gallery_chunk]
      valid = len(part)
      if valid < self.gallery_chunk:
        part = np.concatenate([part, np.zeros((self.gallery_chunk - valid, self.dim), np.float32)])
      self._chunks.append((jax.device_put(part, self._rows), valid))
    self._similarity = jax.jit(_similarity, out_shardings=NamedSharding(self.mesh, P(None, MESH_AXES)))
    self._topk = jax.jit(_chunk_topk, static_argnames="k", out_shardings=self._replicated)

  def _query_chunks(self, queries):
    queries = np.asarray(queries, np.float32)
    for start in range(0, len(queries), self.query_chunk):
      q = queries[start:start + self.query_chunk]
      valid = len(q)
      if valid < self.query_chunk:
        q = np.concatenate([q, np.zeros((self.query_chunk - valid, self.dim), np.float32)])
      yield start, jax.device_put(q, self._replicated), valid

  def search(self, queries, k):
    k = min(int(k), self.size)
    scores, indices = [], []
    for _, q, valid in self._query_chunks(queries):
      best_s = best_i = None
      for c, (g, rows) in enumerate(self._chunks):
        offset = c * self.gallery_chunk
        s, i = self._topk(q, g, jnp.int32(rows), jnp.int32(offset), best_s, best_i, k=k)
        best_s, best_i = s, i
      scores.append(np.asarray(best_s)[:valid])
      indices.append(np.asarray(best_i)[:valid])
    return np.concatenate(scores), np.concatenate(indices).astype(np.int64)

  def similarity_chunks(self, queries):
    """Yields (start, (q, R) float32 NumPy similarity rows) for chunks of queries: the input of the
    protocol metrics, which need every gallery score of a query."""
    for start, q, valid in self._query_chunks(queries):
      rows = [to_host(self._similarity(q, g))[:valid, :n] for g, n in self._chunks]
      yield start, np.concatenate(rows, axis=1)


def _similarity(q, g):
  return jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST)


def _chunk_topk(q, g, valid_rows, offset, best_s, best_i, *, k):
  """Top-k of one gallery chunk (padded rows masked), merged with the running top-k."""
  s = _similarity(q, g)
  s = jnp.where(jnp.arange(g.shape[0])[None, :] < valid_rows, s, -jnp.inf)
  s, i = jax.lax.top_k(s, min(k, g.shape[0]))
  i = i + offset
  if best_s is not None:
    s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], axis=1), min(k, best_s.shape[1] + s.shape[1]))
    i = jnp.take_along_axis(jnp.concatenate([best_i, i], axis=1), pos, axis=1)
  return s, i


class ScannIndex:
  """ScaNN searcher over the gallery (dot product): a k-means tree, anisotropic hashing scores, and
  an exact reorder of the best `reorder_k` candidates."""

  def __init__(self, searcher, size, reorder_k):
    self.searcher = searcher
    self.size = size
    self.reorder_k = reorder_k

  @classmethod
  def build(cls, gallery, cfg):
    from scann import scann_ops_pybind
    gallery = np.ascontiguousarray(gallery, np.float32)
    size = len(gallery)
    if size < MIN_SCANN_TREE_SIZE:
      logging.info("ScaNN: %d gallery items (< %d): brute-force scoring, no tree or hashing.", size, MIN_SCANN_TREE_SIZE)
      return cls(scann_ops_pybind.builder(gallery, 10, "dot_product").score_brute_force().build(), size, 0)
    leaves, to_search, sample = scann_tree_settings(cfg, size)
    searcher = (scann_ops_pybind.builder(gallery, 10, "dot_product")
                .tree(num_leaves=leaves, num_leaves_to_search=to_search, training_sample_size=sample,
                      spherical=bool(cfg.spherical))
                .score_ah(int(cfg.dimensions_per_block),
                          anisotropic_quantization_threshold=float(cfg.anisotropic_quantization_threshold))
                .reorder(int(cfg.reorder_k))
                .build())
    return cls(searcher, size, int(cfg.reorder_k))

  def save(self, directory):
    """Writes the searcher's assets into `directory` (replaced atomically)."""
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    self.searcher.serialize(tmp, relative_path=True)
    with open(os.path.join(tmp, "gleam_index.json"), "w") as f:
      json.dump({"size": self.size, "reorder_k": self.reorder_k}, f)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)

  @classmethod
  def load(cls, directory):
    from scann import scann_ops_pybind
    meta_path = os.path.join(directory, "gleam_index.json")
    if not os.path.exists(meta_path):
      raise GleamError(f"{directory} is not a saved ScaNN index (no gleam_index.json): delete it to rebuild the index.")
    with open(meta_path) as f:
      meta = json.load(f)
    return cls(scann_ops_pybind.load_searcher(directory), meta["size"], meta["reorder_k"])

  def search(self, queries, k):
    k = min(int(k), self.size)
    queries = np.ascontiguousarray(queries, np.float32)
    indices, scores = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=max(self.reorder_k, k) if self.reorder_k else None)
    return np.asarray(scores, np.float32), np.asarray(indices).astype(np.int64)


def scann_tree_settings(cfg, size):
  """(num_leaves, num_leaves_to_search, training_sample_size) fitted to a gallery of `size` items:
  at most size // 100 leaves (at least 1), the searched fraction of leaves kept."""
  leaves = max(1, min(int(cfg.num_leaves), size // 100))
  to_search = max(1, min(leaves, round(int(cfg.num_leaves_to_search) * leaves / int(cfg.num_leaves))))
  sample = max(leaves, min(int(cfg.training_sample_size), size))
  return leaves, to_search, sample


def resolve_backend(cfg, gallery_size):
  backend = cfg.backend
  if backend == "auto":
    return "exact" if gallery_size < int(cfg.auto_threshold) else "scann"
  if backend not in ("exact", "scann"):
    raise GleamError(f"search.backend={backend!r} is not one of 'exact', 'scann', 'auto'.")
  return backend


def gallery_fingerprint(gallery, cfg):
  """Hash of the gallery embeddings and the ScaNN settings: a saved index is reused only for the same."""
  h = hashlib.blake2b(digest_size=16)
  h.update(np.ascontiguousarray(gallery, np.float32).data)
  h.update(json.dumps({k: cfg[k] for k in sorted(cfg.keys())}, sort_keys=True, default=str).encode())
  return h.hexdigest()


def build_index(gallery_embeddings, cfg, workdir=None, mesh=None):
  """The search index of `cfg.backend` over the gallery. With a ScaNN backend and a `workdir`, the
  index is loaded from `<workdir>/scann_index/` when it was built from the same gallery embeddings
  and settings, and otherwise built and saved there."""
  gallery = np.asarray(gallery_embeddings, np.float32)
  if gallery.ndim != 2 or len(gallery) == 0:
    raise GleamError(f"gallery embeddings must be a non-empty (N, D) array, got shape {gallery.shape}.")
  backend = resolve_backend(cfg, len(gallery))
  if backend == "exact":
    return ExactIndex(gallery, mesh, cfg.query_chunk, cfg.gallery_chunk)
  if workdir is None:
    return ScannIndex.build(gallery, cfg)
  directory = os.path.join(workdir, "scann_index")
  fingerprint = gallery_fingerprint(gallery, cfg)
  stamp = os.path.join(directory, "fingerprint.txt")
  if os.path.exists(stamp):
    with open(stamp) as f:
      if f.read().strip() == fingerprint:
        logging.info("Loading the ScaNN index from %s", directory)
        return ScannIndex.load(directory)
  index = ScannIndex.build(gallery, cfg)
  index.save(directory)
  with open(stamp, "w") as f:
    f.write(fingerprint)
  logging.info("Saved the ScaNN index of %d gallery items to %s", len(gallery), directory)
  return index
