"""CLIP image towers on the ViT backbone (`vit.ViTConfig` pre_norm, patch_bias, gelu='quick',
proj_dim): tokens, pooled features, projected embeddings and gradients against transformers'
`CLIPVisionModelWithProjection` (float32) at its grid and resized; transformers' files (a tower or a
whole CLIPModel) and OpenAI / open_clip state dicts read to the same model; the settings checked
against config.json and open_clip_config.json; the export read back by transformers."""
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

from gleam_jax.errors import GleamError
from gleam_jax.models import gleam_c, vit, vit_params
from test_vit import SIZES, TOL, images

CLIP = dict(pre_norm=True, patch_bias=False, gelu="quick", ln_eps=1e-5)
PROJ = 8


def hf_clip_config(image_size=16, projection=PROJ):
  return transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                       image_size=image_size, patch_size=4, projection_dim=projection)


def hf_clip(image_size=16, seed=0):
  """A transformers CLIPVisionModelWithProjection (quick GELU, eps 1e-5), every parameter moved off
  its initial value, so a swapped or mistransposed tensor cannot go unseen."""
  torch.manual_seed(seed)
  model = transformers.CLIPVisionModelWithProjection(hf_clip_config(image_size)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model


def our_clip(image_size=16, proj_dim=PROJ, **kw):
  cfg = vit.vit_config(None, **SIZES, image_size=image_size, **(CLIP | dict(proj_dim=proj_dim) | kw))
  return vit.ViT(cfg, rngs=nnx.Rngs(5))


def params_of(model):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def open_clip_state_dict(hf_sd):
  """The same weights as a whole OpenAI / open_clip CLIP state dict: the image tower under `visual.`
  (q, k, v stacked into attn.in_proj, the projection as a (width, out) matrix) beside a text tower."""
  v = lambda name: hf_sd[f"vision_model.{name}"]
  out = {"visual.class_embedding": v("embeddings.class_embedding"),
         "visual.positional_embedding": v("embeddings.position_embedding.weight"),
         "visual.conv1.weight": v("embeddings.patch_embedding.weight"),
         "visual.proj": hf_sd["visual_projection.weight"].T.copy(),
         # the text tower and the joint model's scalars, which the image tower ignores
         "positional_embedding": np.zeros((7, 32), np.float32), "token_embedding.weight": np.zeros((10, 32), np.float32),
         "transformer.resblocks.0.ln_1.weight": np.ones(32, np.float32), "ln_final.weight": np.ones(32, np.float32),
         "text_projection": np.zeros((32, PROJ), np.float32), "logit_scale": np.zeros((), np.float32)}
  for p in ("weight", "bias"):
    out[f"visual.ln_pre.{p}"] = v(f"pre_layrnorm.{p}")
    out[f"visual.ln_post.{p}"] = v(f"post_layernorm.{p}")
    for i in range(2):
      layer = lambda name: v(f"encoder.layers.{i}.{name}")
      block = f"visual.transformer.resblocks.{i}"
      out[f"{block}.ln_1.{p}"] = layer(f"layer_norm1.{p}")
      out[f"{block}.attn.in_proj_{p}"] = np.concatenate([layer(f"self_attn.{n}_proj.{p}") for n in "qkv"])
      out[f"{block}.attn.out_proj.{p}"] = layer(f"self_attn.out_proj.{p}")
      out[f"{block}.ln_2.{p}"] = layer(f"layer_norm2.{p}")
      out[f"{block}.mlp.c_fc.{p}"] = layer(f"mlp.fc1.{p}")
      out[f"{block}.mlp.c_proj.{p}"] = layer(f"mlp.fc2.{p}")
  return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """transformers' own files of the random tower (`save_pretrained`)."""
  directory = str(tmp_path_factory.mktemp("hf_clip"))
  hf_clip().save_pretrained(directory)
  return directory


def run_hf(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)


@pytest.mark.parametrize("shape", [(16, 16), (16, 32), (20, 28)])
def test_clip_tower_matches_transformers(clip_dir, shape):
  """At the checkpoint's grid, a 1:2 panorama and an odd grid: every token (CLIP's last_hidden_state
  after its post-LayerNorm), the pooled feature (`pooler_output`, proj_dim=0) and the projected
  embedding (`image_embeds`)."""
  hf = transformers.CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
  x = images((2, *shape, 3))
  out = run_hf(hf, x)
  model = our_clip()
  vit_params.load_vit_weights(model, clip_dir)
  with torch.no_grad():
    tokens = hf.vision_model.post_layernorm(out.last_hidden_state).numpy()
  np.testing.assert_allclose(np.asarray(model.tokens(jnp.asarray(x))), tokens, atol=TOL)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), out.image_embeds.numpy(), atol=TOL)
  unprojected = our_clip(proj_dim=0)
  vit_params.load_vit_weights(unprojected, clip_dir)  # the projection left out, as CLIPVisionModel does
  np.testing.assert_allclose(np.asarray(unprojected(jnp.asarray(x))),
                             run_hf(hf.vision_model, x).pooler_output.numpy(), atol=TOL)


