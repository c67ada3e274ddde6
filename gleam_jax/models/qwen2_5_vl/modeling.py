"""Qwen2.5-VL in Flax NNX: vision tower (window attention, 2-D rotary, patch merger) + Qwen2 decoder.

Parameter tree (NNX paths; they mirror the Hugging Face names with Flax leaf names):

  visual.patch_embed.proj.kernel                  (C*T*P*P, vision_hidden)  HF Conv3d weight reshaped
                                                  to (vision_hidden, C*T*P*P) and transposed; no bias
  visual.blocks[i].norm1.scale, .norm2.scale      (vision_hidden,)           HF `weight`
  visual.blocks[i].attn.qkv.kernel / .bias        (vision_hidden, 3*vision_hidden) / (3*vision_hidden,)
  visual.blocks[i].attn.proj.kernel / .bias       (vision_hidden, vision_hidden) / (vision_hidden,)
  visual.blocks[i].mlp.{gate_proj,up_proj}.kernel / .bias   (vision_hidden, vision_mlp) / (vision_mlp,)
  visual.blocks[i].mlp.down_proj.kernel / .bias   (vision_mlp, vision_hidden) / (vision_hidden,)
  visual.merger.ln_q.scale                        (vision_hidden,)
  visual.merger.mlp[0].kernel / .bias             (4*vision_hidden, 4*vision_hidden)
  visual.merger.mlp[2].kernel / .bias             (4*vision_hidden, hidden)
  language_model.embed_tokens.embedding           (vocab, hidden)            HF `weight` as is
  language_model.layers[i].self_attn.{q,k,v}_proj.kernel / .bias   (hidden, heads*head_dim) / (...)
  language_model.layers[i].self_attn.o_proj.kernel                 (heads*head_dim, hidden); no bias
  language_model.layers[i].mlp.{gate_proj,up_proj}.kernel          (hidden, mlp); no bias
  language_model.layers[i].mlp.down_proj.kernel                    (mlp, hidden)
  language_model.layers[i].input_layernorm.scale, .post_attention_layernorm.scale   (hidden,)
  language_model.norm.scale                       (hidden,)
  lm_head.kernel                                  (hidden, vocab); absent when tie_word_embeddings

Every `kernel` is the transpose of the HF `nn.Linear.weight`. In `nnx.state(model)` the list indices
are integers: ('visual', 'blocks', 0, 'attn', 'qkv', 'kernel'). `abstract_model(cfg)` builds the model
with `nnx.eval_shape` (no weights materialised) for a loader to fill.

Each parameter carries logical axis names (`out_sharding` metadata): 'vocab', 'embed', 'mlp', 'heads',
'kv_heads', 'norm', 'vision_patch', 'vision_embed', 'vision_mlp', 'vision_heads'; see
`config.QWEN_SHARDING_RULES`.

Inputs follow HF: `pixel_values` (num_patches, C*T*P*P) flattened patches of all images, concatenated;
`image_grid_thw` (num_images, 3) in patch units (host NumPy; see `rope.vision_layout`); `input_ids`
with `image_token_id` placeholders (one per merged token); 3-D `position_ids` from
`rope.get_rope_index`; `attention_mask` (B, L) with 1 for real tokens (left padding). Videos
(`pixel_values_videos`, `video_grid_thw`, `video_token_id` placeholders, `second_per_grid_ts` for the
positions) go through the same tower: `merge_visuals` puts images and videos into one stream in the
order of their placeholders, and `embed` fills both kinds.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.interpreters import partial_eval  # pylint: disable=g-direct-jax-internal-import

import gleam_jax.models  # noqa: F401  (logical sharding metadata only, no eager placement)
from gleam_jax.errors import GleamError
from gleam_jax.models import ops
from gleam_jax.models.qwen2_5_vl import rope
from gleam_jax.models.qwen2_5_vl.config import QWEN_SHARDING_RULES, Qwen2_5_VLConfig
from gleam_jax.train import sharding

_INIT = nnx.initializers.normal(0.02)
_NEG = float(jnp.finfo(jnp.float32).min)


def _linear(din, dout, names, *, bias, cfg, rngs):
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
      dot_general=ops.pointwise_dot_general,
      kernel_init=nnx.with_partitioning(_INIT, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)), rngs=rngs)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, cast back to the input dtype."""

  def __init__(self, dim, eps, *, cfg):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)


