"""GLEAM-X: supervised fine-tuning of Qwen2.5-VL to answer "do these two views show the same place?"
with a verdict and an explanation (English or Chinese). `config.trainer = 'sft'` (configs/x_sft.py).

The model is a local Hugging Face directory's (`config.model.hf_dir`: weights, tokenizer and
processor; nothing is downloaded) or, without one, a tiny random Qwen2.5-VL whose tokenizer is
trained on the GLEAM-X answers and written into `<workdir>/tiny_qwen` (the CPU default and the
tests). Examples come from the synthetic world (`data/gleam_x.py`), or from JSON Lines files of
your own pairs (`examples.train_file` / `eval_file`, `data/pair_files.py`): query and satellite
images, the question, the answer. Each is tokenized with the chat template
(`Processor.build_sft_example`: the loss covers only the answer and its closing `<|im_end|>`),
right-padded to the longest example. A batch holds one query modality and image layout (one
compiled step each), groups in turn; the order is a function of (seed, step), so a resumed job reads
the batches it would have. The system prompt the examples carry (Qwen2.5-VL's default unless a pairs
file gives one) is recorded in `<workdir>/system_prompt.json`, for `explain` to ask the same way.

Full fine-tuning with AdamW (`train/optim.py`: warmup + cosine, clipping, regex rules for frozen
parameters, e.g. `optim.frozen=('^model/visual/',)` to keep the vision tower, and learning-rate
multipliers), or LoRA (`lora.rank` > 0: adapters on the kernels `lora.targets` match, the model
frozen; `train/lora.py`); frozen parameters get no backward pass and no optimizer state. Checkpoints (Orbax) resume automatically.
The evaluation generates greedy answers to held-out examples and reports verdict accuracy, the
share of answers that give a verdict, and ROUGE-L against the reference explanation
(`eval/explain.py`), overall and per language, with sample answers in `eval/explain_step<N>.md`.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from gleam_jax.data import gleam_x
from gleam_jax.data import pair_files
from gleam_jax.errors import GleamError, make_dir
from gleam_jax.eval import explain as explain_metrics
from gleam_jax.models.qwen2_5_vl import config as config_lib
from gleam_jax.models.qwen2_5_vl import modeling, params, processor, tiny_dir
from gleam_jax.models.qwen2_5_vl.processor import IGNORE_INDEX
from gleam_jax.train import checkpoint
from gleam_jax.train import lora
from gleam_jax.train import optim
from gleam_jax.train import sharding as shd
from gleam_jax.train.loop import check_finite, due, log, parameter_sizes, truncate_metrics
from gleam_jax.utils.progress import RateEta, format_eta
from gleam_jax.utils.writer import MetricWriter

TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
EVAL_PROGRESS_SECONDS = 10  # between the evaluation's progress lines
SYSTEM_PROMPT_FILE = "system_prompt.json"


def model_directory(config, workdir):
  """The job's Hugging Face-layout model directory: `model.hf_dir`, or the tiny one in the workdir."""
  hf_dir = config.model.get("hf_dir")
  return os.path.expanduser(hf_dir) if hf_dir else os.path.join(workdir, "tiny_qwen")


def _model_config(config, directory):
  mc = config.model
  return config_lib.from_pretrained_dir(directory).replace(dtype=mc.dtype, param_dtype=mc.param_dtype,
                                                           remat=bool(mc.remat))


def _processor(config, directory):
  mc = config.model
  return processor.load_processor(directory, min_pixels=mc.get("min_pixels"), max_pixels=mc.get("max_pixels"),
                                  video_min_pixels=mc.get("video_min_pixels"), video_max_pixels=mc.get("video_max_pixels"),
                                  image_resize=mc.get("image_resize"))


