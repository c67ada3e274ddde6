"""ConvNeXt (Liu et al., 2022) in Flax NNX, channels-last (NHWC).

The layout and parameter names follow timm / Hugging Face so checkpoints map one to one
(`convnext_params.load_convnext_weights`):

  stem.conv, stem.norm                         4x4/4 patchify conv + LayerNorm
  stages[i].downsample.norm, .conv             LayerNorm + 2x2/2 conv (stages 1..3; None in stage 0)
  stages[i].blocks[j].dwconv, norm, pwconv1, pwconv2, gamma
  head_norm                                    LayerNorm after global average pooling

A block is 7x7 depthwise conv -> LayerNorm -> Linear 4x -> GELU (exact erf, as timm/HF) -> Linear
-> layer scale -> drop path + residual. The depthwise conv runs as fused shifted multiply-adds, and
its kernel gradient in one of three forms by image size (`depthwise_conv_general_dilated`;
XLA:CPU's grouped convolution is slow); the GELU, the two Linears' kernel gradients and the
stride = kernel convolutions (stem, downsampling) take the forms of `gleam_jax.models.ops`, also
for XLA:CPU's sake. Parameters are float32 and carry logical axis names (see `gleam_jax.models`);
`dtype` sets the compute dtype. Drop path is active in `model.train()` mode (NNX default after
construction) and draws from the 'dropout' rng stream; `model.eval()` turns it off.
"""
import dataclasses
import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models import ops

# name -> (depths, dims), as timm's convnext_<name>.
VARIANTS = {
    'atto': ((2, 2, 6, 2), (40, 80, 160, 320)),
    'femto': ((2, 2, 6, 2), (48, 96, 192, 384)),
    'pico': ((2, 2, 6, 2), (64, 128, 256, 512)),
    'nano': ((2, 2, 8, 2), (80, 160, 320, 640)),
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
}

LN_EPS = 1e-6
# timm's trunc_normal_(std=.02) cuts at +-2 absolute (100 std), so it is a plain normal.
_KERNEL_INIT = nnx.initializers.normal(0.02)
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()
# Logical axis names: conv kernels are (h, w, in, out); only the output channels are named, so a
# conv never carries the same mesh axis twice.
_CONV_AXES = (None, None, None, 'embed')


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
  depths: tuple[int, ...]
  dims: tuple[int, ...]
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  in_channels: int = 3

  @property
  def feature_width(self) -> int:
    """The width of the pooled features."""
    return self.dims[-1]


def convnext_config(variant: str = 'atto', depths: Sequence[int] | None = None,
                    dims: Sequence[int] | None = None, **kw) -> ConvNeXtConfig:
  """A named variant, or a custom one when both `depths` and `dims` are given."""
  if depths is not None or dims is not None:
    if depths is None or dims is None or len(depths) != len(dims) or not depths:
      raise GleamError(f'ConvNeXt custom architecture needs depths and dims of the same non-zero '
                       f'length, got depths={depths} dims={dims}; set both or neither.')
    return ConvNeXtConfig(tuple(int(d) for d in depths), tuple(int(d) for d in dims), **kw)
  if variant not in VARIANTS:
    raise GleamError(f'Unknown ConvNeXt variant {variant!r}; choose one of {sorted(VARIANTS)} '
                     f'or give custom depths and dims.')
  depths, dims = VARIANTS[variant]
  return ConvNeXtConfig(depths, dims, **kw)


def forward_flops(cfg: ConvNeXtConfig, height: int, width: int) -> int:
  """Floating-point operations (2 per multiply-add) of one image's forward pass through the convs
  and linears, the count MFU is quoted in (norms, GELU and the pooling left out, as fvcore and
  timm count). ConvNeXt-T at 224 px: 8.91 GFLOP (timm lists 4.47 GMACs)."""
  h, w = height // 4, width // 4
  macs = h * w * 4 * 4 * cfg.in_channels * cfg.dims[0]  # stem
  for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
    if i > 0:
      h, w = h // 2, w // 2
      macs += h * w * 2 * 2 * cfg.dims[i - 1] * dim  # downsample
    macs += depth * h * w * dim * (7 * 7 + 2 * 4 * dim)  # depthwise 7x7 + the two pointwise
  return 2 * macs


def _layer_norm(dim, dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=nnx.with_partitioning(_ONES, ('embed',)),
                       bias_init=nnx.with_partitioning(_ZEROS, ('embed',)), rngs=rngs)


def _conv(cin, cout, kernel, stride, padding, dtype, rngs, groups=1):
  extra = {}
  if groups == cin > 1:
    extra['conv_general_dilated'] = depthwise_conv_general_dilated
  elif (stride, stride) == kernel:
    extra['conv_general_dilated'] = ops.patch_conv_general_dilated
  return nnx.Conv(cin, cout, kernel, strides=stride, padding=padding, feature_group_count=groups,
                  dtype=dtype, param_dtype=jnp.float32, **extra,
                  kernel_init=nnx.with_partitioning(_KERNEL_INIT, _CONV_AXES),
                  bias_init=nnx.with_partitioning(_ZEROS, ('embed',)), rngs=rngs)


