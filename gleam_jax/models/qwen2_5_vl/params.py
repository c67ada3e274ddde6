"""Hugging Face Qwen2.5-VL safetensors -> NNX `Qwen2_5_VL`, placed straight into its shardings.

    model = load_pretrained('/ckpt/Qwen2.5-VL-3B-Instruct', mesh=mesh)   # cfg from config.json

Both key layouts are read:
  new   model.language_model.*, model.visual.*, lm_head.weight   (transformers >= 4.52 module names,
        written by its save_pretrained from 4.52 to 4.57)
  old   model.layers.*, model.embed_tokens.*, model.norm.*, visual.*, lm_head.weight   (the released
        Qwen checkpoints; transformers 5 converts back to these names when saving)
Each key maps onto the NNX path of the same name (`modeling` mirrors HF names); `weight` becomes
`kernel` (Linear, transposed (out, in) -> (in, out)), `scale` (RMSNorm) or `embedding` (Embed), and the
patch-embedding Conv3d weight (out, C, T, P, P) becomes a (C*T*P*P, out) kernel. With tied
embeddings there is no lm_head parameter; an `lm_head.weight` key in such a checkpoint is skipped
(and logged), as transformers does.

The model is built abstractly (`nnx.eval_shape`), every key and shape is checked against it from the
file headers alone (unused or missing keys, wrong shapes -> one GleamError listing them), then the
files are read tensor by tensor: each tensor is memory-mapped, transposed (a strided view), cast to
the parameter dtype and copied onto its `NamedSharding` (`jax.make_array_from_callback`, so each
process only places its own shards), then unmapped, while the kernel already reads the next one
(posix_fadvise WILLNEED); a few tensors are placed at once by a thread pool. Peak host memory is
the model plus about that many tensors.

`save_pretrained(model, directory)` is the way back: the old key layout (what transformers 5 writes),
each parameter gathered to the host, turned into its torch layout (`_to_hf`), cast if asked and
written on its own, in safetensors shards of at most `max_shard_bytes` (with
model.safetensors.index.json when there are several), and config.json; with `source_dir`, that
directory's config.json is the base (its other fields kept) and its tokenizer, processor and
chat-template files are copied. Peak host memory: a few copies of the largest tensor.
"""
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import time