def _softmax_attention(q, k, v, mask, scale):
  """q (B, L, K, G, D), k/v (B, K, S, D) (the KV cache's layout), mask (B, L, S) bool -> (B, L, K*G*D).
  Softmax in float32.

  Written as two batched matmuls over (B, K) with rows (G, L): the logits come out as (.., L, S)
  rows, so the mask, the softmax and the second matmul read them contiguously (an einsum straight
  from these layouts let XLA produce (S, L) logits and transpose them, the slowest op of the vision
  tower's full-attention block).
  """
  b, length, kv_heads, groups, dim = q.shape
  rows = jnp.transpose(q, (0, 2, 3, 1, 4)).reshape(b, kv_heads, groups * length, dim)
  batch = ((0, 1), (0, 1))
  logits = jax.lax.dot_general(rows, k, (((3,), (3,)), batch), preferred_element_type=jnp.float32) * scale
  logits = logits.reshape(b, kv_heads, groups, length, -1)
  logits = jnp.where(mask[:, None, None], logits, _NEG).reshape(b, kv_heads, groups * length, -1)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jax.lax.dot_general(probs, v, (((3,), (2,)), batch))  # (B, K, G*L, D)
  out = jnp.transpose(out.reshape(b, kv_heads, groups, length, dim), (0, 3, 1, 2, 4))
  return out.reshape(b, length, -1)


# ----------------------------------------------------------------------------- vision tower


class PatchEmbed(nnx.Module):
  """HF Conv3d with stride == kernel over one flattened (C, T, P, P) patch == a Linear without bias."""

  def __init__(self, cfg, *, rngs):
    v = cfg.vision
    self.proj = _linear(v.patch_dim, v.hidden_size, ("vision_patch", "vision_embed"), bias=False, cfg=cfg,
                        rngs=rngs)

  def __call__(self, pixel_values):
    return self.proj(pixel_values.astype(self.proj.dtype))


class VisionAttention(nnx.Module):

  def __init__(self, cfg, *, rngs):
    v = cfg.vision
    self.num_heads, self.head_dim = v.num_heads, v.head_dim
    self.qkv = _linear(v.hidden_size, 3 * v.hidden_size, ("vision_embed", "vision_heads"), bias=True, cfg=cfg,
                       rngs=rngs)
    self.proj = _linear(v.hidden_size, v.hidden_size, ("vision_heads", "vision_embed"), bias=True, cfg=cfg,
                        rngs=rngs)

  def __call__(self, x, cos, sin, blocks, unblock):
    """x (N, D); attention only within each row of `blocks` (see `rope.VisionLayout`)."""
    n = x.shape[0]
    q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim), 1, 0)
    # Materialised before the gathers: fused into them, the rotary was recomputed per gathered element.
    q, k = jax.lax.optimization_barrier((rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)))
    to_blocks = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])])[blocks]  # (S, longest, H, Dh)
    heads_first = lambda a: jnp.transpose(to_blocks(a), (0, 2, 1, 3))  # (S, H, longest, Dh)
    keys_valid = jnp.broadcast_to((blocks < n)[:, None, :], (*blocks.shape, blocks.shape[1]))
    out = _softmax_attention(to_blocks(q)[:, :, :, None], heads_first(k), heads_first(v), keys_valid,
                             self.head_dim**-0.5)
    return self.proj(out.reshape(-1, out.shape[-1])[unblock])


