"""Optimizer rules: frozen parameters (no state, unchanged), lr multipliers, weight-decay mask, schedule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from gleam_jax.errors import GleamError
from gleam_jax.train import optim


def _cfg(**kw):
  cfg = dict(name="adamw", lr=0.1, warmup_steps=2, min_lr_ratio=0.0, weight_decay=0.0, clip_norm=0.0,
             b1=0.9, b2=0.999, eps=1e-8, frozen=(), lr_mults=(), no_decay=())
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def _params():
  return {"stem": {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}},
          "head": {"kernel": jnp.ones((3, 2))}, "logit_scale": jnp.float32(1.0)}


def test_labels_and_masks():
  cfg = _cfg(frozen=(r"^stem/",), lr_mults=((r"^head/", 10.0),))
  labels = optim.partition_labels(_params(), cfg)
  assert labels["stem"]["conv"]["kernel"] == "frozen"
  assert labels["stem"]["conv"]["bias"] == "frozen"
  assert labels["head"]["kernel"] == "lr_x10"
  assert labels["logit_scale"] == "lr_x1"
  decay = optim.decay_mask(_params(), _cfg(no_decay=(r"^head/",)))
  assert decay["stem"]["conv"]["kernel"] and not decay["stem"]["conv"]["bias"]
  assert not decay["head"]["kernel"] and not decay["logit_scale"]


def test_frozen_have_no_state_and_do_not_move():
  params = _params()
  tx, _ = optim.make_optimizer(_cfg(frozen=(r"^stem/",)), params, total_steps=10)
  state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(state))
  n_trainable = 3 * 2 + 1
  assert n_state == 2 * n_trainable + 2  # mu and nu of trainable params + two step counts
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["stem"]["conv"]["kernel"], 1.0)
  np.testing.assert_array_equal(params["stem"]["conv"]["bias"], 1.0)
  assert float(params["logit_scale"]) < 1.0


def test_lr_multiplier_scales_the_step():
  params = _params()
  tx, schedule = optim.make_optimizer(_cfg(lr_mults=((r"^head/", 10.0),)), params, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):  # step 0 has lr 0 (warmup)
    updates, state = tx.update(grads, state, params)
  lr1 = float(schedule(1))
  # Adam's first steps move by ~lr per unit gradient.
  np.testing.assert_allclose(updates["stem"]["conv"]["kernel"], -lr1, rtol=1e-3)
  np.testing.assert_allclose(updates["head"]["kernel"], -10 * lr1, rtol=1e-3)


def test_weight_decay_only_on_masked():
  params = _params()
  tx, schedule = optim.make_optimizer(_cfg(weight_decay=0.5), params, total_steps=10)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = tx.update(zeros, state, params)
  np.testing.assert_allclose(updates["stem"]["conv"]["kernel"], -0.5 * float(schedule(1)), rtol=1e-5)
  np.testing.assert_array_equal(updates["stem"]["conv"]["bias"], 0.0)
  assert float(updates["logit_scale"]) == 0.0


def test_clipping_ignores_frozen_gradients():
  params = _params()
  tx, _ = optim.make_optimizer(_cfg(frozen=(r"^stem/",), clip_norm=1.0, lr=1.0, warmup_steps=0), params,
                               total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["stem"]["conv"]["kernel"] = 1e6 * grads["stem"]["conv"]["kernel"]
  updates, _ = tx.update(grads, state, params)
  # Without the frozen gradient in the norm, Adam's first step is ~lr for every trainable entry.
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0, rtol=1e-3)


def test_schedule_warmup_and_cosine():
  schedule = optim.learning_rate_schedule(_cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1), 20)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 2, 4)], [0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(schedule(12)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(20)), 0.1, rtol=1e-5)


def test_bad_rules_are_config_errors():
  with pytest.raises(GleamError, match="frozen"):
    optim.make_optimizer(_cfg(frozen=("(",)), _params(), 10)
  with pytest.raises(GleamError, match="nothing would be trained"):
    optim.make_optimizer(_cfg(frozen=(".*",)), _params(), 10)
  with pytest.raises(GleamError, match="warmup_steps"):
    optim.make_optimizer(_cfg(warmup_steps=10), _params(), 10)
  with pytest.raises(GleamError, match=r"lr_mults: \('\^head/', -1\.0\) has multiplier -1\.0; it must be >= 0"):
    optim.make_optimizer(_cfg(lr_mults=((r"^head/", -1.0),)), _params(), 10)  # would climb the loss


def _gleam_c_params(backbone):
  """The params tree of a tiny GLEAM-C (a ViT of depth 3, or a ConvNeXt of 2 stages) with a projection."""
  from flax import nnx
  from gleam_jax.models import gleam_c
  if backbone == "vit":
    cfg = gleam_c.model_config(backbone="vit", embed_dim=8, vit=dict(width=16, depth=3, mlp_dim=32, heads=2,
                                                                      patch_size=4, image_size=8, pre_norm=True))
  else:
    cfg = gleam_c.model_config(depths=(1, 2), dims=(8, 16), embed_dim=8)
  return {"model": nnx.to_pure_dict(nnx.state(gleam_c.GleamC(cfg, rngs=nnx.Rngs(0)), nnx.Param))}


def test_layer_decay_multipliers_by_encoder_layer():
  """A ViT of depth 3 has layers 0 (embeddings) .. 4 (final norm): d^4 .. d^0; a ConvNeXt of 2 stages
  has its stem at d^3, stages at d^2, d^1 and its norm at 1; the GLEAM-C projection and logit scale
  keep 1; an lr_mults rule replaces the layer's multiplier."""
  d = 0.5
  labels = optim.param_names(_gleam_c_params("vit"))
  got = {name: label for name, label in zip(jax.tree.leaves(labels), jax.tree.leaves(
      optim.partition_labels(_gleam_c_params("vit"), _cfg(layer_decay=d, lr_mults=((r"blocks/2/fc1", 3.0),)))))}
  expect = {"model/encoder/patch_embed/kernel": d ** 4, "model/encoder/cls_token": d ** 4,
            "model/encoder/pos_embed": d ** 4, "model/encoder/norm_pre/scale": d ** 4,
            "model/encoder/blocks/0/attn/query/kernel": d ** 3, "model/encoder/blocks/1/norm2/bias": d ** 2,
            "model/encoder/blocks/2/fc2/kernel": d, "model/encoder/blocks/2/fc1/kernel": 3.0,
            "model/encoder/norm/scale": 1.0, "model/projection/kernel": 1.0, "model/logit_scale": 1.0}
  for name, mult in expect.items():
    assert got[name] == f"lr_x{mult:g}", name
  assert len(set(got.values())) == 6  # d^0 .. d^4 and the rule's 3
  convnext = _gleam_c_params("convnext")
  got = dict(zip(jax.tree.leaves(optim.param_names(convnext)),
                 jax.tree.leaves(optim.partition_labels(convnext, _cfg(layer_decay=d)))))
  stems = {v for k, v in got.items() if "/encoder/stem/" in k}
  stage0 = {v for k, v in got.items() if "/encoder/stages/0/" in k}
  stage1 = {v for k, v in got.items() if "/encoder/stages/1/" in k}
  last = {v for k, v in got.items() if "/encoder/" in k and "/stem/" not in k and "/stages/" not in k}
  assert (stems, stage0, stage1, last) == ({"lr_x0.125"}, {"lr_x0.25"}, {"lr_x0.5"}, {"lr_x1"}), got
  count = lambda label: sum(1 for v in got.values() if v == label)
  assert optim.describe_partitions(convnext, _cfg(layer_decay=d, frozen=(r"logit_scale",))) == (  # the main job's line
      f"lr multipliers x1 ({count('lr_x1') - 1} tensors), x0.5 ({count('lr_x0.5')}), x0.25 ({count('lr_x0.25')}), "
      f"x0.125 ({count('lr_x0.125')}), frozen (1)")
  assert optim.describe_partitions(convnext, _cfg()) is None
  with pytest.raises(GleamError, match=r"layer_decay=1.5 must be in \(0, 1\]"):
    optim.partition_labels(convnext, _cfg(layer_decay=1.5))


