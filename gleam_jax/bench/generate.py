"""Qwen2.5-VL generation: our jitted KV-cache decoding vs transformers' PyTorch `generate`, same weights.

  python -m gleam_jax.bench.generate                    # 4 x 512 decoder, 448x448 image, 32 new tokens, batch 1, 8
  python -m gleam_jax.bench.generate --new_tokens=8 --batch_sizes=1 --repeats=1 --out=   # a quick check

A small Qwen2.5-VL (vision tower 4 x 256, decoder 4 x 512, vocabulary 32768) with random weights is
built in PyTorch, saved as a Hugging Face checkpoint and loaded into ours with `params.load_pretrained`.
Every row of a batch holds one 448x448 image (256 merged tokens) and some text. Both sides decode
greedily in float32. Ours runs with `chunk` decode steps per compiled loop (`--chunk`, the default of
`generate`) and, for comparison, with chunk=1 (one dispatch and host round trip per token). The
reference runs with every `--torch_threads` setting (`torch.set_num_threads`) and both attention
implementations (eager, sdpa); ours is compared with the fastest of them. For each run, in one process:

  prefill     from the call of `generate` to the first new token (host preprocessing, vision tower, prompt)
  decode      from the first to the last new token, per step (time stamps from our streaming callback and
              from a transformers streamer, within the same `generate` call)
  compile     (ours) first call minus the best warm call

Times are the best of `--repeats` warm runs, interleaved over all settings so that each sees the same
machine load. The tokens of all runs are compared with ours.

On an accelerator, ours alone at a real size (random weights, no PyTorch), with the rate at which a
decode step reads the decoder's weights (what bounds decoding):

  python -m gleam_jax.bench.generate --torch=false --model=qwen2_5_vl_3b --dtype=bfloat16
"""
import os
import tempfile
import time

from absl import app
from absl import flags

_BATCH = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_NEW = flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row.")
_IMAGE = flags.DEFINE_integer("image_size", 448, "Image side in pixels (a multiple of 28).")
_TEXT = flags.DEFINE_integer("text_tokens", 24, "Text tokens per prompt besides the image.")
_CHUNK = flags.DEFINE_integer("chunk", 32, "Our decode steps per compiled loop (generate's `chunk`).")
_THREADS = flags.DEFINE_list("torch_threads", ["1", "2"], "torch.set_num_threads settings for the reference.")
_ATTN = flags.DEFINE_list("torch_attention", ["eager", "sdpa"], "transformers attention implementations.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm runs per setting; the best is reported.")
_OUT = flags.DEFINE_string("out", "docs/bench_generate.md", "Markdown file for the figures ('' = none).")
_TORCH = flags.DEFINE_bool("torch", True, "Compare with transformers (false: ours alone, e.g. on an accelerator).")
_MODEL = flags.DEFINE_enum("model", "bench", ["bench", "qwen2_5_vl_3b", "qwen2_5_vl_7b"],
                           "Model shape (random weights); real sizes only with --torch=false.")
_FUSE = flags.DEFINE_bool("fuse_projections", True, "generate's fuse_projections (with --torch=false).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our parameter and compute dtype "
                           "(with --torch=false).")


def bench_config():
  from gleam_jax.models.qwen2_5_vl import config
  return config.tiny(
      vision=config.VisionConfig(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, window_size=112,
                                 out_hidden_size=512, fullatt_block_indexes=(3,)),
      text=config.TextConfig(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                             max_position_embeddings=4096),
      image_token_id=32700, video_token_id=32701, vision_start_token_id=32702, vision_end_token_id=32703,
      eos_token_ids=(2,), pad_token_id=0)


def make_inputs(cfg, batch, rng):
  import numpy as np
  from gleam_jax.models.qwen2_5_vl import rope
  side = _IMAGE.value // cfg.vision.patch_size
  grids = np.tile([[1, side, side]], (batch, 1))
  n_image = rope.num_image_tokens(grids[:1], cfg.vision.spatial_merge_size)[0]
  rows = []
  for _ in range(batch):
    text = rng.integers(3, 32000, _TEXT.value)
    rows.append([*text[:4], cfg.vision_start_token_id, *[cfg.image_token_id] * n_image, cfg.vision_end_token_id,
                 *text[4:]])
  ids = np.asarray(rows, np.int64)
  pixels = rng.standard_normal((int(np.prod(grids, 1).sum()), cfg.vision.patch_dim)).astype(np.float32)
  return ids, np.ones_like(ids), pixels, grids


class TimeStamps:
  """A transformers streamer that records when each `put` (prompt, then every new token) happens."""

  def __init__(self, stamps):
    self.stamps = stamps

  def put(self, value):
    del value
    self.stamps.append(time.perf_counter())

  def end(self):
    pass


def best(runs, n):
  """(prefill seconds, seconds per decode step, tokens), best over runs of (time stamps, tokens); the
  stamps are [start, token 0, token 1, ..., token n-1]."""
  for stamps, _ in runs:
    assert len(stamps) == n + 1, len(stamps)
  prefill = min(stamps[1] - stamps[0] for stamps, _ in runs)
  step = min((stamps[-1] - stamps[1]) / (n - 1) for stamps, _ in runs)
  return prefill, step, runs[-1][1]


