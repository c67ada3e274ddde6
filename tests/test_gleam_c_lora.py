"""LoRA fine-tuning of GLEAM-C (`config.lora`, `configs/c_phase1.py:lora=<rank>`): adapters on the
encoders' block Linears (`lora.ENCODER_BLOCK_LINEARS`), the encoders frozen, the projection heads and
logit scale trained. The step's gradients are those of the model with the adapters folded in, on one
device and on a mesh; a job's evaluation, its `evaluate` job, `retrieve.load_trained` and a phase-2
job started from it all read the folded model."""
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from config_files import tiny_config
from gleam_jax.errors import GleamError
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax import retrieve
from gleam_jax.models import gleam_c
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import lora
from gleam_jax.train import losses
from gleam_jax.train import sharding as shd
from gleam_jax.utils.writer import read_metrics

RANK, ALPHA = 2, 4.0
OPTIM = ml_collections.ConfigDict(dict(
    name="adamw", lr=1e-2, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.05, clip_norm=1.0, b1=0.9,
    b2=0.999, eps=1e-8, frozen=(), lr_mults=(), no_decay=(r"logit_scale",)))


def lora_cfg():
  return ml_collections.ConfigDict(dict(rank=RANK, alpha=ALPHA, targets=(lora.ENCODER_BLOCK_LINEARS,)))


def vit_model(**vit_kw):
  cfg = gleam_c.model_config(backbone="vit", embed_dim=8, vit=dict(
      width=16, depth=2, mlp_dim=32, heads=2, patch_size=4, image_size=16, **vit_kw))
  return gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def pairs(n=8, seed=0):
  rng = np.random.default_rng(seed)
  sat = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  query = np.concatenate([sat, sat[:, :, ::-1]], axis=2) + 0.3 * rng.normal(size=(n, 16, 32, 3)).astype(np.float32)
  return {"query": query.astype(np.float32), "satellite": sat}


def test_adapters_go_on_every_encoder_block_linear():
  """A ViT block's q, k, v, out, fc1 and fc2 (a SwiGLU's fc1.gate and fc1.up), a ConvNeXt block's
  pwconv1 and pwconv2, in every tower; not the patch embedding, the projection heads or a CLIP
  projection."""
  pure = lambda model: nnx.to_pure_dict(nnx.state(model, nnx.Param))
  vit_keys = set(lora.init(pure(vit_model(swiglu=True, proj_dim=12, pre_norm=True)), lora_cfg(), 0))
  linears = ("attn.query", "attn.key", "attn.value", "attn.out", "fc1.gate", "fc1.up", "fc2")
  assert vit_keys == {f"encoder.blocks.{i}.{name}.kernel" for i in range(2) for name in linears}
  convnext = gleam_c.GleamC(gleam_c.model_config(depths=(1, 2), dims=(8, 16), embed_dim=8, modality_towers=("uav",)),
                            rngs=nnx.Rngs(params=0, dropout=1))
  keys = set(lora.init(pure(convnext), lora_cfg(), 0))
  assert keys == {f"{tower}encoder.stages.{s}.blocks.{b}.pwconv{k}.kernel" for tower in ("", "uav_")
                  for s, blocks in enumerate((1, 2)) for b in range(blocks) for k in (1, 2)}


def _state_with_live_adapters(mesh, accum_steps=1):
  setup, state = contrastive.create_train_state(vit_model(), OPTIM, 20, mesh, shd.DEFAULT_RULES, lora_cfg=lora_cfg(),
                                                accum_steps=accum_steps)
  rng = np.random.default_rng(1)  # B starts at zero; move it so that the adapters change the model
  adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                          jax.device_get(state["params"]["lora"]))
  params = dict(state["params"], lora=adapters)
  return setup, dict(state, params=shd.place(params, setup.shardings["params"]))


