"""ViT backbone (`gleam_jax.models.vit`, `vit_params`): tokens and gradients against transformers'
`ViTModel` (float32) at its own grid and resized to other input shapes; the bicubic resize against
PyTorch's; Hugging Face (file and module names) and timm checkpoints read to the same model;
position grids resampled on load; the export read back by transformers; GLEAM-C on a ViT."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c, vit, vit_params

TOL = 1e-5
SIZES = dict(width=32, depth=2, mlp_dim=48, heads=4, patch_size=4)


def hf_vit(image_size=16, eps=1e-6, seed=0):
  """A transformers ViTModel (no pooler) with every parameter random, so a swapped or mistransposed
  tensor cannot go unseen."""
  torch.manual_seed(seed)
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                  image_size=image_size, patch_size=4, layer_norm_eps=eps, hidden_act="gelu")
  model = transformers.ViTModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
  return model


def our_vit(image_size=16, pool="cls", eps=1e-6):
  return vit.ViT(vit.vit_config(None, **SIZES, image_size=image_size, pool=pool, ln_eps=eps), rngs=nnx.Rngs(3))


def hf_tokens(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True).last_hidden_state.numpy()


def images(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def timm_state_dict(hf_sd):
  """The same weights under timm's VisionTransformer keys (q, k and v stacked into attn.qkv)."""
  out = {"cls_token": hf_sd["embeddings.cls_token"], "pos_embed": hf_sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": hf_sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": hf_sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": hf_sd["layernorm.weight"], "norm.bias": hf_sd["layernorm.bias"],
         "head.weight": np.zeros((10, 32), np.float32), "head.bias": np.zeros(10, np.float32)}
  for i in range(2):
    hf = lambda name: hf_sd[f"encoder.layer.{i}.{name}"]
    for p in ("weight", "bias"):
      out[f"blocks.{i}.norm1.{p}"] = hf(f"layernorm_before.{p}")
      out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate([hf(f"attention.attention.{n}.{p}") for n in ("query", "key", "value")])
      out[f"blocks.{i}.attn.proj.{p}"] = hf(f"attention.output.dense.{p}")
      out[f"blocks.{i}.norm2.{p}"] = hf(f"layernorm_after.{p}")
      out[f"blocks.{i}.mlp.fc1.{p}"] = hf(f"intermediate.dense.{p}")
      out[f"blocks.{i}.mlp.fc2.{p}"] = hf(f"output.dense.{p}")
  return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """transformers' own files of the random ViT (`save_pretrained`: the names real checkpoints have)."""
  directory = str(tmp_path_factory.mktemp("hf_vit"))
  hf_vit().save_pretrained(directory)
  return directory


@pytest.mark.parametrize("size_in,size_out", [(4, 4), (4, 8), (4, 7), (5, 3), (14, 24), (2, 1)])
def test_bicubic_matrix_is_torch_bicubic(size_in, size_out):
  grid = np.random.default_rng(0).standard_normal((size_in, size_in + 1)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(grid)[None, None], size=(size_out, size_out + 2), mode="bicubic",
                       align_corners=False)[0, 0].numpy()
  got = np.asarray(vit.resize_grid(jnp.asarray(grid)[..., None], size_out, size_out + 2))[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16), (16, 32), (20, 28), (8, 8), (18, 17)])
def test_tokens_match_transformers_vit(hf_dir, shape):
  """The grid of the checkpoint (16 px), a 1:2 panorama, sizes needing resized position embeddings
  (odd grids, a smaller one) and sizes that are no multiple of the patch (the border dropped, as
  torch's strided convolution drops it)."""
  model = our_vit()
  vit_params.load_vit_weights(model, hf_dir)
  x = images((2, *shape, 3))
  want = hf_tokens(transformers.ViTModel.from_pretrained(hf_dir, add_pooling_layer=False).eval(), x)
  got = np.asarray(model.tokens(jnp.asarray(x)))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=TOL)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), want[:, 0], atol=TOL)
  gap = our_vit(pool="gap")
  vit_params.load_vit_weights(gap, hf_dir)
  np.testing.assert_allclose(np.asarray(gap(jnp.asarray(x))), want[:, 1:].mean(1), atol=TOL)