def test_layer_decay_gives_lora_adapters_their_kernels_multiplier():
  """With LoRA the encoder is frozen and its adapters train: each at its kernel's layer's rate."""
  from gleam_jax.train import lora
  params = _gleam_c_params("convnext")
  config = ml_collections.ConfigDict(dict(rank=2, alpha=4.0, targets=(lora.ENCODER_BLOCK_LINEARS,)))
  params["lora"] = lora.init(params["model"], config, 0)
  d = 0.5
  got = dict(zip(jax.tree.leaves(optim.param_names(params)),
                 jax.tree.leaves(optim.partition_labels(params, _cfg(layer_decay=d, frozen=(lora.ENCODERS,))))))
  adapters = {k: v for k, v in got.items() if k.startswith("lora/")}
  assert adapters and all(v == f"lr_x{d ** (2 - int(k.split('.stages.')[1][0])):g}" for k, v in adapters.items()), adapters
  assert {v for k, v in got.items() if k.startswith("model/encoder/")} == {"frozen"}


def test_layer_decay_reaches_the_qwen_vision_tower_only():
  """GLEAM-X: Qwen2.5-VL's vision tower (3 blocks) has its patch embedding at d^4, blocks at d^3 .. d
  and its merger at 1; the decoder, its embeddings and the output projection keep 1."""
  from flax import nnx
  from gleam_jax.models.qwen2_5_vl import config as qwen_config
  from gleam_jax.models.qwen2_5_vl import modeling
  params = {"model": nnx.to_pure_dict(nnx.state(modeling.create_model(qwen_config.tiny(), seed=0), nnx.Param))}
  d = 0.5
  got = dict(zip(jax.tree.leaves(optim.param_names(params)),
                 jax.tree.leaves(optim.partition_labels(params, _cfg(layer_decay=d)))))
  by_part = lambda part: {v for k, v in got.items() if k.startswith(f"model/{part}/")}
  assert by_part("visual/patch_embed") == {f"lr_x{d ** 4:g}"}
  assert [by_part(f"visual/blocks/{i}") for i in range(3)] == [{f"lr_x{d ** 3:g}"}, {f"lr_x{d ** 2:g}"}, {f"lr_x{d:g}"}]
  assert by_part("visual/merger") == by_part("language_model") == by_part("lm_head") == {"lr_x1"}


def test_layer_decay_scales_the_step():
  """Adam's first step moves each parameter by its multiplier times the learning rate."""
  params = _gleam_c_params("vit")
  tx, schedule = optim.make_optimizer(_cfg(layer_decay=0.5), params, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):  # step 0 has lr 0 (warmup)
    updates, state = tx.update(grads, state, params)
  lr1 = float(schedule(1))
  encoder = updates["model"]["encoder"]
  np.testing.assert_allclose(encoder["blocks"][0]["fc1"]["kernel"], -lr1 / 8, rtol=1e-3)
  np.testing.assert_allclose(encoder["cls_token"], -lr1 / 16, rtol=1e-3)
  np.testing.assert_allclose(encoder["norm"]["scale"], -lr1, rtol=1e-3)
  np.testing.assert_allclose(updates["model"]["projection"]["kernel"], -lr1, rtol=1e-3)
