"""DINOv2 towers on the ViT backbone (`vit.ViTConfig` layer_scale, registers, pos_antialias, giant's
swiglu, and pos_offset for facebookresearch's own resize): tokens,
pooled features and gradients against transformers' `Dinov2Model` and `Dinov2WithRegistersModel`
(float32) at their grid and resized (antialiased bicubic for the registers model); transformers'
files and in-memory names, and timm's / facebookresearch's state dicts, read to the same model; the
settings checked against the weights and config.json; the export read back by transformers."""
import json

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
from test_vit import TOL, images

SIZES = dict(width=32, depth=2, mlp_dim=64, heads=4, patch_size=4)  # transformers' DINOv2 MLP: a whole ratio
SWIGLU_MLP = 48  # transformers' SwiGLU at mlp_ratio 2: two thirds of 64, rounded up to a multiple of 8
REGISTERS = 3


def hf_dinov2(registers=0, image_size=16, seed=0, swiglu=False):
  """A transformers Dinov2Model (Dinov2WithRegistersModel with `registers`; giant's SwiGLU MLP with
  `swiglu`), every parameter moved off its initial value (the layer scales and register tokens too)."""
  torch.manual_seed(seed)
  sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=image_size,
               patch_size=4, use_swiglu_ffn=swiglu)
  model = (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      **sizes, num_register_tokens=registers)) if registers else transformers.Dinov2Model(transformers.Dinov2Config(**sizes)))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.2)
  return model.eval()


def our_dinov2(registers=0, image_size=16, pool="cls", swiglu=False, **kw):
  settings = dict(layer_scale=1.0, registers=registers, pos_antialias=bool(registers)) | kw
  sizes = SIZES | (dict(mlp_dim=SWIGLU_MLP) if swiglu else {})
  return vit.ViT(vit.vit_config(None, **sizes, image_size=image_size, pool=pool, swiglu=swiglu, **settings),
                 rngs=nnx.Rngs(6))


def run_hf(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2)))


def file_state_dict(model, tmp_path, name):
  from safetensors.numpy import load_file
  model.save_pretrained(str(tmp_path / name))
  return load_file(str(tmp_path / name / "model.safetensors"))


