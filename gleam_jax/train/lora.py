"""LoRA adapters kept beside a frozen parameter tree: a matched kernel W (in, out) is used as
W + (alpha / rank) A B, with A (in, rank) drawn N(0, 1/in) and B (rank, out) zero, so training starts
from the model as it is (Hu et al., 2021; the scaling of Hugging Face PEFT).

The adapters are a dict {kernel name with '.' separators: {'a', 'b'}} in the train state next to the
model's parameters (`config.optim.frozen` then covers the whole model, so AdamW keeps state for the
adapters only). `merge` folds them into the kernels functionally, inside the jitted step and for
generation, where the merged kernels serve as the model's own (the fused decode kernels included).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.train.optim import path_name

# The decoder's attention and MLP projections (the usual LoRA targets of Qwen2.5-VL fine-tuning).
DECODER_PROJECTIONS = r"^language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"


def _key(name):
  return name.replace("/", ".")


def init(model_params, lora_cfg, seed):
  """{key: {'a', 'b'}} for the kernels of `model_params` (a pure dict) whose '/'-joined names match
  `lora_cfg.targets`."""
  rank = int(lora_cfg.rank)
  try:
    targets = [re.compile(t) for t in lora_cfg.targets]
  except re.error as e:
    raise GleamError(f"config.lora.targets: {e}; give regexes over parameter names.") from None
  named = {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(model_params)}
  chosen = sorted(n for n, x in named.items() if x.ndim == 2 and any(t.search(n) for t in targets))
  if not chosen:
    raise GleamError(f"config.lora.targets={tuple(lora_cfg.targets)} match no 2-D kernel of the model; "
                     f"its names look like {sorted(named)[:3]}.")
  rng = np.random.default_rng([int(seed), 17])
  adapters = {}
  for name in chosen:
    din, dout = named[name].shape
    adapters[_key(name)] = {"a": jnp.asarray(rng.standard_normal((din, rank)) / np.sqrt(din), jnp.float32),
                            "b": jnp.zeros((rank, dout), jnp.float32)}
  return adapters


def merge(model_params, adapters, scale):
  """`model_params` with W + scale * A B for every adapted kernel (in W's dtype)."""
  def merged(path, w):
    adapter = adapters.get(_key(path_name(path)))
    if adapter is None:
      return w
    return (w.astype(jnp.float32) + scale * adapter["a"] @ adapter["b"]).astype(w.dtype)
  return jax.tree_util.tree_map_with_path(merged, model_params)


def scale(lora_cfg):
  return float(lora_cfg.alpha) / int(lora_cfg.rank)
