"""ConvNeXt: numerical parity with transformers' ConvNextModel, HF and timm weight import."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ConvNextConfig, ConvNextModel

from gleam_jax.errors import GleamError
from gleam_jax.models import convnext, convnext_params

DEPTHS, DIMS = (1, 1, 2, 1), (16, 32, 48, 64)


def _hf_model(seed=0, depths=DEPTHS, dims=DIMS, drop_path_rate=0.0):
  torch.manual_seed(seed)
  # layer_norm_eps=1e-6 as timm's head norm (HF's default 1e-12 differs only at ~1e-7).
  cfg = ConvNextConfig(depths=list(depths), hidden_sizes=list(dims), layer_norm_eps=1e-6,
                       layer_scale_init_value=0.5, drop_path_rate=drop_path_rate)
  model = ConvNextModel(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases, so a swapped name cannot go unseen
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'layernorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ours(depths=DEPTHS, dims=DIMS, **kw):
  return convnext.ConvNeXt(convnext.convnext_config(depths=depths, dims=dims, **kw),
                           rngs=nnx.Rngs(params=0, dropout=1))


def _abstract(**kw):
  """A model without initial values (no compile): loading a checkpoint fills every parameter."""
  return nnx.eval_shape(lambda: _ours(**kw))


def _to_timm(sd):
  """Renames a HF ConvNextModel state dict to timm's convnext layout."""
  rules = [
      (r'^embeddings\.patch_embeddings\.', 'stem.0.'),
      (r'^embeddings\.layernorm\.', 'stem.1.'),
      (r'^encoder\.stages\.(\d+)\.downsampling_layer\.', r'stages.\1.downsample.'),
      (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.', r'stages.\1.blocks.\2.conv_dw.'),
      (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.', r'stages.\1.blocks.\2.norm.'),
      (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv(\d)\.', r'stages.\1.blocks.\2.mlp.fc\3.'),
      (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$',
       r'stages.\1.blocks.\2.gamma'),
      (r'^layernorm\.', 'head.norm.'),
  ]
  out = {}
  for k, v in sd.items():
    for pat, rep in rules:
      if re.search(pat, k):
        k = re.sub(pat, rep, k)
        break
    else:
      raise AssertionError(k)
    out[k] = v.clone()
  return out


def _images(b=2, h=64, w=96, seed=0):
  x = np.random.RandomState(seed).randn(b, 3, h, w).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1))


@nnx.jit
def _forward(model, x):
  return model.stage_features(x), model(x)


@nnx.jit
def _features_and_grads(model, x):
  """Pooled features and the gradients of a loss that depends on every parameter."""
  def loss(m):
    feats = m(x)
    return jnp.sum(feats * jnp.arange(feats.shape[-1])), feats
  (_, feats), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return feats, grads


def _check_parity(ours, hf, h=64, w=96):
  x_nchw, x_nhwc = _images(h=h, w=w)
  with torch.no_grad():
    out = hf(torch.from_numpy(x_nchw), output_hidden_states=True)
  ours.eval()
  stages, pooled = _forward(ours, x_nhwc)
  assert len(stages) == len(out.hidden_states) - 1  # HF lists the stem output first
  for i, (a, b) in enumerate(zip(stages, out.hidden_states[1:])):
    np.testing.assert_allclose(np.asarray(a), b.numpy().transpose(0, 2, 3, 1), atol=2e-5,
                               rtol=1e-5, err_msg=f'stage {i}')
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=2e-5,
                             rtol=1e-5)


def test_parity_with_transformers_from_save_pretrained(tmp_path):
  hf = _hf_model()
  hf.save_pretrained(tmp_path)
  assert (tmp_path / 'model.safetensors').exists()
  ours = _abstract()
  convnext_params.load_convnext_weights(ours, str(tmp_path))
  _check_parity(ours, hf)
  _check_parity(ours, hf, h=32, w=32)  # any input size


def test_parity_timm_layout_torch_bin(tmp_path):
  hf = _hf_model(seed=1)
  path = tmp_path / 'pytorch_model.bin'
  torch.save(_to_timm(hf.state_dict()) | {'head.fc.weight': torch.zeros(10, DIMS[-1]),
                                          'head.fc.bias': torch.zeros(10)}, path)
  ours = _abstract()
  convnext_params.load_convnext_weights(ours, str(path))
  _check_parity(ours, hf)


def test_classification_checkpoint_and_wrapper_prefix():
  hf = _hf_model(seed=2)
  sd = {f'module.convnext.{k}': v for k, v in hf.state_dict().items()}
  sd['module.classifier.weight'] = torch.zeros(5, DIMS[-1])
  ours = _abstract()
  convnext_params.load_convnext_weights(ours, sd)
  _check_parity(ours, hf)