def test_gradients_match_transformers_vit():
  """Gradients of every parameter (the resized position embeddings included) and of the input."""
  hf = hf_vit()
  model = our_vit()
  vit_params.load_vit_weights(model, hf.state_dict())
  x = images((2, 16, 24, 3), seed=1)
  weights = images((2, 1 + 4 * 6, 32), seed=2)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  loss = (hf(x_torch, interpolate_pos_encoding=True).last_hidden_state * torch.from_numpy(weights)).sum()
  loss.backward()
  want = {k: p.grad.numpy() for k, p in hf.named_parameters()}

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def ours(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest).tokens(x) * weights)

  grads, dx = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, jnp.asarray(x))
  got_model, want_model = our_vit(), our_vit()  # gradients in parameters' places, read out by file names
  nnx.update(got_model, grads)
  vit_params.load_vit_weights(want_model, want)
  got, want = vit_params.hf_state_dict(got_model), vit_params.hf_state_dict(want_model)
  assert len(got) == 38
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(np.asarray(dx), x_torch.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_every_checkpoint_layout_reads_to_the_same_model(hf_dir):
  """transformers' files, its in-memory module names (`state_dict()` of transformers >= 5), a
  `ViTForImageClassification` state dict (prefix `vit.`, classifier ignored), timm's layout (q, k, v
  stacked) and a wrapper prefix all give the same parameters."""
  from safetensors.numpy import load_file
  files = load_file(os.path.join(hf_dir, "model.safetensors"))
  reference = our_vit()
  vit_params.load_vit_weights(reference, hf_dir)
  want = vit_params.hf_state_dict(reference)
  np.testing.assert_equal(want, files)  # and our export names are transformers' file names
  classifier = {f"vit.{k}": v for k, v in files.items()} | {"classifier.weight": np.zeros((3, 32), np.float32)}
  sources = {"modules": {k: v.numpy() for k, v in hf_vit().state_dict().items()},
             "classifier": classifier, "timm": timm_state_dict(files),
             "wrapped timm": {f"module.{k}": v for k, v in timm_state_dict(files).items()}}
  assert vit_params.detect_layout(sources["modules"]) == "huggingface_modules"
  for name, sd in sources.items():
    model = our_vit()
    vit_params.load_vit_weights(model, sd)
    got = vit_params.hf_state_dict(model)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")


def test_position_grid_resampled_on_load(tmp_path):
  """A checkpoint learned at 8 px (2 x 2 grid) in a 16-px model (4 x 4): the model then computes
  what the checkpoint computes at 16 px with its embeddings interpolated."""
  small = hf_vit(image_size=8)
  model = our_vit(image_size=16)
  vit_params.load_vit_weights(model, small.state_dict())
  assert model.pos_embed.shape == (1, 17, 32)
  x = images((1, 16, 16, 3))
  np.testing.assert_allclose(np.asarray(model.tokens(jnp.asarray(x))), hf_tokens(small, x), atol=TOL)


def test_bad_checkpoints_stop_with_the_fix(hf_dir, tmp_path):
  deeper = vit.ViT(vit.vit_config(None, **(SIZES | dict(depth=3)), image_size=16), rngs=nnx.Rngs(0))
  with pytest.raises(GleamError, match=r"depth 3.*checkpoint has width 32, depth 2, MLP 48.*Missing parameters: \['blocks\.2"):
    vit_params.load_vit_weights(deeper, hf_dir)
  wider = vit.ViT(vit.vit_config(None, **(SIZES | dict(mlp_dim=64)), image_size=16), rngs=nnx.Rngs(0))
  with pytest.raises(GleamError, match=r"intermediate\.dense\.bias' has shape \(48,\) \(as blocks\.0\.fc1\.bias\).*expects \(64,\).*MLP 48.*model has width 32, depth 2, MLP 64"):
    vit_params.load_vit_weights(wider, hf_dir)
  with pytest.raises(GleamError, match="layer_norm_eps=1e-06 but the model uses 1e-12; set model.vit.ln_eps=1e-06"):
    vit_params.load_vit_weights(our_vit(eps=1e-12), hf_dir)
  with pytest.raises(GleamError, match="neither a Hugging Face ViT, SigLIP or CLIP vision tower nor a timm or open_clip ViT"):
    vit_params.load_vit_weights(our_vit(), {"stem.0.weight": np.zeros((8, 3, 4, 4), np.float32)})
  with pytest.raises(GleamError, match="ViT weights not found"):
    vit_params.load_vit_weights(our_vit(), str(tmp_path / "missing"))


def test_export_reads_back_in_transformers(tmp_path):
  model = our_vit(image_size=16)
  vit_params.load_vit_weights(model, hf_vit(seed=5).state_dict())
  vit_params.save_hf_vit(model, str(tmp_path / "out"), extra={"gleam_c.logit_scale": np.float32(2.0)})
  hf = transformers.ViTModel.from_pretrained(str(tmp_path / "out"), add_pooling_layer=False).eval()
  x = images((2, 16, 32, 3))
  np.testing.assert_allclose(hf_tokens(hf, x), np.asarray(model.tokens(jnp.asarray(x))), atol=TOL)
  with pytest.raises(GleamError, match="already holds model weights"):
    vit_params.save_hf_vit(model, str(tmp_path / "out"))


def test_variants_and_config_errors():
  s16 = vit.vit_config("S/16")
  assert (s16.width, s16.depth, s16.mlp_dim, s16.heads, s16.patch_size, s16.grid) == (384, 12, 1536, 6, 16, 14)
  # ViT-B/16 at 224 px: 17.6 G multiply-adds (fvcore's 'GFLOPs'): 12 layers of 197 tokens + the patch embedding
  assert vit.forward_flops(vit.vit_config("B/16"), 224, 224) / 1e9 == pytest.approx(35.1, abs=0.1)
  for bad, match in [("S16", "give <name>/<patch size>"), ("X/16", "give <name>/<patch size>")]:
    with pytest.raises(GleamError, match=match):
      vit.vit_config(bad)
  with pytest.raises(GleamError, match="custom ViT needs positive heads"):
    vit.vit_config(None, width=32, depth=1, mlp_dim=8, patch_size=4)
  with pytest.raises(GleamError, match="does not split into 5 heads"):
    vit.vit_config(None, **(SIZES | dict(heads=5)))
  with pytest.raises(GleamError, match="pool='max'"):
    vit.vit_config("S/16", pool="max")
  with pytest.raises(GleamError, match="smaller than one 4-px patch"):
    our_vit()(jnp.zeros((1, 3, 16, 3)))


def test_gleam_c_config_selects_the_vit():
  named = gleam_c.model_config(variant="Ti/4", backbone="vit", vit=dict(image_size=32))
  assert gleam_c.backbone_config(named) == vit.vit_config("Ti/4", image_size=32)
  custom = gleam_c.model_config(backbone="vit", vit=dict(SIZES, pool="gap"), dtype="bfloat16", remat=True)
  assert custom.variant == gleam_c.CUSTOM
  assert gleam_c.backbone_config(custom) == vit.vit_config(None, **SIZES, pool="gap", dtype=jnp.bfloat16, remat=True)
  named.vit.width = 64  # --config.model.vit.width=64 on a named variant: not silently ignored
  with pytest.raises(GleamError, match="model.variant='Ti/4' and custom ViT sizes"):
    gleam_c.backbone_config(named)
  with pytest.raises(GleamError, match="names a ViT but model.backbone is convnext"):
    gleam_c.backbone_config(gleam_c.model_config(variant="S/16"))
  with pytest.raises(GleamError, match="model.backbone='resnet'"):
    gleam_c.backbone_config(gleam_c.model_config(backbone="resnet"))
  with pytest.raises(GleamError, match="model.vit has no field"):
    gleam_c.model_config(backbone="vit", vit=dict(hidden=3))


def test_gleam_c_on_a_vit_encodes_and_loads_every_tower(hf_dir):
  cfg = gleam_c.model_config(backbone="vit", vit=dict(SIZES, image_size=16), embed_dim=8, separate_towers=True,
                             pretrained=hf_dir)
  model = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  model.eval()
  x = images((2, 16, 32, 3))
  want = hf_tokens(transformers.ViTModel.from_pretrained(hf_dir, add_pooling_layer=False).eval(), x)[:, 0]
  for tower in gleam_c.TOWERS:
    encoder = getattr(model, f"{tower}_encoder")
    np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(x))), want, atol=TOL)
    emb = np.asarray(model.encode(jnp.asarray(x), tower))
    assert emb.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  flops = gleam_c.encode_flops(cfg, 16, 32)
  assert flops == vit.forward_flops(gleam_c.backbone_config(cfg), 16, 32) + 2 * 32 * 8
  with open(os.path.join(hf_dir, "config.json")) as f:
    assert json.load(f)["layer_norm_eps"] == 1e-6


