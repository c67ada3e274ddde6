"""GLEAM-C phase 2: all four query modalities (uav, streetmap, panorama, ground) against satellite,
modality-balanced, initialised from the phase-1 result.

    python -m gleam_jax.main --config=configs/c_phase2.py --workdir=~/gleam_runs/c_phase2 \
        --config.init_from=~/gleam_runs/c_phase1
    python -m gleam_jax.main --config=configs/c_phase2.py:towers=modality ...   # a tower per new modality

`init_from` names the phase-1 workdir (or its checkpoints folder, or one step folder); it must
exist. Presets as in c_phase1 (`:tiny`, `key=value`), plus `towers=shared|modality|locked` (below).

Each batch holds 16 pairs of every modality (pipeline.ModalityStreams), each at its own shape.
On the synthetic world, ground photos are read in the panorama frame at their heading and UAV views
in the satellite frame (projected onto the ground with their camera pose); the published datasets
do not record the cameras, so their views are read as they are. By default one encoder serves every
view, as GLEAM-C is defined; `towers=modality` gives the UAV, street-map and ground queries their
own towers, started as copies of the phase-1 tower, which goes on encoding satellites and panoramas.

Measured (2-core CPU dev box, idle, from the phase-1 default, test panorama R@1 82.5%), test R@1
uav / streetmap / panorama / ground:
  towers=shared,   5000 steps (the default): 78.5 / 54.8 / 73.6 / 10.0 in 11:40 wall (~497 pairs/s)
  towers=modality, 5000 steps: 78.8 / 55.2 / 84.0 / 15.6 in 13:43 wall (~431 pairs/s)
With UAV views read as photos (before session 6) the default gave 12.4 / 36.7 / 71.9 / 10.2.
Ground photos are short of R@1 50%; README "Phase 2" has the runs and what reaching it would take.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c_phase1  # noqa: E402

from gleam_jax.data.config import MODALITIES  # noqa: E402

PHASE1_WORKDIR = "~/gleam_runs/c_phase1"


KNOBS = c_phase1.KNOBS + ("towers",)
# shared:   one tower for every view, as in phase 1.
# modality: each new modality (uav, streetmap, ground) gets its own query tower, started as a copy
#           of the phase-1 tower, which keeps encoding satellites and panoramas; all train.
# locked:   as modality, with the phase-1 tower frozen (LiT): satellites and panoramas embed exactly
#           as after phase 1, and the new towers learn to meet them there.
TOWERS = ("shared", "modality", "locked")


def get_config(arg=None):
  flags, knobs = c_phase1.parse_arg(arg, KNOBS)
  towers = knobs.get("towers", "shared")
  if towers not in TOWERS:
    raise c_phase1.GleamError(f"config knob towers={towers!r}: use one of {', '.join(TOWERS)}.")
  c = c_phase1.base_config(arg, modalities=MODALITIES, known=KNOBS)
  for m in MODALITIES:
    c.data.modality_weights[m] = 1.0
  if c.data.name == "synthetic_cvgl":  # the published datasets do not record the cameras
    # Ground photos carry their compass heading: placed in the panorama frame, they are read by
    # what phase 1 learned from panoramas (gleam_jax/data/panorama_frame.py).
    c.data.ground_frame = "panorama"
    # UAV views carry their camera pose: projected onto the ground, north-up, they are read like
    # the satellites they are matched to (gleam_jax/data/satellite_frame.py).
    c.data.uav_frame = "satellite"
  c.init_from = PHASE1_WORKDIR
  if towers != "shared":
    c.model.modality_towers = tuple(m for m in c.data.modalities if m != "panorama")
  if towers == "locked":  # panoramas need no training: their tower is frozen
    c.optim.frozen = (r"^model/encoder/", r"^model/projection/")
    c.eval.modalities = tuple(c.data.modalities)
    c.data.modalities = c.model.modality_towers
  if "tiny" in flags:
    c.batch_size = c_phase1.knob(knobs, "batch", 8 * len(c.data.modalities))  # groups of 8: a row per device
  else:
    c.total_steps = c_phase1.knob(knobs, "steps", 5000)
    c.optim.lr = c_phase1.knob(knobs, "lr", 1e-3, float)
    c.optim.warmup_steps = 50
  # One satellite tower serves north-aligned panoramas and heading-free photos: keep satellites
  # of photos north-up. Photometric augmentation slowed the new modalities in short runs.
  c.data.augment.rotate_photo = False
  c.data.augment.color_jitter = 0.0
  c.data.augment.blur_sharpen = 0.0
  c.data.augment.dropout = 0.0
  return c
