"""Random-access sources over built TFDS datasets, and their metadata index.

`get_source(data_cfg, split)` builds the dataset on first use (under `data.data_dir`, with progress
lines showing rate and ETA) and returns a `Source`: `source[i]` is one decoded example
(`query`, `satellite` uint8 HWC; `modality`, `modality_name`, `location_id`, `view_index`,
`city_id`, `coords`, `index`). Images are decoded here with PIL, so an undecodable image stops with
a GleamError naming the record and the fix.

`get_index(data_cfg, split)` gives every record's metadata as NumPy arrays without decoding any
image (for samplers and the evaluation protocol); it is cached as `index-<split>.npz` next to the
dataset's files. The published datasets add `is_query`, `semi_positive_ids` and `satellite_here`
(builders/pairs.py); for synthetic_cvgl every record is a query and stores its satellite.
"""
import fcntl
import hashlib
import io
import json
import os
import threading
import time

from absl import logging
from etils import epath
import numpy as np
from PIL import Image, ImageOps

from gleam_jax.data import builders
from gleam_jax.data.augment import query_frame
from gleam_jax.data.config import MODALITIES, data_dir as resolve_data_dir, validate, world_overrides
from gleam_jax.data.photo_camera import open_image
from gleam_jax.errors import GleamError, make_dir

IMAGE_KEYS = ("query", "satellite")
INDEX_KEYS = ("location_id", "modality", "view_index", "city_id", "coords")
OPTIONAL_INDEX_KEYS = ("is_query", "semi_positive_ids", "satellite_here")  # in the published datasets' records
BUILD_INFO = "gleam_build.json"


def _rebuild_hint(path):
  return f"the dataset files are damaged: delete {path} and run again to rebuild it"


def _make_builder(data_cfg, root):
  overrides = world_overrides(data_cfg)
  try:
    return builders.builder(data_cfg.name, data_cfg.config, root, overrides=overrides,
                            build_workers=data_cfg.build_workers, manual_dir=data_cfg.manual_dir)
  except (TypeError, ValueError) as e:
    raise GleamError(f"data.overrides={overrides} do not make a valid {data_cfg.name}/{data_cfg.config} "
                     f"dataset ({e}); fix or remove them.") from None


