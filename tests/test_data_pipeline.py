"""Grain pipelines on the tiny synthetic_cvgl: batches, resume from state, process slices, eval."""
import concurrent.futures
import json
import threading

import numpy as np
import pytest

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax.data import augment, pipeline, samplers, sources, synthetic
from gleam_jax.data.augment import normalise, resize
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError


def with_fields(cfg, **kw):
  return data_config(**{**cfg.to_dict(), **kw})


def stream(cfg, batch, sampler=None, seed=0, **kw):
  sampler = sampler or samplers.make_sampler(cfg, sources.get_index(cfg, cfg.train_split))
  return pipeline.make_train_stream(cfg, batch, sampler, seed, process_index=kw.pop("process_index", 0),
                                    process_count=kw.pop("process_count", 1), **kw)


def test_train_batches_are_prepared_pairs(tiny_cfg):
  cfg = with_fields(tiny_cfg, augment={"enabled": False})
  src = sources.get_source(cfg, "train")
  s = stream(cfg, 8)
  seen = set()
  for _ in range(s.steps_per_epoch):
    b = next(s)
    assert b["query"].shape == (8, 32, 32, 3) and b["query"].dtype == np.float32
    assert b["satellite"].shape == (8, 32, 32, 3) and b["satellite"].dtype == np.float32
    assert b["modality"].dtype == np.int32 and b["location_id"].dtype == np.int64
    assert len(set(b["location_id"].tolist())) == 8
    seen.update(b["modality"].tolist())
  assert seen == {0, 1, 2, 3}
  # pixels: the stored satellite of that location, normalised with the ImageNet statistics
  index = sources.get_index(cfg, "train")
  row = int(np.flatnonzero(index["location_id"] == b["location_id"][0])[0])
  want = normalise(src[row]["satellite"], cfg.mean, cfg.std)
  np.testing.assert_allclose(b["satellite"][0], want, rtol=1e-6)
  # 24 locations x 4 modalities = 96 slots; the greedy unique-location fill may drop a batch's worth
  assert s.epoch == 0 and s.batches_in_epoch == s.steps_per_epoch and 96 // 8 - 1 <= s.steps_per_epoch <= 96 // 8
  next(s)
  assert s.epoch == 1 and s.batches_in_epoch == 1


def test_phase1_panorama_stream_shape(tiny_cfg):
  cfg = with_fields(tiny_cfg, modalities=("panorama",), panorama_size=(32, 64))
  b = next(stream(cfg, 6))
  assert b["query"].shape == (6, 32, 64, 3)
  assert np.all(b["modality"] == MODALITIES.index("panorama"))


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def dss_sampler(cfg, index, table=True):
  sampler = samplers.make_sampler(cfg, index)
  if table:
    ids = sampler.location_ids
    sampler.set_neighbours(np.stack([np.roll(ids, -k) for k in (1, 2, 3)], 1))
  return sampler


def read(s, n):
  out = [next(s) for _ in range(n)]
  s.close()
  return out


def test_restored_stream_continues_across_an_epoch_and_worker_counts(tiny_cfg):
  cfg = with_fields(tiny_cfg, worker_count=0, sampler={"name": "dss"})
  index = sources.get_index(cfg, "train")
  first = stream(cfg, 8, dss_sampler(cfg, index), seed=3)
  for _ in range(10):  # epoch 0 has 11 or 12 batches: the next ones cross into epoch 1
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  expected = read(first, 4)

  fresh_sampler = dss_sampler(cfg, index, table=False)  # the state brings the table
  restored = stream(cfg, 8, fresh_sampler, seed=3)
  restored.set_state(state)
  assert_same_batches(expected, read(restored, 4))
  assert fresh_sampler.table is not None

  # a job restarted with grain workers continues with the same batches
  two = stream(with_fields(cfg, worker_count=2), 8, dss_sampler(cfg, index, table=False), seed=3)
  two.set_state(state)
  assert_same_batches(expected[:1], read(two, 1))

  # the augmentation really ran (else this test would not cover its seeding)
  plain = stream(with_fields(cfg, augment={"enabled": False}), 8, dss_sampler(cfg, index), seed=3)
  plain.set_state(state)
  b = next(plain)
  np.testing.assert_array_equal(b["location_id"], expected[0]["location_id"])
  assert not np.allclose(b["satellite"], expected[0]["satellite"])


