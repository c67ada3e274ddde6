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
