"""Qwen2.5-VL configuration: frozen dataclasses, built from presets or a Hugging Face config.

`get(name)` returns a preset ('tiny', 'qwen2_5_vl_3b', 'qwen2_5_vl_7b'); `from_hf(hf_config)` converts a
`transformers.Qwen2_5_VLConfig`; `from_pretrained_dir(path)` reads a local HF checkpoint's
`config.json` (no network). `QWEN_SHARDING_RULES` maps the logical axis names of the parameters to
the mesh axes ('data', 'fsdp', 'tensor'): FSDP shards the embedding dimension, tensor parallelism
shards heads, MLP and vocabulary.
"""
import dataclasses
import json
import os

from gleam_jax.errors import GleamError


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 2
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch (channels x temporal x patch x patch), as HF's pixel_values."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 2048
  intermediate_size: int = 11008
  num_hidden_layers: int = 36
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, ...] = (16, 24, 24)
  max_position_embeddings: int = 128000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """The whole model. `dtype` is the compute dtype; `param_dtype` the dtype parameters are stored in.

  Norms, softmax, rotary embeddings and the final logits are always float32. `remat` recomputes each
  vision block and decoder layer in the backward pass (activation memory of one layer, for training).
  """
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_ids: tuple[int, ...] = (151645, 151643)
  pad_token_id: int = 151643
  tie_word_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def replace(self, **kwargs) -> "Qwen2_5_VLConfig":
    """A copy with `kwargs` changed, checked as the presets are (GleamError on bad values)."""
    return _check(dataclasses.replace(self, **kwargs))


def _check(cfg: Qwen2_5_VLConfig) -> Qwen2_5_VLConfig:
  t, v = cfg.text, cfg.vision
  if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
    raise GleamError(f"Qwen text config: hidden_size {t.hidden_size}, heads {t.num_attention_heads} and "
                     f"kv heads {t.num_key_value_heads} must divide evenly; fix the text config.")
  if 2 * sum(t.mrope_section) != t.head_dim:
    raise GleamError(f"Qwen text config: mrope_section {t.mrope_section} must sum to head_dim/2 = "
                     f"{t.head_dim // 2}; fix mrope_section.")
  if v.hidden_size % v.num_heads or v.head_dim % 4:
    raise GleamError(f"Qwen vision config: hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a "
                     "head_dim divisible by 4 (2-D rotary); fix the vision config.")
  if v.window_size % (v.spatial_merge_size * v.patch_size):
    raise GleamError(f"Qwen vision config: window_size {v.window_size} must be a multiple of "
                     f"spatial_merge_size*patch_size = {v.spatial_merge_size * v.patch_size}.")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
      raise GleamError(f"Qwen config: {name}={getattr(cfg, name)!r}; use 'float32', 'bfloat16' or 'float16'.")
  return cfg


def tiny(**overrides) -> Qwen2_5_VLConfig:
  """A random-init model small enough for CPU tests: windows, full-attention blocks, GQA, M-RoPE."""
  cfg = Qwen2_5_VLConfig(
      vision=VisionConfig(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, window_size=56,
                          out_hidden_size=64, fullatt_block_indexes=(1,)),
      text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                      max_position_embeddings=4096),
      image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303,
      bos_token_id=1, eos_token_ids=(2,), pad_token_id=0, tie_word_embeddings=False)
  return cfg.replace(**overrides)


def qwen2_5_vl_3b(**overrides) -> Qwen2_5_VLConfig:
  """Qwen/Qwen2.5-VL-3B-Instruct."""
  return Qwen2_5_VLConfig().replace(**overrides)


def qwen2_5_vl_7b(**overrides) -> Qwen2_5_VLConfig:
  """Qwen/Qwen2.5-VL-7B-Instruct."""
  cfg = Qwen2_5_VLConfig(
      vision=VisionConfig(out_hidden_size=3584),
      text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4),
      tie_word_embeddings=False)
  return cfg.replace(**overrides)


PRESETS = {"tiny": tiny, "qwen2_5_vl_3b": qwen2_5_vl_3b, "qwen2_5_vl_7b": qwen2_5_vl_7b}