def _vit_gleam_c(drop_path=0.0, **vit_kw):
  cfg = gleam_c.model_config(backbone="vit", vit=dict(SIZES, image_size=16, **vit_kw), embed_dim=16,
                             drop_path_rate=drop_path)
  return gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))


def _pairs(n=16):
  """Panoramas (16 x 32) made of their satellite (16 x 16) and its mirror, with noise."""
  rng = np.random.default_rng(0)
  sat = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
  query = np.concatenate([sat, sat[:, :, ::-1]], axis=2) + 0.3 * rng.normal(size=(n, 16, 32, 3))
  return {"query": query.astype(np.float32), "satellite": sat}


@pytest.mark.parametrize("vit_kw", [{}, dict(class_token=False, pool="map", gelu="tanh"),
                                    dict(pre_norm=True, patch_bias=False, gelu="quick", proj_dim=24, layer_scale=1.0,
                                         registers=2, pos_antialias=True, swiglu=True)],
                         ids=["cls", "siglip", "clip_and_dinov2_parts"])
def test_vit_step_on_a_data_fsdp_tensor_mesh_matches_one_device(vit_kw):
  """The default rules shard the ViT's heads and MLP over 'tensor' and its width over 'fsdp': the
  same loss and gradients as one device (drop path on), and the loss falls. The last case has every
  parameter CLIP's and DINOv2's towers add (norm_pre, proj, ls1/ls2, reg_tokens, giant's fc1.gate and
  fc1.up), in one compile."""
  import ml_collections
  from gleam_jax.train import contrastive
  from gleam_jax.train import sharding as shd
  optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=3e-3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.05, clip_norm=1.0, b1=0.9,
      b2=0.999, eps=1e-8, frozen=(), lr_mults=(), no_decay=(r"logit_scale",)))
  batch = _pairs()
  results = {}
  for name, mesh in [("one", shd.single_device_mesh()), ("mesh", shd.make_mesh(dict(data=2, fsdp=2, tensor=2)))]:
    model = _vit_gleam_c(0.1, **vit_kw)
    if model.encoder.norm_pre is not None:
      # CLIP's LayerNorm before the blocks starts the residual stream at unit scale, to which random
      # blocks add ~1%: every embedding alike, the loss at log(batch), gradients ~1e-3 and their float
      # noise relatively large. A small scale starts the stream as small as the plain ViT's does.
      model.encoder.norm_pre.scale.set_value(model.encoder.norm_pre.scale[...] * 0.02)
    setup, state = contrastive.create_train_state(model, optim, 20, mesh, shd.DEFAULT_RULES)
    results[name] = contrastive.make_grad_fn(setup)(state, shd.shard_batch(batch, mesh))
  (loss1, grads1), (loss8, grads8) = results["one"], results["mesh"]
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  flat8 = dict(jax.tree_util.tree_leaves_with_path(grads8))
  for path, g1 in jax.tree_util.tree_leaves_with_path(grads1):
    g1 = np.asarray(g1)
    np.testing.assert_allclose(np.asarray(flat8[path]), g1, rtol=2e-4, atol=1e-4 * np.abs(g1).max() + 1e-7,
                               err_msg=jax.tree_util.keystr(path))
  specs = {jax.tree_util.keystr(p): tuple(v.sharding.spec) for p, v in jax.tree_util.tree_leaves_with_path(state["params"])}
  query_kernels = [spec for name, spec in specs.items() if "'query'" in name and "'kernel'" in name]
  fc2_kernels = [spec for name, spec in specs.items() if "'fc2'" in name and "'kernel'" in name]
  fc1_kernels = [spec for name, spec in specs.items() if "'fc1'" in name and "'kernel'" in name]
  assert query_kernels and all(spec == ("fsdp", "tensor") for spec in query_kernels), specs
  assert fc1_kernels and all(spec == ("fsdp", "tensor") for spec in fc1_kernels), specs
  assert fc2_kernels and all(spec == ("tensor", "fsdp") for spec in fc2_kernels), specs
  step = contrastive.make_train_step(setup)
  history = []
  sharded_batch = shd.shard_batch(batch, setup.mesh)
  for _ in range(10):
    state, metrics = step(state, sharded_batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0] - 0.3, history


