"""The experiment configs under configs/, loaded as `--config=configs/<name>.py:<arg>` would."""
import os

from gleam_jax.utils.config_files import load_config  # noqa: F401  (the tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name, data_dir, arg="tiny", **fields):
  """configs/<name>.py:<arg> reading data from `data_dir`, with `fields` ('a.b': value) set; locked."""
  config = load_config(name, arg)
  config.data.data_dir = data_dir
  for key, value in fields.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  config.lock()
  return config
