"""The jitted contrastive train step on 1 and 8 CPU devices."""
import re

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c
from gleam_jax.train import contrastive
from gleam_jax.train import losses
from gleam_jax.train import sharding as shd

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
# a collective moving images (N, H, W, 3) between devices
IMAGE_COLLECTIVE = r"(all-gather|all-to-all|collective-permute)[^\n]*f32\[\d+,\d+,\d+,3\]"
BATCH, QUERY_HW, SAT_HW = 16, (16, 32), (16, 16)


def _optim(**kw):
  cfg = dict(name="adamw", lr=3e-3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.05, clip_norm=1.0,
             b1=0.9, b2=0.999, eps=1e-8, frozen=(), lr_mults=(), no_decay=(r"logit_scale",))
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def _model(drop_path=0.0):
  cfg = gleam_c.model_config(depths=(1, 1), dims=(8, 16), embed_dim=16, drop_path_rate=drop_path)
  return gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def _batch(seed=0, n=BATCH):
  rng = np.random.default_rng(seed)
  sat = rng.normal(size=(n, *SAT_HW, 3)).astype(np.float32)
  query = np.concatenate([sat, sat[:, :, ::-1]], axis=2) + 0.3 * rng.normal(size=(n, *QUERY_HW, 3))
  return {"query": query.astype(np.float32), "satellite": sat}


def _setup(mesh, loss="infonce", drop_path=0.0, **optim_kw):
  return contrastive.create_train_state(_model(drop_path), _optim(**optim_kw), 20, mesh, RULES, loss_name=loss)


