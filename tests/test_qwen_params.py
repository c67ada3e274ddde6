"""Weight import: a random transformers Qwen2.5-VL saved to disk, loaded into the NNX model."""
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from jax.sharding import PartitionSpec as P
from PIL import Image

from gleam_jax.errors import GleamError
from gleam_jax.models.qwen2_5_vl import config as config_lib
from gleam_jax.models.qwen2_5_vl import modeling, params, rope
from gleam_jax.models.qwen2_5_vl import processor as proc_lib
from gleam_jax.models.qwen2_5_vl import tiny_dir
from gleam_jax.train import sharding as sharding_lib


def random_torch_model(model_dir, seed=0):
  """A Qwen2_5_VLForConditionalGeneration whose every weight (norms and biases too) is random."""
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(
      transformers.Qwen2_5_VLConfig.from_pretrained(model_dir)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_q" in name else 0.0))
  return model


def write_safetensors(model_dir, tensors):
  safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                              os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """Old layout (what transformers 5's save_pretrained writes, sharded), new layout (the in-memory
  state_dict names that transformers 4.52-4.57 wrote; one file), tied embeddings, bfloat16."""
  root = tmp_path_factory.mktemp("qwen_ckpt")
  old = tiny_dir.write_tiny_qwen_dir(str(root / "old"))
  model = random_torch_model(old)
  model.save_pretrained(old, max_shard_size="100KB")
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  new = str(root / "new")
  shutil.copytree(old, new, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
  assert "model.language_model.norm.weight" in state and "model.norm.weight" in params.checkpoint_index(old)
  write_safetensors(new, state)

  tied = tiny_dir.write_tiny_qwen_dir(str(root / "tied"), tie_word_embeddings=True,
                                           text=dict(tie_word_embeddings=True))
  tied_model = random_torch_model(tied, seed=1)
  tied_model.save_pretrained(tied)

  bf16 = str(root / "bf16")
  shutil.copytree(old, bf16, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
  model_bf16 = random_torch_model(old, seed=2).to(torch.bfloat16)
  model_bf16.save_pretrained(bf16, max_shard_size="100KB")
  return dict(old=(old, model), new=(new, model), tied=(tied, tied_model), bf16=(bf16, model_bf16),
              state=state)


def torch_as_ours(path, tensor):
  """Reference transform of one torch tensor into the NNX leaf at `path`."""
  a = tensor.detach().float().numpy()
  if path[-1] == "kernel":
    return a.reshape(a.shape[0], -1).T
  return a


def nnx_to_torch_key(path):
  module, leaf = ".".join(map(str, path[:-1])), path[-1]
  module = module if module == "lm_head" else "model." + module
  return f"{module}.{'bias' if leaf == 'bias' else 'weight'}"


def assert_params_equal(model, torch_model):
  torch_state = torch_model.state_dict()
  flat = nnx_flat_values(model)
  assert len(flat) == len([k for k in torch_state if not (model.cfg.tie_word_embeddings and k == "lm_head.weight")])
  for path, value in flat.items():
    want = torch_as_ours(path, torch_state[nnx_to_torch_key(path)])
    np.testing.assert_array_equal(np.asarray(value, np.float32), want, err_msg=str(path))


def nnx_flat_values(model):
  from flax import nnx
  return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("layout", ["old", "new"])
def test_both_layouts_load_exact_values(checkpoints, layout):
  directory, torch_model = checkpoints[layout]
  model = params.load_pretrained(directory)
  assert_params_equal(model, torch_model)


def test_logits_match_torch(checkpoints):
  directory, torch_model = checkpoints["old"]
  model = params.load_pretrained(directory)
  processor = proc_lib.load_processor(directory)
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (70, 90, 3), np.uint8)),
            Image.fromarray(rng.integers(0, 256, (60, 60, 3), np.uint8))]
  ex = processor.build_sft_example(images, "Same place? 同一个地方吗？", "Yes. 是的。")
  ids = ex["input_ids"][None]
  with torch.no_grad():
    want = torch_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(ex["pixel_values"]),
                       image_grid_thw=torch.from_numpy(ex["image_grid_thw"]),
                       mm_token_type_ids=torch.from_numpy((ids == processor.image_token_id).astype(np.int64))
                       ).logits.numpy()
  cfg = model.cfg
  position_ids, _ = rope.get_rope_index(ids, ex["image_grid_thw"], None, image_token_id=cfg.image_token_id,
                                        spatial_merge_size=cfg.vision.spatial_merge_size)
  got = model(jnp.asarray(ids), jnp.asarray(position_ids), pixel_values=jnp.asarray(ex["pixel_values"]),
              vision_layout=modeling.vision_inputs(ex["image_grid_thw"], cfg))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_tied_embeddings(checkpoints):
  directory, torch_model = checkpoints["tied"]
  assert "lm_head.weight" not in params.checkpoint_index(directory)
  model = params.load_pretrained(directory)
  assert model.cfg.tie_word_embeddings and not hasattr(model, "lm_head")
  assert_params_equal(model, torch_model)
  hidden = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 64)), jnp.float32)
  emb = torch_model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_allclose(np.asarray(model.logits(hidden)), np.asarray(hidden) @ emb.T, rtol=1e-5, atol=1e-5)


