"""LoRA adapters kept beside a frozen parameter tree: a matched kernel W (in, out) is used as
W + (alpha / rank) A B, with A (in, rank) drawn N(0, 1/in) and B (rank, out) zero, so training starts
from the model as it is (Hu et al., 2021; the scaling of Hugging Face PEFT).

The adapters are a dict {kernel name with '.' separators: {'a', 'b'}} in the train state next to the
model's parameters (`config.optim.frozen` then covers the whole model, so AdamW keeps state for the
adapters only). The train step runs them beside their frozen layers (`attach`): x W + scale (x A) B,
so it never holds a merged copy of a kernel nor a gradient of its size, only the rank-r products.
For generation and export `merge` folds them into the kernels, which then serve as the model's own
(the fused decode kernels included).

GLEAM-X adapts the decoder's projections (`DECODER_PROJECTIONS`) with the whole model frozen; GLEAM-C
the Linears of its encoders' blocks (`ENCODER_BLOCK_LINEARS`) with the encoders frozen and the
projection heads and logit scale trained.
"""
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.models import ops
from gleam_jax.train.optim import path_name

# The decoder's attention and MLP projections (the usual LoRA targets of Qwen2.5-VL fine-tuning).
DECODER_PROJECTIONS = r"^language_model/layers/\d+/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel$"
# GLEAM-C's encoders (every tower): a ViT block's attention and MLP projections (a SwiGLU's gate and
# up), a ConvNeXt block's pointwise layers; what the adapters stand in for is `ENCODERS` (frozen).
ENCODER_BLOCK_LINEARS = (r"^(\w+_)?encoder/(stages/\d+/)?blocks/\d+/"
                         r"(attn/(query|key|value|out)|fc1|fc1/(gate|up)|fc2|pwconv[12])/kernel$")
ENCODERS = r"^model/(\w+_)?encoder/"


def enabled(lora_cfg):
  """Whether `config.lora` asks for adapters (rank > 0); configs written before LoRA have none."""
  return lora_cfg is not None and int(lora_cfg.rank) > 0


def check_values(lora_cfg):
  """Stops a `config.lora` whose rank or alpha no adapter can have (configs without one pass)."""
  if lora_cfg is None:
    return
  if int(lora_cfg.rank) < 0 or float(lora_cfg.alpha) <= 0:
    raise GleamError(f"config.lora.rank={lora_cfg.rank}, alpha={lora_cfg.alpha}: give rank >= 0 (0: no "
                     f"adapters) and alpha > 0 (the adapters are scaled by alpha / rank).")


def freezing(optim_cfg, frozen):
  """A copy of `optim_cfg` that also freezes the parameters `frozen` matches (what the adapters adapt)."""
  optim_cfg = optim_cfg.copy_and_resolve_references()
  with optim_cfg.unlocked():
    optim_cfg.frozen = tuple(optim_cfg.get("frozen") or ()) + (frozen,)
  return optim_cfg


def add_adapters(params, param_shardings, optim_cfg, lora_cfg, seed, replicated, frozen):
  """A train state's LoRA setup, in place: with `lora_cfg` enabled, new adapters in params['lora'] (each
  sharded as `replicated`) and the parameters `frozen` matches frozen. Returns (optim_cfg, lora_cfg, or
  None when LoRA is off)."""
  if not enabled(lora_cfg):
    return optim_cfg, None
  params["lora"] = init(params["model"], lora_cfg, seed)
  param_shardings["lora"] = jax.tree.map(lambda _: replicated, params["lora"])
  return freezing(optim_cfg, frozen), lora_cfg


def merged_model(params, lora_cfg):
  """A train state's `params['model']`, with its adapters (`params['lora']`) folded in when it has them."""
  if "lora" not in params:
    return params["model"]
  return merge(params["model"], params["lora"], scale(lora_cfg))


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
  """An `nnx.Linear` with its adapter beside it: base(x) + scale (x A) B, in the layer's compute dtype.
  The two products take `ops.pointwise`'s 2-D kernel gradients: with jnp's matmul the c_phase2 LoRA
  job ran at 316 pairs/s on a 2-core CPU at step 300, with these at 457 (620 over its 5000 steps;
  full fine-tuning runs at ~462)."""

  def __init__(self, base: nnx.Linear, a, b, scale: float):
    self.base, self.a, self.b, self.scale = base, nnx.data(a), nnx.data(b), scale

  @property
  def dtype(self):  # read by callers that cast their input for the layer
    return self.base.dtype

  def __call__(self, x):
    y = self.base(x)
    low = ops.pointwise(ops.pointwise(x.astype(y.dtype), self.a.astype(y.dtype)), self.b.astype(y.dtype))
    return y + (self.scale * low).astype(y.dtype)


def _layer(model, key):
  """(the module holding the layer of adapter `key`, the layer's attribute or index, the kernel's leaf
  name)."""
  *owner_path, attr, leaf = [int(p) if p.isdigit() else p for p in key.split(".")]
  owner = model
  for p in owner_path:
    owner = _get(owner, p)
  return owner, attr, leaf


def _get(owner, attr):
  return owner[attr] if isinstance(attr, int) else getattr(owner, attr)


def _set(owner, attr, layer):
  if isinstance(attr, int):
    owner[attr] = layer
  else:
    setattr(owner, attr, layer)


def attach(model, adapters, scale):
  """Puts each adapter beside its layer of the merged NNX `model` (in place; the model is the step's
  own, built from the state by `nnx.merge`). Returns the model."""
  for key, adapter in adapters.items():
    owner, attr, leaf = _layer(model, key)
    layer = _get(owner, attr)
    if leaf != "kernel" or not isinstance(layer, nnx.Linear):
      raise GleamError(f"LoRA adapter {key}: only nnx.Linear kernels take adapters, this is a "
                       f"{type(layer).__name__}.{leaf}; narrow config.lora.targets.")
    _set(owner, attr, Adapted(layer, adapter["a"], adapter["b"], scale))
  return model


def detach(model, adapters):
  """Undoes `attach` (in place): each adapted layer back to its own, so that the model's state holds
  its variables only, not the adapters. Returns the model."""
  for key in adapters:
    owner, attr, _ = _layer(model, key)
    _set(owner, attr, _get(owner, attr).base)
  return model
