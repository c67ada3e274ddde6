"""`sues200`: SUES-200 drone views paired with their place's satellite image, one altitude per
builder config ('150', '200', '250', '300'), as the published benchmark trains and tests.

Layout of `manual_dir` (the folder `script/split_datasets.py` of the release writes):
  Training/<altitude>/drone/<place>/*.jpg         Training/<altitude>/satellite/<place>/0.png
  Testing/<altitude>/query_drone/<place>/*        Testing/<altitude>/query_satellite/<place>/*
  Testing/<altitude>/gallery_drone/<place>/*      Testing/<altitude>/gallery_satellite/<place>/*
The galleries hold all 200 places (the 120 training places are distractors). Location id = the
place number. Splits `train` and `test` as University-1652's (same readers, drone views only).
"""
import tensorflow_datasets as tfds

from gleam_jax.data.builders import pairs
from gleam_jax.data.builders.university1652 import university1652_dataset_builder as university

ALTITUDES = ("150", "200", "250", "300")
LAYOUT = "Training/<altitude>/{drone,satellite}/<place>/ and Testing/<altitude>/{query,gallery}_{drone,satellite}/<place>/"


class Builder(pairs.PairsBuilder):
  """SUES-200 drone -> satellite at one altitude; see the module docstring."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Each place's satellite stored once per split (`satellite_here`)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=a, description=f"drone views at {a} m") for a in ALTITUDES]
  DEFAULT_CONFIG_NAME = "150"

  def layout(self):
    return LAYOUT

  def split_examples(self, local):
    altitude = self.builder_config.name
    records = {
        "train": university.train_records(local, f"Training/{altitude}", [("drone", "uav")]),
        "test": university.test_records(local, f"Testing/{altitude}", [("query_drone", "uav")]),
    }
    return {s: university.generate(local, r) for s, r in records.items()}


def make_builder(config, *, data_dir, manual_dir=None):
  return Builder(config=config, data_dir=data_dir, file_format="array_record", manual_dir=manual_dir)