def test_restored_stream_with_grain_workers(tiny_cfg):
  cfg = with_fields(tiny_cfg, worker_count=2, sampler={"name": "gps"})
  index = sources.get_index(cfg, "train")
  first = stream(cfg, 8, samplers.make_sampler(cfg, index), seed=5)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert "iterators_in_use_states" in state["grain"]  # grain's multi-worker iterator state
  expected = read(first, 2)
  restored = stream(cfg, 8, samplers.make_sampler(cfg, index), seed=5)
  restored.set_state(state)
  assert_same_batches(expected, read(restored, 2))


def test_one_dataset_spans_the_epochs_until_the_sampler_changes(tiny_cfg):
  """grain's dataset (and its worker processes) lives across epochs: three epochs read through two
  workers give the batches of reading each epoch by itself, from one dataset; a new DSS neighbour
  table starts a new one at the next epoch, whose batches follow the new table."""
  cfg = with_fields(tiny_cfg, sampler={"name": "dss"}, augment={"enabled": True})
  index = sources.get_index(cfg, "train")
  workers = stream(with_fields(cfg, worker_count=2), 8, dss_sampler(cfg, index), seed=4)
  sampler = dss_sampler(cfg, index)
  reader = pipeline.EpochReader(cfg, sources.get_train_source(cfg), 4, 8, 0, 1)
  for epoch in range(3):
    examples = reader.epoch_examples(epoch, reader.epoch_order(sampler, epoch))
    assert len(examples) % 8 == 0 and len(examples) // 8 in (11, 12)
    for start in range(0, len(examples), 8):
      got = next(workers)
      assert workers.epoch == epoch and workers.batches_in_epoch == start // 8 + 1
      want = [examples[i] for i in range(start, start + 8)]
      for key in ("query", "satellite", "location_id"):
        np.testing.assert_array_equal(got[key], np.stack([w[key] for w in want]))
  assert workers.dataset_starts == 1
  workers.close()

  plain = stream(cfg, 8, dss_sampler(cfg, index), seed=4)
  while plain.batches_in_epoch < plain.steps_per_epoch:
    next(plain)
  old_order = reader.epoch_order(sampler, 1)
  ids = plain.sampler.location_ids
  table = np.stack([np.roll(ids, -k) for k in (5, 6, 7)], 1)
  plain.sampler.set_neighbours(table)
  sampler.set_neighbours(table)
  order = reader.epoch_order(sampler, 1)
  assert not np.array_equal(order[:8], old_order[:8])
  first = next(plain)
  assert plain.dataset_starts == 2 and plain.epoch == 1
  np.testing.assert_array_equal(first["location_id"], index["location_id"][order[:8]])
  plain.close()


def test_restore_refuses_another_batch_size(tiny_cfg):
  s = stream(tiny_cfg, 8)
  next(s)
  with pytest.raises(GleamError, match="global_batch_size=8 but this job has 4"):
    stream(tiny_cfg, 4).set_state(s.get_state())


def test_each_process_reads_its_slice_of_the_global_batch(tiny_cfg):
  """Over three epochs, augmented: two processes' batches are the halves of one process's."""
  cfg = with_fields(tiny_cfg, augment={"enabled": True})
  whole = stream(cfg, 8, seed=1)
  parts = [stream(cfg, 8, seed=1, process_index=p, process_count=2) for p in (0, 1)]
  while whole.epoch < 2 or whole.batches_in_epoch < whole.steps_per_epoch:
    b = next(whole)
    p0, p1 = next(parts[0]), next(parts[1])
    assert p0["query"].shape[0] == 4
    for k in b:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k])
    assert parts[0].epoch == parts[1].epoch == whole.epoch
  assert whole.dataset_starts == parts[0].dataset_starts == 1
  with pytest.raises(GleamError, match="global batch size 6 must be a positive multiple of the number of processes"):
    stream(cfg, 6, process_index=0, process_count=4)
  np.testing.assert_array_equal(pipeline.process_slice(np.arange(12), 6, 1, 3), [2, 3, 8, 9])