def test_bf16_checkpoint_cast_to_param_dtype(checkpoints):
  directory, torch_model = checkpoints["bf16"]
  assert {i.dtype for i in params.checkpoint_index(directory).values()} == {"BF16"}
  model = params.load_pretrained(directory)  # float32 parameters
  assert all(v.dtype == jnp.float32 for v in nnx_flat_values(model).values())
  assert_params_equal(model, torch_model)  # bf16 -> f32 is exact
  model16 = params.load_pretrained(directory, param_dtype="bfloat16")
  assert all(v.dtype == jnp.bfloat16 for v in nnx_flat_values(model16).values())


def test_float32_checkpoint_to_bfloat16_rounds_like_torch(checkpoints):
  directory, torch_model = checkpoints["old"]
  model = params.load_pretrained(directory, param_dtype="bfloat16")
  got = nnx_flat_values(model)[("language_model", "layers", 0, "mlp", "up_proj", "kernel")]
  want = torch_model.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_sharded_placement_on_8_devices(checkpoints):
  directory, torch_model = checkpoints["old"]
  mesh = sharding_lib.make_mesh(dict(data=1, fsdp=2, tensor=4))
  model = params.load_pretrained(directory, mesh=mesh)
  flat = nnx_flat_values(model)
  up = flat[("language_model", "layers", 1, "mlp", "up_proj", "kernel")]  # (embed, mlp) = (64, 96)
  assert up.sharding.spec == P("fsdp", "tensor")
  assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape == (32, 24)
  emb = flat[("language_model", "embed_tokens", "embedding")]
  assert emb.sharding.spec == sharding_lib.logical_to_spec(("vocab", "embed"), config_lib.QWEN_SHARDING_RULES,
                                                           emb.shape, mesh)
  assert_params_equal(model, torch_model)


def test_explicit_shardings_tree(checkpoints):
  directory, torch_model = checkpoints["new"]
  from flax import nnx
  abstract = modeling.abstract_model(config_lib.from_pretrained_dir(directory))
  device = jax.devices()[3]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                           nnx.to_pure_dict(nnx.state(abstract)))
  model = params.load_into(abstract, directory, shardings=shardings)
  assert all(v.devices() == {device} for v in nnx_flat_values(model).values())
  assert_params_equal(model, torch_model)


def _edit_checkpoint(src, dst, edit):
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
  state = safetensors.torch.load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  write_safetensors(dst, state)
  return dst


def test_unused_missing_and_misshapen_keys_are_errors(checkpoints, tmp_path):
  new, _ = checkpoints["new"]
  extra = _edit_checkpoint(new, tmp_path / "extra", lambda s: s.update({"model.visual.extra.weight": torch.ones(2)}))
  with pytest.raises(GleamError, match=r"1 checkpoint keys match no model parameter: model\.visual\.extra\.weight"):
    params.load_pretrained(str(extra))
  missing = _edit_checkpoint(new, tmp_path / "missing", lambda s: s.pop("model.language_model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(GleamError, match=r"not in the checkpoint: language_model\.layers\.1\.mlp\.up_proj\.kernel"):
    params.load_pretrained(str(missing))
  no_head = _edit_checkpoint(new, tmp_path / "no_head", lambda s: s.pop("lm_head.weight"))
  with pytest.raises(GleamError, match="tie_word_embeddings"):
    params.load_pretrained(str(no_head))
  shape = _edit_checkpoint(new, tmp_path / "shape", lambda s: s.update(
      {"model.language_model.norm.weight": torch.ones(65)}))
  with pytest.raises(GleamError, match=r"model\.language_model\.norm\.weight \[65\] \(expected \[64\]"):
    params.load_pretrained(str(shape))
  twice = _edit_checkpoint(new, tmp_path / "twice", lambda s: s.update(
      {"model.norm.weight": s["model.language_model.norm.weight"].clone()}))
  with pytest.raises(GleamError, match=r"given twice .*model\.language_model\.norm\.weight and model\.norm\.weight"):
    params.load_pretrained(str(twice))
  with pytest.raises(GleamError, match=r"No \*\.safetensors weights"):
    params.checkpoint_files(str(tmp_path / "empty"))
  # checked from the headers too: the torch layout of each shape, and a float dtype for every weight
  conv = "model.visual.patch_embed.proj.weight"
  swapped = _edit_checkpoint(new, tmp_path / "swapped", lambda s: s.update({conv: s[conv].transpose(1, 2)}))
  out, c, t, p, _ = safetensors.torch.load_file(os.path.join(new, "model.safetensors"))[conv].shape
  with pytest.raises(GleamError, match=rf"{re.escape(conv)} \[{out}, {t}, {c}, {p}, {p}\] \(expected \[{out}, {c}, {t}, "
                                       rf"{p}, {p}\] for visual\.patch_embed\.proj\.kernel\)"):
    params.load_pretrained(str(swapped))
  norm = "model.language_model.norm.weight"
  for dtype, name in ((torch.int64, "I64"), (torch.float8_e4m3fn, "F8_E4M3")):
    cast = _edit_checkpoint(new, tmp_path / name, lambda s: s.update({norm: s[norm].to(dtype)}))
    with pytest.raises(GleamError, match=rf"1 tensors are not stored as float32, bfloat16 or float16 \(convert "
                                         rf"them\): {re.escape(norm)} {name}"):
      params.load_pretrained(str(cast))
  with pytest.raises(GleamError, match=r"param_dtype='float8'; use 'float32', 'bfloat16' or 'float16'"):
    params.load_pretrained(str(new), param_dtype="float8")


def test_stop_and_pad_tokens_come_from_generation_config(checkpoints, tmp_path):
  """As transformers' generate: generation_config.json's eos (an int or a list) and pad over config.json's."""
  new, _ = checkpoints["new"]
  directory = tmp_path / "ckpt"
  shutil.copytree(new, directory, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
  (directory / "generation_config.json").unlink(missing_ok=True)
  plain = config_lib.from_pretrained_dir(str(directory))
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "pad_token_id": 7}))
  cfg = config_lib.from_pretrained_dir(str(directory))
  assert (cfg.eos_token_ids, cfg.pad_token_id) == ((2, 7), 7) != (plain.eos_token_ids, plain.pad_token_id)
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
  assert config_lib.from_pretrained_dir(str(directory)).eos_token_ids == (9,)
  assert config_lib.from_pretrained_dir(str(directory), eos_token_ids=(4,)).eos_token_ids == (4,)  # overrides win