def load_model_and_processor(config, workdir, mesh):
  """(model placed on `mesh`, processor, the model directory); the tiny directory is written on the
  job's first run."""
  mc = config.model
  directory = model_directory(config, workdir)
  if not mc.get("hf_dir") and not os.path.exists(os.path.join(directory, "config.json")):
    make_dir(directory, "--workdir")
    tiny_dir.write_tiny_qwen_dir(directory, min_pixels=int(mc.min_pixels), max_pixels=int(mc.max_pixels),
                                 corpus=gleam_x.corpus(flights=float(config.examples.get("flights", 0.0)) > 0),
                                 vocab_size=int(mc.tiny.vocab_size),
                                 text=mc.tiny.text.to_dict(), vision=mc.tiny.vision.to_dict())
  cfg = _model_config(config, directory)
  if mc.get("hf_dir"):
    model = params.load_pretrained(directory, cfg, mesh=mesh)
  else:
    model = modeling.shard_model(modeling.create_model(cfg, seed=int(config.seed)), mesh)
  return model, _processor(config, directory), directory


def job_config(workdir):
  """The config a GLEAM-X job wrote into its workdir; GleamError if the workdir holds none."""
  config = checkpoint.job_config(workdir)
  if config is None:
    raise GleamError(f"{os.path.join(os.path.expanduser(workdir), 'config.json')} not found: --workdir must be "
                     "the folder of a GLEAM-X ('sft') job.")
  if config.get("trainer") != "sft":
    raise GleamError(f"{workdir} holds a {config.get('trainer')!r} job; --workdir needs a GLEAM-X ('sft') job.")
  return config


def load_trained(workdir, mesh=None, config=None):
  """(model with the parameters of the workdir's latest checkpoint, processor, its step folder) of a
  GLEAM-X job, for `python -m gleam_jax.explain --workdir=W`; read straight into the job's sharding
  rules on `mesh` when given (else onto one device). `config`: the job's (`job_config`), when the
  caller has read it already."""
  config = config or job_config(workdir)
  directory = model_directory(config, workdir)
  model = modeling.abstract_model(_model_config(config, directory))  # shapes only: the checkpoint fills it
  graphdef, model_params, rest = nnx.split(model, nnx.Param, ...)
  mesh = mesh or shd.single_device_mesh()
  pure = nnx.to_pure_dict(model_params)
  target = {"model": pure}
  shardings = {"model": shd.state_shardings(model_params, mesh, config.sharding_rules)}
  if lora.enabled(config.get("lora")):
    target["lora"] = lora.init(pure, config.lora, int(config.seed))
    shardings["lora"] = jax.tree.map(lambda _: shd.replicated(mesh), target["lora"])
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
  restored, where, _ = checkpoint.restore_params(workdir, target)
  nnx.replace_by_pure_dict(model_params, lora.merged_model(restored, config.get("lora")))
  return nnx.merge(graphdef, model_params, rest), _processor(config, directory), where


def encode(proc, example, image_size=None):
  """One example as model inputs: input_ids, labels (the answers only), pixel_values, image_grid_thw, and
  for a drone flight's pair its video's pixel_values_videos, video_grid_thw, second_per_grid_ts."""
  images, video_args = pair_files.prompt_visuals(example, image_size)
  return proc.build_sft_example(images, example["question"], example["answer"], system=example.get("system"),
                                follow_ups=example.get("follow_ups", ()), **video_args)


def visual_layout(row):
  """An encoded row's visuals as a hashable key: (its images' grids, its videos' grids)."""
  grids = lambda key: tuple(map(tuple, np.asarray(row.get(key, np.zeros((0, 3)))).astype(int).tolist()))
  return grids("image_grid_thw"), grids("video_grid_thw")


def _layout_name(layout):
  images, videos = layout
  return "+".join([f"{h}x{w}" for _, h, w in images] + [f"video {t}x{h}x{w}" for t, h, w in videos])


