"""GLEAM-X: fine-tune Qwen2.5-VL to say whether two views show the same place, and why (train/sft.py).

    python -m gleam_jax.main --config=configs/x_sft.py --workdir=~/gleam_runs/x_sft
    python -m gleam_jax.main --config=configs/x_sft.py:tiny --workdir=/tmp/x   # seconds, for tests
    python -m gleam_jax.main --config=configs/x_sft.py:hf_dir=/models/Qwen2.5-VL-3B-Instruct --workdir=...

`arg` is a comma-separated list of presets: `tiny` (tiny world, tiny model, few steps) and
`key=value` knobs: steps, batch, lr, data (a synthetic world preset), hf_dir (a local Hugging Face
Qwen2.5-VL directory: its weights, tokenizer and processor, bfloat16, the vision tower frozen),
langs (en+zh), lora (a LoRA rank: adapters on the decoder's projections, the model frozen), flights (the share
of drone pairs whose query is the location's whole flight, its views as a video before the satellite image),
negatives_from (a GLEAM-C workdir of the same dataset: non-matching satellites among its top-10 confusions),
train_file / eval_file (your own pairs, JSON Lines or a JSON array: gleam_jax/data/pair_files.py; every pair is used,
images read from the file's folder or examples.image_root, resized to examples.image_size if set). Without hf_dir the model is a small random Qwen2.5-VL (`model.tiny`) with a
tokenizer trained on the GLEAM-X answers: what trains on a CPU. Any field can be overridden on the
command line (`--config.optim.lr=1e-4`); the config is locked, so a typo is an error.
"""
import os
import sys

import ml_collections
from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c_phase1  # noqa: E402

from gleam_jax.data.config import MODALITIES, data_config  # noqa: E402
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES  # noqa: E402
from gleam_jax.train import lora  # noqa: E402

KNOBS = ("steps", "batch", "lr", "data", "hf_dir", "langs", "lora", "train_file", "eval_file", "flights",
         "negatives_from")


def get_config(arg=None):
  flags, knobs = c_phase1.parse_arg(arg, KNOBS)
  tiny = "tiny" in flags
  c = ml_collections.ConfigDict()
  c.trainer = "sft"
  c.seed = 0
  c.data = data_config(config=knobs.get("data", "tiny" if tiny else "s64"), modalities=MODALITIES,
                       read_threads=2 if tiny else 4)
  c.examples = ml_collections.ConfigDict(dict(
      train=64 if tiny else 2048, eval=8 if tiny else 128, eval_split="test",
      hard_negatives=0.5,  # share of non-matching satellites from the query's own city
      # a GLEAM-C job of the same dataset: non-matching satellites among its top-k wrong candidates for each
      # query instead (what GLEAM-X, as GLEAM-C's re-ranker in `localize`, has to tell apart)
      negatives_from=knobs.get("negatives_from") or config_dict.placeholder(str),
      negatives_top_k=10,
      # share of the drone pairs asked about the location's whole flight (its views as a video) instead of one view
      flights=c_phase1.knob(knobs, "flights", 0.0, float),
      langs=tuple(knobs.get("langs", "en+zh").split("+")),
      # your own pairs instead of the synthetic draw (data/pair_files.py); every line of the file is used
      train_file=knobs.get("train_file") or config_dict.placeholder(str),
      eval_file=knobs.get("eval_file") or config_dict.placeholder(str),
      image_root=config_dict.placeholder(str),  # default: each pairs file's folder
      image_size=config_dict.placeholder(tuple)))  # (height, width) for every image: one layout, one compiled step

  hf_dir = knobs.get("hf_dir")
  c.model = ml_collections.ConfigDict(dict(
      hf_dir=hf_dir or config_dict.placeholder(str),
      dtype="bfloat16" if hf_dir else "float32", param_dtype="bfloat16" if hf_dir else "float32", remat=bool(hf_dir),
      # the processor's pixel bounds: the synthetic 64 px views give 2 x 2 merged tokens each
      min_pixels=56 * 56, max_pixels=448 * 448,
      # a flight's frames within the same bounds (not Qwen2.5-VL's video default of >= 128 tokens a frame):
      # each frame as many tokens as the view it is
      video_min_pixels=56 * 56, video_max_pixels=448 * 448,
      # how still images are resized: 'pil' (transformers' PIL image processor) or 'torchvision' (its
      # default where torchvision is installed), to train as the model will be served
      image_resize="pil",
      tiny=dict(vocab_size=1200,
                text=dict(hidden_size=64 if tiny else 256, intermediate_size=96 if tiny else 704,
                          num_hidden_layers=2 if tiny else 4, num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0,  # sums to head_dim / 2
                                               mrope_section=[2, 3, 3] if tiny else [8, 12, 12])),
                vision=dict(depth=2 if tiny else 4, hidden_size=32 if tiny else 128,
                            intermediate_size=48 if tiny else 256, num_heads=2 if tiny else 4,
                            out_hidden_size=64 if tiny else 256))))

  # LoRA (rank > 0): adapters on the decoder's projections, the model frozen (train/lora.py)
  c.lora = ml_collections.ConfigDict(dict(rank=c_phase1.knob(knobs, "lora", 0), alpha=16.0,
                                          targets=(lora.DECODER_PROJECTIONS,)))
  # > 0: the loss over chunks of this many positions, never all (batch, length, vocabulary) logits at once
  # (a real model's 151k vocabulary); 0: in one piece
  c.loss_chunk = 128 if hf_dir else 0
  c.batch_size = c_phase1.knob(knobs, "batch", 8 if tiny else 16)  # tiny: a row per device of the tests' 8
  # > 1: each step's batch in this many micro-batches, one after another, their gradients summed (the
  # same update as the whole batch at once, with a micro-batch's activations in memory)
  c.grad_accum_steps = 1
  c.total_steps = c_phase1.knob(knobs, "steps", 8 if tiny else 600)
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=c_phase1.knob(knobs, "lr", 2e-5 if hf_dir else 1e-3, float), b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0 if hf_dir else 0.01, warmup_steps=2 if tiny else 30, min_lr_ratio=0.1, clip_norm=1.0,
      frozen=(r"^model/visual/",) if hf_dir else (), lr_mults=(), no_decay=(r"norm", r"bias$"),
      layer_decay=1.0))  # < 1: the vision tower's blocks decay layer by layer (optim.layer_decay_mults)

  c.log_every_steps = 1 if tiny else 20
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, at_end=True, batch_size=8 if tiny else 32,
                                          max_new_tokens=16 if tiny else 64, num_samples=8))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=4 if tiny else 200, max_to_keep=2, async_save=True))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = QWEN_SHARDING_RULES
  return c
