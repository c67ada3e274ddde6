"""GLEAM-C phase 1: panorama <-> satellite on the synthetic world (VIGOR-style same-area split).

    python -m gleam_jax.main --config=configs/c_phase1.py --workdir=~/gleam_runs/c_phase1
    python -m gleam_jax.main --config=configs/c_phase1.py:tiny --workdir=/tmp/t   # seconds, for tests
    python -m gleam_jax.main --config=configs/c_phase1.py:sampler=gps,loss=sigmoid --workdir=...

`arg` is a comma-separated list of presets: `tiny` (tiny world, tiny model, few steps) and
`key=value` for the common knobs (variant, data, res, steps, batch, sampler, loss, lr, modalities, vit,
lora). `lora=16` trains rank-16 LoRA adapters on the encoders' block Linears with the encoders frozen.
`variant=` names a ConvNeXt (atto ... base) or, with a patch size, a ViT as big_vision names it
(`variant=S/16`; `variant=Ti/4` for the 32-px synthetic world), its position grid at the satellite size;
`vit=` (google, siglip, clip, open_clip, dinov2, dinov2_reg, dinov2_giant, dinov2_reg_giant) sets the ViT's
settings and the pixel normalisation for that family's checkpoints (`gleam_c.VIT_FAMILIES`;
`variant=giant2/14,res=224,vit=dinov2_giant` for facebook/dinov2-giant; `variant=B/16,res=224,vit=clip` and
`--config.model.pretrained=/path/clip-vit-base-patch16`). Any field can
be overridden on the command line (`--config.optim.lr=1e-3`); the config is locked, so a typo is
an error. `data=` names a synthetic world preset (tiny, s64, s128) or a published dataset built from
its local copy (vigor, cvusa, cvact, university1652, sues200; its builder config, eval splits and
protocol follow), e.g.

    python -m gleam_jax.main --config=configs/c_phase1.py:data=vigor,res=128 \
        --config.data.manual_dir=/data/VIGOR --config.data.config=cross_area --workdir=...

Measured on the 2-core CPU dev box (s64 world, 1,000 held-out test locations, 500 cross-city):
`steps=1000` on an otherwise idle box: 4:39 wall including the 38 s dataset build, ~330 pairs/s,
panorama->satellite R@1 50.4% (R@5 81.2%, R@10 88.5%), cross-city R@1 38.0%. The default of 2000
steps: 5:13-5:31 wall from an empty data dir on session 5's idle box (34-37 s build, ~490-517
pairs/s; 6:49 before session 5's step and input changes, 8:04 before the decoded-record cache), R@1
82.5%, cross-city 64.6%; 5:33 on session 6's box (39 s build, ~493 pairs/s), the same losses and
R@1.
"""
import math

import ml_collections
from ml_collections import config_dict

from gleam_jax.data import builders
from gleam_jax.data.config import data_config
from gleam_jax.errors import GleamError
from gleam_jax.eval.retrieval import search_config
from gleam_jax.models.gleam_c import VIT_FAMILIES, model_config
from gleam_jax.train import lora
from gleam_jax.train.sharding import DEFAULT_RULES

KNOBS = ("variant", "data", "res", "steps", "batch", "sampler", "loss", "lr", "modalities", "vit", "lora")


def parse_arg(arg, known=KNOBS):
  """'tiny,steps=20' -> ({'tiny'}, {'steps': '20'}); unknown knobs are an error."""
  flags, knobs = set(), {}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if "=" in token:
      key, value = token.split("=", 1)
      if key not in known:
        raise GleamError(f"unknown config knob {key!r} in {arg!r}; the knobs are {', '.join(known)}.")
      knobs[key] = value
    elif token == "tiny":
      flags.add(token)
    else:
      raise GleamError(f"unknown preset {token!r} in {arg!r}; use 'tiny' or key=value with the knobs "
                       f"{', '.join(known)}.")
  return flags, knobs


def knob(knobs, key, default, kind=int):
  """The knob's value as a number of `kind`, or `default` when not given."""
  if key not in knobs:
    return default
  try:
    return kind(knobs[key])
  except ValueError:
    raise GleamError(f"config knob {key}={knobs[key]!r} must be a{'n integer' if kind is int else ' number'}.") from None


def vit_family(name, data):
  """The `model.vit` settings and (mean, std) of a checkpoint family (None: ours, the data's)."""
  if name is None:
    return {}, (data.mean, data.std)
  if name not in VIT_FAMILIES:
    raise GleamError(f"config knob vit={name!r}: choose one of {', '.join(VIT_FAMILIES)}.")
  return VIT_FAMILIES[name]


