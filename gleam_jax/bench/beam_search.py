"""Qwen2.5-VL beam search: ours (`beam_search.beam_search`) vs transformers' `generate(num_beams=K)`.

  python -m gleam_jax.bench.beam_search                      # 4 beams, batch 1 and 4, 32 new tokens
  python -m gleam_jax.bench.beam_search --batch_sizes=1 --repeats=1 --new_tokens=8   # a quick check

The model and prompts of `bench.generate` (vision tower 4 x 256, decoder 4 x 512, vocabulary 32768,
random weights; each row one 448x448 image and 24 text tokens), float32 on both sides, no stop token,
so every hypothesis runs `--new_tokens` steps. transformers repeats each prompt for the beams before
its prefill (the vision tower and prompt run K times); ours runs them once per row and repeats the
KV cache. Timed: the whole call (prompt, vision tower and search), best of `--repeats` warm runs,
interleaved; the reference with each `--torch_threads` setting and both attention implementations,
ours compared with the fastest. The hypotheses of every run are compared with ours.
"""
import os
import tempfile
import time

from absl import app
from absl import flags

# bench.generate's model, prompts and flags (--batch_sizes, --new_tokens, --torch_threads,
# --torch_attention, --repeats, --image_size, --text_tokens)
from gleam_jax.bench.generate import bench_config, make_inputs

FLAGS = flags.FLAGS
_BEAMS = flags.DEFINE_integer("num_beams", 4, "Beams per row.")


def main(argv):
  del argv
  import numpy as np
  import torch
  import transformers

  from gleam_jax.models.qwen2_5_vl import beam_search, params
  from gleam_jax.models.qwen2_5_vl import config as config_lib

  torch.manual_seed(0)
  cfg = bench_config()
  reference = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
      config_lib.to_hf(cfg), attn_implementation="eager").eval()
  with torch.no_grad():  # as bench.generate: wider embeddings, so that answers do not repeat one token
    reference.model.language_model.embed_tokens.weight.normal_(0, 0.5)
  with tempfile.TemporaryDirectory() as directory:
    reference.save_pretrained(directory)
    ours = params.load_pretrained(directory, cfg)
  n, k = FLAGS.new_tokens, _BEAMS.value
  torch_settings = [(int(t), a) for t in FLAGS.torch_threads for a in FLAGS.torch_attention]
  load = [os.getloadavg()[0]]
  print(f"beam search, {k} beams, {n} new tokens per hypothesis, float32; the whole call timed", flush=True)
  for batch in [int(b) for b in FLAGS.batch_sizes]:
    ids, mask, pixels, grids = make_inputs(cfg, batch, np.random.default_rng(batch))

    def run_ours():
      start = time.perf_counter()
      tokens, _ = beam_search.beam_search(ours, ids, mask, pixels, grids, num_beams=k, max_new_tokens=n,
                                          eos_token_ids=())
      return time.perf_counter() - start, tokens

    def run_torch(threads, attention):
      torch.set_num_threads(threads)
      reference.set_attn_implementation(attention)
      start = time.perf_counter()
      with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
            image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == cfg.image_token_id) * 1),
            max_new_tokens=n, do_sample=False, num_beams=k, eos_token_id=None, pad_token_id=0)
      return time.perf_counter() - start, out[:, ids.shape[1]:].numpy()

    first, _ = run_ours()
    for s in torch_settings:  # warm-up
      run_torch(*s)
    runs = {"ours": []} | {s: [] for s in torch_settings}
    for _ in range(FLAGS.repeats):
      runs["ours"].append(run_ours())
      for s in torch_settings:
        runs[s].append(run_torch(*s))
      load.append(os.getloadavg()[0])
    ours_s, ours_tokens = min(runs["ours"], key=lambda r: r[0])
    print(f"batch {batch}: ours {ours_s:.3f} s ({batch * n / ours_s:.1f} hypothesis tok/s; compile "
          f"{first - ours_s:.1f} s)", flush=True)
    fastest = None
    for s in torch_settings:
      seconds, tokens = min(runs[s], key=lambda r: r[0])
      same = bool(np.array_equal(tokens, ours_tokens))
      print(f"batch {batch}: torch, {s[0]} thread(s), {s[1]}: {seconds:.3f} s ({batch * n / seconds:.1f} tok/s), "
            f"hypotheses identical to ours: {same}", flush=True)
      fastest = min(fastest or (seconds, s), (seconds, s))
    print(f"batch {batch}: ours / fastest torch ({fastest[1][0]} thread(s), {fastest[1][1]}): "
          f"{fastest[0]:.3f} s / {ours_s:.3f} s = {fastest[0] / ours_s:.2f}x faster", flush=True)
  print(f"1-minute load average {min(load):.1f}-{max(load):.1f} during the run")


if __name__ == "__main__":
  FLAGS.set_default("batch_sizes", ["1", "4"])
  app.run(main)
