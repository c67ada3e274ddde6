"""Vision Transformer (Dosovitskiy et al., 2021) in Flax NNX, as Hugging Face's `ViTModel` computes it.

    cfg = vit.vit_config('S/16', image_size=224)      # big_vision's variant names: mu, Ti, S, M, B, L, H
    model = vit.ViT(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    features = model(images)                          # (B, H, W, 3) -> (B, width) float32

A pre-norm Transformer over non-overlapping patches with a class token and learned position
embeddings (`vit_params` maps Hugging Face, timm, SigLIP, CLIP and DINOv2 checkpoints onto it):

  patch_embed                 patch x patch convolution, stride patch
  cls_token, pos_embed        (1, 1, width) and (1, 1 + grid^2, width): the class token's position first
  blocks[i].norm1, .attn.{query, key, value, out}, .norm2, .fc1, .fc2
  norm                        LayerNorm of every token; `pool` reads the class token ('cls', as
                              ViTModel's last_hidden_state[:, 0]), the mean of the patch tokens ('gap')
                              or a learned probe's attention over them ('map': `head`, SigLIP's
                              pooling head: head.probe, head.attn, head.norm, head.fc1, head.fc2)

`class_token=False` and `gelu='tanh'` give SigLIP's vision tower (`SiglipVisionModel`);
`pre_norm=True` (a LayerNorm of the embedded tokens before the blocks, `norm_pre`), `patch_bias=False`,
`gelu='quick'` and `proj_dim` (a bias-free projection of the pooled feature, `proj`) give CLIP's
(`CLIPVisionModelWithProjection`, OpenAI's and open_clip's `visual`); `layer_scale` (learned
per-channel scales of both residual branches, `blocks[i].ls1`, `.ls2`) and `registers` (tokens after
the class token without position, `reg_tokens`; with `pos_antialias`) give DINOv2's (`Dinov2Model`,
`Dinov2WithRegistersModel`); `swiglu` (the MLP as silu(fc1.gate(x)) * fc1.up(x) -> fc2, mlp_dim the
gated width) gives DINOv2 giant's.

The position embeddings are learned on a square grid of `image_size / patch_size`; other input
shapes (a 1:2 panorama, another resolution) get them resized by bicubic interpolation exactly as
transformers' `interpolate_pos_encoding=True` does (PyTorch's bicubic, align_corners=False; its
antialiased bicubic with `pos_antialias`, as DINOv2 with registers; with `pos_offset=0.1` as
facebookresearch's DINOv2 files compute it, its scale factor (n + 0.1) / grid), so one
encoder reads satellites and panoramas. Linears, GELU and the patch convolution take the forms of
`gleam_jax.models.ops`; attention softmax is in float32; drop path acts in `model.train()` mode.
"""
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models import ops

# big_vision's `decode_variant` table: name -> (width, depth, mlp_dim, heads).
VARIANTS = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'So400m': (1152, 27, 4304, 16),  # SigLIP's shape-optimised ViT
    'giant2': (1536, 40, 4096, 24),  # DINOv2's giant (vit_giant2): 4096 is its SwiGLU's width (swiglu=True)
}
POOLS = ('cls', 'gap', 'map')
GELUS = ('exact', 'tanh', 'quick')
_KERNEL_INIT = nnx.initializers.normal(0.02)
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  width: int
  depth: int
  mlp_dim: int
  heads: int
  patch_size: int
  image_size: int = 224  # the position embeddings' square grid is image_size // patch_size
  pool: str = 'cls'
  ln_eps: float = 1e-6  # timm's and big_vision's; Hugging Face's google/vit-* use 1e-12
  class_token: bool = True  # SigLIP's towers have none
  gelu: str = 'exact'  # 'tanh': the tanh approximation (SigLIP's gelu_pytorch_tanh); 'quick': CLIP's quick_gelu
  pre_norm: bool = False  # CLIP's LayerNorm of the embedded tokens before the blocks (ln_pre)
  patch_bias: bool = True  # CLIP's patch convolution has none
  proj_dim: int = 0  # > 0: CLIP's bias-free projection of the pooled feature to this size
  layer_scale: float = 0.0  # > 0: DINOv2's per-channel scales of the residual branches, initialised so
  registers: int = 0  # DINOv2-with-registers' extra tokens after the class token (no position embedding)
  pos_antialias: bool = False  # resize the position grid by antialiased bicubic (DINOv2 with registers)
  pos_offset: float = 0.0  # resize by the scale (n + offset) / grid (facebookresearch's DINOv2 files: 0.1)
  swiglu: bool = False  # the MLP gated, silu(gate(x)) * up(x), both mlp_dim wide (DINOv2 giant's)
  drop_path_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  in_channels: int = 3

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def feature_width(self) -> int:
    """The size of the pooled (and projected) features."""
    return self.proj_dim or self.width


