"""Metrics output of every job: `metrics.jsonl` (one JSON line per logged step) and TensorBoard
event files written by tensorboardX (no TensorFlow needed)."""
import json
import math
import os
import time

import numpy as np


def _to_python(value):
  if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
    return value.item()
  if hasattr(value, "shape") and getattr(value, "shape", None) == ():
    return float(value)
  return value


class MetricWriter:
  """Appends `{"step": s, "time": t, **metrics}` to `<workdir>/metrics.jsonl`; scalars also go to
  TensorBoard under `<workdir>/tensorboard`. Only process 0 should construct one with
  `enabled=True`; others get a no-op writer."""

  def __init__(self, workdir, enabled=True, tensorboard=True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step, metrics):
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k in ("step", "time"):
          continue
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir):
  """All rows of `<workdir>/metrics.jsonl` as a list of dicts."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