def test_clip_gradients_match_transformers():
  """Gradients of every parameter (the LayerNorm before the blocks, the resized position embeddings,
  the projection) and of the input, through the projected embedding."""
  hf = hf_clip(seed=1)
  model = our_clip()
  vit_params.load_vit_weights(model, hf.state_dict())
  x = images((2, 16, 24, 3), seed=1)
  weights = images((2, PROJ), seed=2)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  (hf(x_torch, interpolate_pos_encoding=True).image_embeds * torch.from_numpy(weights)).sum().backward()
  want = {k: p.grad.numpy() for k, p in hf.named_parameters()}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) * weights)
  grads, x_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
  grad_model = nnx.merge(graphdef, grads, rest)
  got = vit_params.hf_state_dict(grad_model)
  assert set(got) == set(want) and len(want) == 2 * 16 + 8
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(np.asarray(x_grad), x_torch.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_every_clip_layout_reads_to_the_same_model(clip_dir, tmp_path):
  """transformers' files of the tower, a whole CLIPModel directory (text tower, text projection and
  logit scale ignored), a CLIPVisionModel state dict (no projection) into a model without one, and
  OpenAI / open_clip state dicts (plain and under `module.`) give the same parameters; our export's
  names are transformers' file names."""
  from safetensors.numpy import load_file
  files = load_file(os.path.join(clip_dir, "model.safetensors"))
  want = our_clip()
  vit_params.load_vit_weights(want, clip_dir)
  np.testing.assert_equal(vit_params.hf_state_dict(want), files)
  clip_model = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=hf_clip_config().to_dict(), projection_dim=PROJ,
      text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1)))
  clip_model.load_state_dict(transformers.CLIPVisionModelWithProjection.from_pretrained(clip_dir).state_dict(),
                             strict=False)
  clip_model.save_pretrained(str(tmp_path / "clip_model"))
  open_clip = open_clip_state_dict(files)
  sources = {"CLIPModel directory": str(tmp_path / "clip_model"), "open_clip": open_clip,
             "wrapped open_clip": {f"module.{k}": v for k, v in open_clip.items()}}
  assert vit_params.detect_layout(vit_params._strip_wrappers(open_clip)) == "open_clip"
  for name, source in sources.items():
    got = our_clip()
    vit_params.load_vit_weights(got, source)
    for key, value in params_of(want).items():
      np.testing.assert_array_equal(params_of(got)[key], value, err_msg=f"{name}: {key}")
  tower_only = {k: v.numpy() for k, v in hf_clip().vision_model.state_dict().items()}  # CLIPVisionModel's keys
  for source in (tower_only, str(tmp_path / "clip_model")):
    got = our_clip(proj_dim=0)
    vit_params.load_vit_weights(got, source)
    assert got.proj is None
    np.testing.assert_array_equal(params_of(got)["norm_pre.scale"], files["vision_model.pre_layrnorm.weight"])