def test_lora_step_is_the_folded_models_and_trains_only_adapters_and_head():
  """The step's loss and gradients (adapters beside their layers) are those of the model with
  W + (alpha / rank) A B as kernels, on one device, on a (data 2, fsdp 2, tensor 2) mesh and through
  the gradient cache (2 micro-batches); the encoders get no gradient and do not move, the adapters,
  the projection and the logit scale do."""
  batch = pairs()
  setup, state = _state_with_live_adapters(shd.single_device_mesh())
  assert setup.trainable["model"]["projection"]["kernel"] and not setup.trainable["model"]["encoder"]["norm"]["scale"]
  loss, grads = contrastive.make_grad_fn(setup)(state, batch)

  def folded_loss(model_params, adapters):
    merged = lora.merge(model_params, adapters, ALPHA / RANK)
    model = contrastive.merge_model(setup, {"model": merged}, state["model_state"])
    model.train()
    nnx.reseed(model, dropout=jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]))
    query, satellite = model.encode(jnp.asarray(batch["query"]), "query"), model.encode(jnp.asarray(batch["satellite"]), "reference")
    return losses.infonce(query, satellite, merged["logit_scale"], 0.1)
  want_loss, (want_model, want_lora) = jax.jit(jax.value_and_grad(folded_loss, argnums=(0, 1)))(
      state["params"]["model"], state["params"]["lora"])
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  without = jax.jit(folded_loss)(state["params"]["model"], jax.tree.map(jnp.zeros_like, state["params"]["lora"]))
  assert abs(float(without) - float(loss)) > 0.01 * float(loss)  # the adapters matter beyond the tolerances
  close = lambda got, want, **kw: np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4 * np.abs(np.asarray(want)).max(), **kw)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads["lora"]), jax.tree.leaves(want_lora)):
    close(got, want, err_msg=jax.tree_util.keystr(path))
  for name in ("projection", "logit_scale"):
    for got, want in zip(jax.tree.leaves(grads["model"][name]), jax.tree.leaves(want_model[name])):
      close(got, want)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads["model"]["encoder"]))

  mesh_setup, mesh_state = _state_with_live_adapters(shd.make_mesh(dict(data=2, fsdp=2, tensor=2)))
  mesh_loss, mesh_grads = contrastive.make_grad_fn(mesh_setup)(mesh_state, shd.shard_batch(batch, mesh_setup.mesh))
  np.testing.assert_allclose(float(mesh_loss), float(loss), rtol=1e-4)
  for got, want in zip(jax.tree.leaves(mesh_grads["lora"]), jax.tree.leaves(grads["lora"])):
    close(got, want)

  cached_setup, cached_state = _state_with_live_adapters(shd.single_device_mesh(), accum_steps=2)
  cached_loss, cached_grads = contrastive.make_grad_fn(cached_setup)(cached_state, batch)
  np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(cached_grads), jax.tree.leaves(grads)):
    close(got, want)

  before = jax.device_get(state["params"])
  step = contrastive.make_train_step(setup)
  for _ in range(3):
    state, _ = step(state, batch)
  after = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, after["model"]["encoder"], before["model"]["encoder"])
  moved = lambda tree_a, tree_b: all(np.any(a != b) for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))
  assert moved(after["lora"], before["lora"]) and moved(after["model"]["projection"], before["model"]["projection"])
  assert after["model"]["logit_scale"] != before["model"]["logit_scale"]


def test_lora_config_errors_name_the_fix(tiny_cfg, tmp_path):
  """A rank or alpha no adapter can have, and targets that match no kernel, stop before training."""
  config = tiny_config("c_phase1", tiny_cfg.data_dir, "tiny,lora=-2")
  with pytest.raises(GleamError, match=r"config\.lora\.rank=-2, alpha=16\.0: give rank >= 0"):
    main.run(config, str(tmp_path / "bad_rank"))
  config = tiny_config("c_phase1", tiny_cfg.data_dir, "tiny,lora=4", **{"lora.targets": (r"attn/query/kernel$",)})
  with pytest.raises(GleamError, match=r"config\.lora\.targets=\('attn/query/kernel\$',\) match no Linear kernel"):
    main.run(config, str(tmp_path / "no_match"))


