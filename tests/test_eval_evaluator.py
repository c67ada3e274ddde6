"""evaluate_retrieval end to end on tiny encoders: metrics rows, summaries, PNGs and R@1 = 1."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from gleam_jax.errors import GleamError
from gleam_jax.eval import evaluator
from gleam_jax.eval import metrics
from gleam_jax.eval import report
from gleam_jax.eval import retrieval
from gleam_jax.utils.writer import read_metrics

SIDE = 8  # images are SIDE x SIDE x 3; a location code is painted as one bright pixel


def painted_images(location_ids, rng):
  """Dim noise with one bright pixel at a position given by the location id."""
  images = rng.uniform(0.0, 0.3, size=(len(location_ids), SIDE, SIDE, 3)).astype(np.float32)
  flat = images.reshape(len(location_ids), -1)
  flat[np.arange(len(location_ids)), np.asarray(location_ids)] = 1.0
  return flat.reshape(images.shape)


def one_hot_encoder(images):
  """Maps an image to the one-hot of its painted location code: same location, same vector."""
  code = (images.reshape(images.shape[0], -1) > 0.5).astype(jnp.float32)
  return code / jnp.maximum(jnp.linalg.norm(code, axis=1, keepdims=True), 1e-6)


def batches_of(location_ids, batch_size, rng, **extra):
  out = []
  for s in range(0, len(location_ids), batch_size):
    ids = np.asarray(location_ids[s:s + batch_size])
    batch = {"image": painted_images(ids, rng), "location_id": ids}
    batch.update({k: v[s:s + batch_size] for k, v in extra.items()})
    out.append(batch)
  return out


def mesh8():
  return Mesh(np.array(jax.devices()).reshape(2, 4, 1), retrieval.MESH_AXES)


def test_cvusa_protocol_end_to_end_reports(tmp_path):
  rng = np.random.default_rng(0)
  num = 150  # gallery of 150 satellites: R@1% uses K = 1
  gallery = batches_of(np.arange(num), 32, rng)
  query_sets = {"panorama": batches_of(rng.permutation(num)[:45], 16, rng),
                "drone": iter(batches_of(rng.permutation(num)[:21], 8, rng))}  # one-shot iterator
  workdir = str(tmp_path)
  out = evaluator.evaluate_retrieval(one_hot_encoder, one_hot_encoder, query_sets, gallery, protocol="cvusa",
                                     mesh=mesh8(), workdir=workdir, step=7, num_examples_png=4)
  for modality in ("panorama", "drone"):
    for name in ("R@1", "R@5", "R@10", "R@1%"):
      assert out[f"eval/test/{modality}/{name}"] == 1.0
  rows = read_metrics(workdir)
  assert len(rows) == 1 and rows[0]["step"] == 7 and rows[0]["eval/test/drone/R@1"] == 1.0
  summary = open(os.path.join(workdir, "eval", "test", "summary.md")).read()
  assert summary == open(os.path.join(workdir, "eval", "test", "summary_step7.md")).read()
  assert "| panorama | 100.00 | 100.00 | 100.00 | 100.00 |" in summary
  step_dir = os.path.join(workdir, "eval", "test", "step7")
  for name in ("panorama_top5.png", "drone_top5.png", "recall_curve.png", "panorama_recall_curve.png"):
    assert os.path.getsize(os.path.join(step_dir, name)) > 1000


def test_random_encoder_gives_chance_level_and_vigor_hit_rate(tmp_path):
  """A random projection cannot match locations: R@1 far below 1; hit rate >= R@1 (semi-positives)."""
  rng = np.random.default_rng(1)
  proj = jnp.asarray(rng.normal(size=(SIDE * SIDE * 3, 16)).astype(np.float32))

  def random_encoder(images):
    e = images.reshape(images.shape[0], -1) @ proj
    return e / jnp.linalg.norm(e, axis=1, keepdims=True)

  num = 120
  gallery = batches_of(np.arange(num), 40, rng)
  ids = rng.permutation(num)[:60]
  semi = np.stack([(ids + 1) % num, (ids + 2) % num, np.full(60, -1)], axis=1)
  queries = {"panorama": batches_of(ids, 20, rng, semi_positive_ids=semi)}
  out = evaluator.evaluate_retrieval(random_encoder, random_encoder, queries, gallery, protocol="vigor",
                                     workdir=str(tmp_path), step=0, num_examples_png=2)
  assert out["eval/test/panorama/R@1"] < 0.2
  assert out["eval/test/panorama/hit_rate"] >= out["eval/test/panorama/R@1"]
  assert out["eval/test/panorama/R@10"] >= out["eval/test/panorama/R@1"]


def test_university_protocol_with_several_references_and_scann_backend(tmp_path):
  rng = np.random.default_rng(2)
  # 60 locations x 5 gallery images each (300 items) + 40 distractor locations without queries.
  gallery_ids = np.concatenate([np.repeat(np.arange(60), 5), np.arange(60, 100)])
  gallery = batches_of(gallery_ids, 64, rng)
  queries = {"drone": batches_of(rng.integers(0, 60, 30), 10, rng)}
  cfg = retrieval.search_config()
  cfg.backend = "scann"
  out = evaluator.evaluate_retrieval(one_hot_encoder, one_hot_encoder, queries, gallery, protocol="university",
                                     search_cfg=cfg, workdir=str(tmp_path), step=3, num_examples_png=3)
  # Every gallery image of the query's location scores 1, all others 0: ranks 0..4, AP = 1.
  assert out["eval/test/drone/R@1"] == 1.0
  assert out["eval/test/drone/mAP"] == pytest.approx(1.0)
  assert out["eval/test/drone/search_recall@1"] == 1.0
  # the exact top-10 is the 5 references and 5 of the 335 items tied at 0: any 5 of those are right
  assert out["eval/test/drone/search_recall@10"] == 1.0
  assert os.path.exists(os.path.join(str(tmp_path), "scann_index", "fingerprint.txt"))


def unit_rows(images):
  """Images that are their own embeddings, (N, 1, 1, D) -> (N, D), L2-normalised."""
  e = images.reshape(images.shape[0], -1)
  return e / jnp.linalg.norm(e, axis=1, keepdims=True)


def test_multi_query_scores_the_mean_of_each_locations_views(tmp_path):
  """University-1652's multiple queries: all views of a location as one query, their mean embedding."""
  eye = np.eye(4, dtype=np.float32)
  gallery = [{"image": eye[:, None, None, :], "location_id": np.arange(4)}]
  # Location 0 has three views: two lean to locations 1 and 2 (each ranks that one first), one is
  # right; their mean leans to 0. Location 3 has one view, right.
  views = np.stack([eye[0] + 1.2 * eye[1], eye[0] + 1.2 * eye[2], eye[0], eye[3]])
  queries = {"uav": [{"image": views[:, None, None, :], "location_id": np.array([0, 0, 0, 3])}]}
  workdir = str(tmp_path)
  out = evaluator.evaluate_retrieval(unit_rows, unit_rows, queries, gallery, protocol="university",
                                     workdir=workdir, step=2, num_examples_png=2, multi_query=("uav",))
  # one view at rank 1 scores AP (0 + 1/2) / 2 = 0.25 (the baseline's trapezoid), a view at rank 0 scores 1
  assert (out["eval/test/uav/R@1"], out["eval/test/uav/mAP"]) == (0.5, pytest.approx(2.5 / 4))
  assert (out["eval/test/uav_multiquery/R@1"], out["eval/test/uav_multiquery/mAP"]) == (1.0, pytest.approx(1.0))
  summary = open(os.path.join(workdir, "eval", "test", "summary.md")).read()
  assert "queries: uav 4, uav_multiquery 2" in summary and "| uav_multiquery | 100.00 |" in summary
  assert os.path.getsize(os.path.join(workdir, "eval", "test", "step2", "uav_multiquery_recall_curve.png")) > 1000

  # On random embeddings it is the baseline's multiple-query evaluation: the unnormalised mean of a
  # location's features scored against the gallery, then the single-query metrics.
  rng = np.random.default_rng(4)
  gallery_ids = np.concatenate([np.repeat(np.arange(30), 2), np.arange(30, 50), [-1, -1]])
  gallery_vectors = rng.normal(size=(len(gallery_ids), 8)).astype(np.float32)
  query_ids = rng.integers(0, 40, size=90)
  # each view: noise around its location's first gallery vector (the first 80 gallery ids are sorted)
  query_vectors = (rng.normal(size=(90, 8)).astype(np.float32)
                   + gallery_vectors[np.searchsorted(gallery_ids[:80], query_ids)])
  out = evaluator.evaluate_retrieval(
      unit_rows, unit_rows, {"uav": batches_of_vectors(query_vectors, query_ids, 32)},
      batches_of_vectors(gallery_vectors, gallery_ids, 40), protocol="university", num_examples_png=0,
      multi_query=("uav",))
  gallery_features = np.asarray(unit_rows(gallery_vectors[:, None, None, :]))
  query_features = np.asarray(unit_rows(query_vectors[:, None, None, :]))
  locations = np.unique(query_ids)
  mean_features = np.stack([query_features[query_ids == i].mean(axis=0) for i in locations])
  want = metrics.university_metrics(mean_features @ gallery_features.T, locations, gallery_ids)
  for name in ("R@1", "R@5", "R@10", "mAP"):
    assert out[f"eval/test/uav_multiquery/{name}"] == pytest.approx(want[name])
  assert out["eval/test/uav_multiquery/R@1"] > out["eval/test/uav/R@1"]