def parse_variant(variant: str) -> tuple[str, int]:
  """'S/16' -> ('S', 16)."""
  m = re.fullmatch(r'(\w+)/(\d+)', str(variant))
  if not m or m.group(1) not in VARIANTS:
    raise GleamError(f'ViT variant {variant!r}: give <name>/<patch size> with a name of '
                     f'{", ".join(VARIANTS)} (e.g. S/16, B/16, Ti/4), or a custom ViT.')
  return m.group(1), int(m.group(2))


def vit_config(variant: str | None = 'B/16', *, width=None, depth=None, mlp_dim=None, heads=None,
               patch_size=None, **kw) -> ViTConfig:
  """A named variant ('B/16'), or a custom one when `variant` is None and width, depth, mlp_dim,
  heads and patch_size are all given."""
  custom = dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch_size=patch_size)
  if variant is not None:
    if any(v is not None for v in custom.values()):
      raise GleamError(f'ViT variant {variant!r} and custom sizes {custom} are both given; give one.')
    name, patch = parse_variant(variant)
    width, depth, mlp_dim, heads = VARIANTS[name]
    custom = dict(width=width, depth=depth, mlp_dim=mlp_dim, heads=heads, patch_size=patch)
  missing = [k for k, v in custom.items() if v is None or int(v) <= 0]
  if missing:
    raise GleamError(f'A custom ViT needs positive {", ".join(missing)} (got {custom}); set them or '
                     f'name a variant such as S/16.')
  cfg = ViTConfig(**{k: int(v) for k, v in custom.items()}, **kw)
  if cfg.width % cfg.heads:
    raise GleamError(f'ViT width {cfg.width} does not split into {cfg.heads} heads; give a width '
                     f'divisible by the number of heads.')
  if cfg.pool not in POOLS:
    raise GleamError(f'ViT pool={cfg.pool!r}; choose one of {POOLS}.')
  if cfg.pool == 'cls' and not cfg.class_token:
    raise GleamError("ViT pool='cls' needs a class token; set class_token=True or pool='gap' or 'map'.")
  if cfg.gelu not in GELUS:
    raise GleamError(f'ViT gelu={cfg.gelu!r}; choose one of {GELUS}.')
  if cfg.proj_dim < 0 or cfg.registers < 0 or cfg.layer_scale < 0:
    raise GleamError(f'ViT proj_dim={cfg.proj_dim}, registers={cfg.registers}, layer_scale={cfg.layer_scale}: '
                     f'give sizes and scales >= 0 (0 for none).')
  if cfg.grid < 1:
    raise GleamError(f'ViT image_size {cfg.image_size} is smaller than its patch {cfg.patch_size}; the '
                     f'position embeddings need image_size >= patch_size.')
  return cfg