def timm_state_dict(files, registers):
  """The same weights as timm's DINOv2 (q, k, v stacked into attn.qkv, layer scales as ls1/ls2.gamma,
  the registers as `reg_token`, a mask token; giant's SwiGLU as mlp.fc1, gate and up stacked, and
  mlp.fc2)."""
  swiglu = "encoder.layer.0.mlp.weights_in.weight" in files
  mlp_in, mlp_out = ("weights_in", "weights_out") if swiglu else ("fc1", "fc2")
  out = {"cls_token": files["embeddings.cls_token"], "pos_embed": files["embeddings.position_embeddings"],
         "mask_token": np.zeros((1, 32), np.float32),
         "patch_embed.proj.weight": files["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": files["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": files["layernorm.weight"], "norm.bias": files["layernorm.bias"]}
  if registers:
    out["reg_token"] = files["embeddings.register_tokens"]
  for i in range(2):
    layer = lambda name: files[f"encoder.layer.{i}.{name}"]
    out[f"blocks.{i}.ls1.gamma"] = layer("layer_scale1.lambda1")
    out[f"blocks.{i}.ls2.gamma"] = layer("layer_scale2.lambda1")
    for p in ("weight", "bias"):
      out[f"blocks.{i}.norm1.{p}"] = layer(f"norm1.{p}")
      out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate([layer(f"attention.attention.{n}.{p}") for n in ("query", "key", "value")])
      out[f"blocks.{i}.attn.proj.{p}"] = layer(f"attention.output.dense.{p}")
      out[f"blocks.{i}.norm2.{p}"] = layer(f"norm2.{p}")
      out[f"blocks.{i}.mlp.fc1.{p}"] = layer(f"mlp.{mlp_in}.{p}")
      out[f"blocks.{i}.mlp.fc2.{p}"] = layer(f"mlp.{mlp_out}.{p}")
  return out


def original_state_dict(timm):
  """facebookresearch/dinov2's names for timm's: the registers as `register_tokens`, giant's SwiGLU
  as mlp.w12 (gate and up stacked) and mlp.w3."""
  swiglu = timm["blocks.0.mlp.fc1.weight"].shape[0] == 2 * timm["blocks.0.mlp.fc2.weight"].shape[1]
  rename = lambda k: k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if swiglu else k
  return {("register_tokens" if k == "reg_token" else rename(k)): v for k, v in timm.items()}


@pytest.mark.parametrize("size_in,size_out", [(4, 8), (4, 7), (5, 3), (37, 16), (16, 37), (14, 24), (24, 14), (2, 1)])
def test_antialiased_bicubic_matrix_is_torchs(size_in, size_out):
  grid = np.random.default_rng(0).standard_normal((size_in, size_in + 1)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(grid)[None, None], size=(size_out, size_out + 2), mode="bicubic",
                       align_corners=False, antialias=True)[0, 0].numpy()
  got = np.asarray(vit.resize_grid(jnp.asarray(grid)[..., None], size_out, size_out + 2, antialias=True))[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("size_in,size_out", [(37, 16), (37, 37), (4, 8), (4, 7), (16, 37), (5, 3)])
def test_offset_bicubic_matrix_is_torchs_scale_factor_resize(size_in, size_out, antialias):
  """`offset`: PyTorch's resize asked for by scale factor (n + 0.1) / grid, as facebookresearch's
  DINOv2 asks for it; not the resize to that size."""
  grid = np.random.default_rng(0).standard_normal((size_in, size_in + 1)).astype(np.float32)
  factors = ((size_out + 0.1) / size_in, (size_out + 2 + 0.1) / (size_in + 1))
  want = F.interpolate(torch.from_numpy(grid)[None, None], scale_factor=factors, mode="bicubic",
                       align_corners=False, antialias=antialias)[0, 0].numpy()
  assert want.shape == (size_out, size_out + 2)
  got = np.asarray(vit.resize_grid(jnp.asarray(grid)[..., None], size_out, size_out + 2, antialias, 0.1))[..., 0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  plain = np.asarray(vit.resize_grid(jnp.asarray(grid)[..., None], size_out, size_out + 2, antialias))[..., 0]
  assert np.abs(plain - want).max() > 1e-2  # the offset is not a rounding matter


def hub_position_embeddings(self, embeddings, height, width):
  """facebookresearch/dinov2's resize of the position grid (interpolate_offset 0.1, no antialiasing),
  written into transformers' Dinov2Embeddings for the test: the scale factor (n + 0.1) / grid."""
  pos = self.position_embeddings
  grid = int(round((pos.shape[1] - 1) ** 0.5))
  rows, cols = height // self.patch_size, width // self.patch_size
  if (rows, cols) == (grid, grid):
    return pos
  patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
  patches = F.interpolate(patches, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid), mode="bicubic",
                          align_corners=False)
  return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


@pytest.mark.parametrize("shape", [(16, 32), (20, 28), (8, 8), (16, 16)])
def test_pos_offset_computes_facebookresearch_dinov2(monkeypatch, shape):
  """`pos_offset=0.1` (facebookresearch's torch.hub files of the models without registers): tokens as
  that resize gives them, at other sizes and for a grid read at another size (16 px weights, a 24-px
  job)."""
  hf = hf_dinov2()
  monkeypatch.setattr(transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding",
                      hub_position_embeddings)
  weights = {k: v.numpy() for k, v in hf.state_dict().items()}
  x = images((2, *shape, 3))
  want = run_hf(hf, x).last_hidden_state.numpy()
  model = our_dinov2(pos_offset=0.1)
  vit_params.load_vit_weights(model, weights)
  np.testing.assert_allclose(np.asarray(model.tokens(jnp.asarray(x))), want, atol=TOL)
  if shape != (16, 16):
    without = our_dinov2()
    vit_params.load_vit_weights(without, weights)
    assert np.abs(np.asarray(without.tokens(jnp.asarray(x))) - want).max() > 10 * TOL
  resized = our_dinov2(image_size=24, pos_offset=0.1)  # the 4 x 4 grid read onto 6 x 6 on load
  vit_params.load_vit_weights(resized, weights)
  x = images((2, 24, 24, 3))
  np.testing.assert_allclose(np.asarray(resized.tokens(jnp.asarray(x))), run_hf(hf, x).last_hidden_state.numpy(),
                             atol=TOL)


@pytest.mark.parametrize("registers,swiglu", [(0, False), (REGISTERS, False), (0, True), (REGISTERS, True)],
                         ids=["dinov2", "registers", "giant_swiglu", "registers_giant_swiglu"])
@pytest.mark.parametrize("shape", [(16, 16), (16, 32), (20, 28), (8, 8)])
def test_dinov2_matches_transformers(registers, swiglu, shape):
  """Every token (the registers after the class token), `pooler_output` (the class token) and the
  mean patch token (registers left out), at the grid, a 1:2 panorama, an odd and a smaller grid; with
  the GELU MLP and giant's SwiGLU."""
  hf = hf_dinov2(registers, swiglu=swiglu)
  model = our_dinov2(registers, swiglu=swiglu)
  vit_params.load_vit_weights(model, {k: v.numpy() for k, v in hf.state_dict().items()})
  x = images((2, *shape, 3))
  out = run_hf(hf, x)
  np.testing.assert_allclose(np.asarray(model.tokens(jnp.asarray(x))), out.last_hidden_state.numpy(), atol=TOL)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), out.pooler_output.numpy(), atol=TOL)
  gap = our_dinov2(registers, pool="gap", swiglu=swiglu)
  vit_params.load_vit_weights(gap, {k: v.numpy() for k, v in hf.state_dict().items()})
  np.testing.assert_allclose(np.asarray(gap(jnp.asarray(x))), out.last_hidden_state[:, 1 + registers:].mean(1).numpy(),
                             atol=TOL)


@pytest.mark.parametrize("swiglu", [False, True], ids=["gelu", "giant_swiglu"])
def test_dinov2_gradients_match_transformers(swiglu):
  """Gradients of every parameter (layer scales, register tokens, antialiased-resized position
  embeddings, the SwiGLU's gate and up) and of the input."""
  hf = hf_dinov2(REGISTERS, seed=1, swiglu=swiglu)
  model = our_dinov2(REGISTERS, swiglu=swiglu)
  vit_params.load_vit_weights(model, {k: v.detach().numpy() for k, v in hf.state_dict().items()})
  x = images((2, 16, 24, 3), seed=1)
  weights = images((2, 1 + REGISTERS + 4 * 6, 32), seed=2)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  (hf(x_torch).last_hidden_state * torch.from_numpy(weights)).sum().backward()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  grads, x_grad = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest).tokens(x) * weights),
                                   argnums=(0, 1)))(params, jnp.asarray(x))
  got = vit_params.hf_state_dict(nnx.merge(graphdef, grads, rest))
  want = {k: p.grad.numpy() for k, p in hf.named_parameters() if p.grad is not None}  # the mask token has none
  assert len(got) == 5 + 2 * 18 + 2  # embeddings (registers included), 2 blocks, the final norm
  assert len(want) == len(got) + 2 * 2 * swiglu  # in memory, the SwiGLU's stacked weights_in is gate_proj, up_proj
  got = _unstacked(got)
  got_by_memory_name = {m: got[f] for m in want for f in got if _same_tensor(m, f)}
  assert set(got_by_memory_name) == set(want)
  for key in want:
    np.testing.assert_allclose(got_by_memory_name[key], want[key], atol=1e-4, rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(np.asarray(x_grad), x_torch.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def _unstacked(files):
  """The files' SwiGLU weights_in (gate and up stacked) as transformers 5 holds it in memory."""
  out = {}
  for key, value in files.items():
    if ".mlp.weights_in." in key:
      for name, part in zip(("gate_proj", "up_proj"), np.split(value, 2, axis=0)):
        out[key.replace("weights_in", name)] = part
    else:
      out[key] = value
  return out


def _same_tensor(memory_name, file_name):
  """transformers 5's in-memory DINOv2 names (attention.{q,k,v,o}_proj, the SwiGLU's down_proj) against
  its file names."""
  renamed = memory_name
  for short, long in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                      ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                      ("mlp.down_proj", "mlp.weights_out")):
    renamed = renamed.replace(short, long)
  return renamed == file_name


@pytest.mark.parametrize("registers,swiglu", [(0, False), (REGISTERS, False), (REGISTERS, True)],
                         ids=["dinov2", "registers", "registers_giant_swiglu"])
def test_every_dinov2_layout_reads_to_the_same_model(registers, swiglu, tmp_path):
  """transformers' files (our export's names are theirs), its in-memory module names, timm's /
  facebookresearch's layout (also under `module.`, its registers as `reg_token` or `register_tokens`,
  giant's SwiGLU as timm's fc1/fc2 or the original's w12/w3) give the same parameters."""
  hf = hf_dinov2(registers, swiglu=swiglu)
  files = file_state_dict(hf, tmp_path, "hf")
  want = our_dinov2(registers, swiglu=swiglu)
  vit_params.load_vit_weights(want, str(tmp_path / "hf"))
  np.testing.assert_equal(vit_params.hf_state_dict(want), {k: v for k, v in files.items() if "mask_token" not in k})
  timm = timm_state_dict(files, registers)
  original = original_state_dict(timm)
  sources = {"modules": {k: v.numpy() for k, v in hf.state_dict().items()}, "timm": timm,
             "wrapped timm": {f"module.{k}": v for k, v in timm.items()}, "facebookresearch": original}
  for name, sd in sources.items():
    got = our_dinov2(registers, swiglu=swiglu)
    vit_params.load_vit_weights(got, sd)
    for key, value in vit_params.hf_state_dict(got).items():
      np.testing.assert_array_equal(value, files[key], err_msg=f"{name}: {key}")


def test_dinov2_settings_are_checked_with_the_fix(tmp_path):
  hf_dir, reg_dir = str(tmp_path / "dinov2"), str(tmp_path / "registers")
  hf_dinov2().save_pretrained(hf_dir)
  hf_dinov2(REGISTERS).save_pretrained(reg_dir)
  with pytest.raises(GleamError, match=r"has layer scales \(DINOv2's\) but the model has none; set model\.vit\.layer_scale=1\.0"):
    vit_params.load_vit_weights(our_dinov2(layer_scale=0.0), hf_dir)
  with pytest.raises(GleamError, match=r"has 3 register tokens but the model has 0; set model\.vit\.registers=3"):
    vit_params.load_vit_weights(our_dinov2(pos_antialias=True), reg_dir)
  with pytest.raises(GleamError, match=r"dinov2_with_registers, which resizes its position grid with antialiasing; "
                                       r"set model\.vit\.pos_antialias=True"):
    vit_params.load_vit_weights(our_dinov2(REGISTERS, pos_antialias=False), reg_dir)
  with pytest.raises(GleamError, match=r"is a dinov2, which resizes its position grid without antialiasing; "
                                       r"set model\.vit\.pos_antialias=False"):
    vit_params.load_vit_weights(our_dinov2(pos_antialias=True), hf_dir)
  giant_dir = str(tmp_path / "giant")
  hf_dinov2(swiglu=True).save_pretrained(giant_dir)
  with pytest.raises(GleamError, match=r"has a SwiGLU MLP but the model a GELU one; set model\.vit\.swiglu=True "
                                       r"\(DINOv2 giant: variant giant2/14\)"):
    vit_params.load_vit_weights(our_dinov2(), giant_dir)
  with pytest.raises(GleamError, match=r"has a GELU MLP but the model a SwiGLU one; set model\.vit\.swiglu=False\.$"):
    vit_params.load_vit_weights(our_dinov2(swiglu=True), hf_dir)
  with pytest.raises(GleamError, match=r"the checkpoint has width 32, depth 2, SwiGLU MLP 48, .* while the model "
                                       r"has width 32, depth 2, SwiGLU MLP 64,"):
    vit_params.load_vit_weights(vit.ViT(vit.vit_config(None, **SIZES, layer_scale=1.0, swiglu=True), rngs=nnx.Rngs(0)),
                                giant_dir)
  plain = {k: v.numpy() for k, v in transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
      patch_size=4), add_pooling_layer=False).state_dict().items()}
  with pytest.raises(GleamError, match=r"has no layer scales \(DINOv2's\) but the model does; set model\.vit\.layer_scale=0"):
    vit_params.load_vit_weights(our_dinov2(), plain)
  with pytest.raises(GleamError, match=r"Dinov2\[WithRegisters\]Model .*pos_antialias=True exactly with registers"):
    vit_params.hf_architecture(vit.vit_config(None, **SIZES, layer_scale=1.0, registers=2))
  with pytest.raises(GleamError, match=r"swiglu=True is none of .*an MLP width a whole mlp_ratio gives"):
    vit_params.hf_architecture(vit.vit_config(None, **(SIZES | dict(mlp_dim=44)), layer_scale=1.0, swiglu=True))