def test_exported_vit_tower_gives_our_embeddings_in_pytorch(tmp_path):
  """config.json's recipe (ViTModel without pooler, interpolate_pos_encoding, the class token, the
  gleam_c projection, L2 norm) gives `GleamC.encode`'s embedding of a 1:2 panorama."""
  import safetensors.torch
  from gleam_jax import export_c
  model = _vit_gleam_c()
  vit_params.load_vit_weights(model.encoder, hf_vit(seed=7).state_dict())
  model.eval()
  export_c.save_tower(model, "query", str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    head = json.load(f)["gleam_c"]
  assert head["features"] == "last_hidden_state[:, 0]"
  hf = transformers.ViTModel.from_pretrained(str(tmp_path / "out"), add_pooling_layer=False).eval()
  weights = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
  x = images((2, 16, 32, 3))
  with torch.no_grad():
    features = hf(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True).last_hidden_state[:, 0]
    got = F.normalize(F.linear(features, weights["gleam_c.projection.weight"], weights["gleam_c.projection.bias"]),
                      dim=-1, eps=1e-6).numpy()
  np.testing.assert_allclose(got, np.asarray(model.encode(jnp.asarray(x), "query")), atol=TOL)


def test_vit_main_job_trains_evaluates_and_exports(tiny_cfg, tmp_path):
  """`configs/c_phase1.py:tiny,variant=mu/4` from a transformers checkpoint: a ViT on the satellite
  size's grid; the job's config.json builds the same ViT again (retrieve, export) with the parameters
  of the job's checkpoint, also once the pretrained checkpoint is gone, and the export gives its
  embeddings."""
  import shutil
  from config_files import tiny_config
  from gleam_jax import export_c, main, retrieve
  pretrained = str(tmp_path / "pretrained")
  transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=128, image_size=32, patch_size=4, layer_norm_eps=1e-6),
                        add_pooling_layer=False).save_pretrained(pretrained)
  config = tiny_config("c_phase1", tiny_cfg.data_dir, "tiny,variant=mu/4", total_steps=6,
                       **{"optim.warmup_steps": 1, "model.pretrained": pretrained})
  assert config.model.backbone == "vit" and config.model.vit.image_size == config.data.satellite_size[0] == 32
  workdir = str(tmp_path / "job")
  main.run(config, workdir)
  shutil.rmtree(pretrained)  # what the job trained is in its checkpoints
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert any("eval/test/panorama/R@1" in r for r in rows)
  model, saved, _, _ = retrieve.load_trained(workdir)
  assert isinstance(model.encoder, vit.ViT) and model.encoder.config == vit.vit_config("mu/4", image_size=32)
  out = str(tmp_path / "hf")
  assert export_c.export(workdir, out).startswith(f"exported step 6 of {workdir}")
  hf = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
  x = images((2, *saved.data.panorama_size, 3))
  np.testing.assert_allclose(hf_tokens(hf, x)[:, 0], np.asarray(model.encoder(jnp.asarray(x))), atol=TOL)


