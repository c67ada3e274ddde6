"""Checkpoint save/restore of the train state: another mesh shape, mismatches, params-only init."""
import logging

from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import sharding as shd

RULES = (("embed", "fsdp"), ("mlp", "tensor"))
OPTIM = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, warmup_steps=1, weight_decay=0.05, clip_norm=1.0,
                                       frozen=(), lr_mults=(), no_decay=()))


def _state(mesh, dims=(8, 16), seed=0, **model_kw):
  cfg = gleam_c.model_config(depths=(1, 1), dims=dims, embed_dim=16, **model_kw)
  model = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=seed, dropout=1))
  return contrastive.create_train_state(model, OPTIM, 10, mesh, RULES)


def test_restore_onto_another_mesh(tmp_path):
  _, state = _state(shd.make_mesh(dict(data=8, fsdp=1, tensor=1)))
  saved = checkpoint.host_state(state)
  manager = checkpoint.make_manager(tmp_path)
  checkpoint.save(manager, 5, state, {"epoch": 1, "note": "x"})
  manager.wait_until_finished()
  manager.close()

  mesh2 = shd.make_mesh(dict(data=2, fsdp=4, tensor=1))
  _, target = _state(mesh2, seed=1)
  manager = checkpoint.make_manager(tmp_path)
  restored, data_state, step = checkpoint.restore(manager, target)
  manager.close()
  assert step == 5 and data_state == {"epoch": 1, "note": "x"}
  for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved),
                             jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    assert a.sharding == t.sharding
  kernel = restored["params"]["model"]["projection"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp")


def backend_compiles_of(fn):
  """How many XLA programs `fn()` compiles."""
  names, recording = [], [True]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *_, **__: names.append(event) if recording[0] and event == BACKEND_COMPILE_EVENT else None)
  try:
    fn()
  finally:
    recording[0] = False
  return len(names)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.mark.parametrize("min_slice_bytes, compiles", [(checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES, 0), (0, None)])
def test_small_replicated_arrays_are_saved_whole(tmp_path, monkeypatch, min_slice_bytes, compiles):
  """Orbax shares the writing of a replicated array among its replicas by slicing it, one compiled
  program per array shape at the first save. Arrays whose slice would be under
  REPLICA_PARALLEL_MIN_SLICE_BYTES are written whole: saving a small state replicated over 8 devices
  compiles nothing (Orbax's own setting, 0, compiles several programs)."""
  monkeypatch.setattr(checkpoint, "REPLICA_PARALLEL_MIN_SLICE_BYTES", min_slice_bytes)
  _, state = _state(shd.make_mesh(dict(data=8, fsdp=1, tensor=1)), dims=(8, 24))  # shapes no other test saves
  manager = checkpoint.make_manager(tmp_path)

  def save():
    checkpoint.save(manager, 1, state, {"epoch": 0})
    manager.wait_until_finished()

  count = backend_compiles_of(save)
  manager.close()
  if compiles is None:
    assert count > 5, count
  else:
    assert count == compiles


def test_checkpoint_that_does_not_fit_names_path_and_keys(tmp_path):
  mesh = shd.single_device_mesh()
  _, state = _state(mesh)
  manager = checkpoint.make_manager(tmp_path, async_save=False)
  checkpoint.save(manager, 3, state, {})
  manager.close()
  _, other = _state(mesh, dims=(8, 24))
  manager = checkpoint.make_manager(tmp_path)
  with pytest.raises(GleamError) as err:
    checkpoint.restore(manager, other)
  message = str(err.value)
  assert str(tmp_path / "checkpoints" / "3") in message
  assert "params/model/encoder/stages/1" in message and "(24" in message and "(16" in message
  assert "new --workdir" in message


def test_restore_params_only(tmp_path, caplog):
  mesh = shd.single_device_mesh()
  _, state = _state(mesh)
  manager = checkpoint.make_manager(tmp_path, async_save=False)
  checkpoint.save(manager, 7, state, {})
  manager.close()
  _, fresh = _state(mesh, seed=3)
  caplog.clear()
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    with caplog.at_level(logging.INFO):
      params, where, _ = checkpoint.restore_params(str(tmp_path), fresh["params"])
    assert absl_logging.get_verbosity() == absl_logging.INFO  # set back after the open
  finally:
    absl_logging.set_verbosity(verbosity)
  # a read-only open does not repeat Orbax's warnings that such a manager neither saves nor creates
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert where.endswith("checkpoints/7") and checkpoint.step_of(where) == 7
  assert checkpoint.step_of(where + "/") == 7 and checkpoint.step_of(str(tmp_path)) is None
  params, where, _ = checkpoint.restore_params(where, fresh["params"])  # the step folder itself
  assert checkpoint.step_of(where) == 7
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(GleamError, match="no checkpoint at"):
    checkpoint.restore_params(str(tmp_path / "nope"), fresh["params"])


def test_restore_params_starts_new_modality_towers_as_copies(tmp_path):
  """Phase 2 from a phase-1 checkpoint: the shared tower is restored, each new modality tower
  starts as a copy of it (placed like its target), and a parameter nobody can supply is an error."""
  mesh = shd.make_mesh(dict(data=2, fsdp=4, tensor=1))
  _, state = _state(mesh)
  manager = checkpoint.make_manager(tmp_path, async_save=False)
  checkpoint.save(manager, 3, state, {})
  manager.close()
  _, fresh = _state(mesh, seed=5, modality_towers=("uav", "ground"))
  source = lambda name: (name.replace("model/uav_", "model/").replace("model/ground_", "model/")
                         if name.startswith(("model/uav_", "model/ground_")) else None)
  params, _, copied = checkpoint.restore_params(str(tmp_path), fresh["params"], source)
  assert copied and all(n.startswith(("model/uav_", "model/ground_")) for n in copied)
  saved = jax.tree.map(np.asarray, state["params"]["model"])
  for m in ("uav", "ground"):
    for part in ("encoder", "projection"):
      for (path, a), b, t in zip(jax.tree_util.tree_leaves_with_path(params["model"][f"{m}_{part}"]),
                                 jax.tree.leaves(saved[part]), jax.tree.leaves(fresh["params"]["model"][f"{m}_{part}"])):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{m}_{part}{jax.tree_util.keystr(path)}")
        assert a.sharding == t.sharding
  np.testing.assert_array_equal(np.asarray(params["model"]["logit_scale"]), saved["logit_scale"])
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)  # no buffer is shared
  with pytest.raises(GleamError, match="ground_encoder/.*missing in the checkpoint"):
    checkpoint.restore_params(str(tmp_path), fresh["params"])