@pytest.fixture(scope="module")
def lora_workdir(tiny_cfg, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lora_job"))
  main.run(tiny_config("c_phase1", tiny_cfg.data_dir, "tiny,lora=4", total_steps=8), workdir)
  return workdir


def test_lora_job_checkpoints_adapters_and_every_reader_folds_them(lora_workdir, tiny_cfg, tmp_path, capsys):
  """The tiny job with lora=4: its checkpoint holds the adapters beside the untouched encoder;
  `retrieve.load_trained` (retrieve, localize, export_c) gives the folded kernels; an `evaluate` job
  reproduces the job's own last evaluation; a phase-2 job with a tower per modality starts every
  tower as the folded encoder (its own adapters afresh), and a resumed job reads the adapters back."""
  config = retrieve.load_config(lora_workdir)
  assert config.lora.rank == 4
  for path in (lora_workdir, f"{lora_workdir}/checkpoints", f"{lora_workdir}/checkpoints/8"):  # init_from's forms
    assert checkpoint.job_config(checkpoint.job_directory(path)).lora.rank == 4
  initial = contrastive.build_model(config.model, int(config.seed), pretrained=False)
  initial = nnx.to_pure_dict(nnx.state(initial, nnx.Param))
  saved = checkpoint.host_state(checkpoint.restore_params(lora_workdir, {
      "model": jax.tree.map(jnp.asarray, initial), "lora": lora.init(initial, config.lora, 0)})[0])
  jax.tree.map(np.testing.assert_array_equal, saved["model"]["encoder"], initial["encoder"])
  key = "encoder.stages.1.blocks.0.pwconv1.kernel"
  a, b = saved["lora"][key]["a"], saved["lora"][key]["b"]
  assert np.abs(b).max() > 0
  folded = initial["encoder"]["stages"][1]["blocks"][0]["pwconv1"]["kernel"] + (16.0 / 4) * a @ b

  model, _, _, _ = retrieve.load_trained(lora_workdir)
  np.testing.assert_allclose(np.asarray(model.encoder.stages[1].blocks[0].pwconv1.kernel[...]), folded, rtol=1e-6)

  trained = {k: v for r in read_metrics(lora_workdir) if r["step"] == 8 for k, v in r.items() if k.startswith("eval/")}
  evaluation = tiny_config("c_phase1", tiny_cfg.data_dir, trainer="evaluate", init_from=lora_workdir, total_steps=1)
  assert main.run(evaluation, str(tmp_path / "eval")) == pytest.approx(trained) and trained
  assert "folded the LoRA adapters" in capsys.readouterr().out

  phase2 = tiny_config("c_phase2", tiny_cfg.data_dir, "tiny,towers=modality,lora=2", init_from=lora_workdir)
  _, state = contrastive.create_train_state(
      contrastive.build_model(phase2.model, 0, pretrained=False), phase2.optim, 10, shd.single_device_mesh(),
      phase2.sharding_rules, lora_cfg=phase2.lora)
  fresh = jax.device_get(state["params"]["lora"])
  state, _ = contrastive.init_from_checkpoint(phase2, state)
  params = jax.device_get(state["params"])
  for tower in ("encoder", "uav_encoder", "streetmap_encoder", "ground_encoder"):
    np.testing.assert_allclose(params["model"][tower]["stages"][1]["blocks"][0]["pwconv1"]["kernel"], folded, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, params["lora"], fresh)
  copied = tmp_path / "copied"  # the checkpoints alone, without the job's config.json: the fix is named
  shutil.copytree(f"{lora_workdir}/checkpoints", copied / "checkpoints")
  phase2.init_from = str(copied)
  with pytest.raises(GleamError, match=r"lora/encoder\..* but not in the model.*LoRA adapters .*config\.json, which "
                                       r".*copied lacks: copy that job's config\.json there"):
    contrastive.init_from_checkpoint(phase2, state)

  setup, state = contrastive.create_train_state(
      contrastive.build_model(config.model, 0, pretrained=False), config.optim, 8, shd.single_device_mesh(),
      config.sharding_rules, lora_cfg=config.lora)
  manager = checkpoint.make_manager(lora_workdir, 2, False)
  try:
    resumed, _, step = checkpoint.restore(manager, state)
  finally:
    manager.close()
  assert int(step) == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["params"]["lora"]), saved["lora"])