def write_system_prompt(workdir, examples):
  """Records the system prompt the job trains with in `<workdir>/system_prompt.json`, so that `explain`
  and `localize` ask its model as it was trained: {"system": the examples' one prompt (null: Qwen2.5-VL's
  default), "distinct": how many the examples hold (over 1: "system" is null and they are listed)}."""
  prompts = sorted({ex.get("system") for ex in examples}, key=lambda p: (p is not None, p or ""))
  record = dict(system=prompts[0] if len(prompts) == 1 else None, distinct=len(prompts))
  if len(prompts) > 1:
    record["prompts"] = prompts
  with open(os.path.join(workdir, SYSTEM_PROMPT_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, ensure_ascii=False, indent=1)


def trained_system_prompt(workdir):
  """(the system prompt a GLEAM-X job trained with, or None for Qwen2.5-VL's default; how many distinct
  prompts it trained with: 0 where the job recorded none)."""
  path = os.path.join(os.path.expanduser(workdir), SYSTEM_PROMPT_FILE)
  if not os.path.exists(path):
    return None, 0
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  return record["system"], int(record["distinct"])


def load_examples(config, which):
  """The job's 'train' or 'eval' examples: every pair of `examples.<which>_file` when the config names
  one (images read when encoded; a video file's frames extracted under `data.data_dir`), else the
  synthetic world's draw (its non-matching satellites among GLEAM-C's `examples.negatives_top_k`
  confusions of each query with `examples.negatives_from`)."""
  ex = config.examples
  path = ex.get(f"{which}_file")
  if path:
    return pair_files.read_pairs(path, ex.get("image_root"), data_dir=config.data.data_dir)
  return gleam_x.job_examples(config, which, job_negatives(config, which))


def job_negatives(config, which):
  """GLEAM-C's confusions (`retrieve.confusions`) of the split a job draws its `which` pairs from, where
  the job mines its negatives (`examples.negatives_from`); else None."""
  ex = config.examples
  if not ex.get("negatives_from"):
    return None
  from gleam_jax import retrieve  # pylint: disable=g-import-not-at-top
  split = gleam_x.job_split(config, which)
  negatives = retrieve.confusions(os.path.expanduser(ex.negatives_from), config.data, split,
                                  tuple(config.data.modalities), int(ex.negatives_top_k))
  log(f"{which} pairs: non-matching satellites among the top {int(ex.negatives_top_k)} of GLEAM-C "
      f"({ex.negatives_from}) for each {split} query")
  return negatives


class EncodedRows:
  """The training examples as model inputs. One pass encodes every example for its token count and
  image layout (what batching needs); the encoded rows are kept (`keep`: examples held in memory) or
  encoded again when a batch reads them (examples read from files: the pixels of a whole dataset
  would not fit)."""

  def __init__(self, proc, examples, image_size=None, keep=True):
    self.proc, self.examples, self.image_size = proc, examples, image_size
    self.kept, self.lengths, self.layouts = [], [], []
    for ex in examples:
      row = encode(proc, ex, image_size)
      self.lengths.append(len(row["input_ids"]))
      self.layouts.append(visual_layout(row))
      if keep:
        self.kept.append(row)

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.kept[i] if self.kept else encode(self.proc, self.examples[i], self.image_size)

  def group_names(self):
    """Each example's batch group: its modality, with its images' grids where the modality's
    examples have several layouts (a batch holds one layout: one compiled step each)."""
    modalities = [ex["modality"] for ex in self.examples]
    layouts_of = {}
    for m, layout in zip(modalities, self.layouts):
      layouts_of.setdefault(m, set()).add(layout)
    name = lambda m, layout: m if len(layouts_of[m]) == 1 else m + " " + _layout_name(layout)
    return [name(m, layout) for m, layout in zip(modalities, self.layouts)]


def collate(rows, length, cfg):
  """Right-padded (B, length) input_ids / attention_mask / labels, position ids (B, 3, length), the
  images' and videos' patches (in placeholder order) and their vision layout."""
  b = len(rows)
  input_ids = np.full((b, length), cfg.pad_token_id, np.int32)
  labels = np.full((b, length), IGNORE_INDEX, np.int32)
  mask = np.zeros((b, length), np.int32)
  for i, row in enumerate(rows):
    n = len(row["input_ids"])
    input_ids[i, :n], labels[i, :n], mask[i, :n] = row["input_ids"], row["labels"], 1
  position_ids, pixel_values, layout = modeling.position_and_vision_inputs(input_ids, mask, cfg,
                                                                          **processor.join_visuals(rows))
  return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
          "position_ids": np.ascontiguousarray(np.transpose(position_ids, (1, 0, 2)).astype(np.int32)),
          "pixel_values": np.asarray(pixel_values, np.float32), "layout": layout}


