"""`cvact`: CVACT street-view panoramas paired with their polished satellite image.

Layout of `manual_dir` (the published release):
  ACT_data.mat                                        panoIds, trainSet.trainInd, valSet.valInd
                                                      (1-based indices into panoIds)
  ANU_data_small/streetview/<panoId>_grdView.jpg      panoramas (.png accepted too)
  ANU_data_small/satview_polish/<panoId>_satView_polish.jpg
Splits: `train` (trainInd, 35,532 pairs) and `test` (valInd: CVACT_val, 8,884 pairs, the split
Sample4Geo reports as CVACT val; ANU_data_test is not read). Location id = 0-based position in
panoIds.
"""
import os

import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from gleam_jax.data.builders import pairs
from gleam_jax.errors import GleamError

MAT = "ACT_data.mat"
SPLIT_FIELDS = {"train": ("trainSet", "trainInd"), "test": ("valSet", "valInd")}
LAYOUT = "ACT_data.mat, ANU_data_small/streetview/ and ANU_data_small/satview_polish/"


def _text(value):
  while isinstance(value, np.ndarray):
    value = value.reshape(-1)[0]
  return str(value).strip()


def read_mat(local):
  """(pano ids, {split: 0-based indices into them}) from ACT_data.mat."""
  path = local.require(MAT, "the CVACT index (panoIds, trainSet, valSet)")
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises several types for a damaged file
    raise GleamError(f"cvact: {path} does not load as a .mat file ({type(e).__name__}: {e}); "
                     "restore the published ACT_data.mat.") from None
  if "panoIds" not in mat:
    raise GleamError(f"cvact: {path} has no 'panoIds'; restore the published ACT_data.mat.")
  ids = [_text(v) for v in np.asarray(mat["panoIds"]).reshape(-1)]
  splits = {}
  for split, (struct, field) in SPLIT_FIELDS.items():
    try:
      inds = mat[struct][field][0][0]
    except (KeyError, ValueError, IndexError):
      raise GleamError(f"cvact: {path} has no {struct}.{field}; restore the published ACT_data.mat.") from None
    inds = np.asarray(inds, np.int64).reshape(-1) - 1
    if len(inds) and (inds.min() < 0 or inds.max() >= len(ids)):
      raise GleamError(f"cvact: {struct}.{field} in {path} points outside panoIds (1..{len(ids)}).")
    splits[split] = inds
  return ids, splits


def image_path(local, folder, name, what):
  for ext in (".jpg", ".png"):
    relative = f"ANU_data_small/{folder}/{name}{ext}"
    if os.path.isfile(local.path(relative)):
      return local.path(relative)
  raise local.missing(f"ANU_data_small/{folder}/{name}.jpg", what)


def split_records(local, ids, inds):
  """[(panorama id, panorama path, satellite path, location id)] (`pairs.panorama_pairs`)."""
  return [(ids[i], image_path(local, "streetview", f"{ids[i]}_grdView", "the panorama"),
           image_path(local, "satview_polish", f"{ids[i]}_satView_polish", "the satellite image"),
           int(i)) for i in inds]


class Builder(pairs.PairsBuilder):
  """CVACT panorama -> satellite pairs; see the module docstring."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Records carry `satellite_here` (always True: every record stores its satellite)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default", description="ANU_data_small train / val")]

  def layout(self):
    return LAYOUT

  def split_examples(self, local):
    ids, splits = read_mat(local)
    records = {s: split_records(local, ids, inds) for s, inds in splits.items()}
    return {s: pairs.panorama_pairs(r, "cvact") for s, r in records.items()}


def make_builder(config, *, data_dir, manual_dir=None):
  return Builder(config=config, data_dir=data_dir, file_format="array_record", manual_dir=manual_dir)
