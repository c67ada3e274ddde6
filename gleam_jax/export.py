"""Export a GLEAM-X fine-tuning job's model as a Hugging Face Qwen2.5-VL directory.

    python -m gleam_jax.export --workdir=~/gleam_runs/x_sft --out=~/models/gleam-x [--dtype=bfloat16]

Loads the job's latest checkpoint (`sft.load_trained`: LoRA adapters folded in) and writes it with
`params.save_pretrained`: safetensors weights with the released checkpoints' key names (in the
trained dtype unless --dtype; files of at most --max_shard_gb, with model.safetensors.index.json
when there are several), config.json, and the tokenizer, processor and chat-template files of the
job's model directory (`model.hf_dir`, or the tiny one in the workdir), with the pixel bounds the job
resized images and video frames to (preprocessor_config.json, video_preprocessor_config.json) and its image
resize and `examples.image_size` recorded (`processor.write_image_config`). A job that trained with a
system prompt of its own (`<workdir>/system_prompt.json`) has it made the chat template's default
system turn and its record copied, so transformers' `apply_chat_template` and `explain --model_dir`
ask as the job trained. The result loads with
transformers' `from_pretrained`, `params.load_pretrained` and `python -m gleam_jax.explain
--model_dir=`. A directory that already holds weights is refused unless --overwrite.
"""
import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging

from gleam_jax import errors
from gleam_jax.models.qwen2_5_vl import params, processor
from gleam_jax.train import checkpoint, sft
from gleam_jax.utils import model_dirs
from gleam_jax.utils.progress import format_size

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "A GLEAM-X fine-tuning ('sft') job's workdir; its latest checkpoint is "
                      "exported.")
  flags.DEFINE_string("out", None, "The Hugging Face model directory to write.")
  flags.DEFINE_enum("dtype", None, list(model_dirs.EXPORT_DTYPES), "Cast the weights (default: as trained).")
  flags.DEFINE_float("max_shard_gb", params.MAX_SHARD_BYTES / 1e9, "Largest safetensors file, in GB.")
  flags.DEFINE_bool("overwrite", False, "Replace the weights of an --out directory that already holds some.")


def export(workdir, out, dtype=None, max_shard_bytes=params.MAX_SHARD_BYTES, overwrite=False):
  """Writes the latest checkpoint of the GLEAM-X job in `workdir` as a Hugging Face directory `out`;
  returns the line that reports it."""
  start = time.perf_counter()
  workdir, out = os.path.expanduser(workdir), os.path.expanduser(out)
  model_dirs.check_export_dir(out, overwrite=bool(overwrite))  # before the model is loaded
  config = sft.job_config(workdir)
  with checkpoint.at_most_verbose(logging.WARNING):  # Orbax logs every read at INFO; ours after at INFO
    model, proc, where = sft.load_trained(workdir, config=config)
  source = sft.model_directory(config, workdir)
  total, files = params.save_pretrained(model, out, source_dir=source, dtype=dtype,
                                        max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  processor.write_image_config(out, proc.image_config, config.examples.get("image_size"))  # as the job did
  stored = dtype or model.cfg.param_dtype
  return (f"exported step {checkpoint.step_of(where)} of {workdir} to {out}: {format_size(total)} of {stored} "
          f"weights in {files} file{'s' * (files > 1)}, {time.perf_counter() - start:.1f} s"
          f"{_system_prompt(workdir, out)}")


def _system_prompt(workdir, out):
  """Carries the system prompt the job trained with into `out` (its record, and the chat templates'
  default system turn); returns what the report line says of it."""
  system, distinct = sft.trained_system_prompt(workdir)
  if system is not None or distinct > 1:  # Qwen2.5-VL's default alone needs no record
    shutil.copyfile(os.path.join(workdir, sft.SYSTEM_PROMPT_FILE), os.path.join(out, sft.SYSTEM_PROMPT_FILE))
  if system is None:
    return f"; trained with {distinct} system prompts: give --system when asking" if distinct > 1 else ""
  changed = processor.set_default_system_prompt(out, system)
  where = ", ".join(changed) or (f"no chat template here has Qwen2.5-VL's default system turn; "
                                 f"{sft.SYSTEM_PROMPT_FILE} only")
  return f"; its system prompt is the default ({where})"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.max_shard_gb <= 0:
    print(f"error: --max_shard_gb={FLAGS.max_shard_gb} must be positive.", file=sys.stderr)
    sys.exit(2)
  with errors.stop_on_bad_input():
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.dtype, int(FLAGS.max_shard_gb * 1e9), FLAGS.overwrite))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=errors.parse_flags)
