"""Qwen2.5-VL generation: our jitted KV-cache decoding vs transformers' PyTorch `generate`, same weights.

  python -m gleam_jax.bench.generate                    # 4 x 512 decoder, 448x448 image, 32 new tokens, batch 1, 8
  python -m gleam_jax.bench.generate --new_tokens=8 --batch_sizes=1 --out=   # a quick check, no file written

A small Qwen2.5-VL (vision tower 4 x 256, decoder 4 x 512, vocabulary 32768) with random weights is
built in PyTorch, saved as a Hugging Face checkpoint and loaded into ours with `params.load_pretrained`.
Every row of a batch holds one 448x448 image (256 merged tokens) and some text. Both sides decode
greedily in float32 (transformers: eager attention, dynamic cache, `torch.set_num_threads`; ours: XLA on
the same CPU threads). For each side, in one run:

  prefill     from the call of `generate` to the first new token (host preprocessing, vision tower, prompt)
  decode      from the first to the last new token, per step (time stamps from our streaming callback and
              from a transformers streamer, within the same `generate` call)
  compile     (ours) first call minus a warm call, for both jitted functions together

Times are the best of `--repeats` warm runs. The tokens of both sides are compared.
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
_THREADS = flags.DEFINE_list("torch_threads", ["2", "1"],
                             "torch.set_num_threads settings for the reference (one table row each).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm runs per measurement; the best is reported.")
_OUT = flags.DEFINE_string("out", "docs/bench_generate.md", "Markdown file for the figures ('' = none).")


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
  import numpy as np
  import torch
  import transformers

  import jax
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
  rows = []
  for batch in [int(b) for b in _BATCH.value]:
    ids, mask, pixels, grids = make_inputs(cfg, batch, np.random.default_rng(batch))

    def run_ours():
      stamps = [time.perf_counter()]
      tokens = generation.generate(ours, ids, mask, pixels, grids, max_new_tokens=n, eos_token_ids=(),
                                   callback=lambda step, toks: stamps.append(time.perf_counter()))
      return stamps, tokens

    def run_torch():
      stamps = [time.perf_counter()]
      with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
            image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == cfg.image_token_id) * 1),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
            streamer=TimeStamps(stamps))
      return stamps[:1] + stamps[2:], out[:, ids.shape[1]:].numpy()  # stamps[1]: the prompt, before prefill

    threads = [int(t) for t in _THREADS.value]
    first, _ = run_ours()
    ours_runs, torch_runs = [], {t: [] for t in threads}
    for _ in range(_REPEATS.value):  # interleaved, so that every side sees the same machine load
      ours_runs.append(run_ours())
      for t in threads:
        torch.set_num_threads(t)
        torch_runs[t].append(run_torch())
    ours_prefill, ours_step, ours_tokens = best(ours_runs, n)
    compile_s = (first[1] - first[0] - ours_prefill) + (first[2] - first[1] - ours_step)
    length = ids.shape[1]
    for t in threads:
      torch_prefill, torch_step, torch_tokens = best(torch_runs[t], n)
      same = bool(np.array_equal(ours_tokens, torch_tokens))
      agree = float((ours_tokens == torch_tokens).mean())
      row = dict(batch=batch, threads=t, prompt=length, ours_prefill=batch * length / ours_prefill,
                 torch_prefill=batch * length / torch_prefill, ours_decode=batch / ours_step,
                 torch_decode=batch / torch_step, compile_s=compile_s, same=same, agree=agree)
      rows.append(row)
      print(f"batch {batch}, torch threads {t}: prompt {length} tokens, {n} new | prefill "
            f"{row['ours_prefill']:.0f} vs {row['torch_prefill']:.0f} tok/s "
            f"({row['ours_prefill'] / row['torch_prefill']:.2f}x) | decode {row['ours_decode']:.1f} vs "
            f"{row['torch_decode']:.1f} tok/s ({row['ours_decode'] / row['torch_decode']:.2f}x) | compile "
            f"{compile_s:.1f} s | tokens identical: {same} ({agree:.0%} agree)", flush=True)
  if _OUT.value:
    write_markdown(_OUT.value, cfg, rows, n)
    print(f"wrote {_OUT.value}")


def write_markdown(path, cfg, rows, n):
  import jax
  import torch
  v, t = cfg.vision, cfg.text
  lines = [
      "# Qwen2.5-VL generation: ours (JAX, jitted KV cache) vs transformers `generate` (PyTorch)",
      "",
      "`python -m gleam_jax.bench.generate` (figures below from one run). Machine: 2-core CPU dev box, shared "
      "with other jobs during the measurement, so absolute numbers are noisy; both sides were measured "
      "side by side in the same process, best of "
      f"{_REPEATS.value} warm runs each (runs interleaved). jax {jax.__version__} (XLA CPU, its default thread "
      f"pool), torch {torch.__version__} (eager attention, `set_num_threads` as in the table), float32 on "
      "both sides, greedy decoding. On this oversubscribed box torch with 2 threads loses much more to "
      "contention than with 1 thread, so both settings are shown.",
      "",
      f"Model (random weights, same for both): vision tower {v.depth} x {v.hidden_size} "
      f"(window {v.window_size} px, full attention in block {list(v.fullatt_block_indexes)}), decoder "
      f"{t.num_hidden_layers} x {t.hidden_size} ({t.num_attention_heads} heads, {t.num_key_value_heads} KV "
      f"heads, MLP {t.intermediate_size}), vocabulary {t.vocab_size}. Each row: one {_IMAGE.value}x{_IMAGE.value} "
      f"image (256 merged tokens) + {_TEXT.value} text tokens; {n} new tokens.",
      "",
      "| batch | torch threads | prompt tokens | prefill tok/s ours | prefill tok/s torch | prefill ratio | "
      "decode tok/s ours | decode tok/s torch | decode ratio | compile (s, ours) | same tokens |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    same = "yes" if r["same"] else f"no ({r['agree']:.0%} agree)"
    lines.append(
        f"| {r['batch']} | {r['threads']} | {r['prompt']} | {r['ours_prefill']:.0f} | {r['torch_prefill']:.0f} | "
        f"{r['ours_prefill'] / r['torch_prefill']:.2f}x | {r['ours_decode']:.1f} | {r['torch_decode']:.1f} | "
        f"{r['ours_decode'] / r['torch_decode']:.2f}x | {r['compile_s']:.1f} | "
        f"{same} |")
  lines += [
      "",
      "prefill = from the call of `generate` to the first new token (host preprocessing, vision tower, "
      "prompt), prompt tokens of all rows per second; decode = from the first to the last new token "
      f"({n - 1} steps), new tokens of all rows per second; both from time stamps within one `generate` "
      "call (our streaming callback, a transformers streamer). Compile = first call minus a warm call "
      "(the prefill and the single decode-step function), not included in the rates.",
      "",
  ]
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