def test_eval_and_gallery_batches(tiny_cfg):
  spec = synthetic.spec_from_name("tiny")
  ids = synthetic.split_location_ids(spec, "test")
  src = sources.get_source(tiny_cfg, "test")
  queries = pipeline.make_eval_batches(tiny_cfg, "test", "uav", 5)
  batches = list(queries)
  assert len(batches) == len(queries) == 5
  assert [len(b["image"]) for b in batches] == [5, 5, 5, 5, 4]  # 12 locations x 2 views, nothing dropped
  locs = np.concatenate([b["location_id"] for b in batches])
  np.testing.assert_array_equal(locs, np.repeat(ids, 2))
  records = np.concatenate([b["index"] for b in batches])
  for r, image, loc in zip(records[:3], batches[0]["image"], locs):
    ex = src[int(r)]
    assert ex["modality_name"] == "uav" and ex["location_id"] == loc
    np.testing.assert_allclose(image, normalise(ex["query"], tiny_cfg.mean, tiny_cfg.std), rtol=1e-6)

  gallery = list(pipeline.make_gallery_batches(tiny_cfg, "test", 5))
  assert [len(b["image"]) for b in gallery] == [5, 5, 2]
  np.testing.assert_array_equal(np.concatenate([b["location_id"] for b in gallery]), ids)
  view = synthetic.render_location(spec, int(ids[7]))["satellite"]
  np.testing.assert_allclose(gallery[1]["image"][2], normalise(view, tiny_cfg.mean, tiny_cfg.std), rtol=1e-6)

  pano = with_fields(tiny_cfg, modalities=("panorama",), panorama_size=(16, 32))
  b = next(iter(pipeline.make_eval_batches(pano, "test_cross_city", "panorama", 8)))
  assert b["image"].shape == (8, 16, 32, 3)
  want = normalise(resize(src.image(0, "query"), (16, 32)), pano.mean, pano.std)
  assert want.shape == b["image"][0].shape
  with pytest.raises(GleamError, match="unknown modality 'drone'"):
    pipeline.make_eval_batches(tiny_cfg, "test", "drone", 4)


class _CountingSource:
  """A source that records which records' images were decoded."""

  def __init__(self, source):
    self.source, self.read = source, []

  def image(self, record, key):
    self.read.append(record)
    return self.source.image(record, key)

  def raw(self, record):
    return self.source.raw(record)


@pytest.mark.parametrize("split_rows", [([0, 1, 2, 3], [4, 5, 6, 7]), ([0, 1, 4, 5], [2, 3, 6, 7])])
def test_eval_batches_split_over_processes_decode_each_image_once(tiny_cfg, split_rows):
  """Each process decodes only its rows of every batch (zeros past the last record) and carries the
  labels of the whole batch; the processes' rows put together are the one-process batches."""
  src = sources.get_source(tiny_cfg, "test")
  index = sources.get_index(tiny_cfg, "test", src)
  rows = np.flatnonzero(index["modality"] == MODALITIES.index("uav"))  # 24 views: batches of 8, 8, 8
  rows = rows[:21]  # a short last batch: 5 records, 3 padded rows
  whole = list(pipeline.EvalBatches(tiny_cfg, src, rows, index["location_id"][rows], "query", (16, 16), 8, "uav"))
  parts = []
  for process_rows in split_rows:
    counting = _CountingSource(src)
    batches = pipeline.EvalBatches(tiny_cfg, counting, rows, index["location_id"][rows], "query", (16, 16), 8, "uav",
                                   process_rows=process_rows)
    parts.append(list(batches))
    mine = (np.arange(3)[:, None] * 8 + np.asarray(process_rows)[None]).reshape(-1)
    assert sorted(counting.read) == sorted(rows[mine[mine < len(rows)]].tolist())  # its rows, each once
    shown = batches.display_images([0, 20])
    np.testing.assert_array_equal(shown[20], whole[2]["image"][4])
  for k, batch in enumerate(whole):
    padded = np.zeros((8, 16, 16, 3), np.float32)
    padded[:len(batch["image"])] = batch["image"]
    for process_rows, part in zip(split_rows, parts):
      np.testing.assert_array_equal(part[k]["image"], padded[process_rows])
      np.testing.assert_array_equal(part[k]["rows"], process_rows)
      assert part[k]["padded_size"] == 8
      for key in ("location_id", "index"):
        np.testing.assert_array_equal(part[k][key], batch[key])
  with pytest.raises(GleamError, match=r"process_rows \[8\] must be positions in a batch of 8"):
    pipeline.EvalBatches(tiny_cfg, src, rows, index["location_id"][rows], "query", (16, 16), 8, process_rows=[8])


