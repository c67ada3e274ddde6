"""The one user-facing error type.

Raise `GleamError` for bad input (config values, dataset files, images, checkpoints). The message
names the offending thing and the fix; `gleam_jax.main` prints it on one line and exits with
status 2, without a traceback and without touching what is already written in the workdir.
"""
import os


class GleamError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""


def make_dir(path, name):
  """`os.makedirs(path, exist_ok=True)`; a folder that cannot be made (no permission, a file in the
  way, a read-only file system) stops with a GleamError naming `name`, the setting that gave it."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise GleamError(f"{name}={path}: cannot create this folder ({e.strerror}); give one you can write.") from None
