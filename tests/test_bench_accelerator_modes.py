"""The benchmarks' accelerator modes (`--torch=false`, what launch/gpu_bench.sh runs), on tiny settings:
they run without PyTorch and report figures consistent with each other."""
import os
import re
import subprocess
import sys

import pytest

from gleam_jax.models import gleam_c
from config_files import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  out = subprocess.run([sys.executable, "-m", module, "--torch=false", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_step_alone_reports_mfu_of_its_own_rate():
  stdout = _run("gleam_jax.bench.train_step", "--config=configs/c_phase1.py:tiny", "--steps=2",
                "--repeats=1", "--peak_tflops=1", "--config.grad_accum_steps=2")
  setting = stdout.split("Setting:")[1].split("\n")[0]
  assert "torch" not in setting and "ours in 2 micro-batches (gradient cache)" in setting  # ours alone
  steps_per_s = float(re.search(r"\| ours \(jax.jit\) \| ([\d.]+) \|", stdout).group(1))
  config = load_config("c_phase1", "tiny")
  b, query, sat = config.batch_size, tuple(config.data.panorama_size), tuple(config.data.satellite_size)
  step_flops = gleam_c.contrastive_step_flops(config.model, [(b, *query)], [(b, *sat)])
  assert f"{step_flops / 1e9:.2f} GFLOP per step" in stdout
  mfu = float(re.search(r"MFU ([\d.]+)% of 1 TFLOP/s", stdout).group(1)) / 100
  assert mfu == pytest.approx(step_flops * steps_per_s / 1e12, abs=6e-4)  # printed to 0.1%


def test_generate_alone_reports_decode_rate_and_step_time_that_agree():
  stdout = _run("gleam_jax.bench.generate", "--batch_sizes=1,2", "--new_tokens=6", "--repeats=1",
                "--image_size=56", "--out=")
  rows = re.findall(r"batch (\d+): prefill [\d.]+ tok/s, decode ([\d.]+) tok/s \(([\d.]+) ms per step", stdout)
  assert [int(b) for b, _, _ in rows] == [1, 2]
  for batch, rate, ms in rows:
    assert float(rate) == pytest.approx(int(batch) * 1000 / float(ms), rel=0.02)