@pytest.fixture(scope='module')
def dropping():
  """transformers and our ConvNeXt with drop path 0.5 and the same weights."""
  hf = _hf_model(drop_path_rate=0.5)
  ours = _ours(drop_path_rate=0.5)
  convnext_params.load_convnext_weights(ours, hf.state_dict())
  return hf, ours


def test_drop_path_identity_in_eval_and_active_in_train(dropping):
  hf, ours = dropping
  _check_parity(ours, hf)  # eval mode: both are the identity
  _, x = _images(b=8)
  ours.eval()
  ref = np.asarray(_forward(ours, x)[1])
  ours.train()
  a, b = np.asarray(_forward(ours, x)[1]), np.asarray(_forward(ours, x)[1])
  assert np.abs(a - ref).max() > 1e-3 and np.abs(a - b).max() > 1e-3
  # Rates rise linearly from 0 (first block: no drop path) to drop_path_rate (last block).
  blocks = [blk for st in ours.stages for blk in st.blocks]
  assert blocks[0].drop_path is None
  assert blocks[-1].drop_path.rate == pytest.approx(0.5)
  assert blocks[2].drop_path.rate == pytest.approx(0.5 * 2 / 4)


def test_drop_path_keeps_or_drops_whole_samples(dropping):
  blk = dropping[1].stages[-1].blocks[-1]  # rate 0.5
  x = jax.random.normal(jax.random.key(0), (64, 2, 2, DIMS[-1]))
  apply = nnx.jit(lambda b, x: b(x) - x)
  blk.train()
  delta = np.asarray(apply(blk, x))
  blk.eval()
  residual = np.asarray(apply(blk, x))
  per_sample = [np.abs(d).max() for d in delta]
  dropped = [i for i, v in enumerate(per_sample) if v == 0]
  kept = [i for i in range(64) if i not in dropped]
  assert 10 < len(dropped) < 54  # about half
  np.testing.assert_allclose(delta[kept], 2 * residual[kept], rtol=1e-5, atol=1e-5)