def test_modality_batch_sizes_follow_the_weights():
  cfg = data_config(modalities=("uav", "streetmap", "panorama", "ground"),
                    modality_weights={"uav": 2.0, "streetmap": 1.0, "panorama": 1.0, "ground": 1.0})
  # 6 units of 2 by weight: (2.4, 1.2, 1.2, 1.2) -> (2, 1, 1, 1) and the largest remainder (uav) one more
  assert pipeline.modality_batch_sizes(cfg, 12, multiple=2) == {"uav": 6, "streetmap": 2, "panorama": 2, "ground": 2}
  # 8 units of 8: (3.2, 1.6, 1.6, 1.6) -> (3, 1, 1, 1) + the two largest remainders (ties in order)
  assert pipeline.modality_batch_sizes(cfg, 64, multiple=8) == {"uav": 24, "streetmap": 16, "panorama": 16, "ground": 8}
  assert pipeline.modality_batch_sizes(cfg, 80, multiple=8) == {"uav": 32, "streetmap": 16, "panorama": 16, "ground": 16}
  heavy = data_config(modalities=("uav", "streetmap", "panorama", "ground"),
                      modality_weights={"uav": 2.0, "streetmap": 1.0, "panorama": 1.0, "ground": 2.0})
  assert pipeline.modality_batch_sizes(heavy, 64, multiple=8) == {"uav": 24, "streetmap": 8, "panorama": 8, "ground": 24}
  assert pipeline.modality_batch_sizes(heavy, 64) == {"uav": 21, "streetmap": 11, "panorama": 11, "ground": 21}
  # a weight too small for a unit of its own still gets one, from the largest group
  tiny = data_config(modalities=("uav", "panorama"), modality_weights={"uav": 20.0, "panorama": 1.0})
  assert pipeline.modality_batch_sizes(tiny, 16, multiple=8) == {"uav": 8, "panorama": 8}
  equal = data_config(modalities=("uav", "streetmap", "panorama", "ground"))
  assert pipeline.modality_batch_sizes(equal, 64) == {m: 16 for m in equal.modalities}
  with pytest.raises(GleamError, match="cannot hold 4 modalities"):
    pipeline.modality_batch_sizes(cfg, 24, multiple=8)
  with pytest.raises(GleamError, match="use a multiple of 8"):
    pipeline.modality_batch_sizes(cfg, 36, multiple=8)


def test_modality_streams_keep_each_shape_and_resume(tiny_cfg):
  cfg = with_fields(tiny_cfg, panorama_size=(32, 64), ground_frame="panorama", uav_frame="satellite",
                    augment={"enabled": True})
  index = sources.get_index(cfg, "train")
  kw = dict(process_index=0, process_count=1)
  s = pipeline.ModalityStreams(cfg, 16, 0, index, multiple=2, **kw)
  assert s.batch_sizes == {"uav": 4, "streetmap": 4, "panorama": 4, "ground": 4}
  with pytest.raises(GleamError, match="different shapes"):
    stream(cfg, 16)
  for _ in range(3):
    b = next(s)
  shapes = {m: q.shape for m, q in b["query"].items()}
  assert shapes == {"uav": (4, 32, 32, 3), "streetmap": (4, 32, 32, 3), "panorama": (4, 32, 64, 3),
                    "ground": (4, 32, 64, 3)}
  assert all(b["satellite"][m].shape == (4, 32, 32, 3) for m in cfg.modalities)
  for m in cfg.modalities:
    assert len(set(b["location_id"][m].tolist())) == 4
  # the modalities draw their orders independently (one shared seed would give every group the
  # same locations, i.e. the same satellites four times in a batch)
  firsts = [tuple(next(s)["location_id"][m].tolist()) for m in cfg.modalities]
  assert len(set(firsts)) == len(firsts)
  state = json.loads(json.dumps(s.get_state()))
  want = [next(s) for _ in range(8)]  # crosses an epoch of the first modality (24 locations / 4)
  again = pipeline.ModalityStreams(cfg, 16, 0, index, multiple=2, **kw)
  again.set_state(state)
  for w in want:
    got = next(again)
    for key in ("query", "satellite", "location_id"):
      for m in cfg.modalities:
        np.testing.assert_array_equal(got[key][m], w[key][m])
  other = pipeline.ModalityStreams(with_fields(cfg, modality_weights={"uav": 3.0}), 16, 0, index, multiple=2, **kw)
  with pytest.raises(GleamError, match="pairs per modality"):
    other.set_state(state)


def test_a_single_modality_stream_is_the_plain_stream(tiny_cfg):
  """Phase 1 through ModalityStreams reads exactly the batches of a TrainStream with the job's seed."""
  cfg = with_fields(tiny_cfg, modalities=("panorama",), panorama_size=(32, 64))
  index = sources.get_index(cfg, "train")
  grouped = pipeline.ModalityStreams(cfg, 8, 3, index, process_index=0, process_count=1)
  plain = stream(cfg, 8, seed=3)
  for _ in range(4):
    g, p = next(grouped), next(plain)
    np.testing.assert_array_equal(g["query"]["panorama"], p["query"])
    np.testing.assert_array_equal(g["location_id"]["panorama"], p["location_id"])


