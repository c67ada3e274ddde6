"""Checkpoints of a training job: Orbax `CheckpointManager` under `<workdir>/checkpoints/<step>/`.

Each checkpoint is a composite of
  state  the train state pytree (params, optimizer state, step, model variables, RNG key data),
         sharded arrays written by every process;
  data   the input stream's state (grain iterator + sampler, JSON), so a resumed job reads exactly
         the batches it would have read.

Saving is asynchronous (training continues while the arrays are written); `max_to_keep` old
checkpoints are kept. Restoring takes the target train state (placed on the current mesh) and reads
every array straight into the target's sharding, so a job can resume on another mesh shape.
A checkpoint whose arrays do not fit the target fails with a `GleamError` listing the mismatches;
one whose files are damaged, with one naming it and the step to fall back to.
"""
import asyncio
import contextlib
import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gleam_jax.errors import GleamError
from gleam_jax.train.optim import path_name

MAX_LISTED = 8


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), "checkpoints")


async def _reads_done(batch):
  """Awaits `batch`, a handler's reads of many arrays; if it fails, first waits for the reads it
  started. Orbax gathers one read per array, which raises on the first failure (a damaged file) with
  the others still in flight, then closes its event loop without cancelling them (orbax 0.12's
  `run_sync`); as each completes, TensorStore's thread reports "Event loop is closed". Waiting, not
  cancelling: a task is done only once its read's callback reached the loop. Tasks that existed
  before `batch` started (those awaiting it among them) are not waited for."""
  before = asyncio.all_tasks()
  try:
    return await batch
  except Exception:
    while started := asyncio.all_tasks() - before:  # the not yet done ones
      await asyncio.wait(started)
    raise


class _ArrayHandler(ocp.type_handlers.ArrayHandler):
  """Orbax's jax.Array handler, except that a failed batch raises once its reads are done."""

  async def metadata(self, infos):
    return await _reads_done(super().metadata(infos))

  async def deserialize(self, infos, args=None):
    return await _reads_done(super().deserialize(infos, args))


# Orbax writes a replicated array in slices, one per replica (hosts share the writing), each slice a
# compiled op per array shape at the first save; below this size a slice is not worth its compile.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _type_handlers():
  """Orbax's registered type handlers, with `_ArrayHandler` for jax.Array (on the store of array
  metadata that the registered one writes, as Orbax itself finds it)."""
  registered = ocp.type_handlers.get_type_handler(jax.Array)
  arrays = _ArrayHandler(array_metadata_store=getattr(registered, "_array_metadata_store", None),
                         min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES)
  return ocp.type_handlers.create_type_handler_registry(
      *[(ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()])


def _handlers():
  return {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
          "data": ocp.JsonCheckpointHandler()}


def make_manager(workdir, max_to_keep=3, async_save=True):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=_handlers())


def save(manager, step, state, data_state):
  """Starts writing checkpoint `step` (returns at once when async)."""
  manager.save(int(step), args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _leaves_by_name(tree):
  return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def mismatches(saved, target):
  """Human-readable differences between saved metadata and target arrays (names and shapes)."""
  saved, target = _leaves_by_name(saved), _leaves_by_name(target)
  problems = []
  for name in sorted(set(target) - set(saved)):
    problems.append(f"{name}: missing in the checkpoint (model wants {tuple(target[name].shape)})")
  for name in sorted(set(saved) - set(target)):
    problems.append(f"{name}: in the checkpoint {tuple(saved[name].shape)} but not in the model")
  for name in sorted(set(saved) & set(target)):
    s, t = tuple(getattr(saved[name], "shape", ()) or ()), tuple(target[name].shape)
    if s != t:
      problems.append(f"{name}: checkpoint {s} vs model {t}")
  return problems


def _raise_mismatch(path, problems, fix):
  # Optimizer-state mismatches follow from parameter mismatches: name the parameters first.
  problems = sorted(problems, key=lambda p: not p.startswith("params/"))
  listed = "; ".join(problems[:MAX_LISTED])
  more = f" (+{len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
  raise GleamError(f"checkpoint {path} does not fit the model: {listed}{more}. {fix}")


def step_path(manager, step):
  return os.path.join(str(manager.directory), str(step))


def step_of(path):
  """The step of a step folder (`step_path`'s <checkpoints>/<step>); None for another folder."""
  name = os.path.basename(os.path.normpath(path))
  return int(name) if name.isdigit() else None


def _saved_state_metadata(manager, step):
  metadata = manager.item_metadata(step)
  tree = metadata["state"] if "state" in metadata else None
  if tree is None:
    raise GleamError(f"checkpoint {step_path(manager, step)} has no train state: delete it or point "
                     "the job at another workdir.")
  return getattr(tree, "tree", tree)


def restore(manager, target_state, step=None):
  """(state, data_state, step) of checkpoint `step` (default: the latest), placed like `target_state`."""
  step = manager.latest_step() if step is None else step
  earlier = [s for s in manager.all_steps() if s < step]
  fix = (f"delete that step folder to resume from step {max(earlier)}" if earlier else
         "delete that step folder to start again") + ", or use a new --workdir"
  with _damaged_files_named(step_path(manager, step), fix):
    saved = _saved_state_metadata(manager, step)
    problems = mismatches(saved, target_state)
    if problems:
      _raise_mismatch(step_path(manager, step), problems,
                      "Resume with the config the checkpoint was written with, or use a new --workdir.")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=_abstract(target_state),
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target_state)),
        data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"], step


