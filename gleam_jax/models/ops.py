"""Layer ops shared by the models, written for the speed of XLA:CPU as much as of accelerators.

`gelu_exact` is the erf GELU in PyTorch's formula, 0.5 x (1 + erf(x / sqrt 2)).
`jax.nn.gelu(approximate=False)` computes it through erfc, which XLA expands into exponentials and
selects: the GELUs of the c_phase1 train step took ~15 ms of its ~130 ms there, ~6 ms this way.

`pointwise_dot_general` is a drop-in for `lax.dot_general` in `nnx.Linear` (x (..., C) times a
(C, D) kernel) whose kernel gradient is one 2-D dot of the flattened positions, (N, C)^T (N, D).
From JAX's own transpose rule XLA:CPU lays the output gradient out transposed (a copy) and runs
the kernel gradient as a slow plain dot instead of a YNNPACK matmul: 5 ms instead of ~1 ms for the
(8192, 32) x (8192, 128) case of a stage-0 ConvNeXt block. The c_phase1 train step went from
~128 to ~109 ms on a 2-core AMD EPYC box (`docs/bench_train_step.md`).

`patch_conv_general_dilated` runs a convolution whose stride equals its kernel as patches times the
flattened kernel, so that its kernel gradient is a matmul also inside loops (the gradient cache's
scans), where XLA:CPU runs a convolution's as a slow generic one.
"""
import functools

import jax
import numpy as np

_SQRT_HALF = np.float32(np.sqrt(0.5))


def gelu_exact(x):
  """GELU with the exact erf, as torch.nn.GELU() and timm / Hugging Face's 'gelu'."""
  return 0.5 * x * (1 + jax.lax.erf(x * _SQRT_HALF.astype(x.dtype)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, kernel, precision):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _pointwise_fwd(x, kernel, precision):
  return _pointwise(x, kernel, precision), (x, kernel)


def _pointwise_bwd(precision, residuals, grad):
  x, kernel = residuals
  dx = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())), precision=precision)
  rows = lambda a: a.reshape(-1, a.shape[-1])
  dkernel = jax.lax.dot_general(rows(x), rows(grad), (((0,), (0,)), ((), ())), precision=precision)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def pointwise(x, kernel):
  """x (..., C) times a (C, D) kernel, with `pointwise_dot_general`'s gradients (e.g. a LoRA adapter's
  two products beside its layer)."""
  return _pointwise(x, kernel, None)


def pointwise_dot_general(lhs, rhs, dimension_numbers, precision=None, out_sharding=None,
                          preferred_element_type=None):
  """`lax.dot_general` for `nnx.Linear(dot_general=...)`: the same product, the same gradients."""
  if (tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or
      any(dimension_numbers[1]) or rhs.ndim != 2):
    raise ValueError(f'pointwise_dot_general contracts x (..., C) with a (C, D) kernel, got '
                     f'{lhs.shape} x {rhs.shape} over {dimension_numbers}')
  if out_sharding is not None or preferred_element_type not in (None, lhs.dtype):
    raise ValueError('pointwise_dot_general takes neither out_sharding nor another '
                     'preferred_element_type')
  return _pointwise(lhs, rhs, precision)


def check_nhwc_hwio(name, dimension_numbers):
  """Stops a `conv_general_dilated` drop-in given other than NHWC inputs and HWIO kernels."""
  if dimension_numbers is not None and (tuple(dimension_numbers.lhs_spec) != (0, 3, 1, 2) or
                                        tuple(dimension_numbers.rhs_spec) != (3, 2, 0, 1)):
    raise ValueError(f'{name} expects NHWC/HWIO, got {dimension_numbers}')


def patch_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                               dimension_numbers=None, feature_group_count=1, precision=None, **unused):
  """Drop-in for `lax.conv_general_dilated` in `nnx.Conv` for NHWC/HWIO convs whose stride equals
  their kernel ('VALID', as ConvNeXt's stem and downsampling): the non-overlapping patches times the
  flattened kernel, through `pointwise_dot_general`'s gradients. The same numbers; the point is
  that XLA:CPU runs a convolution's kernel gradient inside a loop (the gradient cache's scans) as a
  slow generic convolution, 72 ms of a 170 ms accumulated c_phase1 step, and a dot as a matmul."""
  del unused
  kh, kw, cin, cout = rhs.shape
  valid = padding == 'VALID' or all(tuple(p) == (0, 0) for p in padding)
  if (tuple(window_strides) != (kh, kw) or not valid or feature_group_count != 1 or lhs.shape[-1] != cin or
      any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))):
    raise ValueError('patch_conv_general_dilated handles undilated VALID convs with stride == kernel')
  check_nhwc_hwio('patch_conv_general_dilated', dimension_numbers)
  n, h, w, _ = lhs.shape
  patches = lhs[:, :h - h % kh, :w - w % kw].reshape(n, h // kh, kh, w // kw, kw, cin)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // kh, w // kw, kh * kw * cin)
  return _pointwise(patches, rhs.reshape(kh * kw * cin, cout), precision)