def test_eval_panoramas_cut_to_a_field_of_view(tiny_cfg):
  """Limited-field-of-view panoramas: the plain eval panorama, kept only in the columns within fov/2
  of a heading fixed per record (the rest 0, the fill colour after normalisation)."""
  cfg = with_fields(tiny_cfg, panorama_size=(16, 64))
  plain = next(iter(pipeline.make_eval_batches(cfg, "test", "panorama", 6)))
  cut = next(iter(pipeline.make_eval_batches(cfg, "test", "panorama", 6, fov_deg=90)))
  np.testing.assert_array_equal(cut["index"], plain["index"])
  headings = [pipeline.sector_heading_deg(r) for r in plain["index"]]
  assert len(set(np.round(headings, 3))) == 6 and all(0 <= h < 360 for h in headings)
  for image, whole, heading in zip(cut["image"], plain["image"], headings):
    kept = np.flatnonzero(np.any(image != 0, axis=(0, 2)))
    assert len(kept) == 16  # a quarter of 64 columns
    centres = (kept + 0.5) / 64 * 360
    assert np.all(np.abs((centres - heading + 180) % 360 - 180) <= 45)
    np.testing.assert_array_equal(image[:, kept], whole[:, kept])
  half = next(iter(pipeline.make_eval_batches(cfg, "test", "panorama", 6, fov_deg=180)))
  assert all(len(np.flatnonzero(np.any(im != 0, axis=(0, 2)))) == 32 for im in half["image"])
  for modality, fov in (("uav", 90), ("panorama", 360), ("panorama", 0)):
    with pytest.raises(GleamError, match="eval.panorama_fov_deg"):
      pipeline.make_eval_batches(cfg, "test", modality, 6, fov_deg=fov)


def test_eval_ground_photos_are_read_in_the_panorama_frame(tiny_cfg):
  from gleam_jax.data.panorama_frame import photo_to_panorama
  cfg = with_fields(tiny_cfg, panorama_size=(16, 32), ground_frame="panorama")
  batch = next(iter(pipeline.make_eval_batches(cfg, "test", "ground", 3)))
  assert batch["image"].shape == (3, 16, 32, 3)
  record = sources.get_source(cfg, "test")[int(batch["index"][0])]
  framed = photo_to_panorama(record["query"], record["heading_deg"], record["fov_deg"], record["query"].shape[0])
  np.testing.assert_allclose(batch["image"][0], normalise(resize(framed, (16, 32)), cfg.mean, cfg.std), rtol=1e-6)


def test_eval_uav_views_are_read_in_the_satellite_frame(tiny_cfg):
  from gleam_jax.data.satellite_frame import uav_to_satellite
  cfg = with_fields(tiny_cfg, query_size=(24, 24), uav_frame="satellite")
  batch = next(iter(pipeline.make_eval_batches(cfg, "test", "uav", 3)))
  assert batch["image"].shape == (3, 24, 24, 3)
  record = sources.get_source(cfg, "test")[int(batch["index"][1])]
  framed = uav_to_satellite(record["query"], record["heading_deg"], record["pitch_deg"], record["altitude_m"],
                            record["fov_deg"], record["footprint_m"], record["query"].shape[0])
  np.testing.assert_allclose(batch["image"][1], normalise(resize(framed, (24, 24)), cfg.mean, cfg.std), rtol=1e-6)


