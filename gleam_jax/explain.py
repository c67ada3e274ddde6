"""Ask a Qwen2.5-VL model (GLEAM-X) whether two views show the same place, and why; the answer streams.

    python -m gleam_jax.explain --model_dir=/path/to/Qwen2.5-VL-3B-Instruct \
        --image=uav.jpg --image=satellite.png [--lang=zh] [--prompt="..."] [--max_new_tokens=256]
    python -m gleam_jax.explain --workdir=~/gleam_runs/x_sft --image=uav.jpg --image=satellite.png
    python -m gleam_jax.explain --workdir=~/gleam_runs/x_sft --pairs=test.jsonl --out=answers.jsonl

Loads the weights and processor of a local Hugging Face directory (`params.load_pretrained`,
`processor.load_processor`; nothing is downloaded), or the model a GLEAM-X fine-tuning job wrote
(`--workdir`: its latest checkpoint, `train/sft.py`), builds the chat prompt with the images in the
order given, and generates under jit with the KV cache (`generation.generate`), printing the answer
to stdout as each chunk of tokens is decoded. Greedy unless `--temperature` > 0 (then sampling,
seeded, with `--top_k`, `--top_p`, `--min_p`); `--repetition_penalty` and beam search
(`--num_beams`, `--length_penalty`) as transformers'. With `--generation_config` tokens are chosen as
the model directory's generation_config.json says, as transformers' `generate` chooses them (the
released Instruct checkpoints: a repetition penalty of 1.05, top_k 1); flags given on the command
line override it. Without `--prompt` the question is GLEAM-X's, in English or Chinese (`--lang`);
any number of images may go with a prompt of your own, and videos too (`--video`: a folder of frames
sampled at `--fps`, or recorded at `--video_fps` and sampled down to `--fps`, or a video file such as a
drone's .mp4, sampled at `--fps` as transformers samples it; after the images).
`--video=FLIGHT_DIR --image=satellite.png` without `--prompt` asks GLEAM-X's flight question: does the
drone flight show the satellite image's place (the frames first, as GLEAM-X jobs train on flights).
Prefill and decode rates go to stderr.

`--pairs` answers every pair of a JSON Lines file (`data/pair_files.py`: the layout GLEAM-X jobs
train on) in batches, greedily as the trainer's evaluation does unless the flags above say otherwise
(then each row records its `decoding`, with `--seed` when sampling), and writes one line per pair to
`--out` (the pair's line, images, the answer, its verdict and the model's yes-probability `p_yes`, the
reference where the file has one); when every pair has a reference answer it prints verdict accuracy,
the yes-probabilities' ROC AUC and ROUGE-L (`eval/explain.py`), as the trainer's evaluation does,
and writes them beside `--out` (`<out>_metrics.json`). Answers are kept batch by batch in
`<out>.partial`; a run stopped part way, started again, answers only the pairs not yet answered.
A conversation's later questions are asked after its reference turns, or after the model's own
earlier answers with `--follow_ups_after=own`.
`--fsdp` / `--tensor` split the model over that many local devices (Qwen2.5-VL's sharding rules).
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

from gleam_jax.data import pair_files, video_files
from gleam_jax.data.augment import resize
from gleam_jax.data.gleam_x import FLIGHT_QUESTIONS, QUESTIONS
from gleam_jax.data.sources import image_files, read_image
from gleam_jax.errors import GleamError, make_dir, stop_on_bad_input
from gleam_jax.eval import explain as explain_eval
from gleam_jax.utils.progress import RateEta, format_eta

FLAGS = flags.FLAGS
# what a conversation's later questions are asked after: its reference answers, or the model's own
FOLLOW_UPS_AFTER = ("reference", "own")
# the flags of `generation.generate`'s token-choice keywords (`generation.check_settings`)
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "num_beams", "length_penalty")


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model_dir", None, "Local Hugging Face Qwen2.5-VL directory (config, safetensors, "
                      "tokenizer, preprocessor_config.json).")
  flags.DEFINE_string("workdir", None, "Instead of --model_dir: a GLEAM-X fine-tuning job's workdir (its "
                      "latest checkpoint).")
  flags.DEFINE_multi_string("image", [], "An image file; repeat for each view (GLEAM-X: the query, then "
                            "the satellite image).")
  flags.DEFINE_multi_string("video", [], "A folder of a video's frames (image files, in name order, sampled at "
                            "--fps), or a video file (.mp4, .mov, ...: sampled at --fps as transformers samples "
                            "it; needs PyAV); repeat for each video. With a --prompt they follow the --image views; "
                            "without, one --video and one --image are GLEAM-X's flight pair (frames first).")
  flags.DEFINE_float("fps", 2.0, "With --video: the frames per second the frames were sampled at (or, with "
                     "--video_fps or a video file, the rate to sample them at).")
  flags.DEFINE_float("video_fps", None, "With --video: the folder holds every frame of a clip recorded at this "
                     "rate (as ffmpeg writes them): sample them down to --fps as transformers does.")
  flags.DEFINE_string("prompt", None, "The question (default: GLEAM-X's, in --lang).")
  flags.DEFINE_enum("lang", "en", sorted(QUESTIONS), "Language of the default question.")
  flags.DEFINE_string("system", None, "The system prompt (default: the one the --workdir job trained with, else "
                      "Qwen2.5-VL's). With --pairs, a pair's own (pairs files) comes first.")
  flags.DEFINE_integer("max_new_tokens", 256, "Most tokens to generate.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; above 0: sampling at this temperature.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (with --temperature > 0; 0: all).")
  flags.DEFINE_float("min_p", 0.0, "Drop tokens less likely than min_p times the most likely one (with "
                     "--temperature > 0).")
  flags.DEFINE_float("repetition_penalty", 1.0, "transformers' repetition penalty on the prompt's and the "
                     "answer's tokens, greedy too (1: none).")
  flags.DEFINE_integer("num_beams", 1, "Beam search over this many beams, as transformers' (greedy; 1: none).")
  flags.DEFINE_float("length_penalty", 1.0, "With --num_beams: a hypothesis scores its log-probability / "
                     "length ** length_penalty.")
  flags.DEFINE_bool("generation_config", False, "Choose tokens as the model directory's generation_config.json "
                    "says (transformers' generate defaults); sampling flags given here override it.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype with --model_dir "
                    "(default float32; a --workdir job's as it trained).")
  flags.DEFINE_integer("min_pixels", None, "With --model_dir: override preprocessor_config.json's min_pixels.")
  flags.DEFINE_integer("max_pixels", None, "With --model_dir: override preprocessor_config.json's max_pixels "
                       "(fewer image tokens for large photos).")
  flags.DEFINE_enum("image_resize", None, ["pil", "torchvision"], "With --model_dir: how images are resized, as "
                    "transformers' PIL image processor (the default; an exported job's as it trained) or as its "
                    "torchvision one on a CPU (transformers' default where torchvision is installed).")
  flags.DEFINE_string("pairs", None, "Instead of --image: a JSON Lines file of pairs to answer in batches "
                      "(gleam_jax/data/pair_files.py).")
  flags.DEFINE_string("out", None, "With --pairs: the JSON Lines file of answers to write.")
  flags.DEFINE_string("image_root", None, "With --pairs: the folder image paths are relative to (default: the "
                      "pairs file's).")
  flags.DEFINE_integer("batch_size", 8, "With --pairs: pairs generated together.")
  flags.DEFINE_enum("follow_ups_after", "reference", FOLLOW_UPS_AFTER, "With --pairs: a conversation's later "
                    "questions are asked after its reference answers (teacher-forced, as multi-turn evaluations "
                    "go) or after the model's own earlier answers (own).")
  define_mesh_flags()


def define_mesh_flags():
  """--fsdp / --tensor: the model split over that many local devices (a 7B model over GPUs), for
  `explain` and `gleam_jax.localize`."""
  flags.DEFINE_integer("fsdp", 1, "Devices the parameters are sharded over (FSDP axis).")
  flags.DEFINE_integer("tensor", 1, "Devices each matmul is split over (tensor-parallel axis).")


def inference_mesh(fsdp=1, tensor=1):
  """A mesh of fsdp x tensor local devices (data axis 1: generation's rows stay whole), or None for one
  device."""
  import jax  # pylint: disable=g-import-not-at-top
  from gleam_jax.train import sharding as shd  # pylint: disable=g-import-not-at-top
  if fsdp < 1 or tensor < 1:
    raise GleamError(f"--fsdp={fsdp} --tensor={tensor}: give at least 1 device for each.")
  if fsdp * tensor == 1:
    return None
  devices = jax.local_devices()
  if fsdp * tensor > len(devices):
    raise GleamError(f"--fsdp={fsdp} x --tensor={tensor} needs {fsdp * tensor} devices; this process has "
                     f"{len(devices)}.")
  return shd.make_mesh({"data": 1, "fsdp": fsdp, "tensor": tensor}, devices[:fsdp * tensor])


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


def read_videos(sources, fps=2.0, video_fps=None):
  """(frames of each video, the rate each stands for): a folder's image files in name order (read as
  `read_images` reads images) taken as sampled at `fps`, or with `video_fps` as every frame of a clip
  recorded at that rate, sampled down to `fps` as transformers samples it; a video file sampled at
  `fps` (`video_files.read_clip`)."""
  from gleam_jax.models.qwen2_5_vl import processor  # pylint: disable=g-import-not-at-top
  videos, rates = [], []
  for source in sources:
    where = f"--video={source}"
    if video_files.is_video_file(source):
      if video_fps is not None:
        raise GleamError(f"{where}: --video_fps is for a folder of every frame of a clip; a video file records "
                         "its own rate. Leave --video_fps out.")
      frames, rate, _ = video_files.read_clip(os.path.expanduser(source), fps, where)
    else:
      frames, rate = read_images(image_files(source, "--video")[0]), fps
      if video_fps is not None:
        frames, rate = processor.sample_video(frames, video_fps, fps)
    videos.append(frames)
    rates.append(rate)
  return videos, rates


def explain(model_dir, image_paths, prompt=None, lang="en", max_new_tokens=256, sampling=None,
            seed=0, dtype=None, min_pixels=None, max_pixels=None, write=sys.stdout.write, chunk=8,
            workdir=None, fsdp=1, tensor=1, system=None, generation_config=False, video_dirs=(), fps=2.0,
            video_fps=None, image_resize=None):
  """Generates the answer to `prompt` (default: GLEAM-X's question in `lang`) about the images, writing
  it as it streams; returns the text. `system`: the system prompt (default: the one the `workdir` job
  trained with, else Qwen2.5-VL's). The model: `model_dir`'s, or that of a GLEAM-X job's `workdir`
  (whose images are resized as its examples were); split over `fsdp` x `tensor` devices when more
  than one. `sampling`: `generation.generate`'s token-choice keywords (`generation.check_settings`;
  greedy when empty), over the model directory's generation_config.json with `generation_config`.
  `video_dirs`: folders of frames sampled at `fps` (or recorded at `video_fps`, then sampled down to
  `fps`), or video files sampled at `fps` (`read_videos`), asked about after the images with a
  `prompt`. Without one, a single video and a single image are GLEAM-X's flight pair: the flight's
  frames first, then the satellite image, asked the flight question."""
  from gleam_jax.models.qwen2_5_vl import generation, processor  # pylint: disable=g-import-not-at-top
  flight = prompt is None and bool(video_dirs)
  if prompt is None:
    if lang not in QUESTIONS:
      raise GleamError(f"--lang={lang}: the question is written in {', '.join(sorted(QUESTIONS))}; "
                       "or give your own with --prompt.")
    if flight and (len(video_dirs), len(image_paths)) != (1, 1):
      raise GleamError(f"GLEAM-X's flight question compares one drone flight with one satellite image and "
                       f"{len(video_dirs)} --video and {len(image_paths)} --image were given: give one of each, "
                       "or a --prompt of your own.")
    if not flight and len(image_paths) != 2:
      raise GleamError(f"GLEAM-X's question compares two views and {len(image_paths)} --image were given: "
                       "give two (the query, then the satellite image), or a --prompt of your own.")
    prompt = (FLIGHT_QUESTIONS if flight else QUESTIONS)[lang]
  images = read_images(image_paths)  # a bad file stops before the model is loaded
  videos, rates = read_videos(video_dirs, fps, video_fps)
  if generation_config:
    sampling = generation.sampling_settings(model_directory(model_dir, workdir)) | (sampling or {})
  sampling = generation.check_settings(**(sampling or {}))  # bad values stop before loading
  mesh = inference_mesh(fsdp, tensor)
  model, proc, image_size, trained_system = load_model(model_dir, workdir, dtype, min_pixels, max_pixels, mesh,
                                                       image_resize)
  system = trained_system if system is None else system
  if image_size:  # as the job's examples were: every image and frame
    images = [resize(image, image_size) for image in images]
    videos = [[resize(frame, image_size) for frame in frames] for frames in videos]
  inputs = proc.encode_prompt(images, prompt, system, videos=videos, fps=rates, videos_first=flight)
  stream = TextStream(proc, write)
  times = []
  start = time.perf_counter()
  generation.generate(model, inputs["input_ids"][None], max_new_tokens=max_new_tokens,
                      **processor.join_visuals([inputs]), **sampling, seed=seed, chunk=chunk, mesh=mesh,
                      callback=lambda step, tokens: (times.append(time.perf_counter()), stream(step, tokens)))
  text = stream.close()
  prompt_len, new = len(inputs["input_ids"]), len(times)
  rate = f", decode {(new - 1) / (times[-1] - times[0]):.1f} tok/s" if new > 1 and times[-1] > times[0] else ""
  patches = len(inputs["pixel_values"]) + len(inputs.get("pixel_values_videos", ()))
  print(f"[{prompt_len} prompt tokens ({patches} patches), {new} new; prefill "
        f"{times[0] - start:.2f} s (compiling included){rate}]", file=sys.stderr)
  return text


def model_directory(model_dir=None, workdir=None):
  """The Hugging Face directory of `model_dir`, or the one a GLEAM-X job's `workdir` trained from."""
  if model_dir:
    return model_dir
  from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
  return sft.model_directory(sft.job_config(workdir), workdir)


def check_job_settings(workdir, **settings):
  """Stops when model or processor settings (`load_model`'s dtype, min_pixels, max_pixels, image_resize)
  are given for a GLEAM-X job's `workdir`, whose are as it trained."""
  given = [f"{name}={value!r}" for name, value in settings.items() if value is not None]
  if given:
    raise GleamError(f"{', '.join(given)}: these set up a Hugging Face directory's model and processor; a GLEAM-X "
                     f"job's ({workdir}) are as it trained (its config.json). Leave them out, or export the job "
                     "(python -m gleam_jax.export) and give the export's directory instead of the workdir.")


def load_model(model_dir=None, workdir=None, dtype=None, min_pixels=None, max_pixels=None, mesh=None,
               image_resize=None):
  """(model, processor, image size, system prompt) of a Hugging Face directory or of a GLEAM-X job's
  workdir (its latest checkpoint), with the image size the job's examples were resized to and the system
  prompt it trained with (both also in a directory it was exported to; else None), placed on `mesh`
  under Qwen2.5-VL's sharding rules when given. `dtype` (default float32), `min_pixels`, `max_pixels`
  and `image_resize` ('pil', 'torchvision'; `processor.ImageConfig`) set up a directory's model and
  processor; a job's are as it trained, so giving them with `workdir` stops with the fix."""
  from gleam_jax.models.qwen2_5_vl import config as config_lib  # pylint: disable=g-import-not-at-top
  from gleam_jax.models.qwen2_5_vl import params, processor  # pylint: disable=g-import-not-at-top
  from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
  if workdir:
    check_job_settings(workdir, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels, image_resize=image_resize)
    config = sft.job_config(workdir)
    model, proc, where = sft.load_trained(workdir, mesh, config)
    print(f"[model from {where}]", file=sys.stderr)
    system, distinct = sft.trained_system_prompt(workdir)
    if distinct > 1:
      print(f"[the job trained with {distinct} system prompts ({sft.SYSTEM_PROMPT_FILE}); asked with Qwen2.5-VL's "
            "default unless --system or the pair gives one]", file=sys.stderr)
    return model, proc, config.examples.get("image_size"), system
  proc = processor.load_processor(model_dir, min_pixels=min_pixels, max_pixels=max_pixels, image_resize=image_resize)
  dtype = dtype or "float32"
  cfg = config_lib.from_pretrained_dir(model_dir).replace(dtype=dtype, param_dtype=dtype)
  system, _ = sft.trained_system_prompt(model_dir)  # an exported GLEAM-X job's, where it had one
  image_size = processor.recorded_image_size(model_dir)  # likewise
  return params.load_pretrained(model_dir, cfg, mesh=mesh), proc, image_size, system


def answer_pairs(pairs_path, out_path, model_dir=None, workdir=None, batch_size=8, max_new_tokens=256,
                 image_root=None, dtype=None, min_pixels=None, max_pixels=None, log=None, fsdp=1, tensor=1,
                 system=None, follow_ups_after="reference", decoding=None, seed=0, image_resize=None):
  """Answers every pair of a JSON Lines file (see the module docstring); writes `out_path` (a line per
  pair, in the file's order) and, when every pair has a reference answer, `<out_path>_metrics.json`;
  returns (answer rows, metrics or None). Each batch's answers are appended to `<out_path>.partial` as
  they come: a run of the same model stopped part way resumes with the pairs not yet answered. A pair
  without its own system prompt is asked with `system`, else with the one the `workdir` job trained with.
  A conversation that goes on has each later question asked after the turns before it: the reference
  answers (`follow_ups_after='reference'`, teacher-forced) or the model's own ('own'); the answers go
  into the row's `follow_ups` (`follow_ups_after` says which), and their ROUGE-L into the metrics.
  `decoding`: `generation.generate`'s token-choice keywords (greedy when empty); a row records those
  that differ from greedy (`decoding`, with the `seed` when sampling: pair i of the file draws with
  seed + i, whatever its batch, also after a resume), and an answer is reused only for the same ones."""
  from gleam_jax.models.qwen2_5_vl import generation  # pylint: disable=g-import-not-at-top
  log = log or (lambda line: print(line, file=sys.stderr))
  if batch_size < 1:
    raise GleamError(f"--batch_size={batch_size} must be positive.")
  greedy = generation.check_settings()
  decoding = {k: v for k, v in generation.check_settings(**(decoding or {})).items() if v != greedy.get(k)}
  recorded = decoding | {"seed": seed} if decoding.get("temperature", 0.0) > 0 else decoding
  pairs = pair_files.read_pairs(pairs_path, image_root, need_answers=False)  # bad lines stop before loading
  mesh = inference_mesh(fsdp, tensor)
  out_path = os.path.abspath(os.path.expanduser(out_path))
  if os.path.isdir(out_path):
    raise GleamError(f"--out={out_path} is a folder; give the JSON Lines file to write.")
  make_dir(os.path.dirname(out_path), "--out")
  partial = out_path + ".partial"
  model_name = os.path.abspath(os.path.expanduser(workdir or model_dir))
  if system is None:  # the one the model trained with (as `load_model` reads it), else Qwen2.5-VL's default
    from gleam_jax.train import sft  # pylint: disable=g-import-not-at-top
    system, _ = sft.trained_system_prompt(model_name)
  pairs = [with_system(p, system) for p in pairs]
  # an answer is reused for the same line number, images (a flight's frames and rate), model, system prompt
  # and decoding
  key = lambda line, images, model, asked_with, how: (line.rsplit(":", 1)[-1], tuple(images), model, asked_with,
                                                      json.dumps(how, sort_keys=True))
  done = {}
  if os.path.exists(partial):
    with open(partial, encoding="utf-8") as f:
      for text in f:
        try:
          row = json.loads(text)
        except json.JSONDecodeError:  # the line being written when the run stopped
          continue
        done[key(row["line"], _visual_key(row), row.get("model"), row.get("system"), row.get("decoding", {}))] = row
  rows = [done.get(key(p["line"], _visual_key(_visuals(p)), model_name, p["system"], recorded)) for p in pairs]
  todo = [i for i, row in enumerate(rows) if row is None]
  if len(todo) < len(pairs):
    log(f"resuming: {len(pairs) - len(todo)} of {len(pairs)} pairs answered before ({partial})")
  # follow-up questions (conversations that go on) not yet answered after `follow_ups_after`'s turns
  if follow_ups_after not in FOLLOW_UPS_AFTER:
    raise GleamError(f"follow_ups_after={follow_ups_after!r}: give one of {', '.join(FOLLOW_UPS_AFTER)}.")
  later = [i for i, p in enumerate(pairs) if p.get("follow_ups") and (
      rows[i] is None or "follow_ups" not in rows[i] or rows[i].get("follow_ups_after") != follow_ups_after)]
  if todo or later:
    model, proc, image_size, _ = load_model(model_dir, workdir, dtype, min_pixels, max_pixels, mesh, image_resize)
    ask = lambda examples, seed=seed, **kw: explain_eval.generate_answers(
        model, proc, examples, batch_size, max_new_tokens, mesh=mesh, image_size=image_size, decoding=decoding,
        seed=seed, **kw)
    progress = RateEta(len(todo))
    with open(partial, "a", encoding="utf-8") as f:

      def keep(answered, batch):
        for j, text, p_yes in batch:
          rows[todo[j]] = _answer_row(pairs[todo[j]], text, p_yes, model_name, recorded)
          f.write(json.dumps(rows[todo[j]], ensure_ascii=False) + "\n")
        f.flush()
        rate, eta = progress.update(answered)
        log(f"{answered}/{len(todo)} pairs answered, {rate:.2f} pairs/s, ETA {format_eta(eta)}")
      if todo:
        ask([pairs[i] for i in todo], seed=[seed + i for i in todo], on_batch=keep)
      if later:
        asked = explain_eval.follow_up_questions([pairs[i] for i in later])
        log(f"answering {len(asked)} follow-up questions after the {follow_ups_after} turns")
        own = [rows[i]["answer"] for i in later] if follow_ups_after == "own" else None
        texts = explain_eval.answer_follow_ups(asked, lambda examples: ask(examples)[0], own)
        for i in later:
          rows[i] = dict(rows[i], follow_ups=[], follow_ups_after=follow_ups_after)
        for (j, ex), text in zip(asked, texts, strict=True):
          rows[later[j]]["follow_ups"].append(dict(question=ex["question"], answer=text, reference=ex["answer"]))
        f.writelines(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in later)
  with open(out_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
  if os.path.exists(partial):
    os.remove(partial)
  metrics = None
  if all(pair["answer"] is not None for pair in pairs):
    metrics = explain_eval.explain_metrics([row["answer"] for row in rows], pairs,
                                           [row.get("p_yes") for row in rows])
    asked = explain_eval.follow_up_questions(pairs)
    if asked:
      metrics["follow_up_rouge_l"] = explain_eval.follow_up_rouge_l(
          [turn["answer"] for row in rows for turn in row.get("follow_ups", [])], asked)
    with open(os.path.splitext(out_path)[0] + "_metrics.json", "w") as f:
      json.dump(metrics, f, indent=1)
    log(f"{explain_eval.summary(metrics)} on {len(pairs)} pairs")
  log(f"{len(rows)} answers written to {out_path}")
  return rows, metrics


def with_system(pair, system):
  """The pair, asked with its own system prompt, else with `system`."""
  return pair if pair.get("system") is not None else dict(pair, system=system)


def _visuals(pair):
  """An answer row's fields naming the pair's visuals: its two images, or a flight's frames (`video`, at
  `fps`; a video file's path in `video_file`) and the satellite image."""
  if pair_files.is_video_pair(pair):
    source = {"video_file": pair["video_file"]} if "video_file" in pair else {}
    return dict(video=list(pair["query"]), **source, images=[pair["satellite"]], fps=pair["fps"])
  return dict(images=[pair["query"], pair["satellite"]])


def _visual_key(row):
  return [*row.get("video", ()), *row["images"], *([row["fps"]] if "fps" in row else [])]


def _answer_row(pair, text, p_yes, model, decoding):
  row = dict(line=pair["line"], **_visuals(pair), lang=pair["lang"], modality=pair["modality"], answer=text,
             verdict=explain_eval.verdict(text), p_yes=p_yes, model=model)
  if decoding:
    row["decoding"] = decoding
  if pair["system"] is not None:
    row["system"] = pair["system"]
  if pair["answer"] is not None:
    row.update(reference=pair["answer"], match=pair["match"])
  return row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(FLAGS.model_dir) == bool(FLAGS.workdir) or bool(FLAGS.image or FLAGS.video) == bool(FLAGS.pairs):
    print("error: give --model_dir (a Hugging Face directory) or --workdir (a GLEAM-X job), not both, and "
          "--image / --video (at least one) or --pairs (with --out), not both.", file=sys.stderr)
    sys.exit(2)
  if FLAGS.pairs and not FLAGS.out:
    print("error: --pairs needs --out, the JSON Lines file of answers to write.", file=sys.stderr)
    sys.exit(2)
  with stop_on_bad_input():
    given = [name for name in SAMPLING_FLAGS if FLAGS[name].present or not FLAGS.generation_config]
    decoding = {name: FLAGS[name].value for name in given}  # flags over the file's settings
    if FLAGS.pairs:
      if FLAGS.generation_config:
        from gleam_jax.models.qwen2_5_vl import generation  # pylint: disable=g-import-not-at-top
        decoding = generation.sampling_settings(model_directory(FLAGS.model_dir, FLAGS.workdir)) | decoding
      answer_pairs(FLAGS.pairs, FLAGS.out, FLAGS.model_dir or None, FLAGS.workdir, FLAGS.batch_size,
                   FLAGS.max_new_tokens, FLAGS.image_root, FLAGS.dtype, FLAGS.min_pixels, FLAGS.max_pixels,
                   fsdp=FLAGS.fsdp, tensor=FLAGS.tensor, system=FLAGS.system,
                   follow_ups_after=FLAGS.follow_ups_after, decoding=decoding, seed=FLAGS.seed,
                   image_resize=FLAGS.image_resize)
      return
    explain(FLAGS.model_dir or None, FLAGS.image, FLAGS.prompt, FLAGS.lang, FLAGS.max_new_tokens,
            decoding, FLAGS.seed, FLAGS.dtype, FLAGS.min_pixels,
            FLAGS.max_pixels, workdir=FLAGS.workdir, fsdp=FLAGS.fsdp, tensor=FLAGS.tensor, system=FLAGS.system,
            generation_config=FLAGS.generation_config, video_dirs=FLAGS.video, fps=FLAGS.fps,
            video_fps=FLAGS.video_fps, image_resize=FLAGS.image_resize)


if __name__ == "__main__":
  define_flags()
  app.run(main)
