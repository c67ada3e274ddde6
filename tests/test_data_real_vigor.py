"""VIGOR builder on a tiny copy with the published layout: labels, splits, the VIGOR protocol through
the pipeline and the evaluator, missing files, and a tiny training run through gleam_jax.main."""
import os

import numpy as np
import pytest

import real_data_fixtures as fx
from config_files import load_config
from gleam_jax.data import pipeline, sources
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError
from gleam_jax import main
from gleam_jax.eval import evaluator
from gleam_jax.utils.writer import read_metrics



@pytest.fixture(scope="module")
def vigor(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("vigor"))
  expected = fx.write_vigor(f"{root}/VIGOR")
  # One test panorama shows its first semi-positive: R@1 misses it, the hit rate does not.
  city, pano, _, semis = expected["test"][0]
  fx.paint(f"{root}/VIGOR/{city}/panorama/{pano}", semis[0], (16, 32))
  cfg = data_config(name="vigor", manual_dir=f"{root}/VIGOR", data_dir=f"{root}/data", query_size=(16, 16),
                    panorama_size=(16, 32), satellite_size=(16, 16), read_threads=1)
  return cfg, expected, root


def rows_of(index):
  return sorted((str(c), int(l), tuple(s)) for c, l, s, q in
                zip(index["city"], index["location_id"], index["semi_positive_ids"].tolist(), index["is_query"]) if q)


def test_same_area_splits_labels_and_images(vigor):
  cfg, expected, _ = vigor
  assert (cfg.config, tuple(cfg.eval_splits)) == ("same_area", ("test",))
  for split in ("train", "test"):
    source = sources.get_source(cfg, split)
    index = sources.get_index(cfg, split, source)
    assert rows_of(index) == sorted((c, l, tuple(s)) for c, _, l, s in expected[split])
    queries = index["is_query"]
    assert np.all(index["modality"][queries] == MODALITIES.index("panorama"))
    # satellite coordinates come from the file names satellite_<lat>_<lon>.png
    for i in np.flatnonzero(queries):
      c, j = fx.VIGOR_CITIES.index(index["city"][i]), index["location_id"][i] % 3
      lat, lon = fx.vigor_satellite_name(c, j)[len("satellite_"):-len(".png")].split("_")
      np.testing.assert_allclose(index["coords"][i], [float(lat), float(lon)])
      assert index["city_id"][i] == c
    # train has no gallery-only records; the test gallery holds all 12 satellites of the 4 cities
    if split == "train":
      assert queries.all() and len(source) == 8
    else:
      assert sorted(set(index["location_id"].tolist())) == list(range(12))
      assert sorted(index["location_id"][~queries].tolist()) == [2, 5, 8, 11]
      assert np.all(index["semi_positive_ids"][~queries] == -1)
    for i in range(len(source)):
      ex = source[i]
      assert fx.code_of(ex["satellite"]) == ex["location_id"]
      assert ex["satellite"].shape == (16, 16, 3)
      if queries[i]:
        assert ex["query"].shape == (16, 32, 3)


def test_vigor_protocol_through_pipeline_and_evaluator(vigor, tmp_path):
  cfg, expected, _ = vigor
  queries = pipeline.make_eval_batches(cfg, "test", "panorama", 3)
  gallery = pipeline.make_gallery_batches(cfg, "test", 5)
  batches = list(queries)
  assert sum(len(b["image"]) for b in batches) == 8
  assert all(b["semi_positive_ids"].shape == (len(b["image"]), 3) for b in batches)
  got = sorted((int(l), tuple(s)) for b in batches for l, s in zip(b["location_id"], b["semi_positive_ids"].tolist()))
  assert got == sorted((l, tuple(s)) for _, _, l, s in expected["test"])
  out = evaluator.evaluate_retrieval(fx.code_encoder, fx.code_encoder, {"panorama": queries}, gallery,
                                     protocol="vigor", workdir=str(tmp_path), num_examples_png=2)
  assert out["eval/test/panorama/R@1"] == pytest.approx(7 / 8)  # the repainted panorama
  assert out["eval/test/panorama/R@5"] == 1.0
  assert out["eval/test/panorama/hit_rate"] == 1.0