def test_decoded_cache_gives_the_same_batches(tiny_cfg, caplog, monkeypatch):
  """Records kept decoded in memory (the default) give exactly the batches of decoding every read,
  over two epochs, with augmentation, ground photos warped into the panorama frame and UAV views
  into the satellite frame."""
  cfg = with_fields(tiny_cfg, panorama_size=(32, 64), ground_frame="panorama", uav_frame="satellite",
                    augment={"enabled": True})
  index = sources.get_index(cfg, "train")
  kw = dict(process_index=0, process_count=1)
  warps_by_frame, frame_call = {}, augment.QueryFrame.__call__
  monkeypatch.setattr(augment.QueryFrame, "__call__", lambda self, example: (
      warps_by_frame.setdefault(id(self), []).append(example["index"]) or frame_call(self, example)))
  cached = pipeline.ModalityStreams(cfg, 16, 0, index, multiple=2, **kw)
  plain = pipeline.ModalityStreams(with_fields(cfg, decoded_cache_mb=0), 16, 0, index, multiple=2, **kw)
  source = cached.streams["uav"].source
  assert isinstance(source, sources.DecodedCache) and not isinstance(plain.streams["uav"].source, sources.DecodedCache)
  assert all(s.source is source for s in cached.streams.values())  # one cache for every modality
  for _ in range(2 * cached.steps_per_epoch + 1):
    got, want = next(cached), next(plain)
    for key in ("query", "satellite", "location_id"):
      for m in cfg.modalities:
        np.testing.assert_array_equal(got[key][m], want[key][m])
  # the cache keeps queries warped: each record went through the cache's QueryFrame when decoded,
  # and not again in later epochs (a record that two read threads miss at once is decoded by both; one is kept)
  assert isinstance(source.query_frame, augment.QueryFrame)
  warped = warps_by_frame[id(source.query_frame)]
  assert set(warped) == set(source._records) and len(warped) <= len(set(warped)) + 8
  ground = next(r for r in source._records.values() if r["modality_name"] == "ground")
  assert ground["query"].shape[1] == 2 * ground["query"].shape[0]  # the panorama canvas
  assert source._records and source._bytes <= source.budget_bytes
  # a cached record is returned as the same read-only arrays; a full cache decodes and says so once
  i = next(iter(source._records))
  first, again = source[i], source[i]
  assert first["query"] is again["query"] and not first["query"].flags.writeable
  with pytest.raises(ValueError):
    first["query"][0, 0, 0] = 1
  # the views of one location store one satellite file: decoded once, held once
  by_location = {}
  for r in range(len(source)):
    by_location.setdefault(int(index["location_id"][r]), []).append(r)
  shared = next(rows for rows in by_location.values() if len(rows) >= 3)
  fresh = sources.DecodedCache(sources.get_source(cfg, "train"), 64)
  satellite_decoded, example = [], fresh.source.example
  fresh.source.example = lambda i, raw=None, satellite=None: (satellite_decoded.append(satellite is None)
                                                              or example(i, raw, satellite))
  views = [fresh[r] for r in shared]
  assert satellite_decoded == [True] + [False] * (len(shared) - 1)
  assert all(v["satellite"] is views[0]["satellite"] for v in views)
  for r, v in zip(shared, views):
    want = source.source[r]
    for key in ("query", "satellite"):
      np.testing.assert_array_equal(v[key], want[key])
  assert fresh._bytes == sum(v["query"].nbytes for v in views) + views[0]["satellite"].nbytes
  full = sources.DecodedCache(sources.get_source(cfg, "train"), 0)
  with caplog.at_level("WARNING"):
    for j in range(3):
      np.testing.assert_array_equal(full[j]["query"], source.source[j]["query"])
  assert not full._records and sum("decoded_cache_mb=0 is full" in r.message for r in caplog.records) == 1
  with pytest.raises(GleamError, match="decoded_cache_mb"):
    with_fields(cfg, decoded_cache_mb=-1)


def test_decoded_cache_keeps_one_copy_when_threads_miss_together(tiny_cfg):
  """Read threads that miss the same record, or two views of one location, at the same moment each
  decode, and the cache keeps the first result: one record, one satellite, each counted once."""
  cfg = with_fields(tiny_cfg, decoded_cache_mb=64)
  cache = sources.DecodedCache(sources.get_source(cfg, "train"), 64)
  index = sources.read_index(cache.source)
  rows = {}
  for r in range(len(cache)):
    rows.setdefault(int(index["location_id"][r]), []).append(r)
  a, b = next(v for v in rows.values() if len(v) >= 2)[:2]
  started = threading.Barrier(4)
  example = cache.source.example

  def slow_example(i, raw=None, satellite=None):  # every thread is inside the decode before any keeps
    started.wait(timeout=30)
    return example(i, raw, satellite)

  cache.source.example = slow_example
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(cache.__getitem__, [a, a, b, b]))
  assert got[0]["query"] is got[1]["query"] and got[2]["query"] is got[3]["query"]
  assert all(g["satellite"] is got[0]["satellite"] for g in got)
  assert set(cache._records) == {a, b} and len(cache._satellites) == 1
  assert cache._bytes == got[0]["query"].nbytes + got[2]["query"].nbytes + got[0]["satellite"].nbytes
