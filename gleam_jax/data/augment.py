"""Training augmentations of (query, satellite) pairs, per example, NumPy + PIL.

Geometric augmentations are synchronised so the pair stays a true correspondence (Sample4Geo):
  * flip: both views are mirrored left-right together. A north-up satellite mirrored east-west
    and a panorama mirrored left-right still agree (azimuth a -> -a in both).
  * rotate: the satellite turns by k*90 deg counter-clockwise (np.rot90, k in 1..3); what was
    east is now up (north). The query follows where its heading is known, by its layout
    (`config.query_layout`):
      panorama -> rolled by -k*W/4 columns (azimuth grows left to right, clockwise from north), so
                  the column that showed east now sits where north was (panoramas, and ground
                  photos placed in the panorama frame);
      map      -> rotated by the same k (the streetmap is a north-up map of the same ground, and
                  so is a UAV view placed in the satellite frame);
      photo    -> unchanged: the heading relative to north is unknown to the model (UAV views
                  circle the location, ground photos face any direction), so only the satellite
                  turns, as in Sample4Geo's University-1652 recipe; with `rotate_photo=False`
                  neither turns (the satellite stays north-up for a tower that also serves
                  panoramas).
Photometric augmentations (colour jitter, blur or sharpen, coarse or grid dropout) are drawn
independently for each image. `prepare_pair` then resizes and normalises (no randomness), and is
also what evaluation applies.
"""
import numpy as np
from PIL import Image, ImageFilter

from gleam_jax.data.config import MODALITIES, query_layout, query_shape
from gleam_jax.data.panorama_frame import photo_to_panorama
from gleam_jax.data.satellite_frame import uav_to_satellite
from gleam_jax.errors import GleamError


def rotate_pair(query, satellite, layout, k):
  """Satellite rot90 by k (counter-clockwise); the query follows by its `layout` as the module
  docstring says."""
  satellite = np.rot90(satellite, k)
  if layout == "panorama":
    width = query.shape[1]
    query = np.roll(query, -int(round(k * width / 4)), axis=1)
  elif layout == "map":
    query = np.rot90(query, k)
  return np.ascontiguousarray(query), np.ascontiguousarray(satellite)


def flip_pair(query, satellite):
  return np.ascontiguousarray(query[:, ::-1]), np.ascontiguousarray(satellite[:, ::-1])


def color_jitter(image, rng, brightness, contrast, saturation):
  x = image.astype(np.float32)
  x *= rng.uniform(1 - brightness, 1 + brightness)
  mean = x.mean()
  x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
  gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
  x = (x - gray[..., None]) * rng.uniform(1 - saturation, 1 + saturation) + gray[..., None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def blur_or_sharpen(image, rng, sigma_range):
  pil = Image.fromarray(image)
  if rng.random() < 0.5:
    pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*sigma_range))))
  else:
    pil = pil.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.integers(50, 151)), threshold=0))
  return np.asarray(pil)


def coarse_dropout(image, rng, max_holes, max_size):
  """Up to `max_holes` black rectangles, each side up to max_size of the image side."""
  out = image.copy()
  h, w = image.shape[:2]
  for _ in range(int(rng.integers(1, max_holes + 1))):
    hh = int(rng.integers(1, max(2, int(max_size * h) + 1)))
    ww = int(rng.integers(1, max(2, int(max_size * w) + 1)))
    y, x = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
    out[y:y + hh, x:x + ww] = 0
  return out