def main(argv):
  del argv
  if not _TORCH.value:
    return main_ours_alone()
  if _MODEL.value != "bench" or _DTYPE.value != "float32":
    raise app.UsageError("--model and --dtype choose the model of --torch=false; the comparison with "
                         "transformers runs the bench model in float32.")
  import numpy as np
  import torch
  import transformers

  from gleam_jax.models.qwen2_5_vl import config as config_lib
  from gleam_jax.models.qwen2_5_vl import generation, params

  torch.manual_seed(0)
  cfg = bench_config()
  reference = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
      config_lib.to_hf(cfg), attn_implementation="eager").eval()
  with torch.no_grad():  # wider embeddings than HF's init so that greedy decoding does not repeat one token
    reference.model.language_model.embed_tokens.weight.normal_(0, 0.5)
  with tempfile.TemporaryDirectory() as directory:
    reference.save_pretrained(directory)
    ours = params.load_pretrained(directory, cfg)
  n = _NEW.value
  ours_settings = sorted({_CHUNK.value, 1}, reverse=True)
  torch_settings = [(int(t), a) for t in _THREADS.value for a in _ATTN.value]
  load = [os.getloadavg()[0]]
  rows = []
  for batch in [int(b) for b in _BATCH.value]:
    ids, mask, pixels, grids = make_inputs(cfg, batch, np.random.default_rng(batch))

    def run_ours(chunk):
      stamps = [time.perf_counter()]
      tokens = generation.generate(ours, ids, mask, pixels, grids, max_new_tokens=n, eos_token_ids=(), chunk=chunk,
                                   callback=lambda step, toks: stamps.append(time.perf_counter()))
      return stamps, tokens

    def run_torch(threads, attention):
      torch.set_num_threads(threads)
      reference.set_attn_implementation(attention)
      stamps = [time.perf_counter()]
      with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
            image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == cfg.image_token_id) * 1),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
            streamer=TimeStamps(stamps))
      return stamps[:1] + stamps[2:], out[:, ids.shape[1]:].numpy()  # stamps[1]: the prompt, before prefill

    first = {c: run_ours(c)[0] for c in ours_settings}
    for s in torch_settings:  # warm-up: the first call of each setting
      run_torch(*s)
    runs = {("ours", c): [] for c in ours_settings} | {("torch",) + s: [] for s in torch_settings}
    for _ in range(_REPEATS.value):  # interleaved, so that every setting sees the same machine load
      for c in ours_settings:
        runs[("ours", c)].append(run_ours(c))
      for s in torch_settings:
        runs[("torch",) + s].append(run_torch(*s))
      load.append(os.getloadavg()[0])
    ours_tokens = runs[("ours", _CHUNK.value)][-1][1]
    length = ids.shape[1]
    for key, key_runs in runs.items():
      prefill, step, tokens = best(key_runs, n)
      row = dict(batch=batch, side=key[0], setting=key[1:], prompt=length, prefill=batch * length / prefill,
                 decode=batch / step, same=bool(np.array_equal(ours_tokens, tokens)),
                 agree=float((ours_tokens == tokens).mean()))
      if key[0] == "ours":
        first_stamps = first[key[1]]
        row["compile_s"] = (first_stamps[1] - first_stamps[0] - prefill) + (first_stamps[-1] - first_stamps[1]
                                                                            - step * (n - 1))
      rows.append(row)
      print(f"batch {batch} {describe(row)}: prefill {row['prefill']:.0f} tok/s, decode {row['decode']:.1f} tok/s, "
            f"tokens identical to ours: {row['same']} ({row['agree']:.0%})", flush=True)
    for line in ratio_lines(rows, batch):
      print(line, flush=True)
  if _OUT.value:
    write_markdown(_OUT.value, cfg, rows, n, load)
    print(f"wrote {_OUT.value}")


