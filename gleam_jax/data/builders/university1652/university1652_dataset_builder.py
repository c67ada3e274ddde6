"""`university1652`: University-1652 drone and street views paired with their building's satellite.

Layout of `manual_dir` (the published release):
  train/satellite/<building>/<building>.jpg   one satellite image per building
  train/drone/<building>/*.jpeg               54 drone views per building
  train/street/<building>/*.jpg               street views (train/google/ is not read: it is noisy)
  test/gallery_satellite/<building>/*         the 951 gallery buildings (701 queried + distractors)
  test/query_drone/<building>/*               drone queries of the 701 test buildings
  test/gallery_drone/<building>/*             drone views of all 951 buildings
  test/query_street/<building>/*              street queries
  test/query_satellite/<building>/*           satellite queries (the same 701 buildings)
(test/gallery_street/ and test/4K_drone/ are not read.) Location id = the building number.

Splits: `train` (drone views as 'uav', street views as 'ground', each with the building's
satellite) and `test`: every query_drone / query_street image is a query ('uav' / 'ground'); the
gallery_drone views of buildings nobody queries are kept as records with is_query False (they are
the drone gallery of satellite -> drone retrieval), and a gallery building without any such record
is a gallery-only satellite, so drone -> satellite ranks against all 951 satellites as the
published evaluation. The folder readers here serve SUES-200 too (same test layout).
"""
import collections

import tensorflow_datasets as tfds

from gleam_jax.data.builders import pairs
from gleam_jax.errors import GleamError

LAYOUT = "train/{satellite,drone,street}/<building>/ and test/{query_drone,gallery_drone,...}/<building>/"


def location_id(building, where):
  if not building.isdigit():
    raise GleamError(f"folder {building!r} in {where} is not a building number; the published release names "
                     "building folders by number (0001, ...).")
  return int(building)


def building_images(local, folder, what):
  """{building: [relative image paths]} of `folder`; GleamError if the folder is missing."""
  out = {}
  for building in local.subfolders(folder, what):
    location_id(building, local.path(folder))
    out[building] = [f"{folder}/{building}/{n}" for n in local.images(f"{folder}/{building}")]
  return out


def satellites(local, folder):
  """{building: relative path of its one satellite image}."""
  out = {}
  for building, files in building_images(local, folder, "one satellite image per building").items():
    if len(files) != 1:
      raise GleamError(f"{local.path(folder + '/' + building)} holds {len(files)} images; a building's "
                       "satellite folder holds exactly one.")
    out[building] = files[0]
  return out


def satellite_for(sats, building, folder, local):
  if building not in sats:
    raise GleamError(f"building {building} of {local.path(folder)} has no satellite image in the satellite "
                     "folder of the same split; restore the published release.")
  return sats[building]


def train_records(local, root, views):
  """views: [(folder name, modality)] -> [(key, fields)] pairing every view with its satellite."""
  sats = satellites(local, f"{root}/satellite")
  records = []
  for folder, modality in views:
    for building, files in building_images(local, f"{root}/{folder}", f"the {folder} views").items():
      sat = satellite_for(sats, building, f"{root}/{folder}", local)
      records += [(f, dict(query=f, satellite=sat, modality=modality, view_index=i, is_query=True,
                           location_id=location_id(building, "")))
                  for i, f in enumerate(files)]
  return records


def test_records(local, root, query_views):
  """query_views: [(query folder, modality)]; 'query_drone' also reads gallery_drone (see module doc)."""
  sats = satellites(local, f"{root}/gallery_satellite")
  records, kept = [], collections.Counter()
  for folder, modality in query_views:
    queries = building_images(local, f"{root}/{folder}", f"the {folder.replace('_', ' ')} images")
    for building, files in queries.items():
      sat = satellite_for(sats, building, f"{root}/{folder}", local)
      records += [(f, dict(query=f, satellite=sat, modality=modality, view_index=i, is_query=True,
                           location_id=location_id(building, ""))) for i, f in enumerate(files)]
      kept[building] += len(files)
    if folder != "query_drone":
      continue
    sat_queries = set(local.subfolders(f"{root}/query_satellite", "the satellite query images"))
    if sat_queries != set(queries):
      raise GleamError(f"{local.path(root + '/query_satellite')} and {local.path(root + '/query_drone')} hold "
                       f"different buildings ({len(sat_queries)} and {len(queries)}); the published release "
                       "queries the same buildings in both.")
    gallery = building_images(local, f"{root}/gallery_drone", "the drone gallery images")
    for building, files in gallery.items():
      if building in queries:
        continue  # its views are the query_drone views
      sat = satellite_for(sats, building, f"{root}/gallery_drone", local)
      records += [(f, dict(query=f, satellite=sat, modality=modality, view_index=i, is_query=False,
                           location_id=location_id(building, ""))) for i, f in enumerate(files)]
      kept[building] += len(files)
  for building, sat in sats.items():
    if not kept[building]:
      records.append((sat, dict(query=None, satellite=sat, location_id=location_id(building, ""))))
  return records


def generate(local, records):
  """The split's examples, each building's satellite stored with its first record only."""
  satellite_once = pairs.SatelliteOnce(local)
  for key, f in records:
    satellite = satellite_once(f["location_id"], f["satellite"])
    if f["query"] is None:
      yield key, pairs.gallery_only(satellite, f["location_id"])
    else:
      yield key, pairs.example(local.read(f["query"], "the query image"), satellite, f["modality"],
                               f["location_id"], view_index=f["view_index"], is_query=f["is_query"])


class Builder(pairs.PairsBuilder):
  """University-1652 drone / street -> satellite; see the module docstring."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "2.0.0": "Each building's satellite stored once per split (`satellite_here`)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="drone and street views")]

  def layout(self):
    return LAYOUT

  def split_examples(self, local):
    records = {
        "train": train_records(local, "train", [("drone", "uav"), ("street", "ground")]),
        "test": test_records(local, "test", [("query_drone", "uav"), ("query_street", "ground")]),
    }
    return {s: generate(local, r) for s, r in records.items()}


def make_builder(config, *, data_dir, manual_dir=None):
  return Builder(config=config, data_dir=data_dir, file_format="array_record", manual_dir=manual_dir)
