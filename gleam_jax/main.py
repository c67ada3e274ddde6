"""Entry point: `python -m gleam_jax.main --config=configs/c_phase1.py --workdir=DIR`.

Dispatches on `config.trainer`: the value names a module `gleam_jax.train.<trainer>` that defines
`run(config, workdir)`. Overrides go on the command line as `--config.x=y`; the config is locked,
so an unknown key is an error.
"""
import importlib
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gleam_jax import errors
from gleam_jax.errors import GleamError, make_dir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where config.json, metrics, checkpoints and reports go.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with its defaults (Cloud TPU, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def init_distributed(multihost=False, coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-process job when asked to; a single process needs nothing.

  With `coordinator_address` (and `num_processes`, `process_id`) every process names the
  coordinator itself, as `launch/local_multiprocess.sh` does on loopback (CPU collectives: gloo,
  jax's default); with `multihost` alone `jax.distributed.initialize()` finds it (Cloud TPU, SLURM).
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise GleamError("--coordinator_address needs --num_processes and --process_id as well.")
    if not 0 <= process_id < num_processes:
      raise GleamError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    import jax
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif num_processes is not None or process_id is not None:
    raise GleamError("--num_processes and --process_id need --coordinator_address (host:port of process 0); "
                     "or use --multihost where jax finds the coordinator itself (Cloud TPU, SLURM).")
  elif multihost:
    import jax
    jax.distributed.initialize()


def write_config(config, workdir):
  import jax
  if jax.process_index() != 0:
    return
  make_dir(workdir, "--workdir")
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):  # a rerun resumes; another trainer's job in this workdir stays as it is
    with open(path) as f:
      try:
        written = json.load(f).get("trainer")
      except json.JSONDecodeError as e:
        raise GleamError(f"{path} is not a job's config ({e}): give this job an empty workdir, or remove "
                         "that file if the workdir is this job's.") from None
    if written != config.trainer:
      raise GleamError(f"--workdir={workdir} holds a job of trainer {written!r}, and this job's trainer is "
                       f"{config.trainer!r}: give it a workdir of its own.")
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def run(config, workdir):
  trainer = config.get("trainer")
  if not trainer:
    raise GleamError("config has no `trainer`: set config.trainer to a module name in gleam_jax/train/.")
  try:
    module = importlib.import_module(f"gleam_jax.train.{trainer}")
  except ModuleNotFoundError as e:
    if e.name == f"gleam_jax.train.{trainer}":
      raise GleamError(f"unknown trainer {trainer!r}: config.trainer must name a module in gleam_jax/train/.") from None
    raise
  write_config(config, workdir)
  return module.run(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _WORKDIR.value is None:
    print("error: --workdir is required (the folder for config.json, metrics.jsonl and checkpoints).", file=sys.stderr)
    sys.exit(2)
  with errors.stop_on_bad_input():
    init_distributed(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=errors.parse_flags)