def answer_loss(logits, labels, count=None):
  """Mean next-token cross-entropy over the answer tokens (labels != IGNORE_INDEX, not shifted: the
  logits at position i predict labels[i + 1], as Hugging Face's causal-LM loss); and the share of
  those tokens predicted right. `count`: the answer tokens to divide by (a micro-batch's part of the
  whole batch's mean), else those of `labels`."""
  nll, correct, n = _token_sums(logits[:, :-1], labels[:, 1:])
  count = jnp.maximum(n if count is None else count, 1)
  return nll / count, correct / count


def _token_sums(logits, targets):
  """(summed cross-entropy, tokens predicted right, tokens) over the targets that count."""
  valid = targets != IGNORE_INDEX
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return (nll * valid).sum(), ((jnp.argmax(logits, -1) == targets) & valid).sum(), valid.sum()


def answer_loss_chunked(logits_fn, hidden, labels, chunk, count=None):
  """`answer_loss` of `logits_fn(hidden)` without the (batch, length, vocabulary) logits: the positions
  go through in chunks of `chunk` (a scan), each chunk's logits recomputed in the backward pass, so at
  most (batch, chunk, vocabulary) exist at a time (a 3B model's 151k vocabulary)."""
  h, targets = hidden[:, :-1], labels[:, 1:]
  b, n, d = h.shape
  pad = -n % chunk
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
  targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(b, -1, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def piece(h_c, t_c):
    return _token_sums(logits_fn(h_c), t_c)

  def body(total, xs):
    return jax.tree.map(jnp.add, total, piece(*xs)), None
  zero = (jnp.float32(0), jnp.int32(0), jnp.int32(0))
  (nll, correct, n), _ = jax.lax.scan(body, zero, (h, targets))
  count = jnp.maximum(n if count is None else count, 1)
  return nll / count, correct / count


@dataclasses.dataclass(frozen=True)
class SftSetup:
  graphdef: Any
  rest: Any  # the model's non-parameter state (none for Qwen2.5-VL; kept for generality)
  tx: optax.GradientTransformation
  schedule: Any
  mesh: jax.sharding.Mesh
  shardings: Any
  trainable: Any
  lora_cfg: Any = None  # config.lora when the job trains LoRA adapters
  loss_chunk: int = 0  # > 0: the loss over chunks of this many positions (`answer_loss_chunked`)
  accum_steps: int = 1  # > 1: each batch in this many micro-batches, gradients summed (`_accumulated`)


def create_train_state(model, optim_cfg, total_steps, mesh, rules, lora_cfg=None, seed=0, loss_chunk=0,
                       accum_steps=1):
  """(SftSetup, state). With `lora_cfg.rank` > 0 the state also holds LoRA adapters and the whole
  model is frozen: AdamW keeps state for the adapters only."""
  graphdef, model_params, rest = nnx.split(model, nnx.Param, ...)
  params = {"model": nnx.to_pure_dict(model_params)}
  param_shardings = {"model": shd.state_shardings(model_params, mesh, rules)}
  optim_cfg, lora_cfg = lora.add_adapters(params, param_shardings, optim_cfg, lora_cfg, seed, shd.replicated(mesh),
                                         r"^model/")
  params = shd.place(params, param_shardings)
  tx, schedule = optim.make_optimizer(optim_cfg, params, total_steps)
  opt_state = jax.jit(tx.init)(params)
  state = {"step": jnp.int32(0), "params": params, "opt_state": opt_state}
  shardings = {"step": shd.replicated(mesh), "params": param_shardings,
               "opt_state": jax.tree.map(lambda x: shd.on_mesh(x.sharding, mesh), opt_state)}
  state = shd.place(state, shardings)
  setup = SftSetup(graphdef=graphdef, rest=nnx.to_pure_dict(rest), tx=tx, schedule=schedule, mesh=mesh,
                   shardings=shardings, trainable=optim.trainable_mask(params, optim_cfg), lora_cfg=lora_cfg,
                   loss_chunk=int(loss_chunk), accum_steps=int(accum_steps))
  return setup, state


def model_of(setup, params):
  """The model with the LoRA adapters merged into its kernels (for generation)."""
  return nnx.merge(setup.graphdef, lora.merged_model(params, setup.lora_cfg), setup.rest)


def _loss_fn(setup, params, batch, count=None):
  params = jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), setup.trainable, params)
  model = nnx.merge(setup.graphdef, params["model"], setup.rest)
  if "lora" in params:  # beside their layers: no merged kernel, no kernel-sized gradient
    lora.attach(model, params["lora"], lora.scale(setup.lora_cfg))
  hidden = model.hidden_states(batch["input_ids"], jnp.transpose(batch["position_ids"], (1, 0, 2)),
                               batch["attention_mask"], batch["pixel_values"], batch["layout"])
  if setup.loss_chunk:
    return answer_loss_chunked(model.logits, hidden, batch["labels"], setup.loss_chunk, count)
  return answer_loss(model.logits(hidden), batch["labels"], count)