def batches_of_vectors(vectors, location_ids, batch_size):
  return [{"image": vectors[s:s + batch_size, None, None, :], "location_id": location_ids[s:s + batch_size]}
          for s in range(0, len(vectors), batch_size)]


def test_multi_query_names_evaluated_modalities_outside_vigor():
  queries = {"uav": [{"image": np.ones((2, 1, 1, 4), np.float32), "location_id": np.array([0, 1])}]}
  with pytest.raises(GleamError, match=r"eval.multi_query names \['ground'\].*it queries uav"):
    evaluator.evaluate_retrieval(unit_rows, unit_rows, queries, queries["uav"], multi_query=("ground",))
  with pytest.raises(GleamError, match="under protocol 'vigor'.*clear eval.multi_query"):
    evaluator.evaluate_retrieval(unit_rows, unit_rows, queries, queries["uav"], protocol="vigor", multi_query=("uav",))


def test_save_topk_png_marks_true_reference(tmp_path):
  rng = np.random.default_rng(3)
  q = rng.uniform(size=(32, 32, 3)).astype(np.float32)
  g = (rng.uniform(size=(5, 32, 32, 3)) * 255).astype(np.uint8)
  path = report.save_topk_png(q, g, np.linspace(0.9, 0.5, 5), str(tmp_path / "q.png"), true_index=2)
  from PIL import Image
  image = np.asarray(Image.open(path).convert("RGB")).astype(int)
  green = np.all(np.abs(image - [0x1a, 0x98, 0x50]) < 8, axis=-1).sum()
  red = np.all(np.abs(image - [0xd7, 0x30, 0x27]) < 8, axis=-1).sum()
  assert green > 100 and red > 4 * 100  # one green outline, four red ones
