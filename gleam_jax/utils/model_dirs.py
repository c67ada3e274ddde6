"""Model directories our exports write (`python -m gleam_jax.export`, `python -m gleam_jax.export_c`):
which files hold weights, and whether a directory may receive an export."""
import os
import re

import ml_dtypes
import numpy as np

from gleam_jax.errors import GleamError

# Files of a model directory that hold weights (any framework) or their shard index.
WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|h5|msgpack|ckpt)$|\.index\.json$")


# The dtypes an export may cast its weights to (`--dtype`).
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


def export_dtype(dtype: str | None):
  """The numpy dtype of an export's `dtype` name (None: as the parameters are)."""
  if dtype is not None and dtype not in EXPORT_DTYPES:
    raise GleamError(f"dtype={dtype!r}: export as one of {', '.join(EXPORT_DTYPES)}.")
  return EXPORT_DTYPES[dtype] if dtype else None


def weight_files(directory: str) -> list[str]:
  """The weight files `directory` holds (none if it does not exist)."""
  return sorted(n for n in os.listdir(directory) if WEIGHT_FILE.search(n)) if os.path.isdir(directory) else []


def check_export_dir(directory: str, source_dir: str | None = None, overwrite: bool | None = None) -> None:
  """GleamError unless an export may write into `directory`: not a file, not the model's own
  `source_dir`, and holding no weights unless `overwrite` (None: the export offers no overwrite)."""
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise GleamError(f"{directory} is a file; give a directory to export the model into.")
  if source_dir is not None and os.path.realpath(source_dir) == os.path.realpath(directory):
    raise GleamError(f"{directory} is the directory the model came from; export into another directory.")
  found = weight_files(directory)
  if found and not overwrite:
    fix = "delete those files first" if overwrite is None else "pass overwrite=True (--overwrite) to replace them"
    raise GleamError(f"{directory} already holds model weights ({', '.join(found)}); export into a new or empty "
                     f"directory, or {fix}.")