def _accumulated(setup, params, batch):
  """((loss, token accuracy), gradients) of a batch held as micro-batches (a leading axis on every array
  but the vision layout, which they share), one at a time: each micro-batch's loss is divided by the
  answer tokens of the whole batch, so the sums are the whole batch's mean and its gradient (summed
  in float32)."""
  count = jnp.maximum((batch["labels"][..., 1:] != IGNORE_INDEX).sum(), 1)
  micro = {k: v for k, v in batch.items() if k != "layout"}
  grad_fn = jax.value_and_grad(lambda p, mb: _loss_fn(setup, p, {**mb, "layout": batch["layout"]}, count),
                               has_aux=True)
  trainable = setup.trainable  # frozen parameters carry a scalar, not a gradient-sized sum of zeros

  def body(total, mb):
    (loss, accuracy), grads = grad_fn(params, mb)
    grads = jax.tree.map(lambda t, g: g.astype(jnp.float32) if t else jnp.float32(0), trainable, grads)
    return jax.tree.map(jnp.add, total, ((loss, accuracy), grads)), None
  zero = ((jnp.float32(0), jnp.float32(0)),
          jax.tree.map(lambda t, p: jnp.zeros(p.shape if t else (), jnp.float32), trainable, params))
  (metrics, grads), _ = jax.lax.scan(body, zero, micro)
  return metrics, jax.tree.map(lambda t, g, p: g.astype(p.dtype) if t else jnp.zeros_like(p), trainable, grads, params)


def _train_step(setup, state, batch):
  if setup.accum_steps > 1:
    (loss, accuracy), grads = _accumulated(setup, state["params"], batch)
  else:
    (loss, accuracy), grads = jax.value_and_grad(lambda p: _loss_fn(setup, p, batch), has_aux=True)(state["params"])
  grad_norm = optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, setup.trainable))
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
  metrics = {"loss": loss, "token_acc": accuracy, "lr": setup.schedule(state["step"]), "grad_norm": grad_norm}
  return new_state, metrics


