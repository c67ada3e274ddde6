"""`python -m gleam_jax.bench.beam_search` on tiny settings: both sides find the same hypotheses and
the printed ratio is the printed times'."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_beam_search_bench_compares_equal_hypotheses():
  out = subprocess.run([sys.executable, "-m", "gleam_jax.bench.beam_search", "--batch_sizes=2", "--num_beams=3",
                        "--new_tokens=5", "--repeats=1", "--image_size=56", "--torch_threads=1",
                        "--torch_attention=sdpa"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "batch 2: torch, 1 thread(s), sdpa:" in out.stdout and "hypotheses identical to ours: True" in out.stdout
  ours = float(re.search(r"batch 2: ours ([\d.]+) s", out.stdout).group(1))
  theirs, ours_again, ratio = re.search(r"fastest torch \(1 thread\(s\), sdpa\): ([\d.]+) s / ([\d.]+) s = ([\d.]+)x",
                                        out.stdout).groups()
  assert float(ours_again) == ours and float(ratio) == pytest.approx(float(theirs) / ours, rel=0.01, abs=0.006)
