"""Weight export: the NNX model written as a Hugging Face directory (`params.save_pretrained`), read
back by transformers and by our loader, and `python -m gleam_jax.export` on a tiny GLEAM-X job."""
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
import transformers
from flax import nnx, traverse_util
from PIL import Image

from config_files import REPO, tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from test_qwen_modeling import GRIDS, jax_logits, left_pad, pixels, prompt, torch_logits
from test_qwen_params import nnx_flat_values, torch_as_ours
from gleam_jax import explain, export, main
from gleam_jax.data import gleam_x
from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import config as qcfg
from gleam_jax.models.qwen2_5_vl import modeling, params, processor, tiny_dir
from gleam_jax.train import sft


def random_model(cfg, seed):
  """A model whose every parameter is random (norm scales around 1, biases non-zero), as the
  transformers references of the parity tests."""
  model = modeling.create_model(cfg, seed=seed)
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  for path, value in flat.items():
    noise = rng.standard_normal(value.shape).astype(np.float32)
    flat[path] = jnp.asarray(1.0 + 0.1 * noise if path[-1] == "scale" else
                             (0.5 if path[-1] == "embedding" else 0.08) * noise)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  return model


def stored(directory):
  """Every tensor of a checkpoint directory, read with the safetensors library."""
  out = {}
  for file in params.checkpoint_files(directory):
    out.update(safetensors.torch.load_file(file))
  return out


def assert_same_params(a, b):
  x, y = nnx_flat_values(a), nnx_flat_values(b)
  assert x.keys() == y.keys()
  for path in x:
    assert x[path].dtype == y[path].dtype, path
    np.testing.assert_array_equal(np.asarray(x[path]), np.asarray(y[path]), err_msg=str(path))


@pytest.mark.parametrize("tie,max_shard_bytes", [(False, params.MAX_SHARD_BYTES), (True, 100_000)],
                         ids=["untied-one-file", "tied-sharded"])
def test_export_reads_back_in_transformers_and_exactly_in_ours(tmp_path, tie, max_shard_bytes):
  model = random_model(qcfg.tiny(tie_word_embeddings=tie), seed=int(tie))
  out = str(tmp_path / "ours")
  total, files = params.save_pretrained(model, out, max_shard_bytes=max_shard_bytes)
  index = params.checkpoint_index(out)
  assert total == sum(i.end - i.begin for i in index.values())
  assert ("lm_head.weight" in index) != tie and "model.layers.1.mlp.up_proj.weight" in index
  if files == 1:
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  else:  # shards of at most max_shard_bytes (or one tensor), named by an index as transformers writes it
    with open(os.path.join(out, params.INDEX_FILE)) as f:
      written = json.load(f)
    assert written["metadata"]["total_size"] == total and set(written["weight_map"]) == set(index)
    assert sorted(set(written["weight_map"].values())) == params.shard_names(files) and files > 2
    for file in params.shard_names(files):
      sizes = [i.end - i.begin for i in index.values() if os.path.basename(i.file) == file]
      assert sum(sizes) <= max_shard_bytes or len(sizes) == 1
  # transformers reads every weight, and its logits on a prompt with two images are ours
  reference, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  rng = np.random.default_rng(2)
  ids, mask = left_pad([prompt(rng, 6, GRIDS)])
  px = pixels(rng, GRIDS)
  want = torch_logits(reference.eval(), ids, mask, px, GRIDS)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(jax_logits(model, model.cfg, ids, mask, px, GRIDS), want, atol=1e-4, rtol=0)
  # the key names, shapes and values transformers 5's save_pretrained writes for that model
  reference.save_pretrained(tmp_path / "theirs")
  ours, theirs = stored(out), stored(str(tmp_path / "theirs"))
  assert ours.keys() == theirs.keys()
  for key in ours:
    assert torch.equal(ours[key], theirs[key]), key
  # our loader: the same config and the same parameters, bit for bit
  back = params.load_pretrained(out)
  assert back.cfg == model.cfg
  assert_same_params(back, model)


def test_bfloat16_export_rounds_as_torch(tmp_path):
  model = random_model(qcfg.tiny(), seed=2)
  out = str(tmp_path / "bf16")
  total, _ = params.save_pretrained(model, out, dtype="bfloat16")
  assert {i.dtype for i in params.checkpoint_index(out).values()} == {"BF16"}
  assert total == sum(v.size for v in nnx_flat_values(model).values()) * 2
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  tensors = stored(out)
  for path, value in nnx_flat_values(model).items():
    want = torch.from_numpy(np.array(value)).to(torch.bfloat16).float()  # torch's rounding, our layout
    np.testing.assert_array_equal(torch_as_ours(path, tensors[params.hf_key(path)]), want.numpy(), err_msg=str(path))
  back = params.load_pretrained(out, param_dtype="bfloat16")
  for path, value in nnx_flat_values(back).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(nnx_flat_values(model)[path].astype(jnp.bfloat16)))