def test_variants_have_the_reference_architecture():
  counts = {}
  for name in ('atto', 'nano'):
    depths, dims = convnext.VARIANTS[name]
    model = nnx.eval_shape(lambda: convnext.ConvNeXt(convnext.convnext_config(name),
                                                     rngs=nnx.Rngs(0)))
    ours = {'.'.join(map(str, p)): tuple(v.shape)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    hf = ConvNextModel(ConvNextConfig(depths=list(depths), hidden_sizes=list(dims)))
    mapped, unexpected = convnext_params.map_state_dict(hf.state_dict())
    assert not unexpected
    assert {k: tuple(v.shape) for k, (_, v) in mapped.items()} == ours
    counts[name] = sum(int(np.prod(s)) for s in ours.values())
  # timm lists convnext_atto at 3.70M and nano at 15.59M parameters, with the 1000-class head.
  assert counts['atto'] + 320 * 1000 + 1000 == pytest.approx(3.70e6, rel=2e-3)
  assert counts['nano'] + 640 * 1000 + 1000 == pytest.approx(15.59e6, rel=2e-3)


def test_logical_axis_names():
  ours = _abstract()
  names = {'.'.join(map(str, p)): v.get_metadata()['out_sharding']
           for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
  assert names['stages.1.blocks.0.pwconv1.kernel'] == ('embed', 'mlp')
  assert names['stages.1.blocks.0.pwconv2.kernel'] == ('mlp', 'embed')
  assert names['stages.1.blocks.0.dwconv.kernel'] == (None, None, None, 'embed')
  assert names['head_norm.scale'] == ('embed',)
  assert all(n is not None for n in names.values())


def test_remat_and_bfloat16_match_float32():
  hf = _hf_model()
  _, x = _images(h=32, w=32)
  results = {}
  for name, kw in (('float32', {}), ('remat', {'remat': True}), ('bfloat16', {'dtype': jnp.bfloat16})):
    model = _abstract(**kw)
    convnext_params.load_convnext_weights(model, hf.state_dict())
    results[name] = _features_and_grads(model, x)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(results[name][1]))
  feats, grads = results['float32']
  for name, tol in (('remat', 1e-6), ('bfloat16', 5e-2)):
    np.testing.assert_allclose(np.asarray(results[name][0]), np.asarray(feats), atol=tol, rtol=tol)
    for a, b in zip(jax.tree.leaves(results[name][1]), jax.tree.leaves(grads)):
      assert float(jnp.abs(a - b).max()) <= 5 * tol * (float(jnp.abs(b).max()) + 1e-6), name


def test_wrong_variant_names_shapes_and_fix():
  hf = _hf_model(dims=(16, 32, 48, 80))
  ours = _abstract()
  with pytest.raises(GleamError, match=r"'layernorm\.(weight|bias)'.*\(80,\).*\(64,\).*variant"):
    convnext_params.load_convnext_weights(ours, hf.state_dict())


def test_missing_and_unexpected_keys_are_listed():
  sd = _hf_model().state_dict()
  del sd['encoder.stages.2.layers.1.pwconv2.bias']
  sd['encoder.stages.0.extra.weight'] = torch.zeros(3)
  with pytest.raises(GleamError, match=r'stages\.2\.blocks\.1\.pwconv2\.bias.*extra\.weight'):
    convnext_params.load_convnext_weights(_abstract(), sd)
  deeper = _hf_model(depths=(1, 1, 3, 1)).state_dict()
  with pytest.raises(GleamError, match=r'custom depths=\(1, 1, 3, 1\)'):
    convnext_params.load_convnext_weights(_abstract(), deeper)


def test_unreadable_or_absent_checkpoint(tmp_path):
  with pytest.raises(GleamError, match='not found'):
    convnext_params.load_convnext_weights(_abstract(), str(tmp_path / 'nope'))
  with pytest.raises(GleamError, match='No weight file'):
    convnext_params.load_convnext_weights(_abstract(), str(tmp_path))
  bad = tmp_path / 'w.safetensors'
  bad.write_bytes(b'not a checkpoint')
  with pytest.raises(GleamError, match='Cannot read'):
    convnext_params.load_convnext_weights(_abstract(), str(bad))


# the kernel gradient takes one of three forms by the number of positions (<= 16, <= 128, more)
@pytest.mark.parametrize('x_shape,k_hw', [((3, 9, 12, 5), (7, 7)),   # a stage-0 block, small
                                           ((2, 1, 2, 4), (7, 7)),    # a last stage: image smaller than the kernel
                                           ((2, 5, 4, 3), (3, 5)),    # a non-square kernel
                                           ((2, 12, 13, 3), (7, 7))])  # a larger image
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_depthwise_conv_matches_grouped_convolution(dtype, tol, x_shape, k_hw):
  """The shifted-sum depthwise conv (with its own gradients) against lax's grouped convolution."""
  c = x_shape[-1]
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dtype)
  k = jax.random.normal(jax.random.key(1), (*k_hw, 1, c)).astype(dtype)
  pad = tuple((n // 2, n // 2) for n in k_hw)
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: convnext.depthwise_conv_general_dilated(x, k, (1, 1), pad,
                                                             dimension_numbers=dn,
                                                             feature_group_count=c)
  ref = lambda x, k: jax.lax.conv_general_dilated(
      x.astype(jnp.float32), k.astype(jnp.float32), (1, 1), pad, dimension_numbers=dn,
      feature_group_count=c)
  weights = jax.random.normal(jax.random.key(2), x_shape)
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(f(x, k).astype(jnp.float32) * weights), argnums=(0, 1)))
  (l_ours, g_ours), (l_ref, g_ref) = loss(ours)(x, k), loss(ref)(x, k)
  assert ours(x, k).dtype == dtype
  np.testing.assert_allclose(np.asarray(ours(x, k), np.float32), ref(x, k), rtol=tol, atol=tol * 7)
  np.testing.assert_allclose(l_ours, l_ref, rtol=tol * 10)
  for a, b in zip(g_ours, g_ref):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol * 7)
  with pytest.raises(ValueError):
    convnext.depthwise_conv_general_dilated(x, k, (2, 2), pad, feature_group_count=c)


def test_unknown_variant():
  with pytest.raises(GleamError, match=r"'huge'.*atto.*tiny"):
    convnext.convnext_config('huge')


def test_forward_flops_hand_counted_and_close_to_xla():
  """Model FLOPs for MFU: ConvNeXt-T at 224 px, counted by hand layer by layer (timm lists
  4.47 GMACs, norms included), and within 10% of XLA's count of the same forward, which also
  counts norms, GELU and the depthwise conv's shifted adds."""
  macs = (56 * 56 * 48 * 96                          # stem: 4x4x3 patches -> 96
          + 3 * 56 * 56 * 96 * (49 + 8 * 96)         # stage 0: dwconv + two pointwise per block
          + 28 * 28 * 4 * 96 * 192 + 3 * 28 * 28 * 192 * (49 + 8 * 192)
          + 14 * 14 * 4 * 192 * 384 + 9 * 14 * 14 * 384 * (49 + 8 * 384)
          + 7 * 7 * 4 * 384 * 768 + 3 * 7 * 7 * 768 * (49 + 8 * 768))
  assert convnext.forward_flops(convnext.convnext_config('tiny'), 224, 224) == 2 * macs
  assert abs(2 * macs / 4.47e9 / 2 - 1) < 0.01

  cfg = convnext.convnext_config('tiny')
  graph, state = nnx.split(nnx.eval_shape(lambda: convnext.ConvNeXt(cfg, rngs=nnx.Rngs(0))))
  forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  xla = forward.lower(state, images).cost_analysis()['flops'] / 2
  assert 0.9 < 2 * macs / xla < 1.0, (2 * macs, xla)
