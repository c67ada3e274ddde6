"""gleam_jax.models.ops: the same numbers as the forms they replace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gleam_jax.models import ops


@pytest.mark.parametrize('x_shape', [(6, 5), (3, 4, 7, 5)])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pointwise_dot_general_matches_lax_with_gradients(x_shape, dtype, tol):
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  k = jax.random.normal(jax.random.key(1), (x_shape[-1], 3)).astype(dtype)
  dims = (((len(x_shape) - 1,), (0,)), ((), ()))
  weights = jax.random.normal(jax.random.key(2), (*x_shape[:-1], 3))
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(f(x, k, dims).astype(jnp.float32) * weights), argnums=(0, 1)))
  (l_ours, g_ours), (l_ref, g_ref) = loss(ops.pointwise_dot_general)(x, k), loss(jax.lax.dot_general)(x, k)
  assert ops.pointwise_dot_general(x, k, dims).dtype == dtype
  np.testing.assert_allclose(l_ours, l_ref, rtol=tol)
  for ours, ref in zip(g_ours, g_ref):
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)
  with pytest.raises(ValueError, match='contracts x'):
    ops.pointwise_dot_general(x, k, (((0,), (0,)), ((), ())))
  with pytest.raises(ValueError, match='out_sharding'):
    ops.pointwise_dot_general(x, k, dims, preferred_element_type=jnp.float64)


def test_gelu_exact_matches_torch_in_float64_and_jax_erfc_form():
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  ref = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64)).numpy()
  ours = np.asarray(ops.gelu_exact(jnp.asarray(x)))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
  np.testing.assert_allclose(ours, jax.nn.gelu(x, approximate=False), rtol=0, atol=2e-6)
  grad = jax.vmap(jax.grad(ops.gelu_exact))(jnp.asarray(x))
  torch_x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  torch.nn.functional.gelu(torch_x).sum().backward()
  np.testing.assert_allclose(grad, torch_x.grad.numpy(), rtol=0, atol=2e-6)
  assert ops.gelu_exact(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize('x_shape,k_hw', [((2, 8, 12, 3), (4, 4)),   # a stem
                                           ((3, 5, 7, 4), (2, 2)),    # odd sizes: the last row and column dropped
                                           ((2, 6, 6, 5), (3, 2))])   # a non-square kernel
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_patch_conv_matches_strided_convolution_with_gradients(x_shape, k_hw, dtype, tol):
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  k = jax.random.normal(jax.random.key(1), (*k_hw, x_shape[-1], 6)).astype(dtype)
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: ops.patch_conv_general_dilated(x, k, k_hw, 'VALID', dimension_numbers=dn)
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, k_hw, 'VALID', dimension_numbers=dn)
  out_shape = ref(x, k).shape
  assert ours(x, k).shape == out_shape and ours(x, k).dtype == dtype
  weights = jax.random.normal(jax.random.key(2), out_shape)
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) * weights), argnums=(0, 1)))
  (_, g_ours), (_, g_ref) = loss(ours)(x, k), loss(ref)(x, k)
  np.testing.assert_allclose(np.asarray(ours(x, k), np.float32), np.asarray(ref(x, k), np.float32),
                             rtol=tol, atol=tol * 5)
  for a, b in zip(g_ours, g_ref):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 5)
  with pytest.raises(ValueError, match='stride == kernel'):
    ops.patch_conv_general_dilated(x, k, (1, 1), 'VALID')
  with pytest.raises(ValueError, match='stride == kernel'):
    ops.patch_conv_general_dilated(x, k, k_hw, ((1, 1), (1, 1)))
  nchw = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NCHW', 'HWIO', 'NCHW'))
  with pytest.raises(ValueError, match='patch_conv_general_dilated expects NHWC/HWIO'):
    ops.patch_conv_general_dilated(x, k, k_hw, 'VALID', dimension_numbers=nchw)
