"""`cvusa`: CVUSA street-view panoramas paired with their satellite image, read from a local copy.

Layout of `manual_dir` (the subset used by CVM-Net, SAFA and Sample4Geo):
  splits/train-19zl.csv, splits/val-19zl.csv    lines `bingmap/19/<n>.jpg,streetview/panos/<n>.jpg,...`
  bingmap/19/<n>.jpg                            satellite images
  streetview/panos/<n>.jpg                      panoramas
Splits: `train` (train-19zl.csv, 35,532 pairs) and `test` (val-19zl.csv, 8,884 pairs, the split
every paper reports). Location id = the number in the satellite file name (the line number where
the name has none).
"""
import os

import tensorflow_datasets as tfds

from gleam_jax.data.builders import pairs
from gleam_jax.errors import GleamError

SPLIT_FILES = {"train": "splits/train-19zl.csv", "test": "splits/val-19zl.csv"}
LAYOUT = "splits/{train,val}-19zl.csv, bingmap/19/ and streetview/panos/"


def split_records(local, split):
  """[(key, panorama path, satellite path, location id)] (`pairs.panorama_pairs`), every file checked."""
  listing = SPLIT_FILES[split]
  records = []
  with open(local.require(listing, f"the {split} pairs (satellite,panorama,annotation per line)")) as f:
    lines = [line.strip() for line in f if line.strip()]
  for n, line in enumerate(lines):
    fields = line.split(",")
    if len(fields) < 2:
      raise GleamError(f"cvusa: line {n + 1} of {local.path(listing)} is {line!r}; a line is "
                       "'bingmap/19/<n>.jpg,streetview/panos/<n>.jpg,annotations/<n>.png'.")
    sat, pano = fields[0].strip(), fields[1].strip()
    stem = os.path.splitext(os.path.basename(sat))[0]
    pano_path = local.require(pano, "the panorama")
    # the key is the csv's relative path: TFDS orders records by the key's hash, so an absolute one
    # would make the order (and the batches) depend on where manual_dir lies
    records.append((pano, pano_path, local.require(sat, "the satellite image"), int(stem) if stem.isdigit() else n))
  return records


class Builder(pairs.PairsBuilder):
  """CVUSA panorama -> satellite pairs; see the module docstring."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Records carry `satellite_here` (always True: every record stores its satellite); "
                            "keyed by the csv's relative paths (the record order no longer depends on manual_dir)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="CVM-Net subset, zoom 19")]

  def layout(self):
    return LAYOUT

  def split_examples(self, local):
    records = {s: split_records(local, s) for s in SPLIT_FILES}
    return {s: pairs.panorama_pairs(r, "cvusa") for s, r in records.items()}


def make_builder(config, *, data_dir, manual_dir=None):
  return Builder(config=config, data_dir=data_dir, file_format="array_record", manual_dir=manual_dir)
