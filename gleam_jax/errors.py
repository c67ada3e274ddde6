"""The one user-facing error type.

Raise `GleamError` for bad input (config values, dataset files, images, checkpoints). The message
names the offending thing and the fix; `gleam_jax.main` prints it on one line and exits with
status 2, without a traceback and without touching what is already written in the workdir.
"""
import os
import sys

from absl import flags


class GleamError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""


def make_dir(path, name):
  """`os.makedirs(path, exist_ok=True)`; a folder that cannot be made (no permission, a file in the
  way, a read-only file system) stops with a GleamError naming `name`, the setting that gave it."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise GleamError(f"{name}={path}: cannot create this folder ({e.strerror}); give one you can write.") from None


def parse_flags(argv):
  """absl's flag parsing, with a `--config.x=y` that names no field of the config (ml_collections
  raises while it applies the override) stopped on one line, with its "did you mean" hint."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as error:
    e = error
    while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(message))
      e = e.args[0]
    field, *hint = str(e.args[0] if e.args else e).split("\n")
    field = field.strip("'\"")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    named = [flag for flag in overrides if flag.endswith(f".{field}")]
    if not named:  # not an override's field (e.g. an error inside the config file): as it is
      raise
    print(" ".join([f"error: {named[0]}: the config has no field {field!r}.", *hint,
                    "The config is locked: its fields are in the config file (and --helpfull)."]), file=sys.stderr)
    sys.exit(2)