def test_cross_area_trains_on_two_cities_and_tests_on_the_others(vigor):
  cfg, expected, root = vigor
  cross = data_config(name="vigor", config="cross_area", manual_dir=cfg.manual_dir, data_dir=f"{root}/data")
  for split, cities in (("train", ("NewYork", "Seattle")), ("test", ("Chicago", "SanFrancisco"))):
    index = sources.get_index(cross, split)
    q = index["is_query"]
    want = sorted((c, l) for city in cities for c, _, l in expected["cross"][city])
    assert sorted(zip(index["city"][q].tolist(), index["location_id"][q].tolist())) == want
    assert set(index["city"].tolist()) == set(cities)
  # the test gallery: every satellite of the test cities, 3 each
  assert len(set(sources.get_index(cross, "test")["location_id"].tolist())) == 6


def test_sample4geo_folder_layout_is_read_too(tmp_path):
  """Sample4Geo moves the images to ground/<City>/ and satellite/<City>/; the split files stay."""
  root = str(tmp_path / "VIGOR")
  expected = fx.write_vigor(root)
  os.makedirs(f"{root}/ground")
  os.makedirs(f"{root}/satellite")
  for city in fx.VIGOR_CITIES:
    os.rename(f"{root}/{city}/panorama", f"{root}/ground/{city}")
    os.rename(f"{root}/{city}/satellite", f"{root}/satellite/{city}")
  cfg = data_config(name="vigor", manual_dir=root, data_dir=str(tmp_path / "data"))
  source = sources.get_source(cfg, "train")
  index = sources.get_index(cfg, "train", source)
  assert sorted(index["location_id"].tolist()) == sorted(l for _, _, l, _ in expected["train"])
  assert all(fx.code_of(source[i]["query"]) == source[i]["location_id"] for i in range(len(source)))


def test_built_dataset_is_read_without_the_local_copy(vigor):
  """manual_dir is read once, at build time: afterwards the data dir alone serves the splits."""
  cfg, expected, _ = vigor
  sources.get_builder(cfg)
  without = data_config(name="vigor", data_dir=cfg.data_dir)
  assert without.manual_dir == ""
  index = sources.get_index(without, "train")
  assert sorted(index["location_id"].tolist()) == sorted(l for _, _, l, _ in expected["train"])


def test_missing_inputs_stop_with_one_clear_error(tmp_path):
  with pytest.raises(GleamError, match="manual_dir is not set"):
    sources.get_source(data_config(name="vigor", data_dir=str(tmp_path / "d0")), "train")
  root = str(tmp_path / "VIGOR")
  expected = fx.write_vigor(root)
  city, pano, _, _ = expected["train"][1]
  os.remove(f"{root}/{city}/panorama/{pano}")
  with pytest.raises(GleamError, match=f"{city}/panorama/{pano} is missing"):
    sources.get_source(data_config(name="vigor", manual_dir=root, data_dir=str(tmp_path / "d1")), "train")
  os.remove(f"{root}/splits/Seattle/satellite_list.txt")
  with pytest.raises(GleamError, match="splits/Seattle/satellite_list.txt is missing"):
    sources.get_source(data_config(name="vigor", manual_dir=root, data_dir=str(tmp_path / "d2")), "train")
  with pytest.raises(GleamError, match="not a folder"):
    sources.get_source(data_config(name="vigor", manual_dir=str(tmp_path / "nope"), data_dir=str(tmp_path / "d3")),
                       "train")
  with pytest.raises(GleamError, match="not a builder config of vigor"):
    data_config(name="vigor", config="s64")
  with pytest.raises(GleamError, match="needs coordinates"):
    data_config(name="cvusa", sampler={"name": "gps"})


@pytest.mark.slow
def test_tiny_training_run_on_vigor_through_main(vigor, tmp_path):
  """configs/c_phase1.py:tiny,data=vigor trains, evaluates with the VIGOR protocol, writes reports."""
  cfg, _, _ = vigor
  config = load_config("c_phase1", "tiny,data=vigor,batch=8,steps=3")
  assert (config.data.name, config.eval.protocol, tuple(config.eval.splits)) == ("vigor", "vigor", ("test",))
  config.data.manual_dir = cfg.manual_dir
  config.data.data_dir = str(tmp_path / "data")
  config.lock()
  workdir = str(tmp_path / "run")
  main.run(config, workdir)
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  evals = [r for r in rows if "eval/test/panorama/hit_rate" in r]
  assert len(evals) == 1 and evals[0]["step"] == 3
  assert evals[0]["eval/test/panorama/hit_rate"] >= evals[0]["eval/test/panorama/R@1"]
  assert os.path.exists(os.path.join(workdir, "eval", "test", "summary.md"))
