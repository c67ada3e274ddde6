"""TFDS dataset builders, one small package per dataset (`<name>/<name>_dataset_builder.py`).

`builder(name, config, data_dir, **kwargs)` returns the builder object without importing
TensorFlow: every image is stored encoded (PNG) in ArrayRecord files and decoded with PIL on read.
"""
from gleam_jax.errors import GleamError

NAMES = ("synthetic_cvgl",)


def builder(name, config, data_dir, **kwargs):
  if name == "synthetic_cvgl":
    from gleam_jax.data.builders.synthetic_cvgl import synthetic_cvgl_dataset_builder as module
    return module.make_builder(config, data_dir=data_dir, **kwargs)
  raise GleamError(f"unknown dataset {name!r}: data.name must be one of {NAMES}.")