def _dense(cin, cout, axes, dtype, rngs):
  return nnx.Linear(cin, cout, dtype=dtype, param_dtype=jnp.float32,
                    dot_general=ops.pointwise_dot_general,
                    kernel_init=nnx.with_partitioning(_KERNEL_INIT, axes),
                    bias_init=nnx.with_partitioning(_ZEROS, axes[1:]), rngs=rngs)


def _shifted_sum(padded, kernel, height, width):
  """sum_ij padded[:, i:i+H, j:j+W] * kernel[i, j]: a depthwise correlation that XLA fuses into one
  elementwise loop (float32 accumulation)."""
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      term = padded[:, i:i + height, j:j + width, :].astype(jnp.float32) * kernel[i, j]
      out = term if out is None else out + term
  return out


def _pad(x, padding):
  return jnp.pad(x, ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x, kernel, padding):
  out = _shifted_sum(_pad(x, padding), kernel[:, :, 0, :].astype(jnp.float32), *x.shape[1:3])
  return out.astype(x.dtype)


def _depthwise_fwd(x, kernel, padding):
  return _depthwise(x, kernel, padding), (x, kernel)


def _depthwise_bwd(padding, residuals, grad):
  x, kernel = residuals
  # d/dx: the correlation of the output gradient with the flipped kernel (again shifted sums).
  flipped = [(kh - 1 - lo, kh - 1 - hi) for (lo, hi), kh in zip(padding, kernel.shape[:2])]
  dx = _shifted_sum(_pad(grad, flipped), kernel[::-1, ::-1, 0, :].astype(jnp.float32),
                    *x.shape[1:3]).astype(x.dtype)
  dkernel = _depthwise_kernel_grad(_pad(x, padding), grad.astype(x.dtype), padding)
  return dx, dkernel[:, :, None, :].astype(kernel.dtype)


@functools.lru_cache(maxsize=None)
def _tap_matrix(height, width, kh, kw, top, left):
  """(H W, H W, kh kw) 0/1: [p, q, tap] = 1 where kernel tap (i, j) at output position q = (h, w)
  reads input position p = (h + i - top, w + j - left)."""
  taps = np.zeros((height * width, height * width, kh * kw), np.float32)
  for h, w, i, j in itertools.product(range(height), range(width), range(kh), range(kw)):
    if 0 <= h + i - top < height and 0 <= w + j - left < width:
      taps[(h + i - top) * width + w + j - left, h * width + w, i * kw + j] = 1
  return taps


def _depthwise_kernel_grad(padded, grad, padding):
  """d/dkernel[i, j, c] = sum_nhw padded[n, h+i, w+j, c] * grad[n, h, w, c] (float32).

  XLA:CPU turns the grouped convolution's kernel gradient into a dense C x C convolution and keeps
  its diagonal: C times the work. Here, by the number of image positions H * W:
    <= 64  (late stages): the products of every input position with every output position, summed
           over n ((H W)^2 per channel), then added up per kernel tap by a constant 0/1 matrix
           (`padding`: the ((top, bottom), (left, right)) that `padded` added);
    <= 128 (early stages at small sizes): the correlation as H * W shifted multiply-adds of
           (n, kh, kw, c) windows, which XLA fuses into one loop, then a sum over n;
    larger: one matmul per channel (contracting n and w, channels major) of the padded input's
           rows with the output gradient's rows shifted by each kernel column; the kernel rows are
           diagonals of the result. Shifting the gradient (not the input) lets the input enter
           the matmul as one transposed copy.
  docs/bench_train_step.md has the timings."""
  height, width = grad.shape[1:3]
  kh, kw = padded.shape[1] - height + 1, padded.shape[2] - width + 1  # same-size output
  padded = padded.astype(jnp.float32)
  if height * width <= 64:
    (top, _), (left, _) = padding
    image = padded[:, top:top + height, left:left + width].reshape(grad.shape[0], height * width, -1)
    pairs = jnp.einsum('npc,nqc->pqc', image, grad.reshape(image.shape).astype(jnp.float32))
    taps = _tap_matrix(height, width, kh, kw, top, left)
    return jnp.einsum('pqc,pqk->kc', pairs, taps).reshape(kh, kw, -1)
  if height * width <= 128:
    out = None
    for h in range(height):
      for w in range(width):
        term = padded[:, h:h + kh, w:w + kw] * grad[:, h:h + 1, w:w + 1]
        out = term if out is None else out + term
    return jnp.sum(out, axis=0)
  channels = grad.shape[-1]
  rows = padded.transpose(3, 1, 0, 2).reshape(channels, height + kh - 1, -1)  # (c, H+kh-1, n*Wp)
  grad = grad.astype(jnp.float32).transpose(3, 1, 0, 2)  # (c, H, n, W)
  shifted = jnp.stack([jnp.pad(grad, ((0, 0),) * 3 + ((j, kw - 1 - j),)) for j in range(kw)], axis=1)
  m = jnp.einsum('cpk,cqk->cpq', rows, shifted.reshape(channels, kw * height, -1))
  m = m.reshape(channels, height + kh - 1, kw, height)  # m[c, h + i, j, h] sums to kernel[i, j, c]
  return jnp.stack([jnp.einsum('chjh->jc', m[:, i:i + height]) for i in range(kh)])


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, precision=None, **unused):
  """Drop-in for `lax.conv_general_dilated` in `nnx.Conv` for stride-1 depthwise NHWC convs.

  XLA:CPU runs grouped convolutions as slow generic loops; as shifted multiply-adds the forward
  pass and the input gradient become fused elementwise loops (~15x faster on CPU for the 7x7
  convs of ConvNeXt). Same numbers as the grouped convolution, up to float rounding.
  """
  del precision, unused
  if (tuple(window_strides) != (1, 1) or feature_group_count != lhs.shape[-1] or
      rhs.shape[2] != 1 or any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))):
    raise ValueError('depthwise_conv_general_dilated handles stride-1 undilated depthwise convs')
  ops.check_nhwc_hwio('depthwise_conv_general_dilated', dimension_numbers)
  padding = tuple(tuple(int(p) for p in pad) for pad in padding)
  return _depthwise(lhs, rhs, padding)


