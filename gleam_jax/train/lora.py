"""LoRA adapters kept beside a frozen parameter tree: a matched kernel W (in, out) is used as
W + (alpha / rank) A B, with A (in, rank) drawn N(0, 1/in) and B (rank, out) zero, so training starts
from the model as it is (Hu et al., 2021; the scaling of Hugging Face PEFT).

The adapters are a dict {kernel name with '.' separators: {'a', 'b'}} in the train state next to the
model's parameters (`config.optim.frozen` then covers the whole model, so AdamW keeps state for the
adapters only). The train step runs them beside their frozen layers (`attach`): x W + scale (x A) B,
so it never holds a merged copy of a kernel nor a gradient of its size, only the rank-r products.
For generation and export `merge` folds them into the kernels, which then serve as the model's own
(the fused decode kernels included).
"""
import re

from flax import nnx
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
  chosen = sorted(n for n, x in named.items()
                  if n.endswith("/kernel") and x.ndim == 2 and any(t.search(n) for t in targets))
  if not chosen:
    raise GleamError(f"config.lora.targets={tuple(lora_cfg.targets)} match no Linear kernel of the model; "
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


class Adapted(nnx.Module):
  """An `nnx.Linear` with its adapter beside it: base(x) + scale (x A) B, in the layer's compute dtype."""

  def __init__(self, base: nnx.Linear, a, b, scale: float):
    self.base, self.a, self.b, self.scale = base, nnx.data(a), nnx.data(b), scale

  @property
  def dtype(self):  # read by callers that cast their input for the layer
    return self.base.dtype

  def __call__(self, x):
    y = self.base(x)
    low = (x.astype(y.dtype) @ self.a.astype(y.dtype)) @ self.b.astype(y.dtype)
    return y + (self.scale * low).astype(y.dtype)


def attach(model, adapters, scale):
  """Puts each adapter beside its layer of the merged NNX `model` (in place; the model is the step's
  own, built from the state by `nnx.merge`). Returns the model."""
  for key, adapter in adapters.items():
    *owner_path, attr, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
    owner = model
    for p in owner_path:
      owner = owner[p] if isinstance(p, int) else getattr(owner, p)
    layer = owner[attr] if isinstance(attr, int) else getattr(owner, attr)
    if leaf != "kernel" or not isinstance(layer, nnx.Linear):
      raise GleamError(f"LoRA adapter {key}: only nnx.Linear kernels take adapters, this is a "
                       f"{type(layer).__name__}.{leaf}; narrow config.lora.targets.")
    adapted = Adapted(layer, adapter["a"], adapter["b"], scale)
    if isinstance(attr, int):
      owner[attr] = adapted
    else:
      setattr(owner, attr, adapted)
  return model
