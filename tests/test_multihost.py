"""GLEAM-C on two processes (jax.distributed on loopback, 4 CPU devices each) against one process
with 8 devices: the same losses step by step (DSS neighbours refreshed every 2 epochs, one epoch a
step), the same eval metrics, a resume, one writer."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax.data import pipeline, samplers, sources
from gleam_jax.data.config import data_config
from gleam_jax.errors import GleamError
from gleam_jax.utils.writer import read_metrics
from config_files import tiny_config
from test_main_contrastive import ROOT, train_losses

STEPS = 6
OVERRIDES = {"total_steps": STEPS, "checkpoint.every_steps": 4, "eval.splits": ("test",), "eval.num_examples_png": 0,
             "data.sampler.name": "dss", "dss_refresh_every_epochs": 2}


def _launch(workdir, data_dir, *extra):
  """launch/local_multiprocess.sh with 2 processes of 4 CPU devices; the second launch reads the
  compiled programs of the first from a persistent compilation cache beside the workdir."""
  overrides = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "configs/c_phase1.py:tiny", workdir,
         f"--config.data.data_dir={data_dir}", *overrides, *extra]
  env = {**os.environ, "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable,
         "JAX_COMPILATION_CACHE_DIR": os.path.join(os.path.dirname(workdir), "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env.pop("PORT", None)
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
  return result.stdout


def _eval_metrics(workdir):
  return {k: v for r in read_metrics(workdir) for k, v in r.items() if k.startswith("eval/")}


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tiny_cfg, tmp_path):
  reference = str(tmp_path / "one_process")
  main.run(tiny_config("c_phase1", tiny_cfg.data_dir, **OVERRIDES), reference)
  ref_losses, ref_eval = train_losses(reference), _eval_metrics(reference)
  assert sorted(ref_losses) == list(range(1, STEPS + 1)) and ref_eval

  workdir = str(tmp_path / "two_processes")
  stdout = _launch(workdir, tiny_cfg.data_dir)
  assert "8 devices" in stdout
  assert stdout.count(f"step {STEPS}/{STEPS} loss") == 1  # only process 0 prints
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer: no doubled rows
  losses = train_losses(workdir)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(ref_losses)],
                             rtol=1e-5, atol=1e-6)
  evals = _eval_metrics(workdir)
  assert set(evals) == set(ref_eval)
  for key, value in ref_eval.items():
    assert evals[key] == pytest.approx(value, abs=1e-6), key
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == STEPS

  # Resume from step 4 on two processes: steps 5 and 6 come out the same again.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  stdout = _launch(workdir, tiny_cfg.data_dir, "--config.eval.at_end=False")
  assert "resumed from" in stdout and "step 5/6 loss" in stdout and "step 1/6 loss" not in stdout
  rows = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  resumed = train_losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in (5, 6)], [ref_losses[s] for s in (5, 6)], rtol=1e-5, atol=1e-6)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]

  # The two-process checkpoint of step 4 resumes in one process of 8 devices, onto the same batches.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  main.run(tiny_config("c_phase1", tiny_cfg.data_dir, **{**OVERRIDES, "eval.at_end": False}), workdir)
  resumed = train_losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in (5, 6)], [ref_losses[s] for s in (5, 6)], rtol=1e-5, atol=1e-6)


def test_process_slices_of_augmented_batches_join_to_the_single_process_batch(tiny_cfg):
  """Augmentation is seeded by a record's position in the global order, so two processes' rows of
  every batch (over an epoch boundary, and after a resume) are exactly the one-process batch."""
  cfg = data_config(**{**tiny_cfg.to_dict(), "modalities": ("panorama",)})
  assert cfg.augment.enabled
  index = sources.get_index(cfg, cfg.train_split)

  def stream(process_index, process_count):
    return pipeline.make_train_stream(cfg, 8, samplers.make_sampler(cfg, index), 3,
                                      process_index=process_index, process_count=process_count)
  whole, parts = stream(0, 1), [stream(p, 2) for p in (0, 1)]
  steps = whole.steps_per_epoch + 1
  for step in range(steps):
    if step == 1:  # resume each process from its own state
      parts = [_restored(part, stream(p, 2)) for p, part in enumerate(parts)]
    b, p0, p1 = next(whole), next(parts[0]), next(parts[1])
    assert p0["query"].shape[0] == 4
    for k in b:
      np.testing.assert_array_equal(np.concatenate([p0[k], p1[k]]), b[k], err_msg=f"{k} at step {step}")
  assert whole.epoch == 1
  # a job resumes on another process count: one process from a two-process state, and back
  single = _restored(parts[0], stream(0, 1))
  halves = [_restored(whole, stream(p, 2)) for p in (0, 1)]
  for _ in range(2):
    b, h0, h1 = next(single), next(halves[0]), next(halves[1])
    reference = next(whole)
    for k in b:
      np.testing.assert_array_equal(b[k], reference[k], err_msg=k)
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), reference[k], err_msg=k)


def _restored(old, new):
  new.set_state(old.get_state())
  return new


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator_address="127.0.0.1:1"), "needs --num_processes and --process_id"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), r"--process_id=2 must be in \[0, "),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
])
def test_incomplete_distributed_flags_are_an_error(flags, message):
  with pytest.raises(GleamError, match=message):
    main.init_distributed(**flags)