def _features_and_grads(model, x):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    features = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(features * jnp.arange(features.shape[-1], dtype=jnp.float32)), features

  grads, features = jax.jit(jax.grad(loss, has_aux=True))(params)
  return features, grads


def test_remat_and_bfloat16_match_float32(hf_dir):
  """Parameters and gradients stay float32; remat changes no number; bfloat16 compute is close."""
  x = jnp.asarray(images((2, 16, 32, 3)))
  results = {}
  for name, kw in (("float32", {}), ("remat", {"remat": True}), ("bfloat16", {"dtype": jnp.bfloat16})):
    model = vit.ViT(vit.vit_config(None, **SIZES, image_size=16, **kw), rngs=nnx.Rngs(0))
    vit_params.load_vit_weights(model, hf_dir)
    results[name] = _features_and_grads(model, x)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(results[name][1]))
  features, grads = results["float32"]
  # against the largest gradient: the key bias's is zero in exact arithmetic (softmax ignores a shift
  # shared by all keys), so in bfloat16 it is all rounding
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  for name, tol in (("remat", 1e-6), ("bfloat16", 5e-2)):
    np.testing.assert_allclose(np.asarray(results[name][0]), np.asarray(features), atol=tol * 4, rtol=tol)
    for a, b in zip(jax.tree.leaves(results[name][1]), jax.tree.leaves(grads)):
      assert float(jnp.abs(a - b).max()) <= tol * (float(jnp.abs(b).max()) + scale), name