class Stem(nnx.Module):
  def __init__(self, cin, dim, dtype, rngs):
    self.conv = _conv(cin, dim, (4, 4), 4, 'VALID', dtype, rngs)
    self.norm = _layer_norm(dim, dtype, rngs)

  def __call__(self, x):
    return self.norm(self.conv(x))


class Downsample(nnx.Module):
  def __init__(self, cin, cout, dtype, rngs):
    self.norm = _layer_norm(cin, dtype, rngs)
    self.conv = _conv(cin, cout, (2, 2), 2, 'VALID', dtype, rngs)

  def __call__(self, x):
    return self.conv(self.norm(x))


class Block(nnx.Module):
  """ConvNeXt block; `drop_path` is the stochastic depth rate of this block."""

  def __init__(self, dim, drop_path, layer_scale_init, dtype, rngs):
    self.dwconv = _conv(dim, dim, (7, 7), 1, ((3, 3), (3, 3)), dtype, rngs, groups=dim)
    self.norm = _layer_norm(dim, dtype, rngs)
    self.pwconv1 = _dense(dim, 4 * dim, ('embed', 'mlp'), dtype, rngs)
    self.pwconv2 = _dense(4 * dim, dim, ('mlp', 'embed'), dtype, rngs)
    self.gamma = nnx.Param(jnp.full((dim,), layer_scale_init, jnp.float32),
                           out_sharding=('embed',))
    # Per-sample mask (broadcast over H, W, C) scaled by 1/keep: stochastic depth.
    self.drop_path = (nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
                      if drop_path > 0 else None)

  def __call__(self, x):
    y = self.dwconv(x)
    y = self.norm(y)
    y = self.pwconv1(y)
    y = ops.gelu_exact(y)
    y = self.pwconv2(y)
    y = y * self.gamma[...].astype(y.dtype)
    if self.drop_path is not None:
      y = self.drop_path(y)
    return x + y


def _block_forward(block, x):
  return block(x)


class Stage(nnx.Module):
  def __init__(self, cin, cout, depth, drop_paths, cfg: ConvNeXtConfig, rngs):
    self.downsample = Downsample(cin, cout, cfg.dtype, rngs) if cin is not None else None
    self.blocks = nnx.List([Block(cout, dp, cfg.layer_scale_init, cfg.dtype, rngs)
                            for dp in drop_paths])
    self.remat = cfg.remat

  def __call__(self, x):
    if self.downsample is not None:
      x = self.downsample(x)
    forward = nnx.remat(_block_forward) if self.remat else _block_forward
    for block in self.blocks:
      x = forward(block, x)
    return x


class ConvNeXt(nnx.Module):
  """`model(x)` maps NHWC images to pooled, normed features (B, dims[-1]) in float32."""

  def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    n = sum(cfg.depths)
    rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear in depth
    self.stem = Stem(cfg.in_channels, cfg.dims[0], cfg.dtype, rngs)
    stages, k = [], 0
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
      cin = cfg.dims[i - 1] if i > 0 else None
      stages.append(Stage(cin, dim, depth, rates[k:k + depth], cfg, rngs))
      k += depth
    self.stages = nnx.List(stages)
    self.head_norm = nnx.LayerNorm(cfg.dims[-1], epsilon=LN_EPS, param_dtype=jnp.float32,
                                   scale_init=nnx.with_partitioning(_ONES, ('embed',)),
                                   bias_init=nnx.with_partitioning(_ZEROS, ('embed',)),
                                   rngs=rngs)

  @property
  def feature_width(self) -> int:
    return self.config.feature_width

  def stage_features(self, x) -> list[jax.Array]:
    """The output of every stage, NHWC, in the compute dtype."""
    x = self.stem(x.astype(self.config.dtype))
    outs = []
    for stage in self.stages:
      x = stage(x)
      outs.append(x)
    return outs

  def __call__(self, x) -> jax.Array:
    x = self.stage_features(x)[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return self.head_norm(pooled)