def test_clip_settings_are_checked_with_the_fix(clip_dir, tmp_path):
  vit_dir = str(tmp_path / "vit")
  transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=48, image_size=16, patch_size=4, layer_norm_eps=1e-5),
                        add_pooling_layer=False).save_pretrained(vit_dir)
  plain = dict(pre_norm=False, patch_bias=True)
  with pytest.raises(GleamError, match=r"is a CLIP image tower .* set model\.vit\.pre_norm=True, model\.vit\.patch_bias=False"):
    vit_params.load_vit_weights(our_clip(proj_dim=0, **plain), clip_dir)
  with pytest.raises(GleamError, match=r"huggingface layout\) has no LayerNorm before the blocks.*set model\.vit\.pre_norm=False"):
    vit_params.load_vit_weights(our_clip(proj_dim=0, gelu="exact"), vit_dir)
  tower_only = {k: v.numpy() for k, v in hf_clip().vision_model.state_dict().items()}
  with pytest.raises(GleamError, match=r"has no projection \('visual_projection\.weight'\) but the model projects to 8; "
                                       r"set model\.vit\.proj_dim=0"):
    vit_params.load_vit_weights(our_clip(), tower_only)
  with pytest.raises(GleamError, match=r"hidden_act='quick_gelu' but the model computes gelu='exact'; set model\.vit\.gelu=quick"):
    vit_params.load_vit_weights(our_clip(gelu="exact"), clip_dir)
  with pytest.raises(GleamError, match=r"layer_norm_eps=1e-05 but the model uses 1e-06; set model\.vit\.ln_eps=1e-05"):
    vit_params.load_vit_weights(our_clip(ln_eps=1e-6), clip_dir)
  with pytest.raises(GleamError, match=r"checkpoint has width 32, depth 2, MLP 48, patch 4, position grid 4x4, "
                                       r"projection to 8.*Missing parameters: \['blocks\.2"):
    vit_params.load_vit_weights(vit.ViT(vit.vit_config(None, **(SIZES | dict(depth=3)), image_size=16, proj_dim=PROJ,
                                                       **CLIP), rngs=nnx.Rngs(0)), clip_dir)


def test_open_clip_config_is_checked(clip_dir, tmp_path):
  """An open_clip directory (open_clip_model.safetensors + open_clip_config.json): read as it is when
  the model agrees; its quick_gelu, LayerNorm epsilon and pool_type otherwise stop with the fix."""
  from safetensors.numpy import load_file, save_file
  directory = tmp_path / "open_clip"
  directory.mkdir()
  save_file(open_clip_state_dict(load_file(os.path.join(clip_dir, "model.safetensors"))),
            str(directory / "open_clip_model.safetensors"))

  def write_config(**model_cfg):
    vision_cfg = dict(image_size=16, layers=2, width=32, patch_size=4) | model_cfg.pop("vision_cfg", {})
    with open(directory / "open_clip_config.json", "w") as f:
      json.dump({"model_cfg": dict(embed_dim=PROJ, vision_cfg=vision_cfg) | model_cfg, "preprocess_cfg": {}}, f)
  write_config(quick_gelu=True)
  model = our_clip()
  vit_params.load_vit_weights(model, str(directory))
  want = our_clip()
  vit_params.load_vit_weights(want, clip_dir)
  np.testing.assert_array_equal(params_of(model)["proj.kernel"], params_of(want)["proj.kernel"])
  with pytest.raises(GleamError, match=r"open_clip_config\.json has quick_gelu=false but the model computes gelu='quick'; "
                                       r"set model\.vit\.gelu=exact"):
    write_config()
    vit_params.load_vit_weights(our_clip(), str(directory))
  with pytest.raises(GleamError, match=r"vision_cfg\.norm_kwargs\.eps=1e-06 but the model uses 1e-05"):
    write_config(quick_gelu=True, vision_cfg=dict(norm_kwargs=dict(eps=1e-6)))
    vit_params.load_vit_weights(our_clip(), str(directory))
  with pytest.raises(GleamError, match=r"pool_type='avg' but the model has pool='cls'; set model\.vit\.pool=gap"):
    write_config(quick_gelu=True, vision_cfg=dict(pool_type="avg"))
    vit_params.load_vit_weights(our_clip(), str(directory))
  with pytest.raises(GleamError, match=r"sets \{'ls_init_value': 0\.1\}, which our ViT does not compute"):
    write_config(quick_gelu=True, vision_cfg=dict(ls_init_value=0.1))
    vit_params.load_vit_weights(our_clip(), str(directory))


