"""GLEAM-C export (`python -m gleam_jax.export_c`): each network as a transformers `ConvNextModel`
directory with the GLEAM-C head, whose documented PyTorch recipe gives our embeddings; read back
by our ConvNeXt loader bit for bit; on a one-step tiny job, and refusing to write over weights."""
import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from flax import nnx, traverse_util

from config_files import REPO, tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import export_c, main, retrieve
from gleam_jax.errors import GleamError
from gleam_jax.models import convnext, convnext_params, gleam_c
from gleam_jax.train import contrastive

TOL = 1e-5  # float32 on both sides; the largest difference seen is ~1e-7 (unit-norm embeddings)


def random_gleam_c(seed, **kw):
  """A tiny GLEAM-C whose every parameter is random (norm scales around 1, biases and layer scales
  non-zero), so a swapped or mistransposed tensor cannot go unseen."""
  cfg = gleam_c.model_config(depths=(1, 2), dims=(8, 16), **kw)
  model = nnx.eval_shape(lambda: gleam_c.GleamC(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1)))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  for path, value in flat.items():
    noise = rng.standard_normal(np.shape(value)).astype(np.float32)
    flat[path] = jnp.asarray({"scale": 1.0 + 0.1 * noise, "gamma": 0.5 + 0.1 * noise}.get(path[-1], 0.2 * noise))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  model.eval()
  return model


