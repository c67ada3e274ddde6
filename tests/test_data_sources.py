"""synthetic_cvgl TFDS builder and sources: exact round trip, fields, counts, index, bad inputs."""
import glob
import os
import re
import shutil
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax.data import builders, sources, synthetic
from gleam_jax.data.builders.synthetic_cvgl import synthetic_cvgl_dataset_builder as scb
from gleam_jax.data.config import MODALITIES, data_config
from gleam_jax.errors import GleamError


def test_round_trip_equals_rendered_views_exactly(tiny_cfg):
  spec = synthetic.spec_from_name("tiny")
  per_location = 3 + spec.uav_views
  for split in ("train", "test", "test_cross_city"):
    src = sources.get_source(tiny_cfg, split)
    ids = synthetic.split_location_ids(spec, split)
    assert len(src) == len(ids) * per_location
    index = sources.get_index(tiny_cfg, split, src)
    assert sorted(set(index["location_id"].tolist())) == ids.tolist()
    counts = np.bincount(index["modality"], minlength=4)
    assert counts.tolist() == [len(ids) * spec.uav_views if m == "uav" else len(ids) for m in MODALITIES]
    # every view of two locations, exactly the rendered pixels
    for loc_id in ids[:2]:
      views = synthetic.render_location(spec, int(loc_id))
      rows = np.flatnonzero(index["location_id"] == loc_id)
      assert len(rows) == per_location
      for r in rows:
        ex = src[int(r)]
        want = views["uav"][ex["view_index"]] if ex["modality_name"] == "uav" else views[ex["modality_name"]]
        np.testing.assert_array_equal(ex["query"], want)
        np.testing.assert_array_equal(ex["satellite"], views["satellite"])
        assert ex["query"].dtype == np.uint8
        assert ex["location_id"] == loc_id and ex["index"] == r
        assert ex["city_id"] == views["city"] == index["city_id"][r]
        assert index["city"][r] == views["city_name"]
        np.testing.assert_allclose(ex["coords"], views["coords"], rtol=0, atol=0)
        np.testing.assert_array_equal(index["coords"][r], ex["coords"])
        assert MODALITIES[index["modality"][r]] == ex["modality_name"]
  assert "tensorflow" not in sys.modules


def test_index_is_cached_next_to_the_dataset(tiny_cfg):
  src = sources.get_source(tiny_cfg, "test")
  first = sources.get_index(tiny_cfg, "test", src)
  path = os.path.join(src.path, "index-test.npz")
  assert os.path.exists(path)
  again = sources.get_index(tiny_cfg, "test")
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])


def test_overrides_make_a_distinct_config():
  a = scb.SyntheticCvglConfig(preset="tiny", overrides={"seed": 3, "train_locations": 10})
  assert a.name == "tiny_seed-3_train_locations-10"
  b = scb.SyntheticCvglConfig(preset="tiny", overrides={"uav_altitude_m": (40.0, 60.0)})
  assert b.name == "tiny_uav_altitude_m-40.0-60.0"
  builder = builders.builder("synthetic_cvgl", "tiny", "/nonexistent", overrides={"seed": 3})
  assert builder.builder_config.name == "tiny_seed-3"
  assert builders.builder("synthetic_cvgl", "tiny", "/nonexistent").builder_config.name == "tiny"


def test_unknown_dataset_missing_split_impossible_sizes(tiny_cfg, tmp_path):
  with pytest.raises(GleamError, match="data.name='cvusa_typo' is not a known dataset"):
    data_config(name="cvusa_typo")
  with pytest.raises(GleamError, match="unknown dataset 'nope'"):
    builders.builder("nope", "tiny", str(tmp_path))
  with pytest.raises(GleamError, match=r"split 'validation' is not in synthetic_cvgl/tiny; its splits are"):
    sources.get_source(tiny_cfg, "validation")
  with pytest.raises(GleamError, match=r"data.query_size=\(0, 32\) is impossible"):
    data_config(query_size=(0, 32))
  with pytest.raises(GleamError, match="data.config='s99'"):
    data_config(config="s99")
  with pytest.raises(GleamError, match="sat_size=4 is not possible"):
    sources.get_source(data_config(config="tiny", data_dir=str(tmp_path), overrides={"sat_size": 4}), "train")
  with pytest.raises(GleamError, match="unknown WorldSpec field"):
    sources.get_source(data_config(config="tiny", data_dir=str(tmp_path), overrides={"sat_sise": 64}), "train")


def copy_dataset(cfg, tmp_path):
  src = sources.get_source(cfg, "train")
  rel = os.path.relpath(src.path, os.path.expanduser(cfg.data_dir))
  root = tmp_path / "data"
  shutil.copytree(src.path, root / rel)
  return data_config(**{**cfg.to_dict(), "data_dir": str(root)}), str(root / rel)