@pytest.mark.parametrize("proj_dim", [PROJ, 0], ids=["projected", "pooled"])
def test_exported_clip_tower_gives_our_embeddings_in_pytorch(clip_dir, tmp_path, proj_dim):
  """A GLEAM-C tower on a CLIP backbone (from the checkpoint's directory, as `model.pretrained`)
  exports as a CLIPVisionModelWithProjection (CLIPVisionModel) directory whose config.json recipe
  (`image_embeds` / `pooler_output`, the gleam_c projection, L2 norm) gives `GleamC.encode`'s
  embedding of a 1:2 panorama."""
  import safetensors.torch
  from gleam_jax import export_c
  cfg = gleam_c.model_config(backbone="vit", vit=dict(SIZES, image_size=16, proj_dim=proj_dim, **CLIP), embed_dim=6,
                             pretrained=clip_dir)
  model = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  model.eval()
  assert model.projection.kernel.shape == (proj_dim or 32, 6)
  export_c.save_tower(model, "query", str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    config = json.load(f)
  architecture = "CLIPVisionModelWithProjection" if proj_dim else "CLIPVisionModel"
  assert config["architectures"] == [architecture]
  assert config["gleam_c"]["features"] == ("image_embeds" if proj_dim else "pooler_output")
  hf, info = getattr(transformers, architecture).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
  assert not info["missing_keys"] and set(info["unexpected_keys"]) == {
      "gleam_c.logit_scale", "gleam_c.projection.weight", "gleam_c.projection.bias"}
  weights = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
  x = images((2, 16, 32, 3))
  pooled = getattr(run_hf(hf.eval(), x), config["gleam_c"]["features"])
  got = F.normalize(F.linear(pooled, weights["gleam_c.projection.weight"], weights["gleam_c.projection.bias"]),
                    dim=-1, eps=1e-6).numpy()
  np.testing.assert_allclose(got, np.asarray(model.encode(jnp.asarray(x), "query")), atol=TOL)


def test_clip_settings_in_gleam_c_configs():
  """model.vit's CLIP settings reach the ViT; a config written before them builds the ViT it built;
  FLOPs count the projection; a CLIP tower pooled otherwise than by its class token is no
  transformers model."""
  cfg = gleam_c.model_config(backbone="vit", variant="B/16", vit=dict(proj_dim=512, **CLIP))
  bcfg = gleam_c.backbone_config(cfg)
  assert (bcfg.pre_norm, bcfg.patch_bias, bcfg.gelu, bcfg.proj_dim, bcfg.feature_width) == (True, False, "quick", 512, 512)
  old = gleam_c.model_config(backbone="vit", variant="B/16")
  for field in ("pre_norm", "patch_bias", "proj_dim"):
    del old.vit[field]
  assert gleam_c.backbone_config(old) == vit.vit_config("B/16")
  assert gleam_c.encode_flops(cfg, 224, 224) - gleam_c.encode_flops(old, 224, 224) == 2 * 768 * 512
  with pytest.raises(GleamError, match=r"model\.vit has no field \['ln_pre'\]; its fields are image_size, .*pre_norm"):
    gleam_c.model_config(backbone="vit", vit=dict(ln_pre=True))
  with pytest.raises(GleamError, match=r"proj_dim=-1"):
    vit.vit_config("B/16", proj_dim=-1)
  with pytest.raises(GleamError, match=r"none of transformers' ViTModel.*CLIPVisionModel\[WithProjection\]"):
    vit_params.hf_architecture(vit.vit_config("B/16", pool="gap", **CLIP))


def test_clip_b16_tower_has_clip_vit_b16_parameters():
  """B/16 at 224 px with CLIP's settings and a 512 projection has the parameters and key set of
  openai/clip-vit-base-patch16's CLIPVisionModelWithProjection (built on the meta device)."""
  cfg = vit.vit_config("B/16", image_size=224, proj_dim=512, **CLIP)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  ours = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with torch.device("meta"):
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=16, projection_dim=512))
  theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  assert sum(map(np.prod, ours.values())) == sum(map(np.prod, theirs.values())) > 8.6e7
  stand_ins = {k: np.empty((0,) * len(s), np.float32) for k, s in theirs.items()}
  mapped, unexpected = vit_params.map_state_dict(stand_ins)
  assert not unexpected and set(mapped) == set(ours)



