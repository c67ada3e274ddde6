"""TFDS dataset builders, one small package per dataset (`<name>/<name>_dataset_builder.py`).

`builder(name, config, data_dir, **kwargs)` returns the builder object without importing
TensorFlow: every image is stored encoded (PNG, or the dataset's own JPEG/PNG files) in ArrayRecord
files and decoded with PIL on read.

`synthetic_cvgl` renders itself; the published datasets (`REAL`) are built from a local copy named
by `manual_dir` (see pairs.py for what they add to the synthetic schema). `REAL` says, per dataset,
its builder configs (the first is the default), its evaluation protocol (gleam_jax.eval.metrics),
the query modalities it holds and whether its records carry coordinates.
"""
import importlib

from gleam_jax.errors import GleamError

REAL = {
    "vigor": dict(configs=("same_area", "cross_area"), protocol="vigor", modalities=("panorama",), coords=True),
    "cvusa": dict(configs=("default",), protocol="cvusa", modalities=("panorama",), coords=False),
    "cvact": dict(configs=("default",), protocol="cvusa", modalities=("panorama",), coords=False),
    "university1652": dict(configs=("default",), protocol="university", modalities=("uav", "ground"),
                           coords=False),
    "sues200": dict(configs=("150", "200", "250", "300"), protocol="university", modalities=("uav",),
                    coords=False),
}
NAMES = ("synthetic_cvgl",) + tuple(REAL)


class OwnBuildLines:
  """Mixin of every builder here: `sources._build` prints a build's first and last line itself, and
  TFDS's own two ("Downloading and preparing dataset Unknown size ...", "... downloaded and
  prepared ...") speak of a download there is none of."""

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


def builder(name, config, data_dir, *, manual_dir=None, overrides=None, build_workers=2):
  """The TFDS builder of dataset `name`, builder config `config`, reading/writing under `data_dir`."""
  if name == "synthetic_cvgl":
    from gleam_jax.data.builders.synthetic_cvgl import synthetic_cvgl_dataset_builder as module
    return module.make_builder(config, data_dir=data_dir, overrides=overrides, build_workers=build_workers)
  if name not in REAL:
    raise GleamError(f"unknown dataset {name!r}: data.name must be one of {NAMES}.")
  if overrides:
    raise GleamError(f"data.overrides={dict(overrides)} change the synthetic world only; remove them for {name}.")
  module = importlib.import_module(f"gleam_jax.data.builders.{name}.{name}_dataset_builder")
  return module.make_builder(config, data_dir=data_dir, manual_dir=manual_dir)
