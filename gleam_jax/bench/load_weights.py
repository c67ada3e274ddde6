"""Loading a Qwen2.5-VL-3B-shaped checkpoint: our `params.load_pretrained` vs transformers' `from_pretrained`.

  python -m gleam_jax.bench.load_weights                 # 3B shape, ~7.5 GB of bfloat16 on disk
  python -m gleam_jax.bench.load_weights --model=tiny    # seconds; checks that the bench runs

Writes random bfloat16 weights with the real checkpoint's key names (old layout, tied embeddings, no
lm_head) into sharded safetensors files tensor by tensor (never the whole model in memory), then
loads them in fresh subprocesses, one after the other, each doing only the load: ours (bfloat16
parameters on one CPU device) and, with --reference, `Qwen2_5_VLForConditionalGeneration.
from_pretrained(dtype=torch.bfloat16)`. Before each load the files are dropped from the page cache
(posix_fadvise DONTNEED on our own files) unless --warm. A --dir that already holds a checkpoint
(from an earlier --keep run) is reused and left in place. Reports wall time, peak resident memory
(VmHWM, i.e. ru_maxrss of the fresh process image), the memory the process had before loading, peak / checkpoint bytes, and the ratios
ours / transformers. The checkpoint is deleted afterwards unless --keep.
"""
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_MODEL = flags.DEFINE_enum("model", "qwen2_5_vl_3b", ["qwen2_5_vl_3b", "tiny"], "Model shape to write.")
_DIR = flags.DEFINE_string("dir", None, "Where to write the checkpoint (default: a new folder in /tmp).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 2.0, "Largest safetensors file, in GB.")
_REFERENCE = flags.DEFINE_bool("reference", True, "Also time transformers' from_pretrained.")
_WARM = flags.DEFINE_bool("warm", False, "Keep the files in the page cache (no fadvise DONTNEED).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the checkpoint on disk.")
_CHILD = flags.DEFINE_enum("child", None, ["ours", "transformers"], "Internal: run one load and print JSON.")

DTYPE_BYTES = 2  # bfloat16


def hf_config_dict(cfg) -> dict:
  """A `Qwen2_5_VLConfig` dict (as the real config.json, nested) for our config, stored in bfloat16."""
  from gleam_jax.models.qwen2_5_vl import params  # pylint: disable=g-import-not-at-top
  return params.hf_config_dict(cfg, "bfloat16")


def checkpoint_tensors(config_dict) -> list[tuple[str, tuple[int, ...]]]:
  """(name, shape) of every stored tensor, as the released checkpoints name them (`model.layers.*`,
  `visual.*`; no lm_head when tied), from transformers' model built on the meta device."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**config_dict))
  out = []
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and config_dict["tie_word_embeddings"]:
      continue
    name = name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
    out.append((name, tuple(tensor.shape)))
  return out


def write_checkpoint(directory, tensors, max_shard_bytes, seed=0):
  """Sharded bfloat16 safetensors + index, streamed tensor by tensor from a 64 MB random pool."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gleam_jax.models.qwen2_5_vl import params  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  pool = (rng.standard_normal(32 * 2**20, np.float32) * 0.02).astype(ml_dtypes.bfloat16).view(np.uint8)
  entries = [(name, shape, int(np.prod(shape)) * DTYPE_BYTES) for name, shape in tensors]
  shards = [[entries[i] for i in shard] for shard in params.shard_by_size([e[2] for e in entries], max_shard_bytes)]
  weight_map, total = {}, 0
  for file, shard in zip(params.shard_names(len(shards)), shards):
    weight_map.update((name, file) for name, _, _ in shard)
    with open(os.path.join(directory, file), "wb") as f:
      f.write(params.safetensors_header([(name, "BF16", shape, nbytes) for name, shape, nbytes in shard]))
      for _, _, nbytes in shard:
        while nbytes:
          start = int(rng.integers(0, pool.size // 2)) & ~1
          n = min(nbytes, pool.size - start)
          f.write(pool[start:start + n].data)
          nbytes -= n
      f.flush()
      os.fsync(f.fileno())
    total += sum(nbytes for _, _, nbytes in shard)
  params.write_index(directory, weight_map, total)
  return total, len(shards)


def drop_from_page_cache(directory):
  for name in os.listdir(directory):
    fd = os.open(os.path.join(directory, name), os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _max_rss_bytes():
  """Peak resident memory of this process image: VmHWM, which starts afresh at exec (ru_maxrss keeps
  the high-water mark of the process that spawned us)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_ours(directory):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from gleam_jax.models.qwen2_5_vl import params  # pylint: disable=g-import-not-at-top
  jax.devices()
  before = _max_rss_bytes()
  t0 = time.perf_counter()
  model = params.load_pretrained(directory, param_dtype="bfloat16")
  jax.block_until_ready(nnx.state(model))
  seconds = time.perf_counter() - t0
  leaves = jax.tree.leaves(nnx.state(model))
  return dict(seconds=seconds, peak_rss=_max_rss_bytes(), rss_before=before,
              param_bytes=sum(x.nbytes for x in leaves), dtypes=sorted({str(x.dtype) for x in leaves}))


def child_transformers(directory):
  """from_pretrained memory-maps the files and returns before reading most of them; the weights are
  then read on first use. So both moments are reported: when it returns, and after one read of every
  weight (one element per 4 KB page), which is when the model is usable at full speed."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  before = _max_rss_bytes()
  t0 = time.perf_counter()
  model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      directory, dtype=torch.bfloat16, local_files_only=True)
  returned, returned_rss = time.perf_counter() - t0, _max_rss_bytes()
  with torch.no_grad():
    for p in model.parameters():
      p.view(-1)[::2048].float().sum()
  seconds = time.perf_counter() - t0
  return dict(seconds=seconds, peak_rss=_max_rss_bytes(), rss_before=before, returned_seconds=returned,
              returned_rss=returned_rss,
              param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
              dtypes=sorted({str(p.dtype) for p in model.parameters()}))


def run_child(kind, directory, warm):
  if not warm:
    drop_from_page_cache(directory)
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  cmd = [sys.executable, "-m", "gleam_jax.bench.load_weights", f"--child={kind}", f"--dir={directory}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{kind} load failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    result = child_ours(_DIR.value) if _CHILD.value == "ours" else child_transformers(_DIR.value)
    print(json.dumps(result))
    return
  from gleam_jax.models.qwen2_5_vl import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.get(_MODEL.value)
  directory = _DIR.value or tempfile.mkdtemp(prefix="gleam_load_weights_", dir="/tmp")
  os.makedirs(directory, exist_ok=True)
  config_dict = hf_config_dict(cfg)
  index_file = os.path.join(directory, "model.safetensors.index.json")
  written = False  # only a checkpoint this run wrote is deleted afterwards
  try:
    if os.path.isfile(index_file):  # a checkpoint kept by an earlier --keep run
      with open(index_file) as f:
        index = json.load(f)
      total, n_files = index["metadata"]["total_size"], len(set(index["weight_map"].values()))
      print(f"reusing the checkpoint in {directory}")
    else:
      tensors = checkpoint_tensors(config_dict)
      need = sum(math.prod(s) for _, s in tensors) * DTYPE_BYTES
      free = shutil.disk_usage(directory).free
      if free < need * 1.1:
        raise SystemExit(f"{directory} has {free / 1e9:.1f} GB free; the checkpoint needs {need / 1e9:.1f} GB.")
      written = True
      with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
      t0 = time.perf_counter()
      total, n_files = write_checkpoint(directory, tensors, int(_SHARD_GB.value * 1e9))
      print(f"wrote {len(tensors)} tensors, {total / 1e9:.2f} GB bfloat16 in {n_files} files to {directory} "
            f"({time.perf_counter() - t0:.1f} s)")
    results = {"ours": run_child("ours", directory, _WARM.value)}
    if _REFERENCE.value:
      results["transformers"] = run_child("transformers", directory, _WARM.value)
  finally:
    if written and not _KEEP.value:
      shutil.rmtree(directory, ignore_errors=True)
  cache = "warm page cache" if _WARM.value else "cold page cache (fadvise DONTNEED)"
  print(f"\nmodel={_MODEL.value}  checkpoint={total / 1e9:.2f} GB in {n_files} files  {cache}")
  print("| loader | time (s) | peak RSS (GB) | RSS before load (GB) | peak RSS / checkpoint | params (GB) |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, r in results.items():
    print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['rss_before'] / 1e9:.2f} | "
          f"{r['peak_rss'] / total:.2f}x | {r['param_bytes'] / 1e9:.2f} {','.join(r['dtypes'])} |")
  if "transformers" in results:
    o, t = results["ours"], results["transformers"]
    print(f"(transformers' from_pretrained itself returned after {t['returned_seconds']:.1f} s at "
          f"{t['returned_rss'] / 1e9:.2f} GB peak RSS, before reading most weights from the memory map; "
          "the row above is after one read of every weight)")
    print(f"\nours / transformers: time {o['seconds'] / t['seconds']:.2f}x, "
          f"peak RSS {o['peak_rss'] / t['peak_rss']:.2f}x")
  print(f"ours: peak RSS / checkpoint bytes = {results['ours']['peak_rss'] / total:.2f} (target <= 1.3)")


if __name__ == "__main__":
  app.run(main)
