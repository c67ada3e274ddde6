"""The data part of every config: `data_config(**overrides)` -> ConfigDict.

Experiment configs call it (`config.data = data_config(modalities=('panorama',))`); the pipeline
reads nothing else. `validate(data_cfg)` checks every value and raises `GleamError` naming the key
and what it may be.

Fields
  name              dataset: 'synthetic_cvgl', or a published one read from `manual_dir`: 'vigor',
                    'cvusa', 'cvact', 'university1652', 'sues200' (TFDS builders in
                    gleam_jax/data/builders/). Giving `name` also sets the dataset's default
                    `config` and `eval_splits` unless they are given too.
  config            builder config: a synthetic world preset 'tiny' (tests), 's64', 's128'; vigor
                    'same_area' | 'cross_area'; sues200 the altitude '150' | '200' | '250' | '300';
                    the others 'default'.
  manual_dir        the local copy of a published dataset (its original folder layout), read once
                    to build it into `data_dir`; not needed by synthetic_cvgl.
  overrides         world-spec overrides (e.g. {'seed': 3, 'train_locations': 400}); they give the
                    dataset a distinct config name, so different worlds never share files.
  data_dir          where datasets are built and read (default `~/gleam_data`, or $GLEAM_DATA_DIR);
                    a local path or a URL (gs://...). A dataset is built there on first use.
  build_workers     processes that render locations while building.
  train_split / eval_splits
  modalities        query modalities in training: phase 1 ('panorama',), phase 2 all four.
  modality_weights  share of each training modality in an epoch (normalised over `modalities`).
  query_size        (H, W) of uav / streetmap / ground queries fed to the model.
  panorama_size     (H, W) of panoramas, and of ground photos placed in the panorama frame.
  ground_frame      'photo': a ground photo is a square query like a UAV view; 'panorama': it is
                    warped into the panorama frame at its compass heading (`panorama_frame.py`;
                    needs datasets that record heading and field of view, as synthetic_cvgl).
  uav_frame         'photo': a UAV view is fed as it is; 'satellite': it is projected onto the
                    ground plane, north-up, in the satellite's frame (`satellite_frame.py`; needs
                    datasets that record the camera's heading, pitch, height and field of view and
                    the satellite's footprint, as synthetic_cvgl >= 1.3.0).
  satellite_size    (H, W) of satellite images.
  augment           probabilities and strengths of the training augmentations (augment.py).
  mean / std        normalisation (ImageNet, on [0, 1] pixels).
  sampler           epoch order: 'shuffle' (unique locations per batch), 'gps' (haversine
                    neighbours share a batch), 'dss' (embedding neighbours share a batch).
  worker_count      grain worker processes (0: decode in the main process with `read_threads`).
  worker_buffer_size  batches each worker prefetches.
  read_threads / read_buffer_size  grain.ReadOptions of the per-record reads (threads help where
                    decoding dominates: real datasets read with 4).
  decoded_cache_mb  training records are kept decoded in memory up to this many MB per process
                    (0: off): the first epoch decodes them, later epochs read memory (decoding is
                    most of the input pipeline's time on the synthetic world). Same batches either way.
                    Queries warped into another frame are kept warped. Each grain worker process
                    holds its own cache (workers live across epochs), so with worker_count > 0
                    memory is up to (1 + worker_count x modalities) x this.
  seed              sampler order and augmentation randomness.
"""
import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from gleam_jax.data import builders
from gleam_jax.data.synthetic.spec import MODALITIES
from gleam_jax.data.synthetic.spec import PRESETS as WORLD_PRESETS
from gleam_jax.data.synthetic.spec import WorldSpec
from gleam_jax.errors import GleamError

DATASETS = builders.NAMES
PRESETS = tuple(WORLD_PRESETS)  # builder configs of synthetic_cvgl
SAMPLERS = ("shuffle", "gps", "dss")
GROUND_FRAMES = ("photo", "panorama")
UAV_FRAMES = ("photo", "satellite")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_data_dir():
  return os.environ.get("GLEAM_DATA_DIR", "~/gleam_data")


def world_override_fields():
  """Every WorldSpec field, unset (None: the preset's value), so that a locked config takes
  `--config.data.overrides.seed=3` from the command line."""
  return ml_collections.ConfigDict({f.name: config_dict.placeholder(tuple if f.type in (tuple, "tuple") else f.type)
                                    for f in dataclasses.fields(WorldSpec)})