def test_drop_path_keeps_or_drops_whole_samples_in_training_only():
  """Rates rise linearly in depth to drop_path_rate; in train mode each residual branch is dropped or
  kept (scaled by 1 / keep) per sample; eval mode adds it as it is."""
  model = vit.ViT(vit.vit_config(None, **(SIZES | dict(depth=3)), image_size=16, drop_path_rate=0.5),
                  rngs=nnx.Rngs(params=0, dropout=1))
  assert model.blocks[0].drop_path is None and model.blocks[1].drop_path.rate == pytest.approx(0.25)
  block = model.blocks[2]
  assert block.drop_path.rate == pytest.approx(0.5)
  x, y = (jax.random.normal(jax.random.key(k), (64, 5, 32)) for k in (0, 1))
  residual = nnx.jit(lambda b, x, y: b._residual(x, y, b.ls1))
  block.train()
  got = np.asarray(residual(block, x, y))
  dropped = [i for i in range(64) if np.allclose(got[i], x[i])]
  kept = [i for i in range(64) if i not in dropped]
  assert 10 < len(dropped) < 54
  np.testing.assert_allclose(got[kept], np.asarray(x + 2 * y)[kept], rtol=1e-5, atol=1e-5)
  block.eval()
  np.testing.assert_allclose(np.asarray(residual(block, x, y)), np.asarray(x + y), rtol=1e-6)


