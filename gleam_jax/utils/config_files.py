"""The experiment configs of a checkout (configs/<name>.py), loaded as `--config=configs/<name>.py:<arg>`
gives them to `gleam_jax.main`: for notebooks and tests, which have no command line."""
import importlib.util
import os


def repo_root():
  """The gleam_jax checkout holding configs/: the working directory's parent (a notebook in colabs/),
  the working directory, or the folder above the package (an editable install)."""
  import gleam_jax  # pylint: disable=g-import-not-at-top
  package_parent = os.path.dirname(os.path.dirname(os.path.abspath(gleam_jax.__file__)))
  for root in (os.path.dirname(os.getcwd()), os.getcwd(), package_parent):
    if os.path.exists(os.path.join(root, "configs", "c_phase1.py")):
      return root
  raise FileNotFoundError("no configs/ folder found: run from a gleam_jax checkout (its root or its colabs/ "
                          "folder), or install the package from one with `pip install -e .`.")


def load_config(name, arg=None):
  """configs/<name>.py:<arg> (its `get_config(arg)`; `get_config()` without `arg`)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(repo_root(), "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)