class VisionMLP(nnx.Module):

  def __init__(self, cfg, *, rngs):
    v = cfg.vision
    self.gate_proj = _linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True,
                             cfg=cfg, rngs=rngs)
    self.up_proj = _linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True,
                           cfg=cfg, rngs=rngs)
    self.down_proj = _linear(v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), bias=True,
                             cfg=cfg, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):

  def __init__(self, cfg, *, rngs):
    v = cfg.vision
    self.norm1 = RMSNorm(v.hidden_size, v.rms_norm_eps, cfg=cfg)
    self.norm2 = RMSNorm(v.hidden_size, v.rms_norm_eps, cfg=cfg)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, blocks, unblock):
    x = x + self.attn(self.norm1(x), cos, sin, blocks, unblock)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """ln_q -> concatenate each 2x2 block of patches -> Linear -> exact GELU -> Linear."""

  def __init__(self, cfg, *, rngs):
    v = cfg.vision
    self.merged_dim = v.hidden_size * v.spatial_merge_size**2
    self.ln_q = RMSNorm(v.hidden_size, 1e-6, cfg=cfg)
    self.mlp = nnx.List([
        _linear(self.merged_dim, self.merged_dim, ("vision_mlp", "vision_embed"), bias=True, cfg=cfg,
                rngs=rngs),
        None,  # GELU (index kept so that the paths match HF's nn.Sequential: mlp.0 and mlp.2)
        _linear(self.merged_dim, v.out_hidden_size, ("vision_embed", "embed"), bias=True, cfg=cfg, rngs=rngs),
    ])

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.merged_dim)
    return self.mlp[2](ops.gelu_exact(self.mlp[0](x)))


class VisionTransformer(nnx.Module):
  """Packed images (all patches in one sequence) -> merged tokens (M, out_hidden_size), raster order."""

  def __init__(self, cfg, *, rngs):
    self.cfg = cfg.vision
    self.remat = cfg.remat
    self.patch_embed = PatchEmbed(cfg, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.vision.depth)])
    self.merger = PatchMerger(cfg, rngs=rngs)

  def __call__(self, pixel_values, layout: rope.VisionLayout):
    """`layout` holds the arrays of `rope.vision_layout(image_grid_thw, ...)` (NumPy or jnp)."""
    v = self.cfg
    x = self.patch_embed(pixel_values)[layout.patch_index]
    # Computed once for all blocks (left to itself, XLA fuses cos and sin into every consumer).
    cos, sin = jax.lax.optimization_barrier(rope.vision_cos_sin(jnp.asarray(layout.positions), v.head_dim,
                                                                v.rope_theta))
    full = set(v.fullatt_block_indexes)
    run = nnx.remat(VisionBlock.__call__) if self.remat else VisionBlock.__call__
    for i, block in enumerate(self.blocks):
      if i in full:
        x = run(block, x, cos, sin, jnp.asarray(layout.image_blocks), jnp.asarray(layout.image_unblock))
      else:
        x = run(block, x, cos, sin, jnp.asarray(layout.window_blocks), jnp.asarray(layout.window_unblock))
    return self.merger(x)[layout.merged_inverse]


def vision_inputs(image_grid_thw, cfg: Qwen2_5_VLConfig) -> rope.VisionLayout:
  """Host-side layout of the vision tower for these image sizes (see `rope.vision_layout`)."""
  v = cfg.vision
  return rope.vision_layout(image_grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)


# ----------------------------------------------------------------------------- text decoder


class Attention(nnx.Module):
  """Grouped-query attention with q/k/v bias, M-RoPE, optional static-size KV cache."""

  def __init__(self, cfg, *, rngs):
    t = cfg.text
    self.num_heads, self.num_kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    self.q_proj = _linear(t.hidden_size, t.num_attention_heads * t.head_dim, ("embed", "heads"), bias=True,
                          cfg=cfg, rngs=rngs)
    self.k_proj = _linear(t.hidden_size, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), bias=True,
                          cfg=cfg, rngs=rngs)
    self.v_proj = _linear(t.hidden_size, t.num_key_value_heads * t.head_dim, ("embed", "kv_heads"), bias=True,
                          cfg=cfg, rngs=rngs)
    self.o_proj = _linear(t.num_attention_heads * t.head_dim, t.hidden_size, ("heads", "embed"), bias=False,
                          cfg=cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache=None, start=None, layer=None, fused=None):
    """x (B, L, D); mask (B, L, S) bool. With a `cache` (dict of k, v: one (B, K, S, Dh) array per layer),
    this step's keys and values are written at slot `start` of `layer` and attention runs over that
    layer's whole cache; returns (out, cache). `fused`: this layer's entry of `fused_decoder_kernels`
    (q/k/v as one matmul) instead of the three projections."""
    b, length, _ = x.shape
    groups = self.num_heads // self.num_kv_heads
    if fused is None:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    else:
      q, k, v = jnp.split(_fused_matmul(x, fused["qkv"], fused["qkv_bias"]),
                          [self.num_heads * self.head_dim, (self.num_heads + self.num_kv_heads) * self.head_dim],
                          axis=-1)
    q = q.reshape(b, length, self.num_heads, self.head_dim)
    k = k.reshape(b, length, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, length, self.num_kv_heads, self.head_dim)
    q, k = rope.apply_rotary(q, cos, sin), rope.apply_rotary(k, cos, sin)
    k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # (B, K, L, Dh)
    if cache is not None:
      keys, values = list(cache["k"]), list(cache["v"])
      keys[layer] = jax.lax.dynamic_update_slice(keys[layer], k.astype(keys[layer].dtype), (0, 0, start, 0))
      values[layer] = jax.lax.dynamic_update_slice(values[layer], v.astype(values[layer].dtype), (0, 0, start, 0))
      cache = dict(cache, k=tuple(keys), v=tuple(values))
      k, v = keys[layer], values[layer]
    q = q.reshape(b, length, self.num_kv_heads, groups, self.head_dim)
    out = _softmax_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.head_dim**-0.5)
    return self.o_proj(out), cache