def base_config(arg, modalities, known=KNOBS):
  flags, knobs = parse_arg(arg, known)
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.trainer = "contrastive"
  seed = config_dict.FieldReference(0)
  c.seed = seed

  modalities = tuple(knobs["modalities"].split("+")) if "modalities" in knobs else modalities
  real = builders.REAL.get(knobs.get("data"))
  if real:  # a published dataset: the phase's modalities it holds (else its first), its eval splits
    if "modalities" not in knobs:
      modalities = tuple(m for m in modalities if m in real["modalities"]) or real["modalities"][:1]
    res = knob(knobs, "res", 32)
    c.data = data_config(name=knobs["data"], modalities=modalities, query_size=(res, res),
                         panorama_size=(res, 2 * res), satellite_size=(res, res), read_threads=2 if tiny else 4)
  else:
    # The s64 world read at 32 px: on a 2-core CPU this is what trains in minutes.
    res = knob(knobs, "res", 32)
    c.data = data_config(config=knobs.get("data", "tiny" if tiny else "s64"), modalities=modalities,
                         query_size=(res, res), panorama_size=(res, 2 * res), satellite_size=(res, res),
                         **(dict(read_threads=2) if tiny else {}))
  c.data.seed = seed
  c.data.sampler.name = knobs.get("sampler", "shuffle")

  if "vit" in knobs and "/" not in knobs.get("variant", ""):
    raise GleamError(f"config knob vit={knobs['vit']} sets a ViT's settings; name the ViT too "
                     f"(variant=B/16,vit={knobs['vit']}).")
  if "variant" in knobs and "/" in knobs["variant"]:  # a ViT, e.g. S/16; its position grid at the res
    family, (c.data.mean, c.data.std) = vit_family(knobs.get("vit"), c.data)
    c.model = model_config(variant=knobs["variant"], embed_dim=16 if tiny else 128, backbone="vit",
                           vit=dict(image_size=c.data.satellite_size[0], **family))
  elif "variant" in knobs:  # also with tiny: a real variant on the tiny world
    c.model = model_config(variant=knobs["variant"], embed_dim=16 if tiny else 128)
  elif tiny:
    c.model = model_config(depths=(1, 1), dims=(8, 16), embed_dim=16)
  else:  # a small ConvNeXt (atto's layout at 4/5 width, fewer blocks): fast on CPU
    c.model = model_config(depths=(1, 1, 3, 1), dims=(32, 64, 128, 256), embed_dim=128)

  c.loss = ml_collections.ConfigDict(dict(name=knobs.get("loss", "infonce"), label_smoothing=0.1))
  if c.loss.name == "sigmoid":  # SigLIP starts at t = 10 (and b = -10), InfoNCE at 1/0.07
    c.model.logit_scale_init = math.log(10.0)

  batch_size = config_dict.FieldReference(knob(knobs, "batch", 16 if tiny else 64))
  c.batch_size = batch_size  # global batch (pairs per step), split over the mesh's data axes
  # > 1: each step encodes its batch in this many micro-batches (gradient cache): the loss and the
  # gradients stay the whole batch's, the activations in memory one micro-batch's.
  c.grad_accum_steps = 1
  # 1000 steps (16 epochs) gave test R@1 50.4% (module docstring), still rising, hence 2000.
  c.total_steps = knob(knobs, "steps", 12 if tiny else 2000)
  c.total_epochs = config_dict.placeholder(float)  # when set, replaces total_steps

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=knob(knobs, "lr", 3e-3 if tiny else 2e-3, float), b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.05, warmup_steps=2 if tiny else 50, min_lr_ratio=0.01, clip_norm=1.0,
      frozen=(), lr_mults=(), layer_decay=1.0, no_decay=(r"logit_scale",)))

  # LoRA (rank > 0): adapters on the encoders' block Linears, the encoders frozen, the projection
  # heads and logit scale trained (train/lora.py): fine-tuning a large pretrained backbone.
  c.lora = ml_collections.ConfigDict(dict(rank=knob(knobs, "lora", 0), alpha=16.0,
                                          targets=(lora.ENCODER_BLOCK_LINEARS,)))

  c.log_every_steps = 1 if tiny else 20
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0: only at the end
  c.eval.at_end = True
  c.eval.splits = tuple(c.data.eval_splits)
  c.eval.modalities = config_dict.placeholder(tuple)  # default: the training modalities
  # Also evaluate panoramas cut to these horizontal fields of view (deg) at a heading fixed per record
  # (known orientation, the rest filled), reported as 'panorama_fov<deg>': e.g. (90, 180).
  c.eval.panorama_fov_deg = ()
  c.eval.protocol = real["protocol"] if real else "cvusa"
  # Also score these modalities with all views of a location as one query (the mean of their
  # embeddings; University-1652's multiple-query setting), reported as '<modality>_multiquery'.
  # Default: the drone views, where the job evaluates them and the protocol is not VIGOR's.
  c.eval.multi_query = config_dict.placeholder(tuple)
  # University-1652 / SUES-200 also report satellite -> drone: these modalities' views as gallery
  c.eval.satellite_to = ("uav",) if real and real["protocol"] == "university" else ()
  c.eval.batch_size = config_dict.FieldReference(128) if not tiny else batch_size
  c.eval.num_examples_png = 4 if tiny else 8
  c.eval.search = search_config()

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=4 if tiny else 100, max_to_keep=2, async_save=True))
  c.dss_refresh_every_epochs = 1  # sampler 'dss': recompute satellite neighbours this often

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = DEFAULT_RULES
  c.init_from = config_dict.placeholder(str)  # a workdir/checkpoint whose params start this job
  return c


def get_config(arg=None):
  return base_config(arg, modalities=("panorama",))
