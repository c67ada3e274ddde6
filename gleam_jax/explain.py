"""Ask a Qwen2.5-VL model (GLEAM-X) whether two views show the same place, and why; the answer streams.

    python -m gleam_jax.explain --model_dir=/path/to/Qwen2.5-VL-3B-Instruct \
        --image=uav.jpg --image=satellite.png [--lang=zh] [--prompt="..."] [--max_new_tokens=256]
    python -m gleam_jax.explain --workdir=~/gleam_runs/x_sft --image=uav.jpg --image=satellite.png

Loads the weights and processor of a local Hugging Face directory (`params.load_pretrained`,
`processor.load_processor`; nothing is downloaded), or the model a GLEAM-X fine-tuning job wrote
(`--workdir`: its latest checkpoint, `train/sft.py`), builds the chat prompt with the images in the
order given, and generates under jit with the KV cache (`generation.generate`), printing the answer
to stdout as each chunk of tokens is decoded. Greedy unless `--temperature` > 0 (then top-p
sampling, seeded). Without `--prompt` the question is GLEAM-X's, in English or Chinese (`--lang`);
any number of images may go with a prompt of your own. Prefill and decode rates go to stderr.
"""
import sys
import time

from absl import app
from absl import flags
import numpy as np

from gleam_jax.data.gleam_x import QUESTIONS
from gleam_jax.data.sources import read_image
from gleam_jax.errors import GleamError, stop_on_bad_input

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model_dir", None, "Local Hugging Face Qwen2.5-VL directory (config, safetensors, "
                      "tokenizer, preprocessor_config.json).")
  flags.DEFINE_string("workdir", None, "Instead of --model_dir: a GLEAM-X fine-tuning job's workdir (its "
                      "latest checkpoint).")
  flags.DEFINE_multi_string("image", [], "An image file; repeat for each view (GLEAM-X: the query, then "
                            "the satellite image).")
  flags.DEFINE_string("prompt", None, "The question (default: GLEAM-X's, in --lang).")
  flags.DEFINE_enum("lang", "en", sorted(QUESTIONS), "Language of the default question.")
  flags.DEFINE_integer("max_new_tokens", 256, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; above 0: sampling at this temperature.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
  flags.DEFINE_integer("min_pixels", None, "Override preprocessor_config.json's min_pixels.")
  flags.DEFINE_integer("max_pixels", None, "Override preprocessor_config.json's max_pixels (fewer image "
                       "tokens for large photos).")


def read_images(paths):
  """The images upright (EXIF orientation applied, as Hugging Face's `load_image`), RGB uint8 arrays
  (`sources.read_image`, as `retrieve` reads its queries)."""
  return [read_image(path) for path in paths]


class TextStream:
  """Writes the decoded answer as tokens arrive. Byte-level BPE splits a Chinese character over
  tokens, so text ending in an incomplete character (U+FFFD) waits for the next token."""

  def __init__(self, proc, write):
    self.proc, self.write, self.tokens, self.shown = proc, write, [], ""

  def __call__(self, step, tokens):
    self.tokens.append(int(np.asarray(tokens)[0]))
    self._show(final=False)

  def _show(self, final):
    text = self.proc.decode(self.tokens)
    if final or not text.endswith("\ufffd"):
      self.write(text[len(self.shown):])
      self.shown = text

  def close(self):
    self._show(final=True)
    self.write("\n")
    return self.shown


def explain(model_dir, image_paths, prompt=None, lang="en", max_new_tokens=256, temperature=0.0, top_p=1.0,
            seed=0, dtype="float32", min_pixels=None, max_pixels=None, write=sys.stdout.write, chunk=8,
            model=None, proc=None, workdir=None):
  """Generates the answer to `prompt` (default: GLEAM-X's question in `lang`) about the images, writing
  it as it streams; returns the text. The model: `model_dir`'s, or that of a GLEAM-X job's `workdir`,
  or `model`/`proc` already loaded."""
  from gleam_jax.models.qwen2_5_vl import config as config_lib
  from gleam_jax.models.qwen2_5_vl import generation, params, processor
  if prompt is None:
    if lang not in QUESTIONS:
      raise GleamError(f"--lang={lang}: the question is written in {', '.join(sorted(QUESTIONS))}; "
                       "or give your own with --prompt.")
    if len(image_paths) != 2:
      raise GleamError(f"GLEAM-X's question compares two views and {len(image_paths)} --image were given: "
                       "give two (the query, then the satellite image), or a --prompt of your own.")
    prompt = QUESTIONS[lang]
  images = read_images(image_paths)  # a bad file stops before the model is loaded
  if workdir:
    from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
    model, proc, where = sft.load_trained(workdir)
    print(f"[model from {where}]", file=sys.stderr)
  proc = proc or processor.load_processor(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
  if model is None:
    cfg = config_lib.from_pretrained_dir(model_dir).replace(dtype=dtype, param_dtype=dtype)
    model = params.load_pretrained(model_dir, cfg)
  inputs = proc.encode_prompt(images, prompt)
  stream = TextStream(proc, write)
  times = []
  start = time.perf_counter()
  generation.generate(model, inputs["input_ids"][None], pixel_values=inputs["pixel_values"],
                      image_grid_thw=inputs["image_grid_thw"], max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, seed=seed, chunk=chunk,
                      callback=lambda step, tokens: (times.append(time.perf_counter()), stream(step, tokens)))
  text = stream.close()
  prompt_len, new = len(inputs["input_ids"]), len(times)
  rate = f", decode {(new - 1) / (times[-1] - times[0]):.1f} tok/s" if new > 1 and times[-1] > times[0] else ""
  print(f"[{prompt_len} prompt tokens ({len(inputs['pixel_values'])} patches), {new} new; prefill "
        f"{times[0] - start:.2f} s (compiling included){rate}]", file=sys.stderr)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.model_dir) == bool(FLAGS.workdir) or not FLAGS.image:
    print("error: give --model_dir (a Hugging Face directory) or --workdir (a GLEAM-X job), not both, and "
          "at least one --image.", file=sys.stderr)
    sys.exit(2)
  with stop_on_bad_input():
    explain(FLAGS.model_dir or None, FLAGS.image, FLAGS.prompt, FLAGS.lang, FLAGS.max_new_tokens, FLAGS.temperature,
            FLAGS.top_p, FLAGS.seed, FLAGS.dtype, FLAGS.min_pixels, FLAGS.max_pixels, workdir=FLAGS.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