def world_overrides(data_cfg):
  """The WorldSpec fields the config sets (those left None take the preset's value)."""
  return {k: v for k, v in data_cfg.overrides.items() if v is not None}


def data_config(**overrides):
  """Every data field with its default; `overrides` replace top-level fields (dicts merge)."""
  c = ml_collections.ConfigDict()
  c.name = "synthetic_cvgl"
  c.config = "s64"
  c.overrides = world_override_fields()
  c.manual_dir = ""
  c.data_dir = default_data_dir()
  c.build_workers = 2

  c.train_split = "train"
  c.eval_splits = ("test", "test_cross_city")
  c.modalities = ("panorama",)
  c.modality_weights = ml_collections.ConfigDict({m: 1.0 for m in MODALITIES})

  c.query_size = (64, 64)
  c.panorama_size = (64, 128)
  c.satellite_size = (64, 64)
  c.ground_frame = "photo"
  c.uav_frame = "photo"

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.flip = 0.5  # P(flip query and satellite together)
  c.augment.rotate = 0.75  # P(rotate the satellite by k*90 deg, k in 1..3; the query follows)
  # Also rotate the satellites of 'photo' queries (UAV, ground photos), whose heading the model
  # does not know (Sample4Geo's University-1652 recipe). Off when one satellite tower also serves
  # north-aligned queries: it would be taught to ignore the orientation panoramas depend on.
  c.augment.rotate_photo = True
  c.augment.color_jitter = 0.8  # P(jitter) per image
  c.augment.brightness = 0.15
  c.augment.contrast = 0.15
  c.augment.saturation = 0.15
  c.augment.blur_sharpen = 0.3  # P(Gaussian blur or unsharp mask) per image
  c.augment.blur_sigma = (0.2, 1.2)  # in pixels of the stored image
  c.augment.dropout = 0.3  # P(coarse dropout) per image
  c.augment.dropout_holes = 4  # at most this many holes
  c.augment.dropout_size = 0.15  # hole side at most this fraction of the image side

  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD

  c.sampler = ml_collections.ConfigDict()
  c.sampler.name = "shuffle"
  c.sampler.neighbours_per_anchor = 3  # gps/dss: neighbours that join an anchor's batch
  c.sampler.neighbour_range = 8  # gps: they are drawn from the anchor's nearest this many

  c.worker_count = 0
  c.worker_buffer_size = 2
  # One thread: the per-record work holds the GIL, and on the 2-core box four threads made it
  # slower (phase 1, warm cache: 68 -> 37 ms per batch; the training job 408 -> 459 pairs/s).
  c.read_threads = 1
  c.read_buffer_size = 64
  c.decoded_cache_mb = 2048
  c.seed = 0

  for key, value in overrides.items():
    if key not in c:
      raise GleamError(f"data_config: unknown field {key!r}; the fields are {sorted(c.keys())}.")
    if isinstance(c[key], ml_collections.ConfigDict) and isinstance(value, dict):
      c[key].update({k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})  # JSON lists
    else:
      c[key] = value
  if "name" in overrides and c.name in builders.REAL:
    if "config" not in overrides:
      c.config = builders.REAL[c.name]["configs"][0]
    if "eval_splits" not in overrides:
      c.eval_splits = ("test",)
  validate(c)
  return c


def builder_configs(name):
  """The builder configs dataset `name` accepts as data.config."""
  return builders.REAL[name]["configs"] if name in builders.REAL else PRESETS


def _size(c, key):
  v = c[key]
  if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and x >= 8 for x in v)):
    raise GleamError(f"data.{key}={v!r} is impossible: it must be (height, width), two ints >= 8.")


def _prob(c, key):
  v = c.augment[key]
  if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
    raise GleamError(f"data.augment.{key}={v!r}: it must be a probability in [0, 1].")