def test_refuses_to_overwrite_weights_and_names_bad_requests(tmp_path):
  model, other = modeling.create_model(qcfg.tiny(), seed=0), modeling.create_model(qcfg.tiny(), seed=1)
  out = str(tmp_path / "out")
  params.save_pretrained(model, out, max_shard_bytes=100_000)
  with pytest.raises(GleamError, match=rf"{re.escape(out)} already holds model weights \(model-00001-of-.*"
                                       r"overwrite=True \(--overwrite\)"):
    params.save_pretrained(other, out)
  assert_same_params(params.load_pretrained(out), model)  # left as it was
  params.save_pretrained(other, out, overwrite=True)  # one file: no stale shard stays
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert_same_params(params.load_pretrained(out), other)
  with pytest.raises(GleamError, match=r"dtype='float8': export as one of float32, bfloat16, float16"):
    params.save_pretrained(model, str(tmp_path / "a"), dtype="float8")
  with pytest.raises(GleamError, match="is the directory the model came from"):
    params.save_pretrained(model, out, source_dir=out, overwrite=True)
  source = tiny_dir.write_tiny_qwen_dir(str(tmp_path / "source"))  # another tiny model's config
  with pytest.raises(GleamError, match=r"source/config.json describes another model .*vision.hidden_size"):
    params.save_pretrained(model, str(tmp_path / "b"), source_dir=source)
  (tmp_path / "file").write_text("")
  with pytest.raises(GleamError, match="is a file"):
    params.save_pretrained(model, str(tmp_path / "file"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written on bad input


def test_export_command_on_a_gleam_x_job(tiny_cfg, tmp_path):
  """`gleam_jax.export` on a one-step tiny job (UAV views only: one compiled step): the exported
  directory holds the trained model (the logits of `sft.load_trained`'s, and `explain --model_dir`'s
  answer) and the job's tokenizer and processor files, with the job's image handling (pixel bounds,
  torchvision resize, every image resized to 56 x 84 first); the command refuses to write over it."""
  workdir, out = str(tmp_path / "job"), str(tmp_path / "hf")
  config = tiny_config("x_sft", tiny_cfg.data_dir, total_steps=1, **{
      "data.modalities": ("uav",), "examples.train": 8, "optim.warmup_steps": 0, "eval.at_end": False,
      "model.image_resize": "torchvision", "examples.image_size": (56, 84)})
  main.run(config, workdir)
  # the model directory's own bounds (a released checkpoint's) differ from the job's: the job's are exported
  source = os.path.join(workdir, "tiny_qwen")
  with open(os.path.join(source, "preprocessor_config.json")) as f:
    preprocessor = json.load(f)
  with open(os.path.join(source, "preprocessor_config.json"), "w") as f:
    json.dump(dict(preprocessor, max_pixels=12845056, size=dict(shortest_edge=3136, longest_edge=12845056)), f)
  line = export.export(workdir, out)  # what `python -m gleam_jax.export --workdir --out` runs and prints
  assert re.fullmatch(rf"exported step 1 of {re.escape(workdir)} to {re.escape(out)}: [0-9.]+ MB of float32 "
                      r"weights in 1 file, [0-9.]+ s", line), line
  assert sorted(os.listdir(out)) == sorted(os.listdir(source) + ["model.safetensors", "video_preprocessor_config.json"])
  job_bounds = sft.load_trained(workdir)[1].image_config
  exported_bounds = processor.load_processor(out).image_config
  assert exported_bounds == job_bounds and (job_bounds.max_pixels, job_bounds.video_min_pixels) == (448 * 448, 56 * 56)
  assert job_bounds.image_resize == "torchvision" and processor.recorded_image_size(out) == (56, 84)
  assert processor.recorded_image_size(source) is None
  with open(os.path.join(out, "preprocessor_config.json")) as f:
    written = json.load(f)
  assert written["size"] == dict(shortest_edge=56 * 56, longest_edge=448 * 448) and written["patch_size"] == 14
  assert (written[processor.IMAGE_RESIZE_KEY], written[processor.IMAGE_SIZE_KEY]) == ("torchvision", [56, 84])
  with open(os.path.join(out, "video_preprocessor_config.json")) as f:
    assert processor.IMAGE_SIZE_KEY not in json.load(f)
  assert type(transformers.AutoImageProcessor.from_pretrained(out, local_files_only=True)).__name__.startswith(
      "Qwen2VLImageProcessor")  # transformers reads the directory, our keys aside
  with open(os.path.join(source, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
    assert json.load(g) == dict(json.load(f), dtype="float32")
  trained, _, _ = sft.load_trained(workdir)
  exported, proc = params.load_pretrained(out), processor.load_processor(out)
  assert_same_params(exported, trained)
  example = gleam_x.examples(config.data, "test", 1, seed=1)[0]
  row = sft.encode(proc, example)
  ids = row["input_ids"][None]
  inputs = (ids, np.ones_like(ids), row["pixel_values"], row["image_grid_thw"])
  np.testing.assert_array_equal(jax_logits(exported, exported.cfg, *inputs), jax_logits(trained, trained.cfg, *inputs))
  paths = [str(tmp_path / "query.png"), str(tmp_path / "satellite.png")]
  Image.fromarray(example["query"]).save(paths[0])
  Image.fromarray(example["satellite"]).save(paths[1])
  answer = lambda model_dir, **kw: explain.explain(model_dir, paths, lang="en", max_new_tokens=8, write=lambda _: None,
                                                  **kw)
  assert answer(out) == answer(None, workdir=workdir)
  # the command line: an --out that holds weights stops on one line, before the model is loaded
  run = subprocess.run([sys.executable, "-m", "gleam_jax.export", f"--workdir={workdir}", f"--out={out}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
      f"error: {out} already holds model weights (model.safetensors); export into a new or empty directory, "
      "or pass overwrite=True (--overwrite) to replace them."), run.stderr
  run = subprocess.run([sys.executable, "-m", "gleam_jax.export", f"--workdir={workdir}"],
                       cwd=REPO, capture_output=True, text=True, check=False)
  assert (run.returncode, run.stderr.strip().splitlines()) == (
      2, ["error: --out is required (The Hugging Face model directory to write.)"]), run.stderr