def grid_dropout(image, rng, max_size):
  """Black squares on a regular grid (every other cell), random unit and offset."""
  out = image.copy()
  h, w = image.shape[:2]
  unit = int(rng.integers(max(2, int(max_size * min(h, w) / 2)), max(3, int(max_size * min(h, w)) + 1)))
  hole = max(1, unit // 2)
  oy, ox = int(rng.integers(0, unit)), int(rng.integers(0, unit))
  rows = (np.arange(h) - oy) % unit < hole  # the first `hole` of every `unit` rows from oy (and before it)
  cols = (np.arange(w) - ox) % unit < hole
  out[rows[:, None] & cols[None, :]] = 0
  return out


def photometric(image, rng, aug):
  if rng.random() < aug["color_jitter"]:
    image = color_jitter(image, rng, aug["brightness"], aug["contrast"], aug["saturation"])
  if rng.random() < aug["blur_sharpen"]:
    image = blur_or_sharpen(image, rng, aug["blur_sigma"])
  if rng.random() < aug["dropout"]:
    if rng.random() < 0.5:
      image = coarse_dropout(image, rng, aug["dropout_holes"], aug["dropout_size"])
    else:
      image = grid_dropout(image, rng, aug["dropout_size"])
  return image


def augment_pair(example, rng, aug, layout):
  """Random synchronised geometry, then independent photometric changes; uint8 in, uint8 out.
  `layout`: the query's layout ('panorama', 'map', 'photo'; see `config.query_layout`)."""
  query, satellite = example["query"], example["satellite"]
  if rng.random() < aug["flip"]:
    query, satellite = flip_pair(query, satellite)
  if rng.random() < aug["rotate"]:
    k = int(rng.integers(1, 4))
    if layout != "photo" or aug["rotate_photo"]:
      query, satellite = rotate_pair(query, satellite, layout, k)
  return dict(example, query=photometric(query, rng, aug), satellite=photometric(satellite, rng, aug))


def resize(image, size):
  """uint8 (h, w, 3) -> uint8 (H, W, 3), bilinear with antialiasing (PIL)."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def normalise(image, mean, std):
  x = image.astype(np.float32) * (1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class AugmentPair:
  """grain random-map transform (picklable for worker processes)."""

  def __init__(self, data_cfg):
    self.aug = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in data_cfg.augment.items()}
    self.layouts = {m: query_layout(data_cfg, m) for m in MODALITIES}

  def __call__(self, example, rng):
    return augment_pair(example, rng, self.aug, self.layouts[example["modality_name"]])


# The camera values a warped query is placed by (`sources.query_camera` keys), by modality.
FRAME_CAMERA_KEYS = {"ground": ("heading_deg", "fov_deg"),
                     "uav": ("heading_deg", "pitch_deg", "altitude_m", "fov_deg", "footprint_m")}


def warps_query(data_cfg, modality):
  """Whether a `modality` query is warped into another frame before use (which reads its camera):
  ground photos into the panorama frame, UAV views into the satellite frame."""
  layout = query_layout(data_cfg, modality)
  return (modality == "ground" and layout == "panorama") or (modality == "uav" and layout == "map")


def _camera_values(camera, keys, setting, fix):
  values = [float(camera.get(k, float("nan"))) for k in keys]
  if not all(np.isfinite(values)):
    got = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    raise GleamError(f"{setting} needs each query's {', '.join(keys)}, but this record has {got}: use a "
                     f"dataset that records them, or {fix}.")
  return values


def query_in_frame(image, modality, camera, data_cfg):
  """The query image in its layout's frame: with `ground_frame='panorama'` a ground photo is warped
  into the panorama frame at its heading, with `uav_frame='satellite'` a UAV view is projected onto
  the ground in the satellite frame (`camera`: `sources.query_camera` of the record); anything else
  passes unchanged."""
  if not warps_query(data_cfg, modality):
    return image
  if modality == "ground":
    heading, fov = _camera_values(camera, FRAME_CAMERA_KEYS["ground"], "data.ground_frame='panorama'",
                                  "set data.ground_frame='photo'")
    if not 0 < fov < 180:
      raise GleamError(f"data.ground_frame='panorama' needs a ground photo's field of view in (0, 180) deg, "
                       f"but this record has fov_deg={fov}.")
    return photo_to_panorama(image, heading, fov, image.shape[0])
  values = _camera_values(camera, FRAME_CAMERA_KEYS["uav"], "data.uav_frame='satellite'",
                          "set data.uav_frame='photo'")
  return uav_to_satellite(image, *values, image.shape[0])


def query_frame(data_cfg):
  """The QueryFrame that `data_cfg`'s training modalities need, or None when none is warped."""
  return QueryFrame(data_cfg) if any(warps_query(data_cfg, m) for m in data_cfg.modalities) else None


class QueryFrame:
  """grain map transform: `query_in_frame` on a training example (before augmentation, so the
  synchronised rotation of its layout applies to the warped query)."""

  def __init__(self, data_cfg):
    self.data_cfg = data_cfg

  def __call__(self, example):
    image = query_in_frame(example["query"], example["modality_name"], example, self.data_cfg)
    return example if image is example["query"] else dict(example, query=image)


class PreparePair:
  """grain map transform: resize each view to the model's size and normalise; float32 out."""

  def __init__(self, data_cfg):
    self.sizes = {m: query_shape(data_cfg, m) for m in ("uav", "streetmap", "panorama", "ground")}
    self.satellite_size = tuple(data_cfg.satellite_size)
    self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)

  def __call__(self, example):
    return {
        "query": normalise(resize(example["query"], self.sizes[example["modality_name"]]), self.mean, self.std),
        "satellite": normalise(resize(example["satellite"], self.satellite_size), self.mean, self.std),
        "modality": np.int32(example["modality"]),
        "location_id": np.int64(example["location_id"]),
    }
