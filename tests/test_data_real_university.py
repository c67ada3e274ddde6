"""University-1652 and SUES-200 builders on tiny copies with the published layouts: building ids,
modalities, distractors, the 'university' protocol both ways (drone -> satellite with distractor
satellites, satellite -> drone with the drone gallery), altitudes, and missing files."""
import os
import shutil

import numpy as np
import pytest

import real_data_fixtures as fx
from gleam_jax.data import pipeline, sources
from gleam_jax.data.builders import pairs
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError
from gleam_jax.eval import evaluator

SIZES = dict(query_size=(16, 16), panorama_size=(16, 32), satellite_size=(16, 16), read_threads=1)


@pytest.fixture(scope="module")
def university(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("university"))
  expected = fx.write_university(f"{root}/University-1652")
  cfg = data_config(name="university1652", manual_dir=f"{root}/University-1652", data_dir=f"{root}/data",
                    modalities=("uav", "ground"), **SIZES)
  return cfg, expected


def records_of(index):
  return sorted((MODALITIES[m], int(l), bool(q)) for m, l, q in
                zip(index["modality"], index["location_id"], index["is_query"]))


def test_university_splits_buildings_and_modalities(university):
  cfg, expected = university
  assert (cfg.config, tuple(cfg.eval_splits)) == ("default", ("test",))
  for split in ("train", "test"):
    source = sources.get_source(cfg, split)
    index = sources.get_index(cfg, split, source)
    assert records_of(index) == expected[split]
    for i in range(len(source)):
      ex = source[i]
      assert fx.code_of(ex["satellite"]) == ex["location_id"]
      if index["view_index"][i] >= 0:
        assert fx.code_of(ex["query"]) == ex["location_id"]
    # each building's satellite is stored once per split: the other records hold a placeholder
    here = index["satellite_here"]
    assert sorted(index["location_id"][here].tolist()) == sorted(set(index["location_id"].tolist()))
    assert all(source.raw(i)["satellite"] == pairs.PLACEHOLDER for i in np.flatnonzero(~here))
    assert len(np.flatnonzero(~here)) > 0
    # and decoded once: the cache's views of a building share its satellite array
    cache = sources.DecodedCache(source, 64)
    first = {}
    for i in range(len(source)):
      satellite = cache[i]["satellite"]
      assert np.array_equal(satellite, source[i]["satellite"])
      assert first.setdefault(int(index["location_id"][i]), satellite) is satellite
    source._satellite_records = {}  # as if the records holding the satellites were lost
    with pytest.raises(GleamError, match=r"no record of location \d+ stores its satellite; the dataset files are "
                                         r"damaged: delete .* and run again to rebuild it"):
      source[int(np.flatnonzero(~here)[0])]
    # drone views are numbered within their building
    uav = index["modality"] == MODALITIES.index("uav")
    for b in set(index["location_id"][uav & (index["view_index"] >= 0)].tolist()):
      views = index["view_index"][uav & (index["location_id"] == b)]
      assert sorted(views.tolist()) == list(range(len(views)))
  # the test gallery: the 4 gallery_satellite buildings, distractors 5 and 6 included
  gallery = list(pipeline.make_gallery_batches(cfg, "test", 3))
  assert sorted(np.concatenate([b["location_id"] for b in gallery]).tolist()) == [3, 4, 5, 6]


def test_university_protocol_both_directions(university, tmp_path):
  cfg, _ = university
  gallery = pipeline.make_gallery_batches(cfg, "test", 4)
  queries = {m: pipeline.make_eval_batches(cfg, "test", m, 4) for m in ("uav", "ground")}
  assert [sum(len(b["image"]) for b in queries[m]) for m in ("uav", "ground")] == [4, 1]  # no distractor queries
  out = evaluator.evaluate_retrieval(fx.code_encoder, fx.code_encoder, queries, gallery, protocol="university",
                                     workdir=str(tmp_path / "d2s"), num_examples_png=1)
  assert out["eval/test/uav/R@1"] == 1.0 and out["eval/test/uav/mAP"] == pytest.approx(1.0)
  assert out["eval/test/ground/R@1"] == 1.0
  # satellite -> drone: the satellites of the 2 queried buildings against all 6 drone views
  sat_queries = pipeline.make_satellite_query_batches(cfg, "test", "uav", 4)
  drone_gallery = pipeline.make_view_gallery_batches(cfg, "test", "uav", 4)
  assert sorted(np.concatenate([b["location_id"] for b in sat_queries]).tolist()) == [3, 4]
  assert sorted(np.concatenate([b["location_id"] for b in drone_gallery]).tolist()) == [3, 3, 4, 4, 5, 5]
  out = evaluator.evaluate_retrieval(fx.code_encoder, fx.code_encoder, {"satellite": sat_queries}, drone_gallery,
                                     protocol="university", workdir=str(tmp_path / "s2d"), num_examples_png=0)
  assert out["eval/test/satellite/R@1"] == 1.0 and out["eval/test/satellite/mAP"] == pytest.approx(1.0)


