"""Embedding with padding/masking and sharding; exact and ScaNN search through one interface."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from gleam_jax.bench.retrieval import clustered_embeddings, noisy_queries
from gleam_jax.errors import GleamError
from gleam_jax.eval import retrieval


def mesh_of(shape):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), retrieval.MESH_AXES)


W = np.random.default_rng(0).normal(size=(4 * 4 * 3, 8)).astype(np.float32)


def encode(images):
  e = jnp.tanh(images.reshape(images.shape[0], -1) @ W)
  return e / jnp.linalg.norm(e, axis=1, keepdims=True)


def make_batches(sizes, seed=0):
  rng = np.random.default_rng(seed)
  out, start = [], 0
  for n in sizes:
    out.append({"image": rng.normal(size=(n, 4, 4, 3)).astype(np.float32),
                "location_id": np.arange(start, start + n), "raw": np.zeros((n, 4, 4, 3), np.uint8)})
    start += n
  return out


def test_embed_pads_masks_and_matches_single_device_and_unbatched():
  batches = make_batches([16, 16, 5])  # 37 examples, not a multiple of the batch
  unbatched = np.concatenate([np.asarray(encode(jnp.asarray(b["image"][i:i + 1])))
                              for b in batches for i in range(len(b["image"]))])
  one, labels1 = retrieval.embed(encode, batches, mesh_of((1, 1, 1)), batch_size=8)
  eight, labels8 = retrieval.embed(encode, batches, mesh_of((2, 4, 1)), batch_size=8)
  assert one.shape == eight.shape == (37, 8)
  np.testing.assert_allclose(one, unbatched, atol=1e-5)
  np.testing.assert_allclose(eight, unbatched, atol=1e-5)
  np.testing.assert_array_equal(labels8["location_id"], np.arange(37))
  assert set(labels8) == {"location_id"}  # 'image' and 'raw' are not labels


def test_embed_takes_process_local_rows_of_each_batch():
  """Batches that hold only this process's rows (`EvalBatches` with `process_rows`) embed as the
  plain batches do; rows split for another mesh are an error naming the fix."""
  from gleam_jax.train import sharding
  mesh = mesh_of((2, 4, 1))
  plain = make_batches([16, 16, 5])
  rows = sharding.process_rows(mesh, 16)
  np.testing.assert_array_equal(rows, np.arange(16))  # one process holds every row
  local = []
  for b in plain:
    image = np.zeros((16, 4, 4, 3), np.float32)
    image[:len(b["image"])] = b["image"]
    local.append({"image": image[rows], "rows": rows, "padded_size": 16, "location_id": b["location_id"]})
  want, want_labels = retrieval.embed(encode, plain, mesh, batch_size=16)
  got, labels = retrieval.embed(encode, local, mesh)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert got.shape == (37, 8) and set(labels) == {"location_id"}
  np.testing.assert_array_equal(labels["location_id"], want_labels["location_id"])
  bad = [dict(local[0], image=local[0]["image"][:8], rows=np.arange(8))]
  with pytest.raises(GleamError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7\] of every 16.*process_rows=sharding.process_rows"):
    retrieval.embed(encode, bad, mesh)


def test_embed_rejects_batch_not_divisible_by_data_parallel_size():
  with pytest.raises(GleamError, match="multiple of the data-parallel size 8"):
    retrieval.embed(encode, make_batches([12]), mesh_of((2, 4, 1)), batch_size=12)


def test_embed_stops_on_embeddings_that_are_not_finite():
  """A NaN embedding would count as a top-1 hit under every protocol: it stops, naming the set."""
  batches = make_batches([5, 3])
  batches[1]["image"][1] = np.nan  # row 6 of 8
  with pytest.raises(GleamError, match=r"the test gallery: 1 of 8 embeddings are not finite \(NaN or inf, first at "
                                       r"row 6\).*evaluate another checkpoint"):
    retrieval.embed(encode, batches, mesh_of((1, 1, 1)), what="the test gallery")


def test_exact_index_equals_numpy_brute_force_on_8_devices_with_chunks():
  rng = np.random.default_rng(1)
  gallery = rng.normal(size=(1003, 32)).astype(np.float32)
  queries = rng.normal(size=(77, 32)).astype(np.float32)
  ref_s, ref_i = retrieval.brute_force_topk(queries, gallery, 10)
  for mesh in (mesh_of((1, 1, 1)), mesh_of((2, 2, 2))):
    index = retrieval.ExactIndex(gallery, mesh, query_chunk=32, gallery_chunk=300)  # 4 gallery chunks
    scores, indices = index.search(queries, 10)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)
    sim = np.concatenate([s for _, s in index.similarity_chunks(queries)])
    np.testing.assert_allclose(sim, queries @ gallery.T, atol=1e-5)


def test_build_index_auto_backend_and_bad_backend():
  cfg = retrieval.search_config()
  gallery = np.eye(4, dtype=np.float32)
  assert isinstance(retrieval.build_index(gallery, cfg), retrieval.ExactIndex)
  cfg.auto_threshold = 3
  assert isinstance(retrieval.build_index(gallery, cfg), retrieval.ScannIndex)
  cfg.backend = "faiss"
  with pytest.raises(GleamError, match="search.backend"):
    retrieval.build_index(gallery, cfg)


def small_scann_cfg():
  cfg = retrieval.search_config()
  cfg.backend = "scann"
  cfg.num_leaves = 40
  cfg.num_leaves_to_search = 8
  cfg.reorder_k = 100
  return cfg


def test_scann_recall_on_clustered_set_and_save_load_round_trip(tmp_path):
  gallery = clustered_embeddings(4000, 64, num_clusters=40, seed=0)
  queries, true_index = noisy_queries(gallery, 300, seed=1)
  _, exact = retrieval.brute_force_topk(queries, gallery, 10)
  cfg = small_scann_cfg()
  index = retrieval.build_index(gallery, cfg, workdir=str(tmp_path))
  assert isinstance(index, retrieval.ScannIndex)
  scores, indices = index.search(queries, 10)
  assert np.mean(indices[:, 0] == exact[:, 0]) >= 0.95
  assert np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(indices, exact)]) >= 0.9
  np.testing.assert_allclose(scores, np.sum(queries[:, None] * gallery[indices], -1), atol=1e-4)  # reordered
  saved = tmp_path / "scann_index"
  assert (saved / "fingerprint.txt").exists()
  stamp_time = os.path.getmtime(saved / "scann_config.pb")
  loaded = retrieval.build_index(gallery, cfg, workdir=str(tmp_path))  # same gallery: loaded, not rebuilt
  assert os.path.getmtime(saved / "scann_config.pb") == stamp_time
  s2, i2 = loaded.search(queries, 10)
  np.testing.assert_array_equal(i2, indices)
  np.testing.assert_array_equal(s2, scores)
  # New embeddings (a later eval step): the saved index must not be reused.
  rebuilt = retrieval.build_index(gallery[::-1].copy(), cfg, workdir=str(tmp_path))
  _, i3 = rebuilt.search(queries, 1)
  assert np.mean(i3[:, 0] == len(gallery) - 1 - exact[:, 0]) >= 0.95


def test_load_of_non_index_directory_is_a_clear_error(tmp_path):
  with pytest.raises(GleamError, match="not a saved ScaNN index"):
    retrieval.ScannIndex.load(str(tmp_path))