def test_truncated_shard_and_missing_shard(checkpoints, tmp_path):
  old, _ = checkpoints["old"]
  broken = tmp_path / "broken"
  shutil.copytree(old, broken)
  index = json.load(open(broken / params.INDEX_FILE))
  last = sorted(set(index["weight_map"].values()))[-1]
  data = (broken / last).read_bytes()
  (broken / last).write_bytes(data[:-16])
  with pytest.raises(GleamError, match="truncated"):
    params.load_pretrained(str(broken))
  os.remove(broken / last)
  with pytest.raises(GleamError, match="names shard files that are not in"):
    params.load_pretrained(str(broken))


def test_benchmark_checkpoint_writer_reads_back_with_safetensors(tmp_path):
  """The benchmark's streamed bf16 shards: valid safetensors, real key names, loadable by us."""
  from gleam_jax.bench import load_weights
  cfg = config_lib.tiny(tie_word_embeddings=True)
  config_dict = load_weights.hf_config_dict(cfg)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config_dict, f)
  tensors = load_weights.checkpoint_tensors(config_dict)
  assert "lm_head.weight" not in dict(tensors) and "model.layers.0.mlp.up_proj.weight" in dict(tensors)
  total, n_files = load_weights.write_checkpoint(str(tmp_path), tensors, max_shard_bytes=100_000)
  assert n_files > 1 and total == sum(int(np.prod(s)) * 2 for _, s in tensors)
  model = params.load_pretrained(str(tmp_path), param_dtype="bfloat16")
  assert config_lib.from_pretrained_dir(str(tmp_path)) == cfg
  reference = {}
  for file in params.checkpoint_files(str(tmp_path)):
    reference.update(safetensors.torch.load_file(file))
  got = nnx_flat_values(model)
  for path, value in got.items():
    want = torch_as_ours(path, reference[nnx_to_torch_key(path).replace("model.language_model.", "model.")
                                         .replace("model.visual.", "visual.")])
    np.testing.assert_array_equal(np.asarray(value, np.float32), want, err_msg=str(path))


def write_aligned_safetensors(file, tensors):
  """A safetensors file whose tensors all start on 64-byte boundaries (where JAX on CPU would adopt a
  NumPy buffer in place)."""
  header, offset, blobs = {}, 0, []
  for name, t in tensors.items():
    data = t.contiguous().numpy().tobytes()
    pad = -len(data) % 64
    header[name] = dict(dtype="F32", shape=list(t.shape), data_offsets=[offset, offset + len(data)])
    blobs.append(data + b"\0" * pad)
    offset += len(data) + pad
  text = json.dumps(header).encode()
  text += b" " * (-(8 + len(text)) % 64)
  with open(file, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_parameters_do_not_alias_the_checkpoint_file(checkpoints, tmp_path):
  """JAX on CPU adopts aligned NumPy buffers; rewriting the file in place must not change the weights."""
  new, torch_model = checkpoints["new"]
  copy = shutil.copytree(new, tmp_path / "copy", ignore=shutil.ignore_patterns("*.safetensors"))
  file = copy / "model.safetensors"
  write_aligned_safetensors(file, {k: v.float() for k, v in torch_model.state_dict().items()})
  model = params.load_pretrained(str(copy))
  assert_params_equal(model, torch_model)
  header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
  with open(file, "r+b") as f:
    f.seek(header)
    f.write(b"\0" * (os.path.getsize(file) - header))
  assert_params_equal(model, torch_model)
