"""`synthetic_cvgl`: (query view, satellite) pairs rendered by the synthetic world.

One example per (query view, satellite) pair: a location gives one streetmap, one panorama, one
ground photo and `uav_views` UAV examples, each stored with the location's satellite image.
Splits are by location: `train`, `test` (same cities, held-out locations) and `test_cross_city`
(unseen cities). Images are PNG bytes in ArrayRecord files, so reading never needs TensorFlow.

Builder configs are the world presets (tiny, s64, s128); world-spec overrides (seed, counts, ...)
make a config of their own (`tiny_seed-3_train_locations-40`), so different worlds never share files.
Locations are rendered in `build_workers` processes started once for all splits (render_examples.py).
"""
import re
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

from gleam_jax.data import builders
from gleam_jax.data import synthetic
from gleam_jax.data.builders.synthetic_cvgl import render_examples
from gleam_jax.utils.progress import RateEta, format_eta

SPLITS = ("train", "test", "test_cross_city")


def _slug(value):
  return re.sub(r"[^\w.]+", "-", str(value)).strip("-")


class SyntheticCvglConfig(tfds.core.BuilderConfig):
  """A world preset plus world-spec overrides."""

  def __init__(self, *, preset, overrides=(), **kwargs):
    overrides = tuple(sorted(dict(overrides).items()))
    name = "_".join([preset] + [f"{k}-{_slug(v)}" for k, v in overrides])
    super().__init__(name=name, description=f"synthetic world {preset!r} with overrides {dict(overrides)}", **kwargs)
    self.preset = preset
    self.overrides = overrides

  def spec(self):
    return synthetic.spec_from_name(self.preset, **dict(self.overrides))


class Builder(builders.OwnBuildLines, tfds.core.GeneratorBasedBuilder):
  """Synthetic CVGL pairs; see the module docstring."""

  VERSION = tfds.core.Version(synthetic.WORLD_VERSION)
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Locations spread over 40 m tiles; street cameras clear of trees and walls.",
      "1.2.0": "Every record stores its query camera's heading and field of view.",
      "1.3.0": "Every record also stores its camera's pitch and height and the satellite's footprint.",
  }
  BUILDER_CONFIGS = [SyntheticCvglConfig(preset=p) for p in synthetic.PRESETS]
  DEFAULT_CONFIG_NAME = "s64"

  def __init__(self, *, build_workers=2, **kwargs):
    self.build_workers = build_workers
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "query": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "satellite": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "modality": tfds.features.ClassLabel(names=synthetic.MODALITIES),
            "view_index": np.int32,
            "heading_deg": np.float32,  # the query camera's heading, clockwise from north
            "fov_deg": np.float32,  # its horizontal field of view (360: panorama, 0: map)
            "pitch_deg": np.float32,  # below the horizon (0: level street cameras, 90: the map)
            "altitude_m": np.float32,  # the camera's height above the ground (NaN: the map)
            "footprint_m": np.float32,  # the satellite's ground width
            "location_id": np.int64,
            "city": tfds.features.Text(),
            "city_id": np.int32,
            "coords": tfds.features.Tensor(shape=(2,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
        }),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _download_and_prepare(self, *args, **kwargs):
    config = self.builder_config
    spec = config.spec()
    ids = {split: synthetic.split_location_ids(spec, split) for split in SPLITS}
    self._renderer = render_examples.ParallelRenderer(config.preset, config.overrides, ids, self.build_workers)
    tfds.display_progress_bar(False)  # the progress lines of `_generate_examples` instead of TFDS's bars
    try:
      return super()._download_and_prepare(*args, **kwargs)
    finally:
      tfds.display_progress_bar(True)
      self._renderer.close()
      self._renderer = None

  def _generate_examples(self, split):
    config = self.builder_config
    total = len(self._renderer.split_ids[split])
    progress = RateEta(total)
    last_print = time.perf_counter()
    for done, examples in enumerate(self._renderer.split(split), 1):
      yield from examples
      now = time.perf_counter()
      if now - last_print > 5 or done == total:
        rate, eta = progress.update(done)
        print(f"synthetic_cvgl/{config.name} {split}: {done}/{total} locations, "
              f"{rate:.1f} loc/s, ETA {format_eta(eta)}", file=sys.stderr, flush=True)
        last_print = now


def make_builder(preset, *, overrides=None, data_dir, build_workers=2):
  config = SyntheticCvglConfig(preset=preset, overrides=overrides or {})
  if not config.overrides:
    config = preset  # the registered config object
  return Builder(config=config, data_dir=data_dir, file_format="array_record", build_workers=build_workers)