def main_ours_alone():
  """Ours alone on the default device: prefill and decode tokens/s, and the parameter bytes a decode
  step reads per second (decoding is bound by them)."""
  import jax
  import numpy as np
  from gleam_jax.models.qwen2_5_vl import config as config_lib
  from gleam_jax.models.qwen2_5_vl import generation, modeling
  base = bench_config() if _MODEL.value == "bench" else config_lib.get(_MODEL.value)
  cfg = base.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
  start = time.perf_counter()
  model = modeling.create_model(cfg)
  jax.block_until_ready(nnx_arrays(model))
  params = sum(x.size for x in nnx_arrays(model))
  # What a decode step reads: every parameter outside the vision tower, less an untied input embedding
  # (of which it reads one row per sequence).
  weight_bytes = sum(x.nbytes for x in nnx_arrays(model)) - sum(x.nbytes for x in nnx_arrays(model.visual))
  if not cfg.tie_word_embeddings:
    weight_bytes -= model.language_model.embed_tokens.embedding[...].nbytes
  print(f"{_MODEL.value} ({params / 1e9:.2f} B parameters, {_DTYPE.value}) on {jax.devices()[0].device_kind}: "
        f"initialised in {time.perf_counter() - start:.1f} s", flush=True)
  n = _NEW.value
  for batch in [int(b) for b in _BATCH.value]:
    ids, mask, pixels, grids = make_inputs(cfg, batch, np.random.default_rng(batch))
    runs = []
    for _ in range(_REPEATS.value + 1):  # the first call compiles
      stamps = [time.perf_counter()]
      generation.generate(model, ids, mask, pixels.astype(np.float32), grids, max_new_tokens=n,
                          eos_token_ids=(), chunk=_CHUNK.value, fuse_projections=_FUSE.value,
                          callback=lambda step, toks: stamps.append(time.perf_counter()))
      runs.append((stamps, None))
    prefill, step, _ = best(runs[1:], n)
    print(f"batch {batch}: prefill {batch * ids.shape[1] / prefill:.0f} tok/s, decode {batch / step:.1f} tok/s "
          f"({step * 1e3:.2f} ms per step, decoder weights read at {weight_bytes / step / 1e9:.0f} GB/s), "
          f"compile {runs[0][0][-1] - runs[0][0][0] - prefill - step * (n - 1):.1f} s", flush=True)


def nnx_arrays(model):
  import jax
  from flax import nnx
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def describe(row):
  if row["side"] == "ours":
    return f"ours, chunk {row['setting'][0]}"
  return f"torch, {row['setting'][0]} thread{'s' if row['setting'][0] > 1 else ''}, {row['setting'][1]}"


def ratio_lines(rows, batch):
  """Ours / the fastest torch setting, for prefill and decode (each with its own fastest setting)."""
  ours = [r for r in rows if r["batch"] == batch and r["side"] == "ours"]
  ref = [r for r in rows if r["batch"] == batch and r["side"] == "torch"]
  lines = []
  for metric in ("prefill", "decode"):
    top = max(ref, key=lambda r: r[metric])
    for r in ours:
      lines.append(f"batch {batch}: {metric} {describe(r)} / fastest torch ({describe(top)}): "
                   f"{r[metric]:.1f} / {top[metric]:.1f} = {r[metric] / top[metric]:.2f}x")
  return lines


def write_markdown(path, cfg, rows, n, load):
  import jax
  import torch
  v, t = cfg.vision, cfg.text
  lines = [
      "# Qwen2.5-VL generation: ours (JAX, jitted KV cache) vs transformers `generate` (PyTorch)",
      "",
      "`python -m gleam_jax.bench.generate` (figures below from one run). Machine: 2-core CPU dev box, shared "
      f"with other jobs (1-minute load average {min(load):.1f}-{max(load):.1f} during the run), so absolute numbers "
      "are noisy; all settings were measured side by side in the same process, best of "
      f"{_REPEATS.value} warm runs each, runs interleaved. jax {jax.__version__} (XLA CPU, its default thread "
      f"pool), torch {torch.__version__} (`set_num_threads` and attention implementation as in the table), "
      "float32 on both sides, greedy decoding.",
      "",
      f"Model (random weights, same for both): vision tower {v.depth} x {v.hidden_size} "
      f"(window {v.window_size} px, full attention in block {list(v.fullatt_block_indexes)}), decoder "
      f"{t.num_hidden_layers} x {t.hidden_size} ({t.num_attention_heads} heads, {t.num_key_value_heads} KV "
      f"heads, MLP {t.intermediate_size}), vocabulary {t.vocab_size}. Each row: one {_IMAGE.value}x{_IMAGE.value} "
      f"image (256 merged tokens) + {_TEXT.value} text tokens; {n} new tokens.",
      "",
      "| batch | run | prompt tokens | prefill tok/s | decode tok/s | compile (s) | same tokens as ours |",
      "|---:|---|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    same = "yes" if r["same"] else f"no ({r['agree']:.0%} agree)"
    compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
    lines.append(f"| {r['batch']} | {describe(r)} | {r['prompt']} | {r['prefill']:.0f} | {r['decode']:.1f} | "
                 f"{compile_s} | {same} |")
  lines += ["", "Ratios, ours / the fastest torch setting for that measurement:", ""]
  for batch in sorted({r["batch"] for r in rows}):
    lines += [f"- {line}" for line in ratio_lines(rows, batch)]
  lines += [
      "",
      "prefill = from the call of `generate` to the first new token (host preprocessing, vision tower, "
      "prompt), prompt tokens of all rows per second; decode = from the first to the last new token "
      f"({n - 1} steps), new tokens of all rows per second; both from time stamps within one `generate` "
      "call (our streaming callback, a transformers streamer). With chunk c our callback receives the tokens "
      "of each c decode steps when the compiled loop returns, so the decode rate includes every host round "
      "trip. Compile = first call minus the best warm call (prefill and decode loop), not included in the "
      "rates.",
      "",
  ]
  notes = ""  # a hand-written "## Notes" section of an earlier file is kept
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if "\n## Notes" in old:
      notes = old[old.index("\n## Notes") + 1:]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + notes)


if __name__ == "__main__":
  app.run(main)