def forward_flops(cfg: ViTConfig, height: int, width: int) -> int:
  """FLOPs (2 per multiply-add) of one image's forward pass: patch embedding, the projections, the
  MLP and the two attention products (norms, softmax and GELU left out, as for ConvNeXt)."""
  patches = (height // cfg.patch_size) * (width // cfg.patch_size)
  tokens, d = patches + 1 + cfg.registers, cfg.width
  macs = patches * cfg.patch_size ** 2 * cfg.in_channels * d
  mlp_matrices = 3 if cfg.swiglu else 2
  macs += cfg.depth * (tokens * (4 * d * d + mlp_matrices * d * cfg.mlp_dim) + 2 * tokens * tokens * d)
  return 2 * (macs + d * cfg.proj_dim)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(size_in: int, size_out: int, antialias: bool = False, offset: float = 0.0) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's 1-D bicubic resize (align_corners=False, A = -0.75,
  indices clamped at the borders): `interpolate(mode='bicubic')` is this along each axis; with
  `antialias`, `interpolate(mode='bicubic', antialias=True)`'s (A = -0.5, the kernel stretched by the
  downscale factor, taps outside the input dropped and the rest renormalised). `offset` > 0: the
  resize asked for by `scale_factor=(size_out + offset) / size_in` instead of the size, whose sampling
  positions follow that factor (facebookresearch's DINOv2 resizes its position grid so, with 0.1)."""
  scale = size_in / (size_out + offset)
  if antialias:  # PyTorch leaves an axis of unchanged size as it is there, whatever the factor
    return np.eye(size_in, dtype=np.float32) if size_in == size_out else _antialiased_bicubic_matrix(
        size_in, size_out, scale)
  a = -0.75
  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1
  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  out = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    real = scale * (i + 0.5) - 0.5
    base = math.floor(real)
    t = real - base
    for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      out[i, min(max(base + offset, 0), size_in - 1)] += weight
  return out.astype(np.float32)


def _antialiased_bicubic_matrix(size_in: int, size_out: int, scale: float) -> np.ndarray:
  a = -0.5
  def cubic(t):
    t = abs(t)
    if t < 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    return (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0
  support = 2.0 * max(scale, 1.0)
  inverse = 1.0 / max(scale, 1.0)
  out = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    center = scale * (i + 0.5)
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size_in)
    weights = np.array([cubic((j - center + 0.5) * inverse) for j in range(lo, hi)])
    out[i, lo:hi] = weights / weights.sum()
  return out.astype(np.float32)


def resize_grid(grid: jax.Array, height: int, width: int, antialias: bool = False, offset: float = 0.0) -> jax.Array:
  """(h, w, C) -> (height, width, C) by PyTorch's bicubic resize (`antialias`: its antialiased one;
  `offset`: see `bicubic_matrix`); the same array when sizes agree."""
  h, w = grid.shape[:2]
  if (h, w) == (height, width):
    return grid
  rows, cols = bicubic_matrix(h, height, antialias, offset), bicubic_matrix(w, width, antialias, offset)
  return jnp.einsum('ph,hwc,qw->pqc', rows, grid.astype(jnp.float32), cols,
                    precision=jax.lax.Precision.HIGHEST).astype(grid.dtype)


def _dense(cin, cout, axes, dtype, rngs):
  return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32,
                    dot_general=ops.pointwise_dot_general,
                    kernel_init=nnx.with_partitioning(_KERNEL_INIT, axes),
                    bias_init=nnx.with_partitioning(_ZEROS, axes[1:]), rngs=rngs)


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(cfg.width, epsilon=cfg.ln_eps, dtype=cfg.dtype, param_dtype=jnp.float32,
                       scale_init=nnx.with_partitioning(_ONES, ('embed',)),
                       bias_init=nnx.with_partitioning(_ZEROS, ('embed',)), rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, cfg: ViTConfig, rngs):
    self.heads = cfg.heads
    self.query, self.key, self.value = (_dense(cfg.width, cfg.width, ('embed', 'heads'), cfg.dtype, rngs)
                                        for _ in range(3))
    self.out = _dense(cfg.width, cfg.width, ('heads', 'embed'), cfg.dtype, rngs)

  def __call__(self, x, context=None):
    """Self-attention of `x`, or `x` attending to `context` (the MAP head's probe to the tokens)."""
    context = x if context is None else context
    d = x.shape[-1]
    split = lambda t: t.reshape(*t.shape[:2], self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / np.float32(math.sqrt(d // self.heads)), axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    return self.out(y.reshape(x.shape))


def _gelu(kind: str, x):
  if kind == 'quick':  # CLIP's quick_gelu
    return x * jax.nn.sigmoid(np.float32(1.702).astype(x.dtype) * x)
  return ops.gelu_exact(x) if kind == 'exact' else jax.nn.gelu(x, approximate=True)


class GatedInput(nnx.Module):
  """A SwiGLU MLP's input, silu(gate(x)) * up(x). Checkpoints stack gate and up in one weight
  (transformers' weights_in, timm's fc1, the original w12); apart, each shards on 'mlp' alone."""

  def __init__(self, cfg: ViTConfig, rngs):
    self.gate, self.up = (_dense(cfg.width, cfg.mlp_dim, ('embed', 'mlp'), cfg.dtype, rngs) for _ in range(2))

  def __call__(self, x):
    return jax.nn.silu(self.gate(x)) * self.up(x)


class Block(nnx.Module):
  """Pre-norm Transformer block; `drop_path` is the stochastic depth rate of this block."""

  def __init__(self, cfg: ViTConfig, drop_path: float, rngs):
    self.norm1 = _layer_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.norm2 = _layer_norm(cfg, rngs)
    self.fc1 = (GatedInput(cfg, rngs) if cfg.swiglu
                else _dense(cfg.width, cfg.mlp_dim, ('embed', 'mlp'), cfg.dtype, rngs))
    self.fc2 = _dense(cfg.mlp_dim, cfg.width, ('mlp', 'embed'), cfg.dtype, rngs)
    self.gelu = cfg.gelu
    # Per-sample mask (broadcast over tokens and channels) scaled by 1/keep: stochastic depth.
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)
                      if drop_path > 0 else None)
    scale = lambda: nnx.Param(jnp.full((cfg.width,), cfg.layer_scale, jnp.float32), out_sharding=('embed',))
    self.ls1, self.ls2 = (scale(), scale()) if cfg.layer_scale else (None, None)

  def _residual(self, x, y, layer_scale):
    if layer_scale is not None:
      y = y * layer_scale[...].astype(y.dtype)
    return x + (self.drop_path(y) if self.drop_path is not None else y)

  def __call__(self, x):
    x = self._residual(x, self.attn(self.norm1(x)), self.ls1)
    hidden = self.fc1(self.norm2(x))
    hidden = hidden if isinstance(self.fc1, GatedInput) else _gelu(self.gelu, hidden)
    return self._residual(x, self.fc2(hidden), self.ls2)


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision's 'map', SigLIP's head): a learned probe attends to the
  tokens, then a residual MLP after a LayerNorm; the probe's output is the pooled feature."""

  def __init__(self, cfg: ViTConfig, rngs):
    self.probe = nnx.Param(_KERNEL_INIT(rngs.params(), (1, 1, cfg.width), jnp.float32),
                           out_sharding=(None, None, 'embed'))
    self.attn = Attention(cfg, rngs)
    self.norm = _layer_norm(cfg, rngs)
    self.fc1 = _dense(cfg.width, cfg.mlp_dim, ('embed', 'mlp'), cfg.dtype, rngs)
    self.fc2 = _dense(cfg.mlp_dim, cfg.width, ('mlp', 'embed'), cfg.dtype, rngs)
    self.gelu = cfg.gelu

  def __call__(self, tokens):
    probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    x = self.attn(probe, tokens)
    return (x + self.fc2(_gelu(self.gelu, self.fc1(self.norm(x)))))[:, 0]