class _Scripted(torch.nn.Module):
  """A module holding a flat state dict's tensors under their dotted names, for a TorchScript archive."""

  def __init__(self, state_dict):
    super().__init__()
    for key, value in state_dict.items():
      *path, leaf = key.split(".")
      module = self
      for name in path:
        if not hasattr(module, name):
          module.add_module(name, torch.nn.Module())
        module = getattr(module, name)
      module.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(np.asarray(value)).half(),
                                                         requires_grad=False))

  def forward(self, x):
    return x


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_openai_torchscript_archive_reads_to_the_same_model(clip_dir, tmp_path):
  """OpenAI's CLIP downloads (`ViT-B-16.pt`) are TorchScript archives of the whole model in float16:
  read through `torch.jit.load`, the image tower gives the model the same weights in float16."""
  from safetensors.numpy import load_file
  files = load_file(os.path.join(clip_dir, "model.safetensors"))
  archive = str(tmp_path / "ViT-B-16.pt")
  torch.jit.script(_Scripted(open_clip_state_dict(files))).save(archive)
  got = our_clip()
  vit_params.load_vit_weights(got, archive)
  want = our_clip()
  vit_params.load_vit_weights(want, clip_dir)
  for key, value in params_of(want).items():
    np.testing.assert_array_equal(params_of(got)[key], value.astype(np.float16).astype(np.float32), err_msg=key)


def test_the_job_logs_its_backbone_weights_and_what_it_left_out(clip_dir, capsys):
  """`contrastive.build_model` loads `model.pretrained` and says so, naming the keys the settings
  leave out; with pretrained=False (a model its checkpoint fills) it reads nothing."""
  from gleam_jax.train import contrastive
  cfg = gleam_c.model_config(backbone="vit", vit=dict(SIZES, image_size=16, proj_dim=0, **CLIP), embed_dim=6,
                             pretrained=clip_dir)
  model = contrastive.build_model(cfg, seed=0)
  assert capsys.readouterr().out == (f"backbone weights from {clip_dir}; left out by model.vit's settings: "
                                     f"visual_projection.weight\n")
  want = our_clip(proj_dim=0)
  vit_params.load_vit_weights(want, clip_dir)
  np.testing.assert_array_equal(params_of(model.encoder)["norm_pre.scale"], params_of(want)["norm_pre.scale"])
  cfg.pretrained = "/nowhere"
  untouched = contrastive.build_model(cfg, seed=0, pretrained=False)
  assert capsys.readouterr().out == "" and not np.array_equal(params_of(untouched.encoder)["norm_pre.scale"],
                                                              params_of(want)["norm_pre.scale"])
