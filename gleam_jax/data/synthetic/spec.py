"""What a synthetic world is: its size, its cities, its splits and the image sizes of its views.

Location ids are global ints: `[0, train)` are train locations, then `test_locations` test
locations (same cities as train, different places: VIGOR's same-area split), then
`cross_city_locations` locations in the `cross_city` held-out cities (VIGOR's cross-area split).
"""
import dataclasses

import numpy as np

from gleam_jax.errors import GleamError

# The version of the renders. Bump it with any change that alters a rendered pixel or a label:
# it is the version of the `synthetic_cvgl` dataset, so a dataset built by older code is not reused.
WORLD_VERSION = "1.3.0"

MODALITIES = ("uav", "streetmap", "panorama", "ground")
VIEWS = ("satellite",) + MODALITIES
SPLITS = ("train", "test", "test_cross_city")

MAX_IMAGE_SIZE = 1024  # pixels on a side (panorama: its height); larger renders are a typo
MAX_LOCATIONS = 10_000_000
VIEW_MARGIN_M = 160.0  # a location lies this far inside its city raster, so every view stays inside


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """A procedural world. Every render depends only on (spec, location_id)."""
  seed: int = 0
  num_cities: int = 6
  cross_city: int = 1  # the last `cross_city` cities are held out for the cross-city split
  train_locations: int = 4000
  test_locations: int = 1000
  cross_city_locations: int = 500
  sat_size: int = 64  # satellite and streetmap are sat_size x sat_size
  query_size: int = 64  # ground and uav views are query_size x query_size
  pano_height: int = 64  # the panorama is pano_height x (2 * pano_height)
  uav_views: int = 3
  footprint_m: float = 128.0  # ground extent of the satellite and streetmap tiles
  city_size_m: int = 1600  # each city is a square raster of 1 m cells
  camera_height_m: float = 2.0  # panorama and ground cameras
  ground_fov_deg: float = 90.0
  uav_fov_deg: float = 60.0
  uav_altitude_m: tuple = (45.0, 80.0)
  uav_radius_m: tuple = (45.0, 75.0)  # horizontal distance of the drone from the location

  def __post_init__(self):
    _check_int(self, "seed", 0, 2**63 - 1)
    _check_int(self, "num_cities", 2, 64)
    _check_int(self, "cross_city", 1, self.num_cities - 1,
               hint=f"at least 1 and fewer than num_cities={self.num_cities}")
    for name in ("train_locations", "test_locations", "cross_city_locations"):
      _check_int(self, name, 0, MAX_LOCATIONS)
    for name in ("sat_size", "query_size", "pano_height"):
      _check_int(self, name, 8, MAX_IMAGE_SIZE,
                 hint=("the panorama is pano_height x 2*pano_height, so 8 <= pano_height <= "
                       f"{MAX_IMAGE_SIZE} (width <= {2 * MAX_IMAGE_SIZE})") if name == "pano_height" else None)
    _check_int(self, "uav_views", 1, 64)
    _check_int(self, "city_size_m", 256, 8192)
    _check_float(self, "footprint_m", 16.0, 2 * VIEW_MARGIN_M)
    _check_float(self, "camera_height_m", 0.5, 20.0)
    _check_float(self, "ground_fov_deg", 10.0, 170.0)
    _check_float(self, "uav_fov_deg", 10.0, 170.0)
    for name in ("uav_altitude_m", "uav_radius_m"):
      value = getattr(self, name)
      if isinstance(value, list):  # as it comes from a config file
        value = tuple(value)
        object.__setattr__(self, name, value)
      if (not isinstance(value, tuple) or len(value) != 2
          or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
          or not 5.0 <= value[0] <= value[1] <= 150.0):
        raise GleamError(f"WorldSpec.{name}={value!r}: give a tuple (low, high) of metres with "
                         "5 <= low <= high <= 150.")
    if self.city_size_m < 2 * VIEW_MARGIN_M + 64:
      raise GleamError(f"WorldSpec.city_size_m={self.city_size_m} leaves no room for locations: "
                       f"use at least {int(2 * VIEW_MARGIN_M + 64)}.")

  @property
  def pano_width(self):
    return 2 * self.pano_height

  @property
  def same_area_cities(self):
    return self.num_cities - self.cross_city

  @property
  def num_locations(self):
    return self.train_locations + self.test_locations + self.cross_city_locations


def _check_int(spec, name, low, high, hint=None):
  value = getattr(spec, name)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
    raise GleamError(f"WorldSpec.{name}={value!r} is not possible: "
                     f"{hint or f'give an integer with {low} <= {name} <= {high}'}.")


def _check_float(spec, name, low, high):
  value = getattr(spec, name)
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value <= high:
    raise GleamError(f"WorldSpec.{name}={value!r} is not possible: give a number with "
                     f"{low} <= {name} <= {high}.")


PRESETS = {
    # For tests: renders in a few seconds.
    "tiny": WorldSpec(num_cities=3, cross_city=1, train_locations=24, test_locations=12,
                      cross_city_locations=8, sat_size=32, query_size=32, pano_height=32,
                      uav_views=2, city_size_m=512),
    # The default: 64 px tiles and queries, 64 x 128 panoramas.
    "s64": WorldSpec(),
    "s128": WorldSpec(sat_size=128, query_size=128, pano_height=128),
}
DEFAULT_PRESET = "s64"


def spec_from_name(name, **overrides):
  """The preset `name` ('tiny', 's64', 's128') with fields replaced by `overrides`."""
  if name not in PRESETS:
    raise GleamError(f"unknown synthetic world preset {name!r}: use one of {sorted(PRESETS)}.")
  fields = {f.name for f in dataclasses.fields(WorldSpec)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise GleamError(f"unknown WorldSpec field(s) {unknown}: the fields are {sorted(fields)}.")
  return dataclasses.replace(PRESETS[name], **overrides)


def split_location_ids(spec, split):
  """The global location ids of `split` ('train', 'test' or 'test_cross_city'), ascending."""
  if split not in SPLITS:
    raise GleamError(f"unknown split {split!r} of the synthetic world: use one of {list(SPLITS)}.")
  start = {"train": 0, "test": spec.train_locations,
           "test_cross_city": spec.train_locations + spec.test_locations}[split]
  size = {"train": spec.train_locations, "test": spec.test_locations,
          "test_cross_city": spec.cross_city_locations}[split]
  return np.arange(start, start + size, dtype=np.int64)


def location_split(spec, location_id):
  if isinstance(location_id, bool) or not isinstance(location_id, (int, np.integer)) or not (
      0 <= location_id < spec.num_locations):
    raise GleamError(f"location id {location_id!r} is not in this world: ids run from 0 to "
                     f"{spec.num_locations - 1}.")
  if location_id < spec.train_locations:
    return "train"
  if location_id < spec.train_locations + spec.test_locations:
    return "test"
  return "test_cross_city"


def location_city(spec, location_id):
  """Same-area cities take train and test locations in turn; held-out cities the cross-city ones."""
  return location_city_and_index(spec, location_id)[0]


def location_city_and_index(spec, location_id):
  """(city, k): the location is the k-th of its city (train first, then test; or cross-city)."""
  split = location_split(spec, location_id)
  if split == "test_cross_city":
    k = int(location_id) - spec.train_locations - spec.test_locations
    return spec.same_area_cities + k % spec.cross_city, k // spec.cross_city
  return int(location_id) % spec.same_area_cities, int(location_id) // spec.same_area_cities


def location_rng(spec, location_id, stream):
  """The random stream `stream` of one location: independent of every other location."""
  return np.random.default_rng((spec.seed, 1000 + stream, int(location_id)))
