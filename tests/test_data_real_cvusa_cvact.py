"""CVUSA and CVACT builders on tiny copies with the published layouts (split CSVs; ACT_data.mat
written by scipy.io.savemat as the release stores it): pairs, splits, the 'cvusa' protocol through
the pipeline, and missing or malformed inputs."""
import os

import numpy as np
import pytest
import scipy.io

import real_data_fixtures as fx
from gleam_jax.data import pipeline, sources
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError
from gleam_jax.eval import evaluator

SIZES = dict(query_size=(16, 16), panorama_size=(16, 32), satellite_size=(16, 16), read_threads=1)


def check_pairs(cfg, split, location_ids):
  source = sources.get_source(cfg, split)
  index = sources.get_index(cfg, split, source)
  assert sorted(index["location_id"].tolist()) == sorted(location_ids)
  assert np.all(index["modality"] == MODALITIES.index("panorama")) and index["is_query"].all()
  assert np.all(np.isnan(index["coords"]))  # neither dataset publishes coordinates in these files
  for i in range(len(source)):
    ex = source[i]
    assert fx.code_of(ex["query"]) == fx.code_of(ex["satellite"]) == ex["location_id"] % fx.MAX_CODES
    assert ex["query"].shape == (16, 32, 3) and ex["satellite"].shape == (16, 16, 3)


def check_order_does_not_depend_on_where_the_copy_lies(cfg, tmp_path):
  """The record order (and so every epoch's batches) is the same when the local copy is moved."""
  moved = str(tmp_path / "elsewhere" / os.path.basename(cfg.manual_dir))
  os.renames(cfg.manual_dir, moved)
  cfg_moved = data_config(name=cfg.name, manual_dir=moved, data_dir=str(tmp_path / "data2"), **SIZES)
  for split in ("train", "test"):
    assert (sources.get_index(cfg_moved, split)["location_id"].tolist()
            == sources.get_index(cfg, split)["location_id"].tolist())


def r_at_1(cfg, workdir):
  out = evaluator.evaluate_retrieval(
      fx.code_encoder, fx.code_encoder, {"panorama": pipeline.make_eval_batches(cfg, "test", "panorama", 2)},
      pipeline.make_gallery_batches(cfg, "test", 2), protocol="cvusa", workdir=workdir, num_examples_png=0)
  return out["eval/test/panorama/R@1"]


def test_cvusa_pairs_splits_and_protocol(tmp_path):
  root = str(tmp_path / "CVUSA")
  expected = fx.write_cvusa(root)
  cfg = data_config(name="cvusa", manual_dir=root, data_dir=str(tmp_path / "data"), **SIZES)
  for split in ("train", "test"):
    check_pairs(cfg, split, expected[split])
  assert r_at_1(cfg, str(tmp_path / "eval")) == 1.0
  check_order_does_not_depend_on_where_the_copy_lies(cfg, tmp_path)


def test_cvusa_missing_and_malformed(tmp_path):
  root = str(tmp_path / "CVUSA")
  fx.write_cvusa(root)
  os.remove(f"{root}/streetview/panos/0000006.jpg")
  with pytest.raises(GleamError, match="streetview/panos/0000006.jpg is missing"):
    sources.get_source(data_config(name="cvusa", manual_dir=root, data_dir=str(tmp_path / "d1")), "test")
  with open(f"{root}/splits/val-19zl.csv", "w") as f:
    f.write("bingmap/19/0000005.jpg\n")
  with pytest.raises(GleamError, match="line 1 of .*val-19zl.csv"):
    sources.get_source(data_config(name="cvusa", manual_dir=root, data_dir=str(tmp_path / "d2")), "test")
  os.remove(f"{root}/splits/train-19zl.csv")
  with pytest.raises(GleamError, match="splits/train-19zl.csv is missing"):
    sources.get_source(data_config(name="cvusa", manual_dir=root, data_dir=str(tmp_path / "d3")), "train")


@pytest.mark.parametrize("ext,cell_ids", [(".jpg", False), (".png", True)])
def test_cvact_mat_indices_splits_and_protocol(tmp_path, ext, cell_ids):
  root = str(tmp_path / "CVACT")
  expected = fx.write_cvact(root, ext=ext, cell_ids=cell_ids)
  mat = scipy.io.loadmat(f"{root}/ACT_data.mat")  # the structure the published loaders index
  assert mat["trainSet"]["trainInd"][0][0].reshape(-1).tolist() == [i + 1 for i in expected["train"]]
  assert mat["panoIds"].dtype == (object if cell_ids else np.dtype("<U22"))
  cfg = data_config(name="cvact", manual_dir=root, data_dir=str(tmp_path / "data"), **SIZES)
  for split in ("train", "test"):
    check_pairs(cfg, split, expected[split])
  assert r_at_1(cfg, str(tmp_path / "eval")) == 1.0
  check_order_does_not_depend_on_where_the_copy_lies(cfg, tmp_path)


def test_cvact_missing_and_malformed(tmp_path):
  root = str(tmp_path / "CVACT")
  expected = fx.write_cvact(root)
  pano_id = fx.CVACT_IDS[expected["test"][0]]
  os.remove(f"{root}/ANU_data_small/satview_polish/{pano_id}_satView_polish.jpg")
  with pytest.raises(GleamError, match=f"satview_polish/{pano_id}_satView_polish.jpg is missing"):
    sources.get_source(data_config(name="cvact", manual_dir=root, data_dir=str(tmp_path / "d1")), "test")
  scipy.io.savemat(f"{root}/ACT_data.mat", {"panoIds": np.asarray(fx.CVACT_IDS),
                                            "trainSet": {"trainInd": np.asarray([[1.0]])}})
  with pytest.raises(GleamError, match="has no valSet.valInd"):
    sources.get_source(data_config(name="cvact", manual_dir=root, data_dir=str(tmp_path / "d2")), "test")
  scipy.io.savemat(f"{root}/ACT_data.mat", {"panoIds": np.asarray(fx.CVACT_IDS),
                                            "trainSet": {"trainInd": np.asarray([[99.0]])},
                                            "valSet": {"valInd": np.asarray([[1.0]])}})
  with pytest.raises(GleamError, match="points outside panoIds"):
    sources.get_source(data_config(name="cvact", manual_dir=root, data_dir=str(tmp_path / "d3")), "train")
  with open(f"{root}/ACT_data.mat", "wb") as f:
    f.write(b"not a mat file")
  with pytest.raises(GleamError, match="does not load as a .mat file"):
    sources.get_source(data_config(name="cvact", manual_dir=root, data_dir=str(tmp_path / "d4")), "train")