def corrupt_images(path, rows):
  """Rewrites the train shard with the first image of each record in `rows` damaged (same length)."""
  (shard,) = glob.glob(os.path.join(path, "*-train.array_record*"))
  reader = ArrayRecordReader(shard)
  records = [reader.read() for _ in range(reader.num_records())]
  reader.close()
  for i in rows:
    bad = bytearray(records[i])
    start = bad.find(b"IDAT") + 8  # inside the compressed pixels
    bad[start:start + 16] = b"\x00" * 16
    records[i] = bytes(bad)
  writer = ArrayRecordWriter(shard, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  return len(records)


def test_corrupt_image_names_the_record_and_the_fix(tiny_cfg, tmp_path):
  cfg, path = copy_dataset(tiny_cfg, tmp_path)
  corrupt_images(path, [5])
  src = sources.get_source(cfg, "train")
  src[4]  # the others still read
  with pytest.raises(GleamError, match=r"record 5 of synthetic_cvgl/tiny split 'train'.*does not decode.*delete"):
    src[5]


def test_corrupt_image_stops_the_train_stream_with_the_same_message(tiny_cfg, tmp_path):
  from gleam_jax.data import pipeline, samplers
  cfg, path = copy_dataset(tiny_cfg, tmp_path)
  corrupt_images(path, range(len(sources.get_source(cfg, "train"))))
  sampler = samplers.make_sampler(cfg, sources.get_index(cfg, "train"))
  stream = pipeline.make_train_stream(cfg, 4, sampler, 0, process_index=0, process_count=1)
  with pytest.raises(GleamError, match=r"record \d+ of synthetic_cvgl/tiny split 'train'.*does not decode.*delete"):
    next(stream)


def test_corrupt_file_names_the_record_and_the_fix(tiny_cfg, tmp_path):
  cfg, path = copy_dataset(tiny_cfg, tmp_path)
  (shard,) = glob.glob(os.path.join(path, "*-train.array_record*"))
  data = bytearray(open(shard, "rb").read())
  data[64:len(data) - 64] = bytes((b * 7 + 13) % 256 for b in data[64:len(data) - 64])
  open(shard, "wb").write(bytes(data))
  with pytest.raises(GleamError, match=r"synthetic_cvgl/tiny split 'train'.*delete .* to rebuild"):
    src = sources.get_source(cfg, "train")
    src[0]


def test_parallel_build_matches_the_renders(tmp_path, capfd):
  cfg = data_config(config="tiny", data_dir=str(tmp_path), overrides={"train_locations": 128}, build_workers=2)
  spec = synthetic.spec_from_name("tiny", train_locations=128)
  src = sources.get_source(cfg, "train")
  assert src.name == "synthetic_cvgl/tiny_train_locations-128"
  # the build says where it builds and how long it took, and nothing of downloads (TFDS's own lines);
  # its progress goes to stderr as our lines, without TFDS's bars or its warning about the version folder
  out, err = capfd.readouterr()
  lines = out.splitlines()
  progress = [line for line in err.splitlines() if line.strip()]
  assert progress and all(re.fullmatch(r"synthetic_cvgl/tiny_train_locations-128 \w+: \d+/\d+ locations, "
                                       r"[\d.]+ loc/s, ETA [\d:?]+", line) for line in progress), progress
  assert lines[0] == f"building synthetic_cvgl/tiny_train_locations-128 in {tmp_path} (first use)", lines
  assert re.fullmatch(r"built synthetic_cvgl/tiny_train_locations-128 in \d+\.\d s", lines[-1]), lines
  assert not any("download" in line.lower() for line in lines), lines
  index = sources.get_index(cfg, "train", src)
  assert len(src) == 128 * (3 + spec.uav_views)
  assert sorted(set(index["location_id"].tolist())) == list(range(128))
  for loc_id in (0, 77, 127):  # locations of different cities, so of both workers
    r = int(np.flatnonzero((index["location_id"] == loc_id) & (index["modality"] == 2))[0])
    views = synthetic.render_location(spec, loc_id)
    np.testing.assert_array_equal(src[r]["query"], views["panorama"])
    np.testing.assert_array_equal(src[r]["satellite"], views["satellite"])
  cross = sources.get_index(cfg, "test_cross_city")
  assert sorted(set(cross["location_id"].tolist())) == synthetic.split_location_ids(spec, "test_cross_city").tolist()


def test_decoded_images_are_upright_rgb():
  """A JPEG whose EXIF says 'rotate 90° to show' decodes as shown (as `retrieve` reads query files);
  16-bit grey scales to 8 bits instead of clipping to white."""
  import io
  from PIL import Image
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :20] = 255  # left half white
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: the stored image is shown turned 90° clockwise
  buffer = io.BytesIO()
  Image.fromarray(wide).save(buffer, format="JPEG", exif=exif, quality=95)
  shown = sources.decode_png(buffer.getvalue(), "x", "y")
  assert shown.shape == (40, 20, 3)
  assert shown[:15].mean() > 200 and shown[25:].mean() < 50  # the white half is now on top
  grey = np.array([[0, 32896, 65535]], np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(grey).save(buffer, format="PNG")
  np.testing.assert_array_equal(sources.decode_png(buffer.getvalue(), "x", "y")[0, :, 0], [0, 128, 255])
