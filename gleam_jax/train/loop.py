"""What every trainer's loop does the same way: progress lines, the NaN stop, metrics on resume."""
import json
import math
import os

import jax
import numpy as np

from gleam_jax.errors import GleamError
from gleam_jax.utils.writer import read_metrics


def parameter_sizes(params, lora_cfg):
  """'12.34M params' of a train state's model, with ', LoRA rank r: 0.123M trained' when the state has
  adapters: what both trainers print at the start."""
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  line = f"{size(params['model']) / 1e6:.2f}M params"
  if "lora" in params:
    line += f", LoRA rank {int(lora_cfg.rank)}: {size(params['lora']) / 1e6:.3f}M trained"
  return line


def log(message):
  if jax.process_index() == 0:
    print(message, flush=True)


def due(step, total_steps, config):
  """(log, checkpoint, evaluate): what a trainer does after `step`, by config.log_every_steps,
  checkpoint.every_steps and eval.every_steps (0: never; the last step always logs and checkpoints,
  and evaluates when eval.at_end)."""
  ckpt_every, eval_every = int(config.checkpoint.every_steps), int(config.eval.every_steps)
  last = step == total_steps
  return (step % int(config.log_every_steps) == 0 or last,
          bool(ckpt_every and step % ckpt_every == 0) or last,
          bool(eval_every and step % eval_every == 0) or (last and bool(config.eval.at_end)))


def truncate_metrics(workdir, step):
  """On resume: drop rows written after the checkpoint, so metrics.jsonl reads as one run."""
  rows = read_metrics(workdir)
  kept = [r for r in rows if r["step"] <= step]
  if len(kept) != len(rows):
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for r in kept:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")


def check_finite(pending, last_good, clip_norm):
  """Stops at the first step whose loss or gradient norm is not finite. The gradient counts too: the
  loss of step k comes before update k, so a NaN gradient (a bfloat16 overflow, say) would put NaN
  into the parameters saved at step k while its loss still looks fine."""
  for step, m in pending:
    bad = [f"the {k.replace('_', ' ')} is {float(m[k])}" for k in ("loss", "grad_norm") if not math.isfinite(float(m[k]))]
    if bad:
      where = f"step {last_good[0]} ({last_good[1]})" if last_good else "none (no checkpoint was written yet)"
      fix = "Lower config.optim.lr" + ("" if clip_norm else " or set config.optim.clip_norm")
      raise GleamError(f"{' and '.join(bad)} at step {step}. Last good checkpoint: {where}. {fix}, then run again "
                       "(it resumes from that checkpoint).")