def _fused_matmul(x, kernel, bias=None):
  """x (..., D) times a (D, N) kernel concatenated from several projections (+ bias), as `nnx.Linear`."""
  out = jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
  return out if bias is None else out + bias.astype(out.dtype)


class MLP(nnx.Module):

  def __init__(self, cfg, *, rngs):
    t = cfg.text
    self.gate_proj = _linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
    self.up_proj = _linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, cfg=cfg, rngs=rngs)
    self.down_proj = _linear(t.intermediate_size, t.hidden_size, ("mlp", "embed"), bias=False, cfg=cfg, rngs=rngs)

  def __call__(self, x, fused=None):
    if fused is None:
      return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
    gate, up = jnp.split(_fused_matmul(x, fused["gate_up"]), 2, axis=-1)
    return self.down_proj(jax.nn.silu(gate) * up)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg, *, rngs):
    t = cfg.text
    self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, cfg=cfg)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, cfg=cfg)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, mask, cache=None, start=None, layer=None, fused=None):
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, layer, fused)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x), fused), cache


class TextModel(nnx.Module):

  def __init__(self, cfg, *, rngs):
    t = cfg.text
    self.cfg = t
    self.remat = cfg.remat
    self.embed_tokens = nnx.Embed(
        t.vocab_size, t.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=nnx.with_partitioning(_INIT, ("vocab", "embed")), rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(t.num_hidden_layers)])
    self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, cfg=cfg)

  def __call__(self, x, position_ids, mask, cache=None, start=None, fused=None):
    """x (B, L, D) embeddings; position_ids (3, B, L); mask (B, L, S). cache: dict k/v, each a tuple of one
    (B, K, S, Dh) array per layer. fused: `fused_decoder_kernels(self)` (fewer, wider matmuls)."""
    t = self.cfg
    cos, sin = rope.mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    for i, layer in enumerate(self.layers):
      if self.remat and cache is None:
        x, _ = nnx.remat(DecoderLayer.__call__)(layer, x, cos, sin, mask)
      else:
        x, cache = layer(x, cos, sin, mask, cache, start, i, None if fused is None else fused[i])
    return self.norm(x), cache


def fused_decoder_kernels(text_model: TextModel) -> list[dict]:
  """Per decoder layer: `qkv` (hidden, (heads + 2 kv_heads) * head_dim) and `qkv_bias`, the q/k/v
  projections side by side, and `gate_up` (hidden, 2 * mlp), gate and up side by side: two matmuls
  instead of five per layer when passed as `TextModel(..., fused=...)`. New arrays (one copy of those
  weights); `generation.decode_kernels` keeps them per parameter set."""
  fused = []
  for layer in text_model.layers:
    attn, mlp = layer.self_attn, layer.mlp
    fused.append(dict(
        qkv=jnp.concatenate([attn.q_proj.kernel[...], attn.k_proj.kernel[...], attn.v_proj.kernel[...]], axis=1),
        qkv_bias=jnp.concatenate([attn.q_proj.bias[...], attn.k_proj.bias[...], attn.v_proj.bias[...]]),
        gate_up=jnp.concatenate([mlp.gate_proj.kernel[...], mlp.up_proj.kernel[...]], axis=1)))
  return fused