def test_university_missing_and_inconsistent_folders(tmp_path):
  root = str(tmp_path / "U")
  fx.write_university(root)
  shutil.rmtree(f"{root}/test/query_satellite/0004")
  with pytest.raises(GleamError, match="query_satellite and .*query_drone hold different buildings"):
    sources.get_source(data_config(name="university1652", manual_dir=root, data_dir=str(tmp_path / "d1")), "test")
  shutil.rmtree(f"{root}/train/satellite")
  with pytest.raises(GleamError, match="train/satellite is missing"):
    sources.get_source(data_config(name="university1652", manual_dir=root, data_dir=str(tmp_path / "d2")), "train")
  root2 = str(tmp_path / "U2")
  fx.write_university(root2)
  os.remove(f"{root2}/test/gallery_satellite/0003/0003.jpg")
  with pytest.raises(GleamError, match="holds 0 images"):
    sources.get_source(data_config(name="university1652", manual_dir=root2, data_dir=str(tmp_path / "d3")), "test")
  # hidden files and folders (a macOS copy's resource forks, a notebook's checkpoints) are not part of it,
  # and a file that is no image stops the build naming it
  root3 = str(tmp_path / "U3")
  expected = fx.write_university(root3)
  with open(f"{root3}/train/drone/0001/._image-01.jpeg", "wb") as f:
    f.write(b"\x00\x05\x16\x07 AppleDouble")
  os.makedirs(f"{root3}/train/drone/.ipynb_checkpoints")
  hidden = data_config(name="university1652", manual_dir=root3, data_dir=str(tmp_path / "d5"))
  assert records_of(sources.get_index(hidden, "train")) == expected["train"]
  with open(f"{root3}/train/drone/0001/image-02.jpeg", "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(GleamError, match=r"train/drone/0001/image-02\.jpeg is not an image that can be read \("
                                       r"UnidentifiedImageError.*\); replace it with the published file"):
    sources.get_source(data_config(name="university1652", manual_dir=root3, data_dir=str(tmp_path / "d7")), "train")


def test_sues200_altitudes_and_protocol(tmp_path):
  root = str(tmp_path / "SUES-200")
  expected = fx.write_sues200(root)
  for altitude in ("150", "200"):
    cfg = data_config(name="sues200", config=altitude, manual_dir=root, data_dir=str(tmp_path / "data"),
                      modalities=("uav",), **SIZES)
    for split in ("train", "test"):
      index = sources.get_index(cfg, split)
      assert sorted(zip(index["location_id"].tolist(), index["is_query"].tolist())) == expected[altitude][split]
      assert np.all(index["modality"] == MODALITIES.index("uav"))
    out = evaluator.evaluate_retrieval(
        fx.code_encoder, fx.code_encoder, {"uav": pipeline.make_eval_batches(cfg, "test", "uav", 4)},
        pipeline.make_gallery_batches(cfg, "test", 4), protocol="university", workdir=str(tmp_path / altitude),
        num_examples_png=0)
    assert out["eval/test/uav/R@1"] == 1.0
  with pytest.raises(GleamError, match="not a builder config of sues200"):
    data_config(name="sues200", config="100")
  shutil.rmtree(f"{root}/Testing/150/gallery_drone")
  with pytest.raises(GleamError, match="Testing/150/gallery_drone is missing"):
    sources.get_source(data_config(name="sues200", manual_dir=root, data_dir=str(tmp_path / "d2")), "test")


@pytest.mark.slow
def test_tiny_training_run_on_university_reports_both_directions(university, tmp_path):
  """configs/c_phase1.py:tiny,data=university1652 trains on drone views and evaluates drone ->
  satellite and satellite -> drone (the drone gallery) with the University-1652 protocol."""
  from config_files import load_config
  from gleam_jax import main
  from gleam_jax.utils.writer import read_metrics
  cfg, _ = university
  config = load_config("c_phase1", "tiny,data=university1652,modalities=uav,batch=2,steps=2")
  config.mesh.data, config.mesh.tensor = 2, 4  # the fixture has two training buildings
  config.optim.warmup_steps = 1
  assert config.eval.protocol == "university" and tuple(config.eval.satellite_to) == ("uav",)
  config.data.manual_dir = cfg.manual_dir
  config.data.data_dir = cfg.data_dir
  config.lock()
  workdir = str(tmp_path / "run")
  main.run(config, workdir)
  row = {}
  for r in read_metrics(workdir):
    if any(k.startswith("eval/") for k in r):
      assert r["step"] == 2
      row.update(r)
  for direction in ("uav", "satellite_to_uav", "uav_multiquery"):  # and the drone views of a building as one query
    assert 0.0 <= row[f"eval/test/{direction}/R@1"] <= row[f"eval/test/{direction}/R@5"] <= 1.0
    assert 0.0 <= row[f"eval/test/{direction}/mAP"] <= 1.0
  assert not any(k.startswith("eval/test/satellite_to_uav_multiquery/") for k in row)