def _block_forward(block, x):
  return block(x)


class ViT(nnx.Module):
  """`model(x)` maps NHWC images to pooled features (B, feature_width) in float32."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    p = cfg.patch_size
    self.patch_embed = nnx.Conv(cfg.in_channels, cfg.width, (p, p), strides=p, padding='VALID',
                                dtype=cfg.dtype, param_dtype=jnp.float32,
                                conv_general_dilated=ops.patch_conv_general_dilated, use_bias=cfg.patch_bias,
                                kernel_init=nnx.with_partitioning(_KERNEL_INIT, (None, None, None, 'embed')),
                                bias_init=nnx.with_partitioning(_ZEROS, ('embed',)), rngs=rngs)
    self.cls_token = (nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, cfg.width), jnp.float32),
                                out_sharding=(None, None, 'embed')) if cfg.class_token else None)
    self.pos_embed = nnx.Param(_KERNEL_INIT(rngs.params(), (1, cfg.class_token + cfg.grid ** 2, cfg.width),
                                            jnp.float32), out_sharding=(None, None, 'embed'))
    self.reg_tokens = (nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, cfg.registers, cfg.width), jnp.float32),
                                 out_sharding=(None, None, 'embed')) if cfg.registers else None)
    self.norm_pre = _layer_norm(cfg, rngs) if cfg.pre_norm else None
    rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear in depth
    self.blocks = nnx.List([Block(cfg, rate, rngs) for rate in rates])
    self.norm = _layer_norm(cfg, rngs)
    self.head = MAPHead(cfg, rngs) if cfg.pool == 'map' else None
    self.proj = (nnx.Linear(cfg.width, cfg.proj_dim, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32,
                            dot_general=ops.pointwise_dot_general,
                            kernel_init=nnx.with_partitioning(_KERNEL_INIT, ('embed', None)), rngs=rngs)
                 if cfg.proj_dim else None)

  @property
  def feature_width(self) -> int:
    return self.config.feature_width

  def position_embeddings(self, height: int, width: int) -> jax.Array:
    """(1, [1 +] height * width, C): the class token's (where there is one) and a (height, width)
    grid's embeddings."""
    pos, extra = self.pos_embed[...], int(self.config.class_token)
    grid = pos[0, extra:].reshape(self.config.grid, self.config.grid, -1)
    grid = resize_grid(grid, height, width, self.config.pos_antialias, self.config.pos_offset)
    return jnp.concatenate([pos[:, :extra], grid.reshape(1, height * width, -1)], 1)

  def tokens(self, x) -> jax.Array:
    """(B, [1 +] [registers +] patches, width): every token after the final norm, in the compute dtype."""
    cfg = self.config
    if x.shape[1] < cfg.patch_size or x.shape[2] < cfg.patch_size:
      raise GleamError(f'ViT input {x.shape[1]}x{x.shape[2]} is smaller than one {cfg.patch_size}-px patch; '
                       f'give larger images or a ViT with smaller patches.')
    patches = self.patch_embed(x.astype(cfg.dtype))
    b, h, w, d = patches.shape
    x = patches.reshape(b, h * w, d)
    if self.cls_token is not None:
      x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...].astype(cfg.dtype), (b, 1, d)), x], axis=1)
    x = x + self.position_embeddings(h, w).astype(cfg.dtype)
    if self.reg_tokens is not None:  # after the class token, without position
      extra = int(cfg.class_token)
      registers = jnp.broadcast_to(self.reg_tokens[...].astype(cfg.dtype), (b, cfg.registers, d))
      x = jnp.concatenate([x[:, :extra], registers, x[:, extra:]], axis=1)
    if self.norm_pre is not None:
      x = self.norm_pre(x)
    forward = nnx.remat(_block_forward) if cfg.remat else _block_forward
    for block in self.blocks:
      x = forward(block, x)
    return self.norm(x)

  def __call__(self, x) -> jax.Array:
    tokens = self.tokens(x)
    if self.head is not None:
      pooled = self.head(tokens).astype(jnp.float32)
    elif self.config.pool == 'cls':
      pooled = tokens[:, 0].astype(jnp.float32)
    else:
      pooled = jnp.mean(tokens[:, self.config.class_token + self.config.registers:].astype(jnp.float32), axis=1)
    return pooled if self.proj is None else self.proj(pooled).astype(jnp.float32)
