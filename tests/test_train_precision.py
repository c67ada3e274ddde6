"""GLEAM-C trainer end to end with bfloat16 compute and with rematerialisation: losses finite and
falling, parameters and optimizer state kept in float32, remat giving the losses of no remat."""
import jax
import numpy as np
import pytest

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax.train import checkpoint
from gleam_jax.train.optim import path_name
from config_files import tiny_config
from test_main_contrastive import train_losses

STEPS = 10


def run_tiny(data_dir, workdir, **model):
  fields = {"total_steps": STEPS, "eval.at_end": False, "checkpoint.every_steps": STEPS,
            "model.drop_path_rate": 0.1, **{f"model.{k}": v for k, v in model.items()}}
  main.run(tiny_config("c_phase1", data_dir, **fields), workdir)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return np.asarray([losses[s] for s in range(1, STEPS + 1)])


def saved_dtypes(workdir):
  """{leaf name: dtype} of the train state in the last checkpoint (from its metadata)."""
  manager = checkpoint.make_manager(workdir, async_save=False)
  tree = manager.item_metadata(manager.latest_step())["state"]
  manager.close()
  tree = getattr(tree, "tree", tree)
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "dtype"))
  return {path_name(p): np.dtype(leaf.dtype) for p, leaf in leaves}


@pytest.fixture(scope="module")
def float32_losses(tiny_cfg, tmp_path_factory):
  return run_tiny(tiny_cfg.data_dir, str(tmp_path_factory.mktemp("float32")))


def falling(losses):
  return losses[-3:].mean() < losses[:3].mean()


@pytest.mark.slow
def test_remat_gives_the_losses_of_no_remat(float32_losses, tiny_cfg, tmp_path):
  assert falling(float32_losses)
  remat = run_tiny(tiny_cfg.data_dir, str(tmp_path), remat=True)
  np.testing.assert_allclose(remat, float32_losses, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_state(float32_losses, tiny_cfg, tmp_path):
  bf16 = run_tiny(tiny_cfg.data_dir, str(tmp_path), dtype="bfloat16")
  assert np.all(np.isfinite(bf16)) and falling(bf16)
  assert not np.allclose(bf16, float32_losses, rtol=1e-4)  # the compute dtype took effect
  dtypes = saved_dtypes(str(tmp_path))
  floats = {k: d for k, d in dtypes.items() if k.startswith(("params/", "opt_state/")) and d.kind == "f"}
  assert any(k.startswith("params/model/encoder") for k in floats)
  assert set(floats.values()) == {np.dtype(np.float32)}, {k: d for k, d in floats.items() if d != np.float32}