import jax
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from gleam_jax.errors import GleamError, make_dir
from gleam_jax.models.qwen2_5_vl import config as config_lib
from gleam_jax.models.qwen2_5_vl import modeling
from gleam_jax.train import sharding as sharding_lib
from gleam_jax.utils.model_dirs import WEIGHT_FILE, check_export_dir, export_dtype, weight_files
from gleam_jax.utils.progress import RateEta, format_eta

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what a weight may be stored as
INDEX_FILE = "model.safetensors.index.json"
# Non-persistent buffers that some older exports wrote; they hold no weights.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_DTYPE_CODES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
# As transformers 4 sharded (transformers 5: 50 GB); the released Qwen2.5-VL checkpoints have 2-5 GB files.
MAX_SHARD_BYTES = 5 * 10**9
PATCH_EMBED_KERNEL = ("visual", "patch_embed", "proj", "kernel")  # a Conv3d weight in the checkpoint


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies in a safetensors file."""
  file: str
  dtype: str
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in the file
  end: int


def read_header(file: str) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo from a .safetensors header (no tensor data is read)."""
  try:
    with open(file, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      header = json.loads(f.read(size))
  except (OSError, ValueError) as e:
    raise GleamError(f"Cannot read the safetensors header of {file} ({e}); re-download the file.") from e
  base = 8 + size
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    begin, end = meta["data_offsets"]
    out[name] = TensorInfo(file, meta["dtype"], tuple(meta["shape"]), base + begin, base + end)
  return out


def map_tensor(info: TensorInfo) -> np.ndarray:
  """A read-only memory map of one tensor (its pages are read when first touched)."""
  if info.dtype not in SAFETENSORS_DTYPES:
    raise GleamError(f"{info.file}: tensor dtype {info.dtype} is not supported; convert the checkpoint to "
                     "bfloat16, float16 or float32.")
  dtype = np.dtype(SAFETENSORS_DTYPES[info.dtype])
  if int(np.prod(info.shape)) * dtype.itemsize != info.end - info.begin:
    raise GleamError(f"{info.file}: a tensor of shape {list(info.shape)} {info.dtype} spans "
                     f"{info.end - info.begin} bytes; the file is corrupt, re-download it.")
  if os.path.getsize(info.file) < info.end:
    raise GleamError(f"{info.file} ends before its tensor data does; the file is truncated, re-download it.")
  if info.end == info.begin:
    return np.zeros(info.shape, dtype)
  return np.memmap(info.file, dtype, mode="r", offset=info.begin, shape=info.shape)


def prefetch(info: TensorInfo):
  """Asks the kernel to start reading a tensor's bytes into the page cache (returns at once)."""
  fd = os.open(info.file, os.O_RDONLY)
  try:
    os.posix_fadvise(fd, info.begin, info.end - info.begin, os.POSIX_FADV_WILLNEED)
  finally:
    os.close(fd)


def _owned_slice(host: np.ndarray, mapped: np.ndarray, idx) -> np.ndarray:
  """host[idx] for `jax.make_array_from_callback`. JAX on CPU adopts a C-contiguous NumPy buffer without
  copying, so a slice that still lies in the file mapping is copied: parameters must not change (or
  fault) when the checkpoint file is later rewritten. Strided slices are copied by JAX itself."""
  part = host[idx]
  if part.flags.c_contiguous and np.may_share_memory(part, mapped):
    return np.array(part)
  return part


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors files of a HF model directory (from the shard index when there is one)."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    missing = [n for n in names if not os.path.isfile(os.path.join(directory, n))]
    if missing:
      raise GleamError(f"{index} names shard files that are not in {directory}: {missing}; download them.")
    return [os.path.join(directory, n) for n in names]
  if os.path.isfile(directory) and directory.endswith(".safetensors"):
    return [directory]
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")) if os.path.isdir(directory) else []
  if not files:
    raise GleamError(f"No *.safetensors weights in {directory!r}; give the path of a downloaded Qwen2.5-VL "
                     "checkpoint directory (convert .bin checkpoints with save_pretrained(safe_serialization=True)).")
  return [os.path.join(directory, n) for n in files]


def checkpoint_index(directory: str) -> dict[str, TensorInfo]:
  """Every tensor of the checkpoint, from the file headers."""
  index = {}
  for file in checkpoint_files(directory):
    for name, info in read_header(file).items():
      if name in index:
        raise GleamError(f"Tensor {name} appears in both {index[name].file} and {file}; remove the stray file.")
      index[name] = info
  return index


def hf_module_path(key: str) -> tuple | None:
  """'model.language_model.layers.3.mlp.up_proj.weight' -> (('language_model', 'layers', 3, 'mlp',
  'up_proj'), 'weight'), for both key layouts; None for a key of no known layout."""
  for prefix, root in (("model.language_model.", "language_model."), ("model.visual.", "visual."),
                       ("visual.", "visual."), ("model.", "language_model."), ("lm_head.", "lm_head.")):
    if key.startswith(prefix):
      key = root + key[len(prefix):]
      break
  else:
    return None
  *module, leaf = key.split(".")
  return tuple(int(p) if p.isdigit() else p for p in module), leaf


def hf_key(path: tuple) -> str:
  """The checkpoint key of an NNX parameter in the old layout (the released checkpoints'; what
  transformers 5 writes): ('language_model', 'layers', 3, 'mlp', 'up_proj', 'kernel') ->
  'model.layers.3.mlp.up_proj.weight'. `hf_module_path` reads it back."""
  root, *module = path[:-1]
  return ".".join([{"language_model": "model"}.get(root, root), *map(str, module),
                   "bias" if path[-1] == "bias" else "weight"])


def _to_ours(array: np.ndarray, leaf: str, target_shape) -> np.ndarray:
  """A torch-layout tensor -> the NNX leaf layout (a view where possible)."""
  if leaf == "kernel" and array.ndim == 5:  # Conv3d (out, C, T, P, P) with stride == kernel
    return array.reshape(array.shape[0], -1).T
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  return array


def _to_hf(array: np.ndarray, leaf: str, hf_shape) -> np.ndarray:
  """The inverse of `_to_ours`: an NNX leaf -> its torch layout `hf_shape` (`_hf_shape`), C-contiguous."""
  if leaf == "kernel":
    array = array.T
  return np.ascontiguousarray(array).reshape(hf_shape)


def _hf_shape(leaf: str, target_shape, stored_ndim: int, vision) -> tuple:
  """The shape a parameter of `target_shape` has in a checkpoint (torch layout; see `_to_ours`)."""
  if leaf == "kernel" and stored_ndim == 5:  # Conv3d (out, C, T, P, P)
    return (target_shape[1], vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
  if leaf == "kernel" and stored_ndim == 2:
    return tuple(reversed(target_shape))
  return tuple(target_shape)


def _plan(index: dict[str, TensorInfo], targets: dict, cfg: config_lib.Qwen2_5_VLConfig) -> dict:
  """(NNX path -> HF key) after checking, from the headers, that every key and every parameter is
  accounted for, with the right shape and a float dtype."""
  tied = cfg.tie_word_embeddings
  plan, unused, bad_shapes, twice, bad_dtypes = {}, [], [], [], []
  for key, info in index.items():
    if _IGNORED.search(key):
      continue
    if tied and key == "lm_head.weight":
      logging.info("Tied embeddings: %s in the checkpoint is not used (lm_head = embed_tokens).", key)
      continue
    parsed = hf_module_path(key)
    path = None
    if parsed is not None:
      module, leaf = parsed
      names = ("bias",) if leaf == "bias" else ("kernel", "scale", "embedding") if leaf == "weight" else ()
      path = next((module + (n,) for n in names if module + (n,) in targets), None)
    if path is None:
      unused.append(key)
      continue
    want = _hf_shape(path[-1], tuple(targets[path].shape), len(info.shape), cfg.vision)
    if tuple(info.shape) != want:
      bad_shapes.append(f"{key} {list(info.shape)} (expected {list(want)} for {'.'.join(map(str, path))})")
    if info.dtype not in FLOAT_DTYPES:
      bad_dtypes.append(f"{key} {info.dtype}")
    if path in plan:
      twice.append(f"{plan[path]} and {key}")
    plan[path] = key
  missing = [".".join(map(str, p)) for p in targets if p not in plan]
  problems = []
  if unused:
    problems.append(f"{len(unused)} checkpoint keys match no model parameter: {_some(unused)}")
  if missing:
    hint = " (an untied lm_head needs lm_head.weight; set tie_word_embeddings to match the checkpoint)" \
        if "lm_head.kernel" in missing else ""
    problems.append(f"{len(missing)} model parameters are not in the checkpoint: {_some(missing)}{hint}")
  if bad_shapes:
    problems.append(f"{len(bad_shapes)} tensors have the wrong shape: {_some(bad_shapes)}")
  if twice:
    problems.append(f"{len(twice)} parameters are given twice (old and new key layout mixed): {_some(twice)}")
  if bad_dtypes:
    problems.append(f"{len(bad_dtypes)} tensors are not stored as float32, bfloat16 or float16 (convert them): "
                    f"{_some(bad_dtypes)}")
  if problems:
    raise GleamError("The checkpoint does not fit the Qwen2.5-VL config: " + "; ".join(problems) +
                     ". Use the config.json that came with these weights.")
  return plan


def _some(items, n=8):
  items = sorted(items)
  return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _progress_log(total: int, message: str):
  """`advance(nbytes)`: logs `message` % (GB done, GB in all, MB/s, ETA) every 10 s and at the end."""
  progress, done, last_log = RateEta(total), 0, time.perf_counter()

  def advance(nbytes):
    nonlocal done, last_log
    done += nbytes
    if done == total or time.perf_counter() - last_log > 10:
      last_log = time.perf_counter()
      rate, eta = progress.update(done)
      logging.info(message, done / 1e9, total / 1e9, rate / 1e6, format_eta(eta))
  return advance


def load_into(abstract: modeling.Qwen2_5_VL, directory: str, shardings=None,
              mesh=None, rules=config_lib.QWEN_SHARDING_RULES, threads: int = 4) -> modeling.Qwen2_5_VL:
  """Fills an abstract model (`modeling.abstract_model`) with the checkpoint's tensors.

  `shardings`: a nested dict of `jax.sharding.Sharding` shaped like `nnx.to_pure_dict(nnx.state(model))`
  (e.g. `train.sharding.state_shardings`); without it, from `mesh` and the logical axis `rules`;
  without a mesh, everything goes to the first local device. `threads` tensors are placed at once
  (host memory: the model plus about `threads` tensors).
  """
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  not_params = [".".join(map(str, p)) for p, v in flat.items() if not isinstance(v, nnx.Param)]
  if not_params:
    raise ValueError(f"load_into fills nnx.Param leaves only; the model also has {_some(not_params)}.")
  if shardings is None:
    shardings = sharding_lib.state_shardings(state, mesh or sharding_lib.single_device_mesh(), rules)
  flat_shardings = traverse_util.flatten_dict(shardings)
  targets = {p: v.get_value() for p, v in flat.items()}
  index = checkpoint_index(directory)
  plan = _plan(index, targets, abstract.cfg)

  total = sum(index[k].end - index[k].begin for k in plan.values())
  read = _progress_log(total, "Qwen2.5-VL weights: %.2f / %.2f GB read (%.0f MB/s, ETA %s)")
  order = sorted(plan.items(), key=lambda kv: (index[kv[1]].file, index[kv[1]].begin))

  def place(i):
    path, key = order[i]
    if i + 1 < len(order):
      prefetch(index[order[i + 1][1]])  # the kernel reads ahead while this tensor is placed
    target = targets[path]
    mapped = map_tensor(index[key])
    host = _to_ours(mapped, path[-1], target.shape).astype(target.dtype, copy=False)
    array = jax.make_array_from_callback(target.shape, flat_shardings[path],
                                         lambda idx: _owned_slice(host, mapped, idx))
    return jax.block_until_ready(array)  # the mapping is dropped on return: its pages leave our RSS

  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    for (path, key), array in zip(order, pool.map(place, range(len(order)))):
      flat[path].set_value(array)
      read(index[key].end - index[key].begin)
  return nnx.merge(graphdef, state)


def load_pretrained(directory: str, cfg: config_lib.Qwen2_5_VLConfig | None = None, *, mesh=None,
                    rules=config_lib.QWEN_SHARDING_RULES, shardings=None,
                    param_dtype: str | None = None, threads: int = 4) -> modeling.Qwen2_5_VL:
  """A `Qwen2_5_VL` with the weights of a local Hugging Face directory (config from its config.json
  unless `cfg` is given; `param_dtype` overrides the stored parameter dtype, e.g. 'bfloat16').
  See `load_into` for `shardings`, `mesh`, `rules` and `threads`."""
  cfg = cfg or config_lib.from_pretrained_dir(directory)
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=param_dtype)
  return load_into(modeling.abstract_model(cfg), directory, shardings=shardings, mesh=mesh, rules=rules,
                   threads=threads)


def _config_differences(a: config_lib.Qwen2_5_VLConfig, b: config_lib.Qwen2_5_VLConfig) -> list[str]:
  """The fields ('text.hidden_size', 'tie_word_embeddings', ...) in which two configs differ; the
  compute and parameter dtypes and remat aside (they are not part of a checkpoint)."""
  out = []
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if field.name in ("dtype", "param_dtype", "remat"):
      continue
    if dataclasses.is_dataclass(x):
      out += [f"{field.name}.{f.name}" for f in dataclasses.fields(x) if getattr(x, f.name) != getattr(y, f.name)]
    elif x != y:
      out.append(field.name)
  return out


def hf_config_dict(cfg: config_lib.Qwen2_5_VLConfig, dtype: str, source_dir: str | None = None) -> dict:
  """config.json of a checkpoint of `cfg` stored in `dtype`: `source_dir`'s config.json (fields we do
  not model kept; GleamError if it describes another model), or one written from `cfg`."""
  if source_dir is None:
    out = config_lib.to_hf(cfg).to_diff_dict()
    out["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
  else:
    differ = _config_differences(config_lib.from_pretrained_dir(source_dir), cfg)
    if differ:
      raise GleamError(f"{os.path.join(source_dir, 'config.json')} describes another model than the one exported "
                       f"({', '.join(differ)} differ); give the directory the model was loaded from.")
    with open(os.path.join(source_dir, "config.json")) as f:
      out = json.load(f)
  out["dtype"] = dtype
  for sub in (out, out.get("text_config") or {}, out.get("vision_config") or {}):
    for key in ("dtype", "torch_dtype"):  # torch_dtype: what transformers 4 wrote and reads
      if key in sub:
        sub[key] = dtype
  return out


def shard_names(n: int) -> list[str]:
  """The safetensors file names of a checkpoint in `n` shards, as transformers names them."""
  return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def shard_by_size(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """The indices of tensors of `sizes` bytes, in order, grouped into shards of at most `max_shard_bytes`
  (a larger tensor gets a shard of its own)."""
  shards, total = [[]], 0
  for i, nbytes in enumerate(sizes):
    if shards[-1] and total + nbytes > max_shard_bytes:
      shards.append([])
      total = 0
    shards[-1].append(i)
    total += nbytes
  return shards


def safetensors_header(entries) -> bytes:
  """The start of a safetensors file holding tensors (key, dtype code, shape, bytes) in this order: the
  8-byte little-endian header length and the JSON header, padded so that the data starts 8-byte
  aligned (as the safetensors library writes). The tensors' bytes follow, in the same order."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, code, shape, nbytes in entries:
    header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  return len(blob).to_bytes(8, "little") + blob


def write_index(directory: str, weight_map: dict, total: int, parameters: int | None = None) -> None:
  """model.safetensors.index.json: which file holds each tensor, as transformers writes it."""
  metadata = {"total_size": total} if parameters is None else {"total_parameters": parameters, "total_size": total}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def _export_layout(values: dict, cfg: config_lib.Qwen2_5_VLConfig, dtype, max_shard_bytes: int) -> list:
  """[(file name, [(NNX path, key, torch-layout shape, safetensors dtype, bytes), ...])]: the shards of at
  most `max_shard_bytes` (a larger tensor gets one of its own), checked as `load_pretrained` checks a
  checkpoint's headers (every parameter once, the shapes, the dtypes)."""
  entries = []
  for path, value in values.items():
    out = np.dtype(value.dtype) if dtype is None else dtype
    ndim = 5 if path == PATCH_EMBED_KERNEL else len(value.shape)
    shape = _hf_shape(path[-1], tuple(value.shape), ndim, cfg.vision)
    entries.append((path, hf_key(path), shape, _DTYPE_CODES[out], math.prod(shape) * out.itemsize))
  shards = [[entries[i] for i in shard] for shard in shard_by_size([e[-1] for e in entries], max_shard_bytes)]
  layout = list(zip(shard_names(len(shards)), shards))
  _plan({key: TensorInfo(file, code, shape, 0, nbytes) for file, shard in layout
         for _, key, shape, code, nbytes in shard}, values, cfg)
  return layout


def _write_shard(file: str, entries: list, values: dict, dtype, written) -> None:
  """One safetensors file (8-byte little-endian header length, JSON header, the tensors' bytes), the
  tensors gathered to the host and written one at a time; `written(nbytes)` after each."""
  with open(file, "wb") as f:
    f.write(safetensors_header([(key, code, shape, nbytes) for _, key, shape, code, nbytes in entries]))
    for path, _, shape, _, nbytes in entries:
      host = np.asarray(jax.device_get(values[path]))
      array = _to_hf(host if dtype is None else host.astype(dtype), path[-1], shape)
      assert array.nbytes == nbytes, (path, array.shape, array.dtype)
      f.write(array.reshape(-1).view(np.uint8).data)  # little-endian, as safetensors stores
      written(nbytes)




def _copy_model_files(source_dir: str, directory: str) -> list[str]:
  """Copies the tokenizer, processor, chat-template and other files of a model directory: every file
  but the weights, their index and config.json (hidden files and folders stay behind)."""
  copied = []
  for name in sorted(os.listdir(source_dir)):
    source = os.path.join(source_dir, name)
    if name.startswith(".") or name == "config.json" or WEIGHT_FILE.search(name) or not os.path.isfile(source):
      continue
    shutil.copyfile(source, os.path.join(directory, name))
    copied.append(name)
  return copied


def save_pretrained(model: modeling.Qwen2_5_VL, directory: str, *, source_dir: str | None = None,
                    dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                    overwrite: bool = False) -> tuple[int, int]:
  """Writes `model` as a Hugging Face Qwen2.5-VL directory that `load_pretrained` and transformers'
  `Qwen2_5_VLForConditionalGeneration.from_pretrained` read: safetensors weights (old key layout, the
  parameters' dtype or `dtype`: 'float32', 'bfloat16', 'float16'), config.json and, from `source_dir`
  (the model's Hugging Face directory), its config.json's other fields and its tokenizer and processor
  files. A directory holding weights is refused unless `overwrite` (its weight files are replaced).
  Every parameter must be addressable from this process. Returns (bytes of weights, files written)."""
  cast = export_dtype(dtype)
  if max_shard_bytes <= 0:
    raise GleamError(f"max_shard_bytes={max_shard_bytes} must be positive.")
  check_export_dir(directory, source_dir, bool(overwrite))
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  not_params = [".".join(map(str, p)) for p, v in flat.items() if not isinstance(v, nnx.Param)]
  if not_params:
    raise ValueError(f"save_pretrained writes nnx.Param leaves only; the model also has {_some(not_params)}.")
  values = {p: v.get_value() for p, v in flat.items()}
  layout = _export_layout(values, model.cfg, cast, max_shard_bytes)
  stored = np.dtype(next(iter(values.values())).dtype) if cast is None else cast
  config = hf_config_dict(model.cfg, stored.name, source_dir)
  make_dir(directory, "the export directory")
  for name in weight_files(directory):  # overwrite: no stale shard may stay next to the new ones
    os.remove(os.path.join(directory, name))
  total = sum(nbytes for _, shard in layout for *_, nbytes in shard)
  written = _progress_log(total, "Qwen2.5-VL export: %.2f / %.2f GB written (%.0f MB/s, ETA %s)")
  for file, entries in layout:
    _write_shard(os.path.join(directory, file), entries, values, cast, written)
  if len(layout) > 1:
    write_index(directory, {entry[1]: file for file, shard in layout for entry in shard}, total,
                sum(math.prod(v.shape) for v in values.values()))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  if source_dir is not None:
    logging.info("Qwen2.5-VL export: copied %s from %s", ", ".join(_copy_model_files(source_dir, directory)),
                 source_dir)
  return total, len(layout)
