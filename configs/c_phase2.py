"""GLEAM-C phase 2: all four query modalities (uav, streetmap, panorama, ground) against satellite,
modality-balanced, initialised from the phase-1 result.

    python -m gleam_jax.main --config=configs/c_phase2.py --workdir=~/gleam_runs/c_phase2 \
        --config.init_from=~/gleam_runs/c_phase1

`init_from` names the phase-1 workdir (or its checkpoints folder, or one step folder); it must
exist. Presets as in c_phase1 (`:tiny`, `key=value`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c_phase1  # noqa: E402

from gleam_jax.data.config import MODALITIES  # noqa: E402

PHASE1_WORKDIR = "~/gleam_runs/c_phase1"


def get_config(arg=None):
  c = c_phase1.base_config(arg, modalities=MODALITIES)
  for m in MODALITIES:
    c.data.modality_weights[m] = 1.0
  c.init_from = PHASE1_WORKDIR
  flags, knobs = c_phase1.parse_arg(arg)
  if "tiny" not in flags:
    c.total_steps = int(knobs.get("steps", 1200))
    c.optim.warmup_steps = 50
  return c