def make_train_step(setup):
  """Jitted `(state, batch) -> (state, metrics)`: token arrays split over the data axes (behind the
  micro-batch axis with `accum_steps` > 1), the images' patches and layout replicated, the state donated."""
  tokens = shd.batch_sharding(setup.mesh, axis=int(setup.accum_steps > 1))
  whole = shd.replicated(setup.mesh)
  batch_shardings = {**{k: tokens for k in TOKEN_KEYS}, "pixel_values": whole, "layout": whole}
  return jax.jit(lambda state, batch: _train_step(setup, state, batch),
                 in_shardings=(setup.shardings, batch_shardings), out_shardings=(setup.shardings, whole),
                 donate_argnums=(0,))


class Batches:
  """The training batches: step s reads `batch_size` examples of group `groups[s % G]` (a modality and
  image layout: `EncodedRows.group_names`), the (s // G)-th batch of that group's endless stream of
  seeded epoch permutations."""

  def __init__(self, rows, groups_of_rows, batch_size, seed, length, cfg, accum_steps=1):
    self.rows, self.batch_size, self.seed, self.length, self.cfg = rows, batch_size, seed, length, cfg
    self.accum_steps = accum_steps
    self.groups = sorted(set(groups_of_rows))
    self.by_group = {g: np.flatnonzero(np.asarray(groups_of_rows) == g) for g in self.groups}
    small = {g: len(r) for g, r in self.by_group.items() if len(r) < batch_size}
    if small:
      raise GleamError(f"config.batch_size={batch_size} is larger than the training examples of {small} (a batch "
                       "holds one modality and one image layout): raise config.examples.train (or add pairs), "
                       "lower the batch size, or give every image one size (config.examples.image_size).")

  def indices(self, step):
    g = self.groups[step % len(self.groups)]
    members = self.by_group[g]
    start = (step // len(self.groups)) * self.batch_size
    out = []
    for p in range(start, start + self.batch_size):
      epoch, k = divmod(p, len(members))
      out.append(int(members[self._order(g, epoch)[k]]))
    return out

  @functools.lru_cache(maxsize=8)
  def _order(self, group, epoch):
    """The seeded permutation of `group`'s examples in `epoch` (a batch spans at most two)."""
    return np.random.default_rng([self.seed, 5, epoch, self.groups.index(group)]).permutation(
        len(self.by_group[group]))

  def batch(self, step):
    """The step's batch (`collate`); with `accum_steps` > 1, its micro-batches stacked on a leading
    axis (one vision layout: the rows of a batch share their images' layout)."""
    rows = [self.rows[i] for i in self.indices(step)]
    if self.accum_steps == 1:
      return collate(rows, self.length, self.cfg)
    size = len(rows) // self.accum_steps
    micro = [collate(rows[k * size:(k + 1) * size], self.length, self.cfg) for k in range(self.accum_steps)]
    return {**{k: np.stack([m[k] for m in micro]) for k in micro[0] if k != "layout"}, "layout": micro[0]["layout"]}


def _conversations(examples):
  """', N with follow-up turns' for the job's first line, where examples go on after the first answer."""
  n = sum(bool(ex.get("follow_ups")) for ex in examples)
  return f"; {n} with follow-up turns" if n else ""


def padded_length(lengths, multiple=16):
  return int(math.ceil(max(lengths) / multiple) * multiple)


def evaluate(config, setup, state, proc, examples, workdir, step, writer):
  """Greedy answers to the held-out examples (batched by language and modality: prompts of one
  length), and to their follow-up questions where they have any; returns and writes the metrics, with
  sample answers in eval/explain_step<N>.md."""
  progress, last_line = RateEta(len(examples)), time.perf_counter()

  def show_progress(answered, _):
    nonlocal last_line
    if time.perf_counter() - last_line > EVAL_PROGRESS_SECONDS and answered < len(examples):
      last_line = time.perf_counter()
      rate, eta = progress.update(answered)
      log(f"step {step}: eval {answered}/{len(examples)} pairs answered, {rate:.1f} pairs/s, ETA {format_eta(eta)}")
  model = model_of(setup, state["params"])
  ask = functools.partial(explain_metrics.generate_answers, model, proc, batch_size=int(config.eval.batch_size),
                          max_new_tokens=int(config.eval.max_new_tokens), mesh=setup.mesh,
                          image_size=config.examples.get("image_size"))
  answers, yes = ask(examples, on_batch=show_progress)
  metrics = explain_metrics.explain_metrics(answers, examples, yes)
  asked = explain_metrics.follow_up_questions(examples)
  if asked:  # conversations that go on: each later question after the reference turns before it
    later = explain_metrics.answer_follow_ups(asked, lambda batch: ask(batch)[0])
    metrics["follow_up_rouge_l"] = explain_metrics.follow_up_rouge_l(later, asked)
  writer.write(step, {f"eval/explain/{k}": v for k, v in metrics.items()})
  if jax.process_index() == 0:
    lines = [f"# GLEAM-X evaluation, step {step}", "",
             " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()), "",
             "| # | modality | lang | truth | reference | generated | p_yes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for i in range(min(int(config.eval.num_samples), len(examples))):
      ex = examples[i]
      p_yes = "-" if yes[i] is None else f"{yes[i]:.2f}"
      lines.append(f"| {i} | {ex['modality']} | {ex['lang']} | {'match' if ex['match'] else 'no match'} | "
                   f"{ex['answer']} | {answers[i].replace('|', '/').replace(chr(10), ' ')} | {p_yes} |")
    path = os.path.join(workdir, "eval", f"explain_step{step}.md")
    make_dir(os.path.dirname(path), "--workdir")
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  log(f"step {step}: eval {explain_metrics.summary(metrics)} on {len(examples)} held-out pairs")
  return metrics


def evaluates(config):
  """Whether the job evaluates at all (eval.every_steps or eval.at_end)."""
  return bool(int(config.eval.every_steps) or config.eval.at_end)


def check_config(config):
  if int(config.batch_size) <= 0:
    raise GleamError(f"config.batch_size={config.batch_size} must be positive.")
  optim.check_values(config.optim)
  optim.learning_rate_schedule(config.optim, int(config.total_steps))
  lora.check_values(config.get("lora"))
  for key in ("train", "eval"):
    if int(config.examples[key]) < 2:
      raise GleamError(f"config.examples.{key}={config.examples[key]}: give at least 2 (a match and a non-match).")
  if config.examples.get("train_file") and not config.examples.get("eval_file") and evaluates(config):
    raise GleamError("config.examples.train_file is set but examples.eval_file is not: name your held-out pairs, "
                     "or turn the evaluation off (eval.at_end=False, eval.every_steps=0).")
  for lang in config.examples.langs:
    if lang not in gleam_x.LANGS:
      raise GleamError(f"config.examples.langs has {lang!r}; GLEAM-X answers are written in {gleam_x.LANGS}.")
  if config.examples.get("negatives_from") and int(config.examples.negatives_top_k) < 1:
    raise GleamError(f"config.examples.negatives_top_k={config.examples.negatives_top_k}: draw negatives from at "
                     "least GLEAM-C's top 1.")
  if not 0.0 <= float(config.examples.get("flights", 0.0)) <= 1.0:
    raise GleamError(f"config.examples.flights={config.examples.flights}: the share of drone pairs asked about "
                     "the whole flight is in [0, 1].")


def run(config, workdir):
  """Fine-tunes as `config` says; returns the last evaluation's metrics."""
  check_config(config)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every write at INFO; progress goes to stdout
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = shd.make_mesh(config.mesh)
  batch_size, seed, total_steps = int(config.batch_size), int(config.seed), int(config.total_steps)
  accum_steps = int(config.get("grad_accum_steps", 1))
  if accum_steps < 1 or batch_size % accum_steps:
    raise GleamError(f"config.grad_accum_steps={accum_steps} must be a positive divisor of config.batch_size="
                     f"{batch_size} (each step's batch is split into that many micro-batches).")
  micro_batch = ("config.batch_size" if accum_steps == 1 else
                 f"config.batch_size / config.grad_accum_steps (a micro-batch of {batch_size} // {accum_steps})")
  shd.check_batch_divides(batch_size // accum_steps, mesh, micro_batch)
  with contextlib.ExitStack() as cleanup:
    model, proc, directory = load_model_and_processor(config, workdir, mesh)
    cfg = model.cfg
    train = load_examples(config, "train")
    if jax.process_index() == 0:
      write_system_prompt(workdir, train)
    held_out = load_examples(config, "eval") if evaluates(config) else []
    image_size = config.examples.get("image_size")
    rows = EncodedRows(proc, train, image_size, keep=not config.examples.get("train_file"))
    batches = Batches(rows, rows.group_names(), batch_size, seed, padded_length(rows.lengths), cfg, accum_steps)
    setup, state = create_train_state(model, config.optim, total_steps, mesh, config.sharding_rules,
                                      lora_cfg=config.get("lora"), seed=seed, loss_chunk=config.get("loss_chunk", 0),
                                      accum_steps=accum_steps)
    del model
    sizes = parameter_sizes(state["params"], config.get("lora"))
    manager = checkpoint.make_manager(workdir, config.checkpoint.max_to_keep, config.checkpoint.async_save)
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)
    step, last_good = 0, None
    if manager.latest_step() is not None:
      state, _, step = checkpoint.restore(manager, state)
      last_good = (int(step), checkpoint.step_path(manager, step))
      if jax.process_index() == 0:
        truncate_metrics(workdir, int(step))
      log(f"resumed from {last_good[1]}")
    step = int(step)
    log(f"{len(jax.devices())} devices, mesh {dict(mesh.shape)}; Qwen2.5-VL {sizes} from "
        f"{directory}; {len(train)} training pairs ({', '.join(batches.groups)}; "
        f"{', '.join(sorted({ex['lang'] for ex in train}))}{_conversations(train)}), "
        f"{batches.length} tokens per row{f' (batch in {accum_steps} micro-batches)' if accum_steps > 1 else ''}; "
        f"training to step {total_steps}")
    partitions = optim.describe_partitions(state["params"], config.optim)
    if partitions:
      log(partitions)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    cleanup.callback(writer.close)
    train_step = make_train_step(setup)
    rate = RateEta(total_steps)
    pending, results, first_step = [], {}, step
    while step < total_steps:
      batch = batches.batch(step)
      batch = {**shd.shard_batch({k: batch[k] for k in TOKEN_KEYS}, mesh, axis=int(accum_steps > 1)),
               "pixel_values": batch["pixel_values"],
               "layout": batch["layout"]}
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        rate.reset(step)  # the first step of each shape compiles
      is_log, is_ckpt, is_eval = due(step, total_steps, config)
      if is_log or is_ckpt or is_eval:
        pending = jax.device_get(pending)
        check_finite(pending, last_good, config.optim.get("clip_norm"))
        if is_log:
          m = dict(pending[-1][1])
          steps_per_s, eta = rate.update(step)
          m.update(examples_per_s=steps_per_s * batch_size)
          writer.write(step, m)
          log(f"step {step}/{total_steps} loss {m['loss']:.4f} token acc {m['token_acc']:.2f} lr {m['lr']:.2e} "
              f"grad norm {m['grad_norm']:.3f} {m['examples_per_s']:.1f} examples/s ETA {format_eta(eta)}")
        pending = []
      if is_ckpt:
        checkpoint.save(manager, step, state, {"step": step})
        last_good = (step, checkpoint.step_path(manager, step))
      if is_eval:
        results = evaluate(config, setup, state, proc, held_out, workdir, step, writer)
    return results