@pytest.fixture(scope="module")
def single_device_grads():
  setup, state = _setup(shd.single_device_mesh(), drop_path=0.1)
  return contrastive.make_grad_fn(setup)(state, _batch())


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1)])
def test_loss_and_grads_match_single_device(mesh_cfg, single_device_grads):
  batch = _batch()
  loss1, grads1 = single_device_grads
  setup8, state8 = _setup(shd.make_mesh(mesh_cfg), drop_path=0.1)
  loss8, grads8 = contrastive.make_grad_fn(setup8)(state8, shd.shard_batch(batch, setup8.mesh))
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  flat1 = jax.tree_util.tree_leaves_with_path(grads1)
  flat8 = dict(jax.tree_util.tree_leaves_with_path(grads8))
  for path, g1 in flat1:
    g1 = np.asarray(g1)  # float32 sums in another order: tolerance relative to the gradient's scale
    np.testing.assert_allclose(np.asarray(flat8[path]), g1, rtol=2e-4, atol=1e-4 * np.abs(g1).max() + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_step_gathers_embeddings_not_images():
  mesh = shd.make_mesh(dict(data=8, fsdp=1, tensor=1))
  setup, state = _setup(mesh)
  step = contrastive.make_train_step(setup)
  batch = shd.shard_batch(_batch(), mesh)
  hlo = step.jitted.lower(state, batch).compile().as_text()
  gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
  shapes = [tuple(int(d) for d in m.split(",") if d)
            for line in gathers for m in re.findall(r"f32\[([\d,]*)\]", line.split("=")[1].split("all-gather")[0])]
  assert shapes, "the global-batch loss needs an all-gather of the embeddings"
  assert (BATCH, 16) in shapes, shapes  # the (global batch, embed dim) embeddings
  assert not re.search(IMAGE_COLLECTIVE, hlo)
  image_elems = BATCH * SAT_HW[0] * SAT_HW[1] * 3
  assert all(np.prod(s) < image_elems // 4 for s in shapes), shapes
  assert not any(len(s) == 4 for s in shapes), shapes


def test_loss_falls_and_step_reports_metrics():
  setup, state = _setup(shd.make_mesh(dict(data=8, fsdp=1, tensor=1)))
  step = contrastive.make_train_step(setup)
  batch = shd.shard_batch(_batch(), setup.mesh)
  history = []
  for _ in range(12):
    state, metrics = step(state, batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0] - 0.3, history
  assert int(state["step"]) == 12
  assert set(metrics) >= {"loss", "lr", "logit_scale", "grad_norm", "batch_acc"}
  np.testing.assert_allclose(float(metrics["lr"]), float(setup.schedule(11)), rtol=1e-6)
  assert 0 < float(metrics["grad_norm"]) and 1.0 < float(metrics["logit_scale"]) <= 100.0


@pytest.mark.parametrize("loss", ["infonce", "sigmoid"])
def test_infonce_step_bounds_the_logit_scale_parameter(loss):
  """InfoNCE: the log scale is clamped at log 100 after the update (CLIP); SigLIP leaves it free."""
  setup, state = _setup(shd.single_device_mesh(), loss=loss)
  state["params"]["model"]["logit_scale"] = jax.numpy.float32(np.log(150.0))
  state, metrics = contrastive.make_train_step(setup)(state, _batch())
  np.testing.assert_allclose(float(metrics["logit_scale"]), 150.0, rtol=1e-5)  # the step's loss used it as it was
  after = float(state["params"]["model"]["logit_scale"])
  if loss == "infonce":
    np.testing.assert_allclose(after, np.log(100.0), rtol=1e-6)
  else:
    assert abs(after - np.log(150.0)) < 0.01


def test_sigmoid_loss_with_frozen_stem():
  """The sigmoid loss trains its bias; frozen parameters do not move, the others do."""
  setup, state = _setup(shd.single_device_mesh(), loss="sigmoid", frozen=(r"^model/encoder/stem/",))
  before = jax.tree.map(np.asarray, state["params"])
  step = contrastive.make_train_step(setup)
  for _ in range(2):  # the first step has learning rate 0 (warmup)
    state, metrics = step(state, _batch())
  after = jax.tree.map(np.asarray, state["params"])
  assert np.isfinite(float(metrics["loss"]))
  assert after["loss_bias"] != before["loss_bias"]
  for a, b in zip(jax.tree.leaves(after["model"]["encoder"]["stem"]), jax.tree.leaves(before["model"]["encoder"]["stem"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(after["model"]["projection"]["kernel"], before["model"]["projection"]["kernel"])


def test_batch_that_does_not_divide_fails_before_compiling():
  setup, state = _setup(shd.make_mesh(dict(data=8, fsdp=1, tensor=1)))
  step = contrastive.make_train_step(setup)
  with pytest.raises(GleamError, match=r"batch size=12 .*8 shards"):
    step(state, _batch(n=12))
  # a satellite per query, group by group
  short = dict(_batch(), satellite=_batch()["satellite"][:8])
  with pytest.raises(GleamError, match="the batch holds 16 queries but 8 satellites"):
    step(state, short)
  grouped = _grouped_batch()
  grouped["satellite"]["b"] = grouped["satellite"]["b"][:4]
  with pytest.raises(GleamError, match="the batch group b holds 8 queries but 4 satellites"):
    step(state, grouped)


def _grouped_batch(seed=0):
  """Two modality groups of 8 with their own query shapes; group 'b' repeats one location of 'a'."""
  a, b = _batch(seed, 8), _batch(seed + 1, 8)
  b["query"] = b["query"][:, :, :16]  # square queries
  location_ids = {"a": np.arange(8), "b": np.arange(100, 108)}
  location_ids["b"][3] = 5
  return {"query": {"a": a["query"], "b": b["query"]}, "satellite": {"a": a["satellite"], "b": b["satellite"]},
          "location_id": location_ids}


def test_grouped_batch_matches_single_device_and_gathers_no_images():
  batch = _grouped_batch()
  setup1, state1 = _setup(shd.single_device_mesh())
  loss1, grads1 = contrastive.make_grad_fn(setup1)(state1, batch)
  mesh = shd.make_mesh(dict(data=8, fsdp=1, tensor=1))
  setup8, state8 = _setup(mesh)
  loss8, grads8 = contrastive.make_grad_fn(setup8)(state8, shd.shard_batch(batch, mesh))
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  for (path, g1), g8 in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads8)):
    g1 = np.asarray(g1)
    np.testing.assert_allclose(np.asarray(g8), g1, rtol=2e-4, atol=1e-4 * np.abs(g1).max() + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # the loss is the plain InfoNCE over the joined batch, with the shared location's pairs excluded
  model = contrastive.eval_model(setup1, state1)
  model.train()
  q = np.concatenate([np.asarray(model.encode(batch["query"][k], tower="query")) for k in ("a", "b")])
  r = np.concatenate([np.asarray(model.encode(batch["satellite"][k], tower="reference")) for k in ("a", "b")])
  ids = np.concatenate([batch["location_id"]["a"], batch["location_id"]["b"]])
  exclude = losses.same_location_pairs(ids, ids)
  want = losses.infonce(q, r, model.logit_scale[...], 0.1, exclude)
  np.testing.assert_allclose(float(loss1), float(want), rtol=1e-5)
  # one step: per-group batch accuracies, and no image crosses devices
  step = contrastive.make_train_step(setup8)
  inputs = contrastive.step_inputs(shd.shard_batch(batch, mesh))
  compiled = step.jitted.lower(state8, inputs).compile()
  assert not re.search(IMAGE_COLLECTIVE, compiled.as_text())
  state8, metrics = compiled(state8, inputs)
  assert set(metrics) >= {"batch_acc/a", "batch_acc/b"}
  twelve = {k: {**batch[k], "b": np.concatenate([batch[k]["b"], batch[k]["b"][:4]])} for k in ("query", "satellite")}
  with pytest.raises(GleamError, match="batch size of b=12"):
    step(state8, {**batch, **twelve})


def test_one_encoder_call_per_tower_and_shape(monkeypatch):
  """Images one tower reads at one shape go through one encoder call, joined shard by shard; the
  embeddings come back in the batch's order (the grouped test above checks the loss)."""
  calls = []
  encode = gleam_c.GleamC.encode
  monkeypatch.setattr(gleam_c.GleamC, "encode",
                      lambda self, x, tower="query": calls.append((tower, x.shape)) or encode(self, x, tower))
  batch = _grouped_batch()
  model = _model()
  query, reference = contrastive.encode_pairs(model, batch["query"], batch["satellite"], shards=4)
  # one shared tower: the square queries of 'b' join both groups' satellites
  assert calls == [("a", (8, 16, 32, 3)), ("b", (24, 16, 16, 3))], calls
  joined = np.concatenate([batch["query"]["b"], batch["satellite"]["a"], batch["satellite"]["b"]])
  order = np.arange(24).reshape(3, 4, 2).transpose(1, 0, 2).reshape(-1)  # shard by shard
  np.testing.assert_array_equal(np.asarray(contrastive.join_by_shard(
      [batch["query"]["b"], batch["satellite"]["a"], batch["satellite"]["b"]], 4)), joined[order])
  want_q = np.concatenate([model.encode(batch["query"][k], tower=k) for k in ("a", "b")])
  want_r = np.concatenate([model.encode(batch["satellite"][k], tower="reference") for k in ("a", "b")])
  np.testing.assert_allclose(np.asarray(query), want_q, atol=2e-6)
  np.testing.assert_allclose(np.asarray(reference), want_r, atol=2e-6)
  # a tower of its own for 'b': its queries get their own call
  calls.clear()
  cfg = gleam_c.model_config(depths=(1, 1), dims=(8, 16), embed_dim=16, modality_towers=("b",))
  towers = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  contrastive.encode_pairs(towers, batch["query"], batch["satellite"], shards=2)
  assert calls == [("a", (8, 16, 32, 3)), ("b", (8, 16, 16, 3)), ("reference", (16, 16, 16, 3))], calls


def test_modality_towers_with_a_frozen_shared_tower():
  """Phase 2's locked-satellite recipe: group 'b' has its own tower, the shared tower is frozen.
  The step's gradients equal plain autodiff restricted to the trainable parameters, and the frozen
  tower costs no backward pass (fewer flops than training it)."""
  batch = _grouped_batch()
  cfg = gleam_c.model_config(depths=(1, 1), dims=(8, 16), embed_dim=16, modality_towers=("b",))
  frozen = (r"^model/encoder/", r"^model/projection/")
  mesh = shd.single_device_mesh()
  setup, state = contrastive.create_train_state(
      gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1)), _optim(frozen=frozen), 20, mesh, RULES)
  loss, grads = contrastive.make_grad_fn(setup)(state, batch)
  model = contrastive.eval_model(setup, state)
  model.train()

  def reference_loss(params):
    m = contrastive.merge_model(setup, params, state["model_state"])
    q = jax.numpy.concatenate([m.encode(batch["query"]["a"], tower="a"), m.encode(batch["query"]["b"], tower="b")])
    r = jax.numpy.concatenate([m.encode(batch["satellite"][k], tower="reference") for k in ("a", "b")])
    ids = np.concatenate([batch["location_id"]["a"], batch["location_id"]["b"]])
    return losses.infonce(q, r, m.logit_scale[...], 0.1, losses.same_location_pairs(ids, ids))
  want_loss, want = jax.jit(jax.value_and_grad(reference_loss))(state["params"])
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    if "'encoder'" in name or "'projection'" in name:
      np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=name)
    else:
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=name)
  assert np.abs(np.asarray(grads["model"]["b_encoder"]["stem"]["conv"]["kernel"])).max() > 0

  def flops(setup, state):  # of the step as traced: autodiff leaves the frozen tower's backward out
    return contrastive.make_train_step(setup).jitted.lower(state, batch).cost_analysis()["flops"]
  setup_all, state_all = contrastive.create_train_state(
      gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1)), _optim(), 20, mesh, RULES)
  assert flops(setup, state) < 0.85 * flops(setup_all, state_all)