def validate(c):
  """Raises GleamError for the first bad value, naming the key and the allowed values."""
  if c.name not in DATASETS:
    raise GleamError(f"data.name={c.name!r} is not a known dataset; choose one of {DATASETS}.")
  if c.config not in builder_configs(c.name):
    raise GleamError(f"data.config={c.config!r} is not a builder config of {c.name}; "
                     f"choose one of {builder_configs(c.name)}.")
  if not isinstance(c.build_workers, int) or c.build_workers < 1:
    raise GleamError(f"data.build_workers={c.build_workers!r}: it must be an int >= 1.")
  mods = tuple(c.modalities)
  if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
    raise GleamError(f"data.modalities={mods!r}: it must be a non-empty subset of {MODALITIES} without repeats.")
  for m in mods:
    w = c.modality_weights.get(m)
    if not isinstance(w, (int, float)) or w <= 0:
      raise GleamError(f"data.modality_weights.{m}={w!r}: every training modality needs a weight > 0.")
  for key in ("query_size", "panorama_size", "satellite_size"):
    _size(c, key)
  if c.ground_frame not in GROUND_FRAMES:
    raise GleamError(f"data.ground_frame={c.ground_frame!r}; choose one of {GROUND_FRAMES}.")
  if c.uav_frame not in UAV_FRAMES:
    raise GleamError(f"data.uav_frame={c.uav_frame!r}; choose one of {UAV_FRAMES}.")
  for key in ("flip", "rotate", "color_jitter", "blur_sharpen", "dropout"):
    _prob(c, key)
  if not isinstance(c.augment.rotate_photo, bool):
    raise GleamError(f"data.augment.rotate_photo={c.augment.rotate_photo!r}: it must be True or False.")
  if not 0.0 < c.augment.dropout_size <= 0.5:
    raise GleamError(f"data.augment.dropout_size={c.augment.dropout_size!r}: it must be in (0, 0.5].")
  lo, hi = c.augment.blur_sigma
  if not 0.0 < lo <= hi:
    raise GleamError(f"data.augment.blur_sigma={tuple(c.augment.blur_sigma)!r}: it must be (low, high) with 0 < low <= high.")
  if len(c.mean) != 3 or len(c.std) != 3 or any(s <= 0 for s in c.std):
    raise GleamError(f"data.mean/std={tuple(c.mean)!r}/{tuple(c.std)!r}: three channel values each, std > 0.")
  if c.sampler.name not in SAMPLERS:
    raise GleamError(f"data.sampler.name={c.sampler.name!r}; choose one of {SAMPLERS}.")
  if c.sampler.name == "gps" and not builders.REAL.get(c.name, {}).get("coords", True):
    raise GleamError(f"data.sampler.name='gps' needs coordinates, which {c.name} does not publish; "
                     "use 'shuffle' or 'dss'.")
  if c.sampler.neighbours_per_anchor < 0 or c.sampler.neighbour_range < c.sampler.neighbours_per_anchor:
    raise GleamError("data.sampler: need 0 <= neighbours_per_anchor <= neighbour_range, got "
                     f"{c.sampler.neighbours_per_anchor} and {c.sampler.neighbour_range}.")
  for key in ("worker_count", "read_threads", "worker_buffer_size", "read_buffer_size", "decoded_cache_mb"):
    low = 0 if key in ("worker_count", "decoded_cache_mb") else 1
    if not isinstance(c[key], int) or c[key] < low:
      raise GleamError(f"data.{key}={c[key]!r}: it must be an int >= {low}.")
  return c


def query_layout(data_cfg, modality):
  """How a query of `modality` is laid out: 'panorama' (equirectangular, column 0 north), 'map'
  (north-up, orthographic: street maps, and UAV views in the satellite frame) or 'photo' (a pinhole
  view, heading unknown to the model)."""
  if modality == "panorama" or (modality == "ground" and data_cfg.get("ground_frame") == "panorama"):
    return "panorama"
  if modality == "streetmap" or (modality == "uav" and data_cfg.get("uav_frame") == "satellite"):
    return "map"
  return "photo"


def query_shape(data_cfg, modality):
  """(H, W) a query of `modality` is resized to, in training and in evaluation alike."""
  if query_layout(data_cfg, modality) == "panorama":
    return tuple(data_cfg.panorama_size)
  return tuple(data_cfg.query_size)


def data_dir(data_cfg):
  """Absolute local path, or a URL such as gs://bucket/gleam_data as given."""
  if "://" in data_cfg.data_dir:
    return data_cfg.data_dir
  return os.path.abspath(os.path.expanduser(data_cfg.data_dir))