def images(shape, seed):
  """Normalised NHWC images, as `GleamC.encode` takes them."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_embed(directory, x):
  """The embedding by config.json's recipe in PyTorch (in the dtype transformers loads the weights
  as: config.json's): transformers' ConvNextModel pooler_output, the gleam_c.* projection, L2 norm. Returns (embedding, ConvNextModel output, loading
  info, config)."""
  hf, info = transformers.ConvNextModel.from_pretrained(directory, output_loading_info=True)
  head = safetensors.torch.load_file(os.path.join(directory, "model.safetensors"))
  with torch.no_grad():
    out = hf.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)).to(hf.dtype))  # NHWC -> NCHW, the model's dtype
    features = out.pooler_output.float()
    if hf.config.gleam_c["projection"]:
      features = F.linear(features, head["gleam_c.projection.weight"], head["gleam_c.projection.bias"])
    return F.normalize(features, dim=-1, eps=1e-6).numpy(), out, info, hf.config


def params_of(module):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@nnx.jit(static_argnums=2)
def forward(model, x, tower):
  """(embedding, backbone features, last stage's output) of `tower`'s network."""
  encoder = getattr(model, f"{model.tower_key(tower)}encoder")
  return model.encode(x, tower=tower), encoder(x), encoder.stage_features(x)[-1]


def check_tower(model, tower, directory, x, loss_bias=None):
  """transformers reads the backbone (the head keys reported unexpected), its features and our recipe's
  embedding are ours; our loader reads the backbone back bit for bit. Returns the largest difference."""
  want, features, last = map(np.asarray, forward(model, jnp.asarray(x), tower))
  got, out, info, config = torch_embed(directory, x)
  head = export_c.head_tensors(model, tower, loss_bias)
  assert not info["missing_keys"] and not info["mismatched_keys"]
  assert info["unexpected_keys"] == set(head) and "gleam_c.logit_scale" in head
  assert tower in config.gleam_c["towers"] and config.layer_norm_eps == convnext.LN_EPS
  np.testing.assert_allclose(out.pooler_output.numpy(), features, atol=TOL, rtol=0)
  np.testing.assert_allclose(out.last_hidden_state.numpy().transpose(0, 2, 3, 1), last, atol=TOL, rtol=0)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  encoder = getattr(model, f"{model.tower_key(tower)}encoder")
  back = nnx.eval_shape(lambda: convnext.ConvNeXt(encoder.config, rngs=nnx.Rngs(0)))
  convnext_params.load_convnext_weights(back, directory)
  written, read = params_of(encoder), params_of(back)
  assert written.keys() == read.keys()
  for name in written:
    np.testing.assert_array_equal(read[name], written[name], err_msg=name)
  stored = safetensors.torch.load_file(os.path.join(directory, "model.safetensors"))
  for key, value in head.items():
    assert stored[key].shape == value.shape, key
    np.testing.assert_array_equal(stored[key].numpy(), value, err_msg=key)
  return float(np.abs(got - want).max())


def test_modality_tower_model_exports_each_network(tmp_path):
  """A shared encoder with a UAV tower and a projection: a folder per network, each giving our
  embeddings of its towers in PyTorch."""
  model = random_gleam_c(0, embed_dim=12, modality_towers=("uav",))
  folders = export_c.tower_folders(False, ("uav",))
  assert folders == {"shared": ["query", "reference"], "uav": ["uav"]}
  for name, towers in folders.items():
    export_c.save_tower(model, towers[0], str(tmp_path / name))
    assert sorted(os.listdir(tmp_path / name)) == ["config.json", "model.safetensors"]
  x = images((2, 32, 64, 3), seed=1)
  diffs = [check_tower(model, t, str(tmp_path / "shared"), x) for t in ("query", "reference")]
  diffs.append(check_tower(model, "uav", str(tmp_path / "uav"), images((3, 32, 32, 3), seed=2)))
  assert max(diffs) < TOL
  with open(tmp_path / "uav" / "config.json") as f:
    config = json.load(f)
  assert (config["depths"], config["hidden_sizes"], config["hidden_act"]) == ([1, 2], [8, 16], "gelu")
  assert config["gleam_c"]["embed_dim"] == 12 and config["gleam_c"]["embedding"].startswith("F.normalize(F.linear(")
  # the shared and UAV networks differ; the head's logit scale is the model's
  shared = safetensors.torch.load_file(str(tmp_path / "shared" / "model.safetensors"))
  uav = safetensors.torch.load_file(str(tmp_path / "uav" / "model.safetensors"))
  assert not torch.equal(shared["embeddings.patch_embeddings.weight"], uav["embeddings.patch_embeddings.weight"])
  assert float(uav["gleam_c.logit_scale"]) == float(model.logit_scale[...])


def test_separate_towers_without_projection(tmp_path):
  model = random_gleam_c(3, separate_towers=True)
  assert export_c.tower_folders(True, ()) == {"query": ["query"], "reference": ["reference"]}
  export_c.save_tower(model, "reference", str(tmp_path))
  assert set(export_c.head_tensors(model, "reference")) == {"gleam_c.logit_scale"}
  assert check_tower(model, "reference", str(tmp_path), images((2, 32, 32, 3), seed=4)) < TOL
  with pytest.raises(GleamError, match=rf"{re.escape(str(tmp_path))} already holds model weights "
                                       r"\(model.safetensors\); export into a new or empty directory"):
    export_c.save_tower(model, "query", str(tmp_path))


def test_tower_selection():
  folders = export_c.tower_folders(False, ("uav", "ground"))
  select = lambda tower: export_c.select_folders(folders, tower, ("uav", "panorama"), False, ("uav", "ground"))
  assert select(None) == folders and list(select("panorama")) == ["shared"] and list(select("reference")) == ["shared"]
  assert select("ground") == {"ground": ["ground"]} and list(select("shared")) == ["shared"]
  with pytest.raises(GleamError, match=r"--tower=streetmap: the job's towers and query modalities are shared, uav, "
                                       r"ground, query, reference, panorama; give one of them"):
    select("streetmap")


def test_job_info_names_the_frames_queries_were_warped_into():
  """A phase-2 job read ground photos in the panorama frame and UAV views in the satellite frame: a
  PyTorch user has to warp them the same way, so config.json says so; a phase-1 job has no such queries."""
  phase2 = tiny_config("c_phase2", "/unused")
  info = export_c._job_info(phase2, ["query", "reference"], 3)
  assert info["query_frames"] == {"ground": "panorama", "uav": "satellite"}
  assert info["inputs"]["ground"] == list(phase2.data.panorama_size) and info["step"] == 3
  assert "query_frames" not in export_c._job_info(tiny_config("c_phase1", "/unused"), ["query", "reference"], 3)


@pytest.fixture(scope="module")
def c_job(tiny_cfg, tmp_path_factory):
  """A finished one-step phase-1 job with separate query and reference towers, trained with the sigmoid
  loss (whose learned bias the export carries)."""
  workdir = str(tmp_path_factory.mktemp("c_job"))
  config = tiny_config("c_phase1", tiny_cfg.data_dir, "tiny,loss=sigmoid", total_steps=1, **{
      "model.separate_towers": True, "optim.warmup_steps": 0, "eval.at_end": False})
  main.run(config, workdir)
  return workdir


def test_export_command_on_a_gleam_c_job(c_job, tmp_path):
  out = str(tmp_path / "hf")
  line = export_c.export(c_job, out)  # what `python -m gleam_jax.export_c --workdir --out` runs and prints
  assert re.fullmatch(rf"exported step 1 of {re.escape(c_job)} to {re.escape(out)}: towers query, reference, "
                      r"[0-9.]+ MB of float32, [0-9.]+ s", line), line
  assert sorted(os.listdir(out)) == ["query", "reference"]
  model, config, _, loss_bias = retrieve.load_trained(c_job)
  data = config.data
  assert config.loss.name == "sigmoid" and loss_bias != contrastive.SIGMOID_BIAS_INIT  # learned in its step
  for tower, size, name in [("query", data.panorama_size, "panorama"), ("reference", data.satellite_size, "satellite")]:
    x = images((2, *size, 3), seed=5)
    assert check_tower(model, tower, os.path.join(out, tower), x, loss_bias) < TOL
    with open(os.path.join(out, tower, "config.json")) as f:
      info = json.load(f)["gleam_c"]
    assert info["inputs"] == {name: list(size)} and info["step"] == 1
    assert info["pixel_mean"] == list(data.mean) and info["pixel_std"] == list(data.std)
    assert info["similarity"].endswith(" + gleam_c.logit_bias") and info["match_probability"] == "sigmoid(similarity)"
  # the PyTorch recipe's scores are the sigmoid loss's logits of the job (scale and bias as trained)
  q, r = (torch_embed(os.path.join(out, t), images((3, *s, 3), seed=6 + i))[0]
          for i, (t, s) in enumerate([("query", data.panorama_size), ("reference", data.satellite_size)]))
  head = safetensors.torch.load_file(os.path.join(out, "query", "model.safetensors"))
  theirs = head["gleam_c.logit_scale"].exp().numpy() * q @ r.T + head["gleam_c.logit_bias"].numpy()
  ours = (np.exp(float(model.logit_scale[...])) * np.asarray(model.encode(jnp.asarray(images((3, *data.panorama_size, 3), 6)), tower="query"))
          @ np.asarray(model.encode(jnp.asarray(images((3, *data.satellite_size, 3), 7)), tower="reference")).T + loss_bias)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-5)
  # --tower: one network, into --out itself
  single = str(tmp_path / "panorama")
  assert "towers query, " in export_c.export(c_job, single, tower="panorama")
  for file in ("model.safetensors", "config.json"):
    with open(os.path.join(single, file), "rb") as f, open(os.path.join(out, "query", file), "rb") as g:
      assert f.read() == g.read()
  with pytest.raises(GleamError, match=r"--tower=uav: the job's towers and query modalities are query, reference, "
                                       r"panorama; give one"):
    export_c.export(c_job, str(tmp_path / "uav"), tower="uav")
  # --dtype=bfloat16: the ConvNeXt weights stored as bfloat16 (the head in float32), config.json says so,
  # and transformers' model (loaded as bfloat16) gives the float32 export's embeddings to bfloat16's precision
  half = str(tmp_path / "bf16")
  assert " of bfloat16, " in export_c.export(c_job, half, tower="panorama", dtype="bfloat16")
  stored = safetensors.torch.load_file(os.path.join(half, "model.safetensors"))
  full = safetensors.torch.load_file(os.path.join(single, "model.safetensors"))
  for key, value in stored.items():
    assert value.dtype == (torch.float32 if key.startswith("gleam_c.") else torch.bfloat16), key
    np.testing.assert_array_equal(value.float().numpy(), full[key].to(value.dtype).float().numpy(), err_msg=key)
  with open(os.path.join(half, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  x = images((2, *data.panorama_size, 3), seed=8)
  np.testing.assert_allclose(torch_embed(half, x)[0], torch_embed(single, x)[0], atol=2e-2)
  with pytest.raises(GleamError, match=r"dtype='int8': export as one of float32, bfloat16, float16"):
    export_c.export(c_job, str(tmp_path / "int8"), dtype="int8")
  (tmp_path / "file").write_text("")
  with pytest.raises(GleamError, match="is a file; give a directory"):
    export_c.export(c_job, str(tmp_path / "file"), tower="query")
  assert not (tmp_path / "uav").exists()
  # the command line: an --out that holds weights stops on one line, before the model is loaded
  run = subprocess.run([sys.executable, "-m", "gleam_jax.export_c", f"--workdir={c_job}", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 2 and run.stderr.strip().splitlines() == [
      f"error: {out}/query already holds model weights (model.safetensors); export into a new or empty "
      "directory, or delete those files first."], run.stderr


def test_only_gleam_c_jobs_are_exported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"trainer": "sft"}))
  with pytest.raises(GleamError, match=r"holds a 'sft' job; give the workdir of a GLEAM-C \('contrastive'\) "
                                       r"training job \(GLEAM-X jobs: python -m gleam_jax.export\)"):
    export_c.export(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(GleamError, match="config.json not found"):
    export_c.export(str(tmp_path / "none"), str(tmp_path / "out"))