def _accumulating_setup(mesh, steps, loss="infonce", drop_path=0.0, **optim_kw):
  return contrastive.create_train_state(_model(drop_path), _optim(**optim_kw), 20, mesh, RULES, loss_name=loss,
                                        accum_steps=steps)


@pytest.mark.parametrize("grouped,loss,frozen,mesh_cfg,steps", [
    (True, "infonce", (), dict(data=4, fsdp=1, tensor=2), 2),
    (False, "sigmoid", (r"^model/encoder/stem/",), None, 4)])
def test_gradient_cache_gives_the_whole_batchs_loss_and_gradients(grouped, loss, frozen, mesh_cfg, steps):
  """In micro-batches: the loss and gradients of the whole batch on one device (every query against
  every satellite), frozen parameters at zero, no image crosses devices, and the compiled step's scratch
  memory (XLA's own accounting) shrinks with the micro-batch."""
  batch = _grouped_batch() if grouped else _batch()
  setup1, state1 = _setup(shd.single_device_mesh(), loss=loss, frozen=frozen)
  whole = contrastive.make_grad_fn(setup1).jitted.lower(state1, contrastive.step_inputs(batch)).compile()
  loss1, grads1 = whole(state1, contrastive.step_inputs(batch))
  mesh = shd.make_mesh(mesh_cfg) if mesh_cfg else shd.single_device_mesh()
  setup, state = _accumulating_setup(mesh, steps, loss=loss, frozen=frozen)
  inputs = contrastive.step_inputs(shd.shard_batch(batch, mesh))
  compiled = contrastive.make_grad_fn(setup).jitted.lower(state, inputs).compile()
  assert not re.search(IMAGE_COLLECTIVE, compiled.as_text())
  got_loss, grads = compiled(state, inputs)
  np.testing.assert_allclose(float(got_loss), float(loss1), rtol=1e-5)
  for (path, g1), g in zip(jax.tree_util.tree_leaves_with_path(grads1), jax.tree.leaves(grads), strict=True):
    g1 = np.asarray(g1)
    np.testing.assert_allclose(np.asarray(g), g1, rtol=2e-4, atol=1e-4 * np.abs(g1).max() + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
  if frozen:
    np.testing.assert_array_equal(np.asarray(grads["model"]["encoder"]["stem"]["conv"]["kernel"]), 0.0)
    assert float(grads["loss_bias"]) != 0.0
  if mesh.size == 1:
    scratch = lambda c: c.memory_analysis().temp_size_in_bytes
    assert scratch(compiled) < 0.4 * scratch(whole), (scratch(compiled), scratch(whole))


def _live_branches(state):
  """Layer scales of 1 (ConvNeXt starts them at 1e-6): a dropped residual branch then changes the output."""
  for stage in state["params"]["model"]["encoder"]["stages"].values():
    for block in stage["blocks"].values():
      block["gamma"] = jax.numpy.ones_like(block["gamma"])


def test_gradient_cache_draws_the_same_drop_path_in_both_passes():
  """With drop path, micro-batch k is encoded with the noise of fold_in(step key, k) in the pass
  without gradients and in the pass that pulls gradients back: the gradients equal plain autodiff
  through that micro-batched encoding (other noise in either pass would not)."""
  batch, steps = _batch(), 2
  setup, state = _accumulating_setup(shd.single_device_mesh(), steps, drop_path=0.5)
  _live_branches(state)
  loss, grads = contrastive.make_grad_fn(setup)(state, batch)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  micro = contrastive.split_micro_batches({k: {"": batch[k]} for k in contrastive.STEP_INPUTS}, steps, 1)

  def reference_loss(params, key_offset):
    embeddings = []
    for k in range(steps):
      model = contrastive.merge_model(setup, params, state["model_state"])
      model.train()
      nnx.reseed(model, dropout=jax.random.fold_in(step_key, k + key_offset))
      embeddings.append(contrastive.encode_pairs(model, *(jax.tree.map(lambda x: x[k], micro[i])
                                                           for i in contrastive.STEP_INPUTS)))
    q, r = (contrastive.join_micro_batches(jax.numpy.stack([e[i] for e in embeddings]), [BATCH], 1) for i in (0, 1))
    return losses.infonce(q, r, params["model"]["logit_scale"], 0.1)
  reference = jax.jit(jax.value_and_grad(reference_loss))
  want_loss, want = reference(state["params"], 0)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5 * np.abs(w).max() + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # the noise is live: other keys give another loss
  assert abs(float(reference(state["params"], steps)[0]) - float(loss)) > 1e-3


def test_micro_batches_that_do_not_divide_fail_before_compiling():
  setup, state = _accumulating_setup(shd.make_mesh(dict(data=8, fsdp=1, tensor=1)), 4)
  step = contrastive.make_train_step(setup)
  with pytest.raises(GleamError, match=r"micro-batch size of the batch \(16 // 4\)=4 does not divide .*8 shards"):
    step(state, _batch())
  with pytest.raises(GleamError, match=r"batch size=18 does not split into config.grad_accum_steps=4"):
    step(state, _batch(n=18))