def get_builder(data_cfg):
  """The TFDS builder named by the config, built if not yet there (once, under a file lock for a
  local data_dir; build a dataset on a URL data_dir from one process before starting many)."""
  validate(data_cfg)
  root = resolve_data_dir(data_cfg)
  builder = _make_builder(data_cfg, root)
  if _prepared(builder):
    return builder
  if "://" in root:
    _build(data_cfg, builder, root)
  else:
    make_dir(root, "data.data_dir")
    with open(os.path.join(root, f".{data_cfg.name}-{builder.builder_config.name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same dataset
      if not _prepared(builder):
        _build(data_cfg, builder, root)
  return _make_builder(data_cfg, root)  # reads the dataset info from disk, whoever built it


def _prepared(builder):
  """`builder.is_prepared()`, without its warning about the version folder that TFDS makes before a
  first build ("Variant folder ... has no dataset_info.json")."""
  return (epath.Path(builder.data_path) / "dataset_info.json").exists() and builder.is_prepared()


def _build(data_cfg, builder, root):
  print(f"building {data_cfg.name}/{builder.builder_config.name} in {root} (first use)", flush=True)
  start = time.perf_counter()
  builder.download_and_prepare()
  seconds = time.perf_counter() - start
  info = {"build_seconds": seconds, "build_workers": data_cfg.build_workers}
  (epath.Path(builder.data_dir) / BUILD_INFO).write_text(json.dumps(info))
  print(f"built {data_cfg.name}/{builder.builder_config.name} in {seconds:.1f} s", flush=True)


def build_info(builder):
  path = epath.Path(builder.data_dir) / BUILD_INFO
  return json.loads(path.read_text()) if path.exists() else {}


def upright_rgb(image):
  """A PIL image as uint8 (h, w, 3) RGB, turned upright as its EXIF orientation says it is shown (the
  same for training records and for `retrieve`'s query files); 16-bit grey is scaled to 8 bits (PIL's
  RGB conversion would clip it to white)."""
  ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
  if image.mode in ("I", "I;16", "I;16B", "I;16L"):
    grey = np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
  return np.asarray(image.convert("RGB"))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(folder, flag):
  """(the image files in `folder`, sorted; how many other files it holds)."""
  if not os.path.isdir(folder):
    raise GleamError(f"{flag}={folder} is not a folder of images.")
  names = sorted(os.listdir(folder))
  files = [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
  skipped = len([n for n in names if os.path.isfile(os.path.join(folder, n))]) - len(files)
  if not files:
    raise GleamError(f"{flag}={folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
  return files, skipped


def read_image(path):
  """The image file at `path` upright (as its EXIF orientation says it is shown), RGB (`upright_rgb`);
  one GleamError naming the file if it cannot be read."""
  with open_image(path) as image:
    return upright_rgb(image)


def decode_png(data, what, fix):
  """Encoded image bytes -> uint8 (h, w, 3) upright RGB (`upright_rgb`); GleamError naming `what` and
  `fix` if they do not decode."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return upright_rgb(im)
  except Exception as e:  # PIL raises many types for broken files
    raise GleamError(f"{what}: the image does not decode ({type(e).__name__}: {e}); {fix}.") from None


class Source:
  """Random access to one split; picklable, so grain worker processes can hold it."""

  def __init__(self, builder, split):
    import tensorflow_datasets as tfds
    splits = list(builder.info.splits.keys())
    if split not in splits:
      raise GleamError(f"split {split!r} is not in {builder.name}/{builder.builder_config.name}; "
                       f"its splits are {sorted(splits)}.")
    self.name = f"{builder.name}/{builder.builder_config.name}"
    self.path = builder.data_dir
    self.split = split
    self._satellite_records = None  # see _satellite_record
    try:
      self._records = builder.as_data_source(split, decoders={k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS})
    except Exception as e:
      raise GleamError(f"{self.name} split {split!r} cannot be opened ({type(e).__name__}: {e}); "
                       f"{_rebuild_hint(self.path)}.") from None

  def __len__(self):
    return len(self._records)

  def _where(self, i):
    return f"record {i} of {self.name} split {self.split!r} ({self.path})"

  def raw(self, i):
    """Record i with its images still encoded."""
    if not 0 <= i < len(self):
      raise IndexError(f"{self._where(i)}: index out of range (the split has {len(self)} records)")
    try:
      return self._records[int(i)]
    except Exception as e:
      raise GleamError(f"{self._where(i)} cannot be read ({type(e).__name__}: {e}); {_rebuild_hint(self.path)}.") from None

  def image(self, i, key):
    data = self.satellite_bytes(i) if key == "satellite" else self.raw(i)[key]
    return decode_png(data, f"{self._where(i)}, image {key!r}", _rebuild_hint(self.path))

  def satellite_bytes(self, i, raw=None):
    """The encoded satellite of record i: its own, or, where the dataset stores each location's
    satellite once (`satellite_here` False, builders/pairs.py), that of the location's record holding it."""
    r = self.raw(i) if raw is None else raw
    if bool(r.get("satellite_here", True)):
      return r["satellite"]
    return self.raw(self._satellite_record(int(r["location_id"]), i))["satellite"]

  def _satellite_record(self, location_id, i):
    if self._satellite_records is None:  # location id -> its record holding the satellite, from the index
      index = index_of(self)
      here = np.flatnonzero(index["satellite_here"])
      self._satellite_records = dict(zip(index["location_id"][here].tolist(), here.tolist()))
    record = self._satellite_records.get(location_id)
    if record is None:
      raise GleamError(f"{self._where(i)}: no record of location {location_id} stores its satellite; "
                       f"{_rebuild_hint(self.path)}.")
    return record

  def __getitem__(self, i):
    return self.example(i)

  def example(self, i, raw=None, satellite=None):
    """Record i decoded; `raw`: the record if already read, `satellite`: its satellite if already
    decoded."""
    r = self.raw(i) if raw is None else raw
    where, fix = self._where(i), _rebuild_hint(self.path)
    if satellite is None:
      satellite = decode_png(self.satellite_bytes(i, r), f"{where}, image 'satellite'", fix)
    return {
        "query": decode_png(r["query"], f"{where}, image 'query'", fix),
        "satellite": satellite,
        "modality": int(r["modality"]),
        "modality_name": MODALITIES[int(r["modality"])],
        "location_id": int(r["location_id"]),
        "view_index": int(r["view_index"]),
        **query_camera(r),
        "city_id": int(r["city_id"]),
        "coords": np.asarray(r["coords"], np.float64),
        "index": int(i),
    }


class DecodedCache:
  """A Source whose decoded records stay in memory, up to `budget_mb`: each record is decoded once,
  and later reads return the same arrays (read-only, so no reader can change what the next one
  sees). Records of the same satellite file (the views of one location, whether each stores it or
  one record of the location does) share one decoded satellite, decoded once: University-1652's 54
  drone views of a building hold one satellite, not 54.
  When the budget is full, further records are decoded on every read, and that is logged once. Not
  pickled with its records: a grain worker process starts its own.

  `query_frame` (an `augment.QueryFrame`, or None) is applied to each record as it is decoded, so a
  query warped into another frame (ground photos into the panorama frame, UAV views into the
  satellite frame) is warped once and kept warped, not warped again every epoch; a stream reading
  this source then skips its own warp."""

  def __init__(self, source, budget_mb, query_frame=None):
    self.source = source
    self.name, self.path, self.split = source.name, source.path, source.split
    self.budget_bytes = int(budget_mb) * 2**20
    self.query_frame = query_frame
    self._records, self._satellites, self._bytes, self._full = {}, {}, 0, False
    self._lock = threading.Lock()  # grain's read threads: decode outside it, keep the first result

  def __len__(self):
    return len(self.source)

  def raw(self, i):
    return self.source.raw(i)

  def image(self, i, key):
    return self.source.image(i, key)

  def __getitem__(self, i):
    record = self._records.get(int(i))
    if record is None:
      raw = self.source.raw(i)
      key = hashlib.blake2b(self.source.satellite_bytes(i, raw), digest_size=16).digest()  # the file's digest
      satellite = self._satellites.get(key)
      record = self.source.example(i, raw, satellite)
      if self.query_frame is not None:
        record = self.query_frame(record)
      record = self._keep(int(i), key, record)
    return dict(record)

  def _keep(self, i, key, record):
    """The record the cache holds for `i`: this one if it fits, or the one another thread kept first."""
    with self._lock:
      if i in self._records:
        return self._records[i]
      shared = self._satellites.get(key)
      if shared is not None:  # decoded meanwhile by another view of the location: hold one copy
        record["satellite"] = shared
      size = record["query"].nbytes + (record["satellite"].nbytes if shared is None else 0)
      if self._bytes + size <= self.budget_bytes:
        for k in IMAGE_KEYS:
          record[k].flags.writeable = False
        self._records[i] = record
        self._satellites.setdefault(key, record["satellite"])
        self._bytes += size
      elif not self._full:
        self._full = True
        logging.warning("data.decoded_cache_mb=%d is full after %d of %d records of %s; the rest are "
                        "decoded on every read (raise it to keep them all).", self.budget_bytes >> 20,
                        len(self._records), len(self), self.name)
      return record

  def __getstate__(self):
    return {**self.__dict__, "_records": {}, "_satellites": {}, "_bytes": 0, "_full": False, "_lock": None}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())


CAMERA_KEYS = ("heading_deg", "fov_deg", "pitch_deg", "altitude_m", "footprint_m")


def query_camera(record):
  """The record's query camera: heading_deg (clockwise from north), fov_deg (horizontal), pitch_deg
  (below the horizon), altitude_m (above the ground), and footprint_m, the satellite's ground width;
  NaN where the dataset does not record them."""
  return {k: float(record[k]) if k in record else float("nan") for k in CAMERA_KEYS}


def get_source(data_cfg, split):
  return Source(get_builder(data_cfg), split)


def get_train_source(data_cfg):
  """The training split's source, decoded records kept in memory per `data.decoded_cache_mb`, with
  their queries in the frame `data.ground_frame` / `data.uav_frame` name."""
  source = get_source(data_cfg, data_cfg.train_split)
  budget = int(data_cfg.get("decoded_cache_mb", 0) or 0)
  return DecodedCache(source, budget, query_frame(data_cfg)) if budget else source


def read_index(source):
  """Metadata arrays of every record (no image decoding)."""
  n = len(source)
  out = {k: [] for k in INDEX_KEYS + OPTIONAL_INDEX_KEYS + ("city",)}
  for i in range(n):
    r = source.raw(i)
    for k in INDEX_KEYS + tuple(k for k in OPTIONAL_INDEX_KEYS if k in r):
      out[k].append(r[k])
    out["city"].append(r["city"].decode() if isinstance(r["city"], bytes) else str(r["city"]))
  index = {
      "location_id": np.asarray(out["location_id"], np.int64).reshape(n),
      "modality": np.asarray(out["modality"], np.int32).reshape(n),
      "view_index": np.asarray(out["view_index"], np.int32).reshape(n),
      "city_id": np.asarray(out["city_id"], np.int32).reshape(n),
      "coords": np.asarray(out["coords"], np.float64).reshape(n, 2),
      "city": np.asarray(out["city"], dtype=str).reshape(n),
      "is_query": np.ones(n, bool),
  }
  if len(out["is_query"]) == n:
    index["is_query"] = np.asarray(out["is_query"], bool).reshape(n)
  if len(out["semi_positive_ids"]) == n:
    index["semi_positive_ids"] = np.asarray(out["semi_positive_ids"], np.int64).reshape(n, -1)
  index["satellite_here"] = (np.asarray(out["satellite_here"], bool).reshape(n) if len(out["satellite_here"]) == n
                             else np.ones(n, bool))
  return index


def get_index(data_cfg, split, source=None):
  """Metadata of `split` (dict of arrays, one row per record), cached next to the dataset."""
  return index_of(source or get_source(data_cfg, split))


def index_of(source):
  """`get_index` of an open source."""
  path = epath.Path(source.path) / f"index-{source.split}.npz"
  if path.exists():
    with np.load(io.BytesIO(path.read_bytes())) as z:
      index = {k: z[k] for k in z.files}
    if len(index["location_id"]) == len(source):
      return index
  index = read_index(source)
  buffer = io.BytesIO()
  np.savez(buffer, **index)
  tmp = path.parent / f"{path.name}.{os.getpid()}.tmp"
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # another process may have written it meanwhile: same content
  return index
