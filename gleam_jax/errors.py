"""The one user-facing error type.

Raise `GleamError` for bad input (config values, dataset files, images, checkpoints). The message
names the offending thing and the fix; `gleam_jax.main` prints it on one line and exits with
status 2, without a traceback and without touching what is already written in the workdir.
"""
import contextlib
import os
import re
import sys

from absl import flags


class GleamError(Exception):
  """Bad input from the user: the message says what is wrong and how to fix it."""


@contextlib.contextmanager
def stop_on_bad_input():
  """A GleamError raised inside ends the program: its message on one line, exit status 2."""
  try:
    yield
  except GleamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def make_dir(path, name):
  """`os.makedirs(path, exist_ok=True)`; a folder that cannot be made (no permission, a file in the
  way, a read-only file system) stops with a GleamError naming `name`, the setting that gave it."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise GleamError(f"{name}={path}: cannot create this folder ({e.strerror}); give one you can write.") from None


def parse_flags(argv, config_flag="config"):
  """absl's flag parsing, with bad input stopped on one line (exit status 2) instead of a traceback:
  a `--config.x=y` that names no field of the config (ml_collections raises while it applies the
  override; its "did you mean" hint kept), a GleamError or ValueError raised while the config file
  builds the config (an unknown preset, a bad knob value), a config file that cannot be read, and
  absl's own flag errors (a missing required flag, a value of the wrong type)."""
  try:
    parsed = flags.FLAGS(argv)
    config = flags.FLAGS[config_flag].value if config_flag in flags.FLAGS else None
    if config is not None:
      getattr(config, "get")  # ml_collections defers the error of a config file it cannot read to a first use
    return parsed
  except (AttributeError, KeyError) as error:
    _stop_on_override(error, argv)
    raise
  except (GleamError, OSError, flags.Error) as error:
    given = next((a for a in argv[1:] if a.startswith(f"--{config_flag}=")), f"--{config_flag}")
    print(f"error: {_flag_error_line(error, given, config_flag)}", file=sys.stderr)
    sys.exit(2)


def _flag_error_line(error, given, config_flag):
  chain, link = [], error
  while link is not None and link not in chain:
    chain.append(link)
    link = link.__cause__ or link.__context__
  gleam = next((e for e in chain if isinstance(e, GleamError)), None)
  if gleam is not None:
    return f"{given}: {gleam}"
  if isinstance(error, OSError):  # the config file: not found, not readable, not importable
    reason = (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[-1].strip()
    return (f"{given}: cannot load this config file ({reason}); give the path of a "
            "config file, e.g. --config=configs/c_phase1.py.")
  root = chain[-1]
  missing = re.search(r"Flag --(\w+) must have a value other than None", str(error))
  if isinstance(error, flags.IllegalFlagValueError) and missing:
    if missing.group(1) != config_flag:
      return f"--{missing.group(1)} is required ({flags.FLAGS[missing.group(1)].help})"
    return f"--{config_flag} is required, e.g. --config=configs/c_phase1.py (presets after a colon: :tiny)."
  if any(str(e).startswith("Error whilst parsing config file") for e in chain):  # the config file's code
    return f"{given}: {type(root).__name__}: {root}"
  return " ".join(str(error).split())


def _stop_on_override(error, argv):
  e = error
  while e.args and isinstance(e.args[0], Exception):  # AttributeError(KeyError(message))
    e = e.args[0]
  field, *hint = str(e.args[0] if e.args else e).split("\n")
  field = field.strip("'\"")
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  named = [flag for flag in overrides if flag.endswith(f".{field}")]
  if named:  # else not an override's field (e.g. an error inside the config file): raised as it is
    print(" ".join([f"error: {named[0]}: the config has no field {field!r}.", *hint,
                    "The config is locked: its fields are in the config file (and --helpfull)."]), file=sys.stderr)
    sys.exit(2)
