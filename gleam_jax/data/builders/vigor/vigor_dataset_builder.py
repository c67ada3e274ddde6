"""`vigor`: VIGOR panoramas paired with their positive satellite, read from a local copy.

Layout of `manual_dir` (the published release):
  splits/<City>/satellite_list.txt              one satellite file name a line
  splits/<City>/same_area_balanced_{train,test}.txt
  splits/<City>/pano_label_balanced.txt         every panorama of the city (cross-area)
  <City>/panorama/<pano>.jpg                    (or Sample4Geo's ground/<City>/)
  <City>/satellite/satellite_<lat>_<lon>.png    (or Sample4Geo's satellite/<City>/)
A split line is `pano sat dx dy sat dx dy sat dx dy sat dx dy`: the positive satellite, then the
three semi-positives, each with its offset. Builder configs: `same_area` (train and test panoramas
of all four cities) and `cross_area` (train on NewYork and Seattle, test on Chicago and
SanFrancisco). Location id = position of the satellite in the four cities' satellite lists, in the
order of CITIES. The test gallery is every satellite of the test cities (those without a panorama
are gallery-only records), as the published evaluation; the hit rate needs the semi-positives.
"""
import os
import re

import tensorflow_datasets as tfds

from gleam_jax.data.builders import pairs
from gleam_jax.errors import GleamError

CITIES = ("Chicago", "NewYork", "SanFrancisco", "Seattle")
SPLIT_CITIES = {
    "same_area": {"train": CITIES, "test": CITIES},
    "cross_area": {"train": ("NewYork", "Seattle"), "test": ("Chicago", "SanFrancisco")},
}
SATELLITE_NAME = re.compile(r"^satellite_(-?[\d.]+)_(-?[\d.]+)\.\w+$")
LAYOUT = "splits/<City>/*.txt, <City>/panorama/ and <City>/satellite/ for Chicago, NewYork, SanFrancisco, Seattle"


def split_file(config, split, city):
  if config == "same_area":
    return f"splits/{city}/same_area_balanced_{split}.txt"
  return f"splits/{city}/pano_label_balanced.txt"


def satellite_coords(name, where):
  m = SATELLITE_NAME.match(name)
  if not m:
    raise GleamError(f"vigor: satellite file name {name!r} in {where} is not 'satellite_<lat>_<lon>.png' as in "
                     "the published release; restore the original file names.")
  return float(m.group(1)), float(m.group(2))


def image_folders(local, city):
  """(panorama folder, satellite folder) of `city`, relative to manual_dir."""
  for pano, sat in ((f"{city}/panorama", f"{city}/satellite"), (f"ground/{city}", f"satellite/{city}")):
    if os.path.isdir(local.path(pano)) and os.path.isdir(local.path(sat)):
      return pano, sat
  raise local.missing(f"{city}/panorama", f"the {city} panoramas (and {city}/satellite the satellites)")


def satellite_table(local):
  """{(city, name): (location id, coords)} over every city's satellite_list.txt."""
  table = {}
  for city in CITIES:
    listing = f"splits/{city}/satellite_list.txt"
    for row in local.lines(listing, f"the list of {city}'s satellite images"):
      table[(city, row[0])] = (len(table), satellite_coords(row[0], local.path(listing)))
  return table


def split_records(local, config, split, table):
  """[(key, kind, fields)] of a split, every file checked before anything is read."""
  records, used = [], set()
  for city in SPLIT_CITIES[config][split]:
    pano_dir, sat_dir = image_folders(local, city)
    listing = split_file(config, split, city)
    for n, row in enumerate(local.lines(listing, f"the {split} panoramas of {city}")):
      if len(row) < 11:
        raise GleamError(f"vigor: line {n + 1} of {local.path(listing)} has {len(row)} fields; a line is "
                         "'pano sat dx dy sat dx dy sat dx dy sat dx dy'.")
      sats = [row[1], row[4], row[7], row[10]]
      for s in sats:
        if (city, s) not in table:
          raise GleamError(f"vigor: satellite {s!r} (line {n + 1} of {local.path(listing)}) is not in "
                           f"{local.path(f'splits/{city}/satellite_list.txt')}; restore the published split files.")
      location_id, coords = table[(city, row[1])]
      used.add((city, row[1]))
      records.append((f"{city}/{row[0]}", "pair", dict(
          query=local.require(f"{pano_dir}/{row[0]}", f"the panorama {row[0]}"),
          satellite=local.require(f"{sat_dir}/{row[1]}", f"the satellite image {row[1]}"),
          location_id=location_id, coords=coords, city=city, city_id=CITIES.index(city),
          semi_positive_ids=[table[(city, s)][0] for s in sats[1:]])))
    if split == "test":  # the gallery holds every satellite of the test cities
      for (c, name), (location_id, coords) in table.items():
        if c == city and (c, name) not in used:
          records.append((f"{city}/{name}", "gallery", dict(
              satellite=local.require(f"{sat_dir}/{name}", f"the satellite image {name}"),
              location_id=location_id, coords=coords, city=city, city_id=CITIES.index(city))))
  return records


def generate(records):
  for key, kind, f in records:
    common = dict(coords=f["coords"], city=f["city"], city_id=f["city_id"])
    if kind == "pair":
      yield key, pairs.example(pairs.read_bytes(f["query"]), pairs.read_bytes(f["satellite"]), "panorama",
                               f["location_id"], semi_positive_ids=f["semi_positive_ids"], **common)
    else:
      yield key, pairs.gallery_only(pairs.read_bytes(f["satellite"]), f["location_id"], **common)


class Builder(pairs.PairsBuilder):
  """VIGOR panorama -> satellite pairs with semi-positives; see the module docstring."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Records carry `satellite_here` (always True: every record stores its satellite)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n, description=f"VIGOR {n.replace('_', '-')} split")
                     for n in SPLIT_CITIES]
  DEFAULT_CONFIG_NAME = "same_area"

  def layout(self):
    return LAYOUT

  def split_examples(self, local):
    table = satellite_table(local)
    records = {s: split_records(local, self.builder_config.name, s, table) for s in ("train", "test")}
    return {s: generate(r) for s, r in records.items()}


def make_builder(config, *, data_dir, manual_dir=None):
  return Builder(config=config, data_dir=data_dir, file_format="array_record", manual_dir=manual_dir)