@contextlib.contextmanager
def _damaged_files_named(path, fix):
  """A checkpoint whose files are truncated or missing stops with a GleamError naming it and `fix`.
  Orbax and TensorStore raise plain Exceptions (and ValueErrors, OSErrors) for them; the message
  keeps the first line of what they said, and the original stays chained as the cause."""
  try:
    yield
  except GleamError:
    raise
  except Exception as e:  # noqa: BLE001  (re-raised as the user-facing error, chained)
    chain, link = [], e
    while link is not None and link not in chain:  # down to the storage layer's own words
      chain.append(link)
      link = link.__cause__ or link.__context__
    cause = (str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__])[0][:300]
    raise GleamError(f"checkpoint {path} cannot be read ({cause}); its files are damaged or incomplete: "
                     f"{fix}.") from e


def restore_params(path, target_params, copy_source=None,
                   fix="Set the model config to the one the checkpoint was trained with."):
  """Parameters only (`state['params']`) from a checkpoint directory: a workdir, its `checkpoints`
  folder, or one step folder; used to initialise a job from another job's result.

  `copy_source(name) -> name | None`: a target parameter the checkpoint lacks starts as a copy of
  the checkpoint's parameter of that name (e.g. a new modality tower from the query tower). `fix`:
  what a mismatch's error tells to do. Returns (params, the step folder read, the names filled by copies)."""
  manager, step = _open_for_reading(path)
  earlier = [s for s in manager.all_steps() if s < step]
  damaged = functools.partial(_damaged_files_named, step_path(manager, step),
                              f"give step {max(earlier)}'s folder, or delete that step folder to read step {max(earlier)} instead"
                              if earlier else
                              "train that job again")
  with damaged():
    saved = _saved_state_metadata(manager, step)
  if "params" not in saved:
    raise GleamError(f"checkpoint {step_path(manager, step)} holds no params.")
  saved_names, target_names = set(_leaves_by_name(saved["params"])), set(_leaves_by_name(target_params))
  sources = {}
  for name in sorted(target_names - saved_names):
    source = copy_source(name) if copy_source else None
    if source in saved_names & target_names:  # restored first, then copied
      sources[name] = source
  present = _prune(target_params, set(sources))
  problems = mismatches(saved["params"], present)
  if problems:
    _raise_mismatch(step_path(manager, step), problems, fix)
  target = {"params": present}
  with damaged():
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=_abstract(target),
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
            partial_restore=True)))
  manager.close()
  by_name = _leaves_by_name(restored["state"]["params"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, t: by_name[path_name(p)] if path_name(p) in by_name else _copy_onto(by_name[sources[path_name(p)]], t),
      target_params)
  return params, step_path(manager, step), sorted(sources)


def _copy_onto(source, target):
  if source.shape != target.shape:
    raise GleamError(f"cannot start a parameter of shape {target.shape} as a copy of one of shape "
                     f"{source.shape}: the new tower must have the architecture of the one it copies.")
  # a new buffer: two leaves of one train state must never share one (the step donates them)
  return jax.device_put(jnp.array(source, dtype=target.dtype, copy=True), target.sharding)


def _prune(tree, drop, prefix=()):
  """`tree` (nested dicts) without the leaves whose '/'-joined names are in `drop`."""
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, dict):
      out[key] = _prune(value, drop, path)
    elif "/".join(path) not in drop:
      out[key] = value
  return out


@contextlib.contextmanager
def at_most_verbose(level):
  """absl logging at `level` or quieter while inside (Orbax logs each read and write at INFO and
  warns about read-only managers); the verbosity is set back on the way out."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(min(verbosity, level))
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def job_directory(path):
  """The workdir of a checkpoint path: a workdir, its checkpoints folder or one step folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if step_of(path) is not None:
    path = os.path.dirname(path)
  return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def job_config(workdir):
  """The config.json a job wrote into its workdir, as a ConfigDict; None when there is none (a
  checkpoint copied without its job)."""
  config_file = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.exists(config_file):
    return None
  with open(config_file) as f:
    return ml_collections.ConfigDict(json.load(f))


def _open_for_reading(path):
  path = os.path.abspath(os.path.expanduser(path))
  step = step_of(path)
  if step is not None:
    path = os.path.dirname(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(path):
    raise GleamError(f"no checkpoint at {path}: give a workdir of a finished job, its checkpoints "
                     "folder or a step folder.")
  with at_most_verbose(logging.ERROR):  # Orbax warns that a read-only manager neither saves nor creates
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_handlers=_handlers())
  steps = manager.all_steps()
  if not steps:
    raise GleamError(f"{path} has no checkpoints: finish (or resume) the job that writes them first.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise GleamError(f"{path} has no checkpoint for step {step}; it has steps {sorted(steps)}.")
  return manager, step


def host_state(tree):
  """A pytree of arrays as NumPy (for tests and debugging)."""
  return jax.tree.map(np.asarray, tree)