# ----------------------------------------------------------------------------- full model


def causal_mask(attention_mask, length):
  """(B, L) 1/0 padding mask -> (B, L, L) bool: causal and key not padding."""
  keys = jnp.asarray(attention_mask).astype(bool)
  return jnp.tril(jnp.ones((length, length), bool))[None] & keys[:, None, :]


class Qwen2_5_VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration: `visual`, `language_model`, `lm_head`."""

  def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.visual = VisionTransformer(cfg, rngs=rngs)
    self.language_model = TextModel(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _linear(cfg.text.hidden_size, cfg.text.vocab_size, ("embed", "vocab"), bias=False, cfg=cfg,
                             rngs=rngs)

  def embed(self, input_ids, pixel_values=None, vision_layout=None):
    """Token embeddings with the merged visual features scattered into the image and video placeholders
    in order (row-major over the batch). With the visuals in the order their runs appear
    (`merge_visuals`), this is HF's two masked_scatters, images into image tokens, videos into video
    tokens."""
    x = self.language_model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    feats = self.visual(pixel_values, vision_layout).astype(x.dtype)
    is_visual = ((input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_visual) - 1, 0, feats.shape[0] - 1)
    flat = jnp.where(is_visual[:, None], feats[index], x.reshape(-1, x.shape[-1]))
    return flat.reshape(x.shape)

  def logits(self, hidden):
    """Final hidden states -> float32 logits."""
    if self.cfg.tie_word_embeddings:
      out = self.language_model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def hidden_states(self, input_ids, position_ids, attention_mask=None, pixel_values=None, vision_layout=None):
    """Final (normed) hidden states (B, L, hidden), e.g. for a loss computed in vocabulary chunks."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embed(input_ids, pixel_values, vision_layout)
    hidden, _ = self.language_model(x, position_ids, causal_mask(attention_mask, input_ids.shape[1]))
    return hidden

  def __call__(self, input_ids, position_ids, attention_mask=None, pixel_values=None, vision_layout=None):
    """Full-sequence forward (training, scoring): logits (B, L, vocab) float32."""
    return self.logits(self.hidden_states(input_ids, position_ids, attention_mask, pixel_values, vision_layout))


def check_image_tokens(input_ids, image_grid_thw, cfg: Qwen2_5_VLConfig, video_grid_thw=None):
  """Host check: as many image (video) placeholders as the images (videos) produce merged tokens."""
  ids = np.asarray(input_ids)
  for kind, token, grid in (("image", cfg.image_token_id, image_grid_thw),
                            ("video", cfg.video_token_id, video_grid_thw)):
    have = int((ids == token).sum())
    need = sum(rope.num_image_tokens(grid, cfg.vision.spatial_merge_size)) if grid is not None else 0
    if have != need:
      raise GleamError(f"input_ids hold {have} {kind} tokens ({token}) but {kind}_grid_thw gives {need} merged "
                       f"{kind} tokens; build the prompt with the processor for these {kind}s.")


def check_pixel_values(pixel_values, image_grid_thw, cfg: Qwen2_5_VLConfig, names=("pixel_values", "image_grid_thw")):
  """Host check: one row of `patch_dim` values per patch of the images, (sum of t*h*w, patch_dim). (The
  vision tower gathers rows by index, and an index past the end would read a clamped row, not fail.)
  `names`: the two arguments as the caller calls them (e.g. a video's)."""
  grids = np.asarray(image_grid_thw).reshape(-1, 3)
  need = (int(np.prod(grids, axis=1).sum()), cfg.vision.patch_dim)
  have = tuple(np.shape(pixel_values))
  if have != need:
    raise GleamError(f"{names[0]} has shape {have} but {names[1]} {grids.tolist()} needs {need} (one row "
                     f"of {cfg.vision.patch_dim} values per patch); pass the processor's {names[0]} of these "
                     f"inputs together with their {names[1]}.")


