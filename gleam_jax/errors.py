"""The one user-facing error type.

Raise `GleamError` for bad input (config values, dataset files, images, checkpoints). The message
names the offending thing and the fix; `gleam_jax.main` prints it on one line and exits with
status 2, without a traceback and without touching what is already written in the workdir.
"""


class GleamError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""
