"""GLEAM-C encoder: embeddings, towers, any input size, bfloat16, pretrained weights, config."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ConvNextConfig, ConvNextModel

from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))


@nnx.jit
def _embed(model, q, s):
  return model(q, s)


def _make(**kw):
  cfg = gleam_c.model_config(**(TINY | kw))
  return gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def _images(b, h, w, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


@pytest.fixture(scope='module')
def shared():
  model = _make()
  model.eval()
  return model


def test_shapes_norms_and_any_input_size(shared):
  pano, sat = _images(3, 64, 128), _images(3, 64, 64, seed=1)
  q, s = _embed(shared, pano, sat)
  assert q.shape == s.shape == (3, 32) and q.dtype == s.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(s, axis=-1), 1.0, rtol=1e-5)
  # Shared weights: the same image gives the same embedding through either tower.
  q2, s2 = _embed(shared, sat, sat)
  np.testing.assert_allclose(q2, s2, atol=1e-6)
  np.testing.assert_allclose(s2, s, atol=1e-6)
  # Embeddings depend on the image (not a constant vector).
  assert float(jnp.abs(q[0] - q[1]).max()) > 1e-3
  assert shared.embed_dim == 32
  assert float(shared.logit_scale[...]) == pytest.approx(math.log(1 / 0.07))
  assert shared.logit_scale.get_metadata()['out_sharding'] == ()


def test_separate_towers_and_projection():
  model = _make(separate_towers=True, embed_dim=12)
  model.eval()
  sat = _images(2, 32, 32)
  q, s = _embed(model, sat, sat)
  assert q.shape == s.shape == (2, 12)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(q - s).max()) > 1e-2  # independent towers, different weights
  names = {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert names == {'query_encoder', 'reference_encoder', 'query_projection',
                   'reference_projection', 'logit_scale'}
  # Gradients reach each tower only from its own images.
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m.encode(sat, 'query')[:, 0])))(model)
  assert float(jnp.abs(grads.query_encoder.stem.conv.kernel[...]).max()) > 0
  assert float(jnp.abs(grads.reference_encoder.stem.conv.kernel[...]).max()) == 0


def test_bfloat16_keeps_float32_params_and_close_embeddings(shared):
  model = _make(dtype='bfloat16')
  nnx.update(model, nnx.state(shared, nnx.Param))
  model.eval()
  dtypes = {v.dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  pano, sat = _images(4, 64, 128), _images(4, 64, 64, seed=1)
  q, s = _embed(model, pano, sat)
  q32, s32 = _embed(shared, pano, sat)
  assert q.dtype == jnp.float32
  # Cosine similarity of the bfloat16 and float32 embeddings of each image.
  assert float(jnp.min(jnp.sum(q * q32, -1))) > 0.99
  assert float(jnp.min(jnp.sum(s * s32, -1))) > 0.99


def test_pretrained_path_loads_into_every_tower(tmp_path):
  torch.manual_seed(0)
  hf = ConvNextModel(ConvNextConfig(depths=list(TINY['depths']), hidden_sizes=list(TINY['dims']),
                                    layer_norm_eps=1e-6, layer_scale_init_value=0.3)).eval()
  hf.save_pretrained(tmp_path)
  model = _make(separate_towers=True, pretrained=str(tmp_path))
  model.eval()
  x = _images(2, 32, 32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))).pooler_output.numpy()
  ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
  q, s = _embed(model, x, x)
  np.testing.assert_allclose(q, ref, atol=1e-5)
  np.testing.assert_allclose(s, ref, atol=1e-5)


def test_pretrained_of_another_variant_is_a_clear_error(tmp_path):
  torch.manual_seed(0)
  ConvNextModel(ConvNextConfig(depths=[2, 2, 6, 2], hidden_sizes=[8, 16, 24, 32])).save_pretrained(
      tmp_path)
  with pytest.raises(GleamError, match=r'depths=\(2, 2, 6, 2\).*variant'):
    _make(pretrained=str(tmp_path))
  with pytest.raises(GleamError, match='not found'):
    _make(pretrained=str(tmp_path / 'missing'))


def test_drop_path_follows_train_and_eval():
  model = _make(drop_path_rate=0.5)
  for blk in (b for st in model.encoder.stages for b in st.blocks):
    blk.gamma[...] = jnp.ones_like(blk.gamma[...])  # residual branches large enough to see
  x = _images(4, 32, 32)
  a, b = _embed(model, x, x)[0], _embed(model, x, x)[0]
  assert float(jnp.abs(a - b).max()) > 1e-3  # train mode (the NNX default): random depth
  model.eval()
  a, b = _embed(model, x, x)[0], _embed(model, x, x)[0]
  np.testing.assert_array_equal(a, b)


def test_config_errors_and_overrides():
  with pytest.raises(GleamError, match=r"'gigantic'.*atto.*base"):
    gleam_c.GleamC(gleam_c.model_config(variant='gigantic'), rngs=nnx.Rngs(0))
  with pytest.raises(GleamError, match='dtype'):
    gleam_c.GleamC(gleam_c.model_config(dtype='float16'), rngs=nnx.Rngs(0))
  cfg = gleam_c.model_config()
  assert cfg.embed_dim is None and cfg.pretrained is None and cfg.variant == 'atto'
  cfg.embed_dim = 256  # placeholders take typed overrides (e.g. --config.model.embed_dim=256)
  cfg.depths = (1, 1, 1, 1)
  with pytest.raises(TypeError):
    cfg.embed_dim = 'large'
  model = nnx.eval_shape(lambda: gleam_c.GleamC(gleam_c.model_config(), rngs=nnx.Rngs(0)))
  assert model.encoder.config.dims == (40, 80, 160, 320)  # atto by default
  custom = gleam_c.model_config(depths=(1, 1), dims=(8, 16))
  assert custom.variant == 'custom'
  custom.variant = 'base'  # --config.model.variant=base on a custom net: not silently ignored
  with pytest.raises(GleamError, match=r"variant='base'.*depths=\(1, 1\).*c_phase1.py:variant=base"):
    gleam_c.backbone_config(custom)
  custom.variant = 'atto'  # configs saved before 'custom' existed: the custom net, as then
  assert gleam_c.backbone_config(custom).dims == (8, 16)


def test_modality_towers_encode_their_modality_and_others_fall_back():
  model = _make(modality_towers=('uav',), embed_dim=12)
  model.eval()
  x = _images(2, 32, 32)
  np.testing.assert_array_equal(model.encode(x, tower='panorama'), model.encode(x, tower='query'))
  np.testing.assert_array_equal(model.encode(x, tower='reference'), model.encode(x, tower='query'))
  assert not np.allclose(model.encode(x, tower='uav'), model.encode(x, tower='query'))
  nnx.update(model.uav_encoder, nnx.state(model.encoder))
  nnx.update(model.uav_projection, nnx.state(model.projection))
  np.testing.assert_array_equal(model.encode(x, tower='uav'), model.encode(x, tower='query'))
  assert gleam_c.tower_copy_source('uav_encoder/stem/conv/kernel', False, ('uav',)) == 'encoder/stem/conv/kernel'
  assert gleam_c.tower_copy_source('uav_projection/kernel', True, ('uav',)) == 'query_projection/kernel'
  assert gleam_c.tower_copy_source('encoder/stem/conv/kernel', False, ('uav',)) is None
  with pytest.raises(GleamError, match='cannot name a tower'):
    _make(modality_towers=('reference',))
