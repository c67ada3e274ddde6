"""The experiment configs under configs/, loaded as `--config=configs/<name>.py:<arg>` would."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


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