def get(name: str, **overrides) -> Qwen2_5_VLConfig:
  if name not in PRESETS:
    raise GleamError(f"Unknown Qwen2.5-VL preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


def eos_tuple(eos) -> tuple[int, ...]:
  """Stop tokens as a tuple: None -> (), an int -> (int,), a list -> its ints (as transformers takes them)."""
  if eos is None:
    return ()
  try:
    return tuple(int(e) for e in eos)
  except TypeError:  # not iterable: one token id
    return (int(eos),)


def from_hf(hf_config, **overrides) -> Qwen2_5_VLConfig:
  """From a `transformers.Qwen2_5_VLConfig` (or its `to_dict()`)."""
  d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
  vd, td = d["vision_config"], d.get("text_config") or d
  vrope = vd.get("rope_parameters") or {}
  trope = td.get("rope_parameters") or td.get("rope_scaling") or {}
  vision = VisionConfig(
      depth=vd["depth"], hidden_size=vd["hidden_size"], intermediate_size=vd["intermediate_size"],
      num_heads=vd["num_heads"], in_channels=vd.get("in_channels", 3), patch_size=vd["patch_size"],
      temporal_patch_size=vd["temporal_patch_size"], spatial_merge_size=vd["spatial_merge_size"],
      window_size=vd["window_size"], out_hidden_size=vd["out_hidden_size"],
      fullatt_block_indexes=tuple(vd["fullatt_block_indexes"]),
      tokens_per_second=vd.get("tokens_per_second", 2), rope_theta=vrope.get("rope_theta", 10000.0))
  if vd.get("hidden_act", "silu") != "silu" or td.get("hidden_act", "silu") != "silu":
    raise GleamError("Qwen2.5-VL config: only hidden_act='silu' is supported.")
  text = TextConfig(
      vocab_size=td["vocab_size"], hidden_size=td["hidden_size"], intermediate_size=td["intermediate_size"],
      num_hidden_layers=td["num_hidden_layers"], num_attention_heads=td["num_attention_heads"],
      num_key_value_heads=td.get("num_key_value_heads") or td["num_attention_heads"],
      rms_norm_eps=td["rms_norm_eps"],
      rope_theta=trope.get("rope_theta", td.get("rope_theta", 1000000.0)),
      mrope_section=tuple(trope.get("mrope_section", (16, 24, 24))),
      max_position_embeddings=td.get("max_position_embeddings", 128000))
  eos = eos_tuple(td.get("eos_token_id", d.get("eos_token_id")))
  pad = td.get("pad_token_id", d.get("pad_token_id"))
  tie = bool(d.get("tie_word_embeddings") or td.get("tie_word_embeddings"))
  cfg = Qwen2_5_VLConfig(
      vision=vision, text=text, image_token_id=d["image_token_id"], video_token_id=d["video_token_id"],
      vision_start_token_id=d["vision_start_token_id"], vision_end_token_id=d["vision_end_token_id"],
      bos_token_id=td.get("bos_token_id", d.get("bos_token_id")) or 0, eos_token_ids=eos,
      pad_token_id=pad if pad is not None else (eos[0] if eos else 0), tie_word_embeddings=tie)
  return cfg.replace(**overrides)


def generation_config(path: str) -> dict:
  """The fields of `<path>/generation_config.json` (what transformers' `generate` takes its defaults
  from), or {} where there is none."""
  file = os.path.join(path, "generation_config.json")
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise GleamError(f"{file} is not valid JSON ({e}); fix or remove it.") from e


def from_pretrained_dir(path: str, **overrides) -> Qwen2_5_VLConfig:
  """Reads `<path>/config.json` of a local Hugging Face checkpoint (no network), and the stop and pad
  tokens of its `generation_config.json` where there is one, as transformers' `generate` does (the
  released Instruct checkpoints stop on <|im_end|> and <|endoftext|> and pad with <|endoftext|>;
  config.json names only the first)."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise GleamError(f"No config.json in {path!r}; give the path of a downloaded Qwen2.5-VL checkpoint "
                     "directory (with config.json and *.safetensors).")
  with open(file) as f:
    d = json.load(f)
  if d.get("model_type") not in ("qwen2_5_vl", None):
    raise GleamError(f"{file} has model_type {d.get('model_type')!r}, expected 'qwen2_5_vl'.")
  if "text_config" not in d:
    d = dict(d, text_config=d)
  g = generation_config(path)
  if g:
    if g.get("eos_token_id") is not None:
      overrides.setdefault("eos_token_ids", eos_tuple(g["eos_token_id"]))
    if g.get("pad_token_id") is not None:
      overrides.setdefault("pad_token_id", int(g["pad_token_id"]))
  return from_hf(d, **overrides)


# (logical axis, mesh axes). Unlisted logical names are replicated. FSDP shards the model dimension of
# every matrix, tensor parallelism the heads / MLP / vocabulary dimension (Megatron style).
QWEN_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_patch", None),
    ("norm", None),
    ("layers", None),
    ("cache_len", None),
)


def to_hf(cfg: Qwen2_5_VLConfig):
  """The equivalent `transformers.Qwen2_5_VLConfig` (for reference models in tests and benchmarks)."""
  import transformers  # only needed here
  v, t = cfg.vision, cfg.text
  return transformers.Qwen2_5_VLConfig(
      vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                         num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                         temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                         window_size=v.window_size, out_hidden_size=v.out_hidden_size,
                         fullatt_block_indexes=list(v.fullatt_block_indexes),
                         tokens_per_second=v.tokens_per_second,
                         rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta)),
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                       max_position_embeddings=t.max_position_embeddings, bos_token_id=cfg.bos_token_id,
                       eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.pad_token_id,
                       rope_parameters=dict(rope_type="default", rope_theta=t.rope_theta,
                                            mrope_section=list(t.mrope_section))),
      image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
      tie_word_embeddings=cfg.tie_word_embeddings)
