"""What the builders of the published CVGL datasets share: the feature schema, the local copy
(`manual_dir`) they read, and file reading that names the missing thing.

Every example is one (query image, satellite image) pair in the schema of `synthetic_cvgl`
(`query`, `satellite`, `modality`, `view_index`, `location_id`, `city`, `city_id`, `coords`), plus
  is_query            False for a gallery-only record: a satellite that must be in the evaluation
                      gallery (VIGOR's satellites without a panorama of the split, University-1652's
                      and SUES-200's distractor buildings) but is no query; such a record's `query` is
                      a 1x1 placeholder, and training splits hold none.
  semi_positive_ids   (3,) location ids of VIGOR's semi-positive satellites, -1 elsewhere.
  satellite_here      False where the record's `satellite` is a 1x1 placeholder and the location's
                      satellite is stored in the one record of the same location and split that has
                      it True (`sources.Source` resolves it): a dataset with many views per
                      location (University-1652: 54 drone views of a building) stores each
                      satellite once (`SatelliteOnce`), not with every view.
`coords` is (latitude, longitude) in degrees where the dataset publishes them (VIGOR), else NaN.
Images are the dataset's own encoded files (JPEG or PNG bytes), stored as they are.
"""
import abc
import io
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from gleam_jax.data import builders
from gleam_jax.data.config import MODALITIES
from gleam_jax.errors import GleamError

NUM_SEMI_POSITIVES = 3
NO_COORDS = (float("nan"), float("nan"))


def _placeholder_png():
  buffer = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buffer, format="PNG")
  return buffer.getvalue()


PLACEHOLDER = _placeholder_png()


def features():
  image = lambda: tfds.features.Image(shape=(None, None, 3), encoding_format=None)
  return tfds.features.FeaturesDict({
      "query": image(),
      "satellite": image(),
      "modality": tfds.features.ClassLabel(names=MODALITIES),
      "view_index": np.int32,
      "location_id": np.int64,
      "city": tfds.features.Text(),
      "city_id": np.int32,
      "coords": tfds.features.Tensor(shape=(2,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES),
      "is_query": np.bool_,
      "semi_positive_ids": tfds.features.Tensor(shape=(NUM_SEMI_POSITIVES,), dtype=np.int64),
      "satellite_here": np.bool_,
  })


def example(query, satellite, modality, location_id, *, view_index=0, city="", city_id=0, coords=NO_COORDS,
            is_query=True, semi_positive_ids=()):
  """One record; `query` / `satellite` are encoded image bytes, `satellite` None where another record
  of the location stores it (`SatelliteOnce`)."""
  semi = list(semi_positive_ids)[:NUM_SEMI_POSITIVES]
  semi += [-1] * (NUM_SEMI_POSITIVES - len(semi))
  return dict(query=query, satellite=PLACEHOLDER if satellite is None else satellite, modality=modality,
              view_index=int(view_index), location_id=int(location_id), city=str(city), city_id=int(city_id),
              coords=np.asarray(coords, np.float64), is_query=bool(is_query),
              semi_positive_ids=np.asarray(semi, np.int64), satellite_here=satellite is not None)


class SatelliteOnce:
  """The satellite bytes to store with a split's next record of a location: the file's bytes for its
  first record, None (stored elsewhere) for the others. One per split."""

  def __init__(self, local):
    self.local, self.stored = local, set()

  def __call__(self, location_id, relative):
    if location_id in self.stored:
      return None
    self.stored.add(location_id)
    return self.local.read(relative, "the satellite image")


def read_bytes(path):
  """The bytes of an image file (a path `LocalCopy.require` has checked), stored as they are; a file
  PIL cannot read stops the build naming it (not later, at training, as a damaged dataset)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
  except Exception as e:  # PIL raises many types for broken files
    raise GleamError(f"{path} is not an image that can be read ({type(e).__name__}: {e}); replace it with the "
                     "published file, or remove it from the local copy.") from None
  return data


def panorama_pairs(records, city):
  """(key, example) of panorama -> satellite pairs from [(key, panorama path, satellite path,
  location id)]: CVUSA and CVACT."""
  for key, panorama, satellite, location_id in records:
    yield key, example(read_bytes(panorama), read_bytes(satellite), "panorama", location_id, city=city)


def gallery_only(satellite, location_id, **kwargs):
  """A satellite that belongs in the evaluation gallery without being any query's pair."""
  return example(PLACEHOLDER, satellite, "uav", location_id, view_index=-1, is_query=False, **kwargs)


class LocalCopy:
  """The local copy of a dataset; every missing path stops with one GleamError naming it."""

  def __init__(self, dataset, root, layout):
    self.dataset, self.layout = dataset, layout
    if not root:
      raise GleamError(f"data.manual_dir is not set: {dataset} is built from your local copy of it. Pass "
                       f"--config.data.manual_dir=/path/to/{dataset} (the folder holding {layout}).")
    self.root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(self.root):
      raise GleamError(f"data.manual_dir={self.root} is not a folder: point it at your copy of {dataset} "
                       f"(the folder holding {layout}).")

  def path(self, *parts):
    return os.path.join(self.root, *parts)

  def missing(self, relative, what):
    return GleamError(f"{self.dataset}: {self.path(relative)} is missing; {what} must be there "
                      f"(data.manual_dir={self.root} should hold {self.layout}).")

  def require(self, relative, what, folder=False):
    """The absolute path of `relative`; GleamError if it is not there."""
    full = self.path(relative)
    if not (os.path.isdir(full) if folder else os.path.isfile(full)):
      raise self.missing(relative, what)
    return full

  def read(self, relative, what):
    """Bytes of the file at `relative`."""
    return read_bytes(self.require(relative, what))

  def lines(self, relative, what):
    """Non-empty lines of a text file, whitespace-split."""
    with open(self.require(relative, what)) as f:
      return [line.split() for line in f if line.strip()]

  def subfolders(self, relative, what):
    """Sorted names of the folders in `relative`."""
    full = self.require(relative, what, folder=True)
    return sorted(n for n in os.listdir(full) if not n.startswith(".") and os.path.isdir(os.path.join(full, n)))

  def images(self, relative):
    """Sorted image file names in the folder `relative` ([] if there is no such folder); hidden files
    (macOS's `._name.jpg` resource forks, say) are not images of the dataset."""
    full = self.path(relative)
    if not os.path.isdir(full):
      return []
    return sorted(n for n in os.listdir(full)
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in (".jpg", ".jpeg", ".png"))


class PairsBuilder(builders.OwnBuildLines, tfds.core.GeneratorBasedBuilder):
  """A builder reading a published dataset from `manual_dir`; subclasses give `split_examples`."""

  def __init__(self, *, manual_dir=None, **kwargs):
    self.manual_dir = manual_dir
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(features=features(), description=self.__doc__)

  @abc.abstractmethod
  def split_examples(self, local):
    """{split: iterable of (key, example)} read from `local` (a LocalCopy)."""

  @abc.abstractmethod
  def layout(self):
    """One line naming what `manual_dir` must hold (for error messages)."""

  def _split_generators(self, dl_manager):
    del dl_manager
    local = LocalCopy(self.name, self.manual_dir, self.layout())
    return self.split_examples(local)

  def _generate_examples(self):  # split_examples gives the generators
    raise NotImplementedError