def position_and_vision_inputs(input_ids, attention_mask, cfg: Qwen2_5_VLConfig, pixel_values=None,
                               image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                               second_per_grid_ts=None):
  """Host-side inputs of a batch with images and videos: (M-RoPE position ids (3, B, L), the vision tower's
  pixel values in placeholder order (`merge_visuals`), their layout (`vision_inputs`); None, None without
  visuals). Call after `check_image_tokens`."""
  position_ids, _ = rope.get_rope_index(input_ids, image_grid_thw, attention_mask, image_token_id=cfg.image_token_id,
                                        spatial_merge_size=cfg.vision.spatial_merge_size,
                                        video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                        video_token_id=cfg.video_token_id,
                                        tokens_per_second=cfg.vision.tokens_per_second)
  pixel_values, grid_thw = merge_visuals(input_ids, cfg, pixel_values, image_grid_thw, pixel_values_videos,
                                         video_grid_thw)
  return position_ids, pixel_values, None if grid_thw is None else vision_inputs(grid_thw, cfg)


def merge_visuals(input_ids, cfg: Qwen2_5_VLConfig, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None):
  """Images and videos as one vision-tower input, (pixel_values, grid_thw), in the order their placeholder
  runs appear in `input_ids` (row-major). The vision tower attends within each frame only, so one call
  over both equals HF's two; `Qwen2_5_VL.embed` then fills the placeholders in that order. Without
  videos, the image inputs as they are. Call after `check_image_tokens`."""
  if video_grid_thw is None or len(video_grid_thw) == 0:
    return pixel_values, image_grid_thw
  if image_grid_thw is None or len(image_grid_thw) == 0:
    return pixel_values_videos, video_grid_thw
  merge = cfg.vision.spatial_merge_size
  sources = {}
  for kind, token, px, grid in (("image", cfg.image_token_id, pixel_values, image_grid_thw),
                                ("video", cfg.video_token_id, pixel_values_videos, video_grid_thw)):
    grid = np.asarray(grid).reshape(-1, 3)
    starts = np.concatenate([[0], np.cumsum(np.prod(grid, axis=1))])
    sources[token] = (px, grid, starts, rope.num_image_tokens(grid, merge))
  ids = np.asarray(input_ids).reshape(-1)
  order, used, i = [], {token: 0 for token in sources}, 0
  while i < len(ids):
    token = int(ids[i])
    if token not in sources:
      i += 1
      continue
    k = used[token]
    order.append((token, k))
    used[token] += 1
    i += sources[token][3][k]
  rows = [np.asarray(sources[t][0])[sources[t][2][k]:sources[t][2][k + 1]] for t, k in order]
  grids = [sources[t][1][k] for t, k in order]
  return np.concatenate(rows), np.stack(grids)


def create_model(cfg: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VL:
  """A randomly initialised model (normal(0.02) weights, unit norms, zero biases)."""
  return Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed))


def shard_model(model: Qwen2_5_VL, mesh, rules=QWEN_SHARDING_RULES) -> Qwen2_5_VL:
  """Places the parameters on `mesh` by their logical axis names (in place; returns the model)."""
  state = nnx.state(model)
  placed = sharding.place(nnx.to_pure_dict(state), sharding.state_shardings(state, mesh, rules))
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(model, state)
  return model


@contextlib.contextmanager
def no_tracer_origin_messages():
  """Makes `nnx.eval_shape` of a big model linear in time again (jax-ml/jax#40041, fixed after jax 0.10).

  flax NNX's `Variable.set_value` probes `getattr(value, 'sharding', None)`; on a tracer that raises an
  AttributeError whose message walks every equation traced so far, so building the abstract 3B model
  is quadratic (~30 s instead of ~2 s). The message is text that `getattr` throws away; this context
  leaves it empty.
  """
  tracer = getattr(partial_eval, "DynamicJaxprTracer", None)
  original = getattr(tracer, "_origin_msg", None)
  if original is None:
    yield
    return
  tracer._origin_msg = lambda self: ""  # pylint: disable=protected-access
  try:
    yield
  finally:
    tracer._origin_msg = original  # pylint: disable=protected-access


def abstract_model(cfg: Qwen2_5_VLConfig) -> Qwen2_5_VL:
  """The model with `jax.ShapeDtypeStruct` leaves (nothing allocated), for weight loading."""
  with no_tracer_origin_messages():
    return nnx.eval_shape(functools.partial(create_model, cfg))