@pytest.mark.parametrize("registers,swiglu", [(0, False), (REGISTERS, False), (0, True)],
                         ids=["dinov2", "registers", "giant_swiglu"])
def test_exported_dinov2_tower_gives_our_embeddings_in_pytorch(registers, swiglu, tmp_path):
  """A GLEAM-C tower on a DINOv2 backbone (from the checkpoint's directory; its 12-px grid resized to
  16 px on load) exports as a Dinov2[WithRegisters]Model directory (giant's SwiGLU stacked back
  into weights_in) whose config.json recipe gives `GleamC.encode`'s embedding of a 1:2 panorama."""
  import safetensors.torch
  from gleam_jax import export_c
  hf_dinov2(registers, image_size=12, swiglu=swiglu).save_pretrained(str(tmp_path / "checkpoint"))
  settings = dict(layer_scale=1.0, registers=registers, pos_antialias=bool(registers), pool="gap", swiglu=swiglu)
  sizes = SIZES | (dict(mlp_dim=SWIGLU_MLP) if swiglu else {})
  cfg = gleam_c.model_config(backbone="vit", vit=dict(sizes, image_size=16, **settings), embed_dim=6,
                             pretrained=str(tmp_path / "checkpoint"))
  model = gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=0, dropout=1))
  model.eval()
  export_c.save_tower(model, "query", str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    config = json.load(f)
  architecture = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
  assert config["architectures"] == [architecture] and config.get("use_swiglu_ffn", False) == swiglu
  assert config["gleam_c"]["features"] == f"last_hidden_state[:, {1 + registers}:].mean(1)"
  hf, info = getattr(transformers, architecture).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
  assert not info["missing_keys"] and set(info["unexpected_keys"]) == {
      "gleam_c.logit_scale", "gleam_c.projection.weight", "gleam_c.projection.bias"}
  weights = safetensors.torch.load_file(str(tmp_path / "out" / "model.safetensors"))
  x = images((2, 16, 32, 3))
  pooled = eval(config["gleam_c"]["features"], {}, {"last_hidden_state": run_hf(hf.eval(), x).last_hidden_state})
  got = F.normalize(F.linear(pooled, weights["gleam_c.projection.weight"], weights["gleam_c.projection.bias"]),
                    dim=-1, eps=1e-6).numpy()
  np.testing.assert_allclose(got, np.asarray(model.encode(jnp.asarray(x), "query")), atol=TOL)
  checkpoint = getattr(transformers, architecture).from_pretrained(str(tmp_path / "checkpoint")).eval()
  square = images((2, 16, 16, 3))  # at the model's grid, the export computes what the 12-px checkpoint does
  np.testing.assert_allclose(run_hf(hf, square).last_hidden_state.numpy(),
                             run_hf(checkpoint, square).last_hidden_state.numpy(), atol=TOL)


def test_dinov2_giant_tower_has_dinov2_giant_parameters():
  """giant2/14 at 518 px with swiglu has the parameters (1.1e9) and key set (but the mask token) of
  facebook/dinov2-giant (built on the meta device), and exports as its config."""
  cfg = vit.vit_config("giant2/14", image_size=518, layer_scale=1.0, swiglu=True)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  ours = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  config = vit_params.hf_config(cfg)
  assert (config["mlp_ratio"], config["use_swiglu_ffn"], config["num_attention_heads"]) == (4, True, 24)
  with torch.device("meta"):
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, image_size=518, patch_size=14,
        use_swiglu_ffn=True))
  theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "embeddings.mask_token"}
  assert sum(map(np.prod, ours.values())) == sum(map(np.prod, theirs.values())) > 1.1e9
  stand_ins = {k: np.empty((0,) * len(s), np.float32) for k, s in theirs.items()}
  mapped, unexpected = vit_params.map_state_dict(stand_ins)
  assert not unexpected and set(mapped) == set(ours)


def test_dinov2_b14_tower_has_dinov2_base_parameters():
  """B/14 at 518 px with DINOv2's settings and 4 registers has the parameters and key set (but the
  mask token) of facebook/dinov2-with-registers-base (built on the meta device)."""
  cfg = vit.vit_config("B/14", image_size=518, layer_scale=1.0, registers=4, pos_antialias=True)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  ours = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  with torch.device("meta"):
    hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518, patch_size=14,
        num_register_tokens=4))
  theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k != "embeddings.mask_token"}
  assert sum(map(np.prod, ours.values())) == sum(map(np.prod, theirs.values())) > 8.6e7
  stand_ins = {k: np.empty((0,) * len(s), np.float32) for k, s in theirs.items()}
  mapped, unexpected = vit_params.map_state_dict(stand_ins)
  assert not unexpected and set(mapped) == set(ours)