def test_variants_have_the_reference_parameter_counts():
  """timm lists vit_tiny_patch16_224 at 5.72M and vit_base_patch16_224 at 86.57M parameters, with
  the 1000-class head."""
  for variant, timm_count in (("Ti/16", 5.72e6), ("B/16", 86.57e6)):
    model = nnx.eval_shape(lambda: vit.ViT(vit.vit_config(variant), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    width = vit.VARIANTS[variant.split("/")[0]][0]
    assert count + width * 1000 + 1000 == pytest.approx(timm_count, rel=2e-3), variant


SIGLIP = dict(class_token=False, pool="map", gelu="tanh")


def hf_siglip(image_size=16, seed=0):
  """A transformers SiglipVisionModel (MAP head, tanh GELU, no class token), every parameter random."""
  torch.manual_seed(seed)
  config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, image_size=image_size, patch_size=4)
  model = transformers.SiglipVisionModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model


def our_siglip(image_size=16):
  return vit.ViT(vit.vit_config(None, **SIZES, image_size=image_size, **SIGLIP), rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf_siglip"))
  hf_siglip().save_pretrained(directory)
  return directory


@pytest.mark.parametrize("shape", [(16, 16), (16, 32), (20, 28)])
def test_siglip_vision_tower_matches_transformers(siglip_dir, shape):
  """SigLIP's tower: no class token, position embeddings resized as SigLIP's `interpolate_pos_encoding`,
  the tanh GELU, and the attention-pooling head (`pooler_output`)."""
  model = our_siglip()
  vit_params.load_vit_weights(model, siglip_dir)
  hf = transformers.SiglipVisionModel.from_pretrained(siglip_dir).eval()
  x = images((2, *shape, 3))
  with torch.no_grad():
    out = hf(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
  np.testing.assert_allclose(np.asarray(model.tokens(jnp.asarray(x))), out.last_hidden_state.numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), out.pooler_output.numpy(), atol=TOL)


def test_siglip_model_checkpoint_and_grid_resampling(siglip_dir):
  """A whole `SiglipModel` state dict (its tower under `vision_model.`, the text tower and the logit
  scale and bias ignored) reads to the same parameters; a 2 x 2 grid is resized to the model's 4 x 4."""
  want = our_siglip()
  vit_params.load_vit_weights(want, siglip_dir)
  tower = {f"vision_model.{k}": v.numpy() for k, v in hf_siglip().state_dict().items()}
  whole = tower | {"text_model.embeddings.token_embedding.weight": np.zeros((10, 32), np.float32),
                   "logit_scale": np.zeros(1, np.float32), "logit_bias": np.zeros(1, np.float32)}
  got = our_siglip()
  vit_params.load_vit_weights(got, whole)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(got, nnx.Param)), nnx.to_flat_state(nnx.state(want, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
  small = hf_siglip(image_size=8)
  model = our_siglip(image_size=16)
  vit_params.load_vit_weights(model, small.state_dict())
  x = images((1, 16, 16, 3))
  with torch.no_grad():
    out = small(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), out.pooler_output.numpy(), atol=TOL)


def test_siglip_settings_are_checked_against_its_config(siglip_dir, tmp_path):
  with pytest.raises(GleamError, match=r"SigLIP vision tower .* set model.vit.class_token=False and model.vit.pool=map"):
    vit_params.load_vit_weights(vit.ViT(vit.vit_config(None, **SIZES, image_size=16, gelu="tanh"), rngs=nnx.Rngs(0)),
                                siglip_dir)
  with pytest.raises(GleamError, match=r"hidden_act='gelu_pytorch_tanh' but the model computes gelu='exact'; set model.vit.gelu=tanh"):
    vit_params.load_vit_weights(vit.ViT(vit.vit_config(None, **SIZES, image_size=16, class_token=False, pool="map"),
                                        rngs=nnx.Rngs(0)), siglip_dir)
  headless = {k: v.numpy() for k, v in hf_siglip().state_dict().items() if not k.startswith("head.")}
  with pytest.raises(GleamError, match=r"SigLIP tower without attention-pooling head .* set model\.vit\.pool=gap"):
    vit_params.load_vit_weights(our_siglip(), headless)
  with pytest.raises(GleamError, match="pool='cls' needs a class token"):
    vit.vit_config(None, **SIZES, class_token=False)
  with pytest.raises(GleamError, match="none of transformers. ViTModel .*, SiglipVisionModel .*, CLIPVisionModel.* or Dinov2"):
    vit_params.save_hf_vit(vit.ViT(vit.vit_config(None, **SIZES, pool="map"), rngs=nnx.Rngs(0)), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pool", ["map", "gap"])
def test_exported_siglip_tower_gives_our_embeddings_in_pytorch(siglip_dir, tmp_path, pool):
  """A GLEAM-C tower on a SigLIP backbone exports as a SiglipVisionModel directory (the head's query,
  key and value stacked back into in_proj) whose config.json recipe gives `GleamC.encode`'s embedding."""
  import safetensors.torch
  from gleam_jax import export_c
  cfg = gleam_c.model_config(backbone="vit", vit=dict(SIZES, image_size=16, **(SIGLIP | dict(pool=pool))),
                             embed_dim=8, pretrained=siglip_dir)  # 'gap': the checkpoint's MAP head left out
  model = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  model.eval()
  assert model.encoder.cls_token is None and (model.encoder.head is not None) == (pool == "map")
  export_c.save_tower(model, "query", str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    features = json.load(f)["gleam_c"]["features"]
  hf, info = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
  assert not info["missing_keys"] and set(info["unexpected_keys"]) == {"gleam_c.logit_scale", "gleam_c.projection.weight",
                                                                       "gleam_c.projection.bias"}
  weights = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
  x = images((2, 16, 32, 3))
  with torch.no_grad():
    out = hf.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
    pooled = eval(features, {}, {"pooler_output": out.pooler_output, "last_hidden_state": out.last_hidden_state})
    got = F.normalize(F.linear(pooled, weights["gleam_c.projection.weight"], weights["gleam_c.projection.bias"]),
                      dim=-1, eps=1e-6).numpy()
  np.testing.assert_allclose(got, np.asarray(model.encode(jnp.asarray(x), "query")), atol=TOL)
  with torch.no_grad():  # the checkpoint's tokens, whichever head pools them
    checkpoint = transformers.SiglipVisionModel.from_pretrained(siglip_dir).eval()
    want = checkpoint(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True).last_hidden_state
  np.testing.assert_allclose(out.last_hidden_state.numpy(), want.numpy(), atol=TOL)


def test_so400m_tower_has_siglip_so400m_parameters():
  """big_vision's So400m/14 at 384 px with SigLIP's settings has the parameters of transformers'
  SiglipVisionModel of google/siglip-so400m-patch14-384's vision config (built on the meta device)."""
  cfg = vit.vit_config("So400m/14", image_size=384, **SIGLIP)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  ours = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with torch.device("meta"):
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304, image_size=384,
        patch_size=14))
  theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  assert sum(map(np.prod, ours.values())) == sum(map(np.prod, theirs.values())) > 4.0e8
  stand_ins = {k: np.empty((0,) * len(s), np.float32) for k, s in theirs.items()}  # the key names, not 1.7 GB
  mapped, unexpected = vit_params.map_state_dict(stand_ins)
  assert not unexpected and set(mapped) == set(ours)
