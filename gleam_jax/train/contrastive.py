"""GLEAM-C contrastive trainer: `run(config, workdir)`, and the jitted train step it is built on.

The train step (reused by `gleam_jax.bench.train_step`):

    setup, state = create_train_state(model, optim_cfg, total_steps, mesh, rules,
                                      loss_name='infonce', label_smoothing=0.1, seed=0)
    train_step = make_train_step(setup)          # jitted, state donated
    state, metrics = train_step(state, batch)    # batch: {'query': (B,H,W,3), 'satellite': (B,Hs,Ws,3)}

- `model` is a `GleamC` (anything with `encode(images, tower)`, `tower_key(tower)` and a
  `logit_scale` Param); its config decides the compute dtype (bfloat16 option, parameters stay
  float32) and remat.
- `state` is a dict pytree of jax.Arrays placed on `mesh`: `step`, `params` (`{'model': ...}` plus
  `loss_bias` for the sigmoid loss, and `lora` with `lora_cfg.rank` > 0: adapters on the encoders'
  block Linears, which are then frozen, `train/lora.py`), `opt_state`, `model_state` (non-parameter
  variables) and `rng` (key data; drop path draws from `fold_in(rng, step)`, so a resumed run draws the
  same noise).
- `batch` arrays are global jax.Arrays sharded over ('data', 'fsdp') (`sharding.shard_batch`) or
  host NumPy arrays of the global batch; images are float32/bfloat16 (already normalised) or uint8
  (normalised in the step with ImageNet mean/std). `query` and `satellite` are arrays, or dicts of
  modality groups (`pipeline.ModalityStreams`: each modality at its own image shape) with
  `location_id` groups alongside; the images one tower reads at one shape are encoded in one call,
  joined shard by shard so that no image moves between devices (`encode_pairs`), and one loss
  covers every query against every satellite of the global batch, a location that two groups
  share excluded from the negatives.
- `metrics`: loss, lr, logit_scale (exp, clipped), grad_norm (trainable parameters), batch_acc
  (and batch_acc/<modality> for grouped batches).

The loss covers the global batch: the (B x B) logits are computed from the embeddings, so GSPMD
all-gathers embeddings across the data axes and never the images.
"""
import contextlib
import dataclasses
import functools
import math
import os
from typing import Any

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gleam_jax.data import pipeline
from gleam_jax.data import sources
from gleam_jax.errors import GleamError
from gleam_jax.eval import evaluator
from gleam_jax.eval import retrieval
from gleam_jax.models import gleam_c
from gleam_jax.train import checkpoint
from gleam_jax.train import lora
from gleam_jax.train import losses
from gleam_jax.train.loop import check_finite, due, log, parameter_sizes, truncate_metrics
from gleam_jax.train import optim
from gleam_jax.train import sharding as shd
from gleam_jax.utils import mfu
from gleam_jax.utils.progress import RateEta, format_eta
from gleam_jax.utils.writer import MetricWriter

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
STEP_INPUTS = ("query", "satellite")
SIGMOID_BIAS_INIT = -10.0


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the jitted step closes over (all static for jit)."""
  graphdef: Any
  rng_state: Any  # the model's RNG variables; reseeded every step
  tx: optax.GradientTransformation
  schedule: Any
  loss_name: str
  label_smoothing: float
  mesh: jax.sharding.Mesh
  shardings: Any  # tree matching the train state
  trainable: Any  # tree of bools matching state['params']
  accum_steps: int = 1  # > 1: the batch is encoded in this many micro-batches (`_cached_grads`)
  lora_cfg: Any = None  # config.lora when the job trains LoRA adapters


def normalise_images(images):
  """uint8 images -> float32 normalised with ImageNet mean/std; float images pass unchanged."""
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD
  return images


def split_model(model):
  """(graphdef, params, rng_state, model_state) as pure pytrees of arrays."""
  graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, params, rng_state, rest


def merge_model(setup, params, model_state):
  """The model of the state's `params`; its LoRA adapters, when it has them, beside their layers (no
  merged kernel, no kernel-sized gradient): take its state back with `model_state_of`."""
  model = nnx.merge(setup.graphdef, params["model"], setup.rng_state, model_state)
  if "lora" in params:
    lora.attach(model, params["lora"], lora.scale(setup.lora_cfg))
  return model


def model_state_of(model, params):
  """The non-parameter variables of a `merge_model` model (its adapters detached first)."""
  if "lora" in params:
    lora.detach(model, params["lora"])
  return nnx.to_pure_dict(split_model(model)[3])


def create_train_state(model, optim_cfg, total_steps, mesh, rules, loss_name="infonce",
                       label_smoothing=0.1, seed=0, with_optimizer=True, accum_steps=1, lora_cfg=None):
  """(TrainSetup, state placed on `mesh`) for `model`; the model object is not used afterwards.
  `accum_steps` > 1: the step's gradients are gradient-cached over that many micro-batches.
  `lora_cfg.rank` > 0: LoRA adapters on the kernels `lora_cfg.targets` match, every encoder frozen
  (the projection heads, the logit scale and the sigmoid loss's bias train).

  `with_optimizer=False` (evaluation only): the state has no `opt_state`, which is never built, so
  the job's peak memory is the parameters', not a training job's."""
  if loss_name not in losses.LOSSES:
    losses.contrastive_loss(loss_name, None, None, None)  # raises the config error
  graphdef, params, rng_state, rest = split_model(model)
  param_shardings = shd.state_shardings(params, mesh, rules)
  rest_shardings = shd.state_shardings(rest, mesh, rules)
  params = {"model": nnx.to_pure_dict(params)}
  param_shardings = {"model": param_shardings}
  if loss_name == "sigmoid":
    params["loss_bias"] = jnp.float32(SIGMOID_BIAS_INIT)
    param_shardings["loss_bias"] = shd.replicated(mesh)
  optim_cfg, lora_cfg = lora.add_adapters(params, param_shardings, optim_cfg, lora_cfg, seed, shd.replicated(mesh),
                                         lora.ENCODERS)
  params = shd.place(params, param_shardings)
  # evaluation builds no optimizer (nor its schedule, which could not fit an evaluation's total_steps)
  tx, schedule = optim.make_optimizer(optim_cfg, params, total_steps) if with_optimizer else (None, None)
  state = {
      "step": jnp.int32(0),
      "params": params,
      "model_state": nnx.to_pure_dict(rest),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }
  shardings = {
      "step": shd.replicated(mesh),
      "params": param_shardings,
      "model_state": rest_shardings,
      "rng": shd.replicated(mesh),
  }
  if with_optimizer:
    state["opt_state"] = jax.jit(tx.init)(params)
    shardings["opt_state"] = jax.tree.map(lambda x: shd.on_mesh(x.sharding, mesh), state["opt_state"])
  state = shd.place(state, shardings)
  setup = TrainSetup(
      graphdef=graphdef, rng_state=nnx.to_pure_dict(rng_state), tx=tx, schedule=schedule,
      loss_name=loss_name, label_smoothing=float(label_smoothing), mesh=mesh, shardings=shardings,
      trainable=optim.trainable_mask(params, optim_cfg), accum_steps=int(accum_steps), lora_cfg=lora_cfg)
  return setup, state


def _loss_fn(setup, params, model_state, rng, step, batch):
  model = merge_model(setup, params, model_state)
  model.train()
  nnx.reseed(model, dropout=jax.random.fold_in(jax.random.wrap_key_data(rng), step))
  query, reference = encode_pairs(model, batch["query"], batch["satellite"], shd.batch_shards(setup.mesh))
  loss, aux = _batch_loss(setup, params, query, reference, batch)
  return loss, (model_state_of(model, params), aux)


def _batch_loss(setup, params, query, reference, batch):
  """(loss, metrics) of the global batch's embeddings, in `encode_pairs`' order."""
  exclude = None
  if "location_id" in batch:
    location_ids = jnp.concatenate(jax.tree.leaves(batch["location_id"]))
    exclude = losses.same_location_pairs(location_ids, location_ids)
  log_scale = params["model"]["logit_scale"]
  loss = losses.contrastive_loss(
      setup.loss_name, query, reference, log_scale, params.get("loss_bias"), setup.label_smoothing, exclude)
  aux = {
      "logit_scale": losses.logit_scale_value(log_scale),
      "batch_acc": losses.retrieval_accuracy(query, reference),
  }
  if isinstance(batch["query"], dict):
    hits = losses.retrieval_hits(query, reference)
    start = 0
    for name, images in sorted(batch["query"].items()):
      aux[f"batch_acc/{name}"] = jnp.mean(hits[start:start + images.shape[0]])
      start += images.shape[0]
  return loss, aux


def encode_pairs(model, query, satellite, shards=1):
  """(query, satellite) embeddings of a batch whose images are arrays or dicts of modality groups
  (joined in key order, as jax.tree.leaves). A query group is read by its modality's tower (the
  model falls back to the query tower), satellites by the reference tower.

  The images one network reads at one shape are encoded in one call (phase 2: the satellites of
  every modality; with one shared tower also the square UAV and street-map queries): fewer, larger
  calls run faster than one per group. Parts are joined shard by shard (`join_by_shard`), so no
  image moves between devices; `shards` is the number of batch shards of the mesh."""
  if not isinstance(query, dict):
    query, satellite = {"": query}, {"": satellite}
  parts = [(model.tower_key(m or "query"), m or "query", normalise_images(query[m])) for m in sorted(query)]
  parts += [(model.tower_key("reference"), "reference", normalise_images(satellite[m])) for m in sorted(satellite)]
  calls = {}
  for i, (key, _, images) in enumerate(parts):
    calls.setdefault((key, images.shape[1:], images.dtype), []).append(i)
  embeddings = [None] * len(parts)
  for members in calls.values():
    joined = join_by_shard([parts[i][2] for i in members], shards)
    pieces = split_by_shard(model.encode(joined, tower=parts[members[0]][1]),
                            [parts[i][2].shape[0] for i in members], shards)
    for i, piece in zip(members, pieces):
      embeddings[i] = piece
  return jnp.concatenate(embeddings[:len(query)]), jnp.concatenate(embeddings[len(query):])


def join_by_shard(arrays, shards):
  """Concatenates batch-sharded arrays so that shard s of the result holds shard s of each input
  (in order): a concatenation on the batch axis that keeps every row on its device."""
  if len(arrays) == 1:
    return arrays[0]
  blocks = [a.reshape(shards, a.shape[0] // shards, *a.shape[1:]) for a in arrays]
  joined = jnp.concatenate(blocks, axis=1)
  return joined.reshape(-1, *joined.shape[2:])


def split_by_shard(joined, sizes, shards):
  """The inverse of `join_by_shard`: the arrays of batch sizes `sizes`."""
  if len(sizes) == 1:
    return [joined]
  blocks = joined.reshape(shards, -1, *joined.shape[1:])
  bounds = np.cumsum([n // shards for n in sizes])[:-1]
  return [b.reshape(-1, *b.shape[2:]) for b in jnp.split(blocks, bounds, axis=1)]


def _frozen_out(setup, params):
  """Frozen parameters behind stop_gradient: they get no backward pass (their gradient is zero)."""
  return jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), setup.trainable, params)


def _grads(setup, state, batch):
  if setup.accum_steps > 1:
    return _cached_grads(setup, state, batch)
  grad_fn = jax.value_and_grad(lambda params, *args: _loss_fn(setup, _frozen_out(setup, params), *args),
                               has_aux=True)
  (loss, (model_state, aux)), grads = grad_fn(
      state["params"], state["model_state"], state["rng"], state["step"], batch)
  return loss, grads, model_state, aux


def _cached_grads(setup, state, batch):
  """The global batch's loss and gradients with one micro-batch's activations in memory at a time
  (gradient cache, Gao et al. 2021): the contrastive loss needs every embedding of the batch, so

  1. every micro-batch is encoded without gradients, giving the batch's embeddings;
  2. the loss and its gradients with respect to those embeddings (and the logit scale, the bias);
  3. every micro-batch is encoded again and its embeddings' gradients pulled back to the parameters,
     summed over the micro-batches (`lax.scan`, so memory does not grow with their number).

  The gradients are the full batch's (every query against every satellite), at the cost of a second
  forward pass. Micro-batch k holds block k of every shard's rows (`split_micro_batches`), so no image
  moves between devices; it draws drop path from fold_in(step key, k) in both of its passes."""
  shards, steps = shd.batch_shards(setup.mesh), setup.accum_steps
  params = state["params"]
  images = {k: batch[k] if isinstance(batch[k], dict) else {"": batch[k]} for k in STEP_INPUTS}
  micro = jax.lax.with_sharding_constraint(split_micro_batches(images, steps, shards),
                                           shd.batch_sharding(setup.mesh, axis=1))
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

  def embed(params, k, images):
    model = merge_model(setup, params, state["model_state"])
    model.train()
    nnx.reseed(model, dropout=jax.random.fold_in(step_key, k))
    return encode_pairs(model, images["query"], images["satellite"], shards)

  def embed_without_grads(_, xs):
    return None, embed(jax.lax.stop_gradient(params), *xs)
  index = jnp.arange(steps)
  _, (query, reference) = jax.lax.scan(embed_without_grads, None, (index, micro))
  sizes = {k: [x.shape[0] for _, x in sorted(images[k].items())] for k in STEP_INPUTS}
  query = join_micro_batches(query, sizes["query"], shards)
  reference = join_micro_batches(reference, sizes["satellite"], shards)

  loss_grad = jax.value_and_grad(
      lambda p, q, r: _batch_loss(setup, _frozen_out(setup, p), q, r, batch), argnums=(0, 1, 2), has_aux=True)
  (loss, aux), (grads, d_query, d_reference) = loss_grad(params, query, reference)
  d_query = split_micro_embeddings(d_query, sizes["query"], steps, shards)
  d_reference = split_micro_embeddings(d_reference, sizes["satellite"], steps, shards)

  def pull_back(grads, xs):
    k, images, cotangents = xs
    _, vjp = jax.vjp(lambda p: embed(_frozen_out(setup, p), k, images), params)
    return jax.tree.map(jnp.add, grads, vjp(cotangents)[0]), None
  grads, _ = jax.lax.scan(pull_back, grads, (index, micro, (d_query, d_reference)))
  return loss, grads, state["model_state"], aux


def split_micro_batches(tree, steps, shards):
  """Every leaf (B, ...) -> (steps, B / steps, ...). Micro-batch k holds block k of every shard's rows,
  so shard s of each micro-batch lies on shard s's devices: no data moves."""
  def split(x):
    blocks = x.reshape(shards, steps, x.shape[0] // (shards * steps), *x.shape[1:])
    return jnp.swapaxes(blocks, 0, 1).reshape(steps, -1, *x.shape[1:])
  return jax.tree.map(split, tree)


def _unsplit(x, shards):
  """The inverse of `split_micro_batches` for one leaf: (steps, B / steps, ...) -> (B, ...)."""
  blocks = x.reshape(x.shape[0], shards, -1, *x.shape[2:])
  return jnp.swapaxes(blocks, 0, 1).reshape(-1, *x.shape[2:])


def join_micro_batches(embeddings, sizes, shards):
  """(steps, B / steps, D) embeddings of the micro-batches' `encode_pairs` (groups of `sizes` / steps
  rows in key order in each) -> (B, D) in the global batch's `encode_pairs` order."""
  bounds = np.cumsum([n // embeddings.shape[0] for n in sizes])[:-1]
  return jnp.concatenate([_unsplit(g, shards) for g in jnp.split(embeddings, bounds, axis=1)])


def split_micro_embeddings(embeddings, sizes, steps, shards):
  """The inverse of `join_micro_batches`."""
  groups = jnp.split(embeddings, np.cumsum(sizes)[:-1])
  return jnp.concatenate([split_micro_batches(g, steps, shards) for g in groups], axis=1)


def _train_step(setup, state, batch):
  loss, grads, model_state, aux = _grads(setup, state, batch)
  grad_norm = optax.tree.norm(jax.tree.map(
      lambda g, t: g if t else jnp.zeros_like(g), grads, setup.trainable))
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  if setup.loss_name == "infonce":
    model_params = dict(params["model"], logit_scale=losses.clamp_log_scale(params["model"]["logit_scale"]))
    params = dict(params, model=model_params)
  new_state = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "model_state": model_state,
      "rng": state["rng"],
  }
  metrics = {"loss": loss, "lr": setup.schedule(state["step"]), "grad_norm": grad_norm, **aux}
  return new_state, metrics


def batch_shardings(setup):
  """One sharding for every leaf of the batch (a pytree prefix): the batch axis over the data axes."""
  return shd.batch_sharding(setup.mesh)


def step_inputs(batch):
  """What the step reads: query and satellite, and the location ids of grouped batches."""
  keys = STEP_INPUTS + (("location_id",) if isinstance(batch["query"], dict) else ())
  return {k: batch[k] for k in keys}


def step_model_flops(model_cfg, batch):
  """Model FLOPs of a train step on `batch` (global shapes): `gleam_c.contrastive_step_flops`."""
  shapes = {k: [x.shape[:3] for x in jax.tree.leaves(batch[k])] for k in STEP_INPUTS}
  return gleam_c.contrastive_step_flops(model_cfg, shapes["query"], shapes["satellite"])


def check_batch_groups(batch, mesh, accum_steps=1):
  """Every group of the batch has as many satellites as queries, and splits over the mesh's data axes
  (in `accum_steps` micro-batches; fails before compiling, with the numbers)."""
  queries = batch["query"] if isinstance(batch["query"], dict) else {"": batch["query"]}
  satellites = batch["satellite"] if isinstance(batch["satellite"], dict) else {"": batch["satellite"]}
  if set(satellites) != set(queries):
    raise GleamError(f"the batch's satellite groups {sorted(satellites)} are not its query groups {sorted(queries)}.")
  for name, images in queries.items():
    if satellites[name].shape[0] != images.shape[0]:
      raise GleamError(f"the batch{' group ' + name if name else ''} holds {images.shape[0]} queries but "
                       f"{satellites[name].shape[0]} satellites; each query needs its own satellite.")
    what = f"batch size of {name}" if name else "batch size"
    if images.shape[0] % accum_steps:
      raise GleamError(f"the {what}={images.shape[0]} does not split into config.grad_accum_steps={accum_steps} "
                       f"micro-batches: use a multiple of {accum_steps} x the mesh's data shards.")
    what = what if accum_steps == 1 else f"micro-batch size of {name or 'the batch'} ({images.shape[0]} // {accum_steps})"
    shd.check_batch_divides(images.shape[0] // accum_steps, mesh, what=what)


def make_train_step(setup):
  """Jitted `(state, batch) -> (state, metrics)`, explicit shardings, state donated."""
  return _checked(setup, jax.jit(
      lambda state, batch: _train_step(setup, state, batch),
      in_shardings=(setup.shardings, batch_shardings(setup)),
      out_shardings=(setup.shardings, shd.replicated(setup.mesh)),
      donate_argnums=(0,)))


def make_grad_fn(setup):
  """Jitted `(state, batch) -> (loss, grads)` (for tests and diagnostics; state not donated)."""
  return _checked(setup, jax.jit(lambda state, batch: _grads(setup, state, batch)[:2],
                                 in_shardings=(setup.shardings, batch_shardings(setup))))


def _checked(setup, jitted):
  """`jitted` called on the step's inputs of a batch whose groups were checked first (`.jitted`: it alone)."""
  def call(state, batch):
    batch = step_inputs(batch)
    check_batch_groups(batch, setup.mesh, setup.accum_steps)
    return jitted(state, batch)
  call.jitted = jitted
  return call


# ----------------------------------------------------------------------------------------------
# The job: `python -m gleam_jax.main --config=configs/c_phase1.py --workdir=DIR`.
# ----------------------------------------------------------------------------------------------
def build_model(model_cfg, seed, pretrained=True):
  """The GLEAM-C of `model_cfg`, its backbone from `model.pretrained` (logged, with the checkpoint keys
  the backbone's settings leave out). `pretrained=False` leaves that file unread: for a model whose
  parameters come from a checkpoint (a resumed job, a trained one), which then needs neither the time
  to read those weights nor their file."""
  model = gleam_c.GleamC(model_cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1), read_pretrained=False)
  path = model_cfg.get("pretrained")
  if path and pretrained:
    left_out = model.load_pretrained(path)
    log(f"backbone weights from {path}" + (f"; left out by model.vit's settings: {', '.join(left_out)}"
                                           if left_out else ""))
  return model


def eval_model(setup, state):
  """The model with the state's parameters (LoRA adapters folded into their kernels), in eval mode (no
  drop path)."""
  params = {"model": lora.merged_model(state["params"], setup.lora_cfg)}
  model = merge_model(setup, params, state["model_state"])
  model.eval()
  return model


def check_config(config):
  """Config errors that can be seen before building anything."""
  if config.loss.name not in losses.LOSSES:
    raise GleamError(f"config.loss.name={config.loss.name!r} is not a loss: set it to one of {losses.LOSSES}.")
  if int(config.batch_size) <= 0:
    raise GleamError(f"config.batch_size={config.batch_size} must be positive.")
  optim.check_values(config.optim)
  lora.check_values(config.get("lora"))
  for key in ("log_every_steps", "grad_accum_steps"):
    if int(config[key]) <= 0:
      raise GleamError(f"config.{key}={config[key]} must be positive.")
  if config.eval.protocol != "cvusa" and config.eval.protocol not in ("vigor", "university"):
    raise GleamError(f"config.eval.protocol={config.eval.protocol!r}: use 'cvusa', 'vigor' or 'university'.")
  fovs = fov_query_sets(config).values()
  if fovs and "panorama" not in eval_modalities(config):
    raise GleamError(f"config.eval.panorama_fov_deg={tuple(fovs)} cuts panoramas, but this job does not evaluate "
                     "panoramas: add 'panorama' to eval.modalities or clear eval.panorama_fov_deg.")
  for fov in fovs:
    pipeline.check_panorama_fov(fov)
  evaluator.check_multi_query(multi_query_modalities(config), eval_modalities(config), config.eval.protocol)


def eval_modalities(config):
  """The query modalities the job evaluates: `eval.modalities`, by default the training ones."""
  return tuple(config.eval.modalities or config.data.modalities)


def multi_query_modalities(config):
  """The modalities also scored with one query per location: `eval.multi_query`, or when it is not
  set (or a config predates it) the drone views where the job evaluates them, outside VIGOR."""
  chosen = config.eval.get("multi_query")
  if chosen is not None:
    return tuple(chosen)
  return ("uav",) if "uav" in eval_modalities(config) and config.eval.protocol != "vigor" else ()


def fov_query_sets(config):
  """{name: fov_deg} of the limited-field-of-view panorama evaluations (`eval.panorama_fov_deg`)."""
  return {f"panorama_fov{float(f):g}": float(f) for f in tuple(config.eval.get("panorama_fov_deg", ()) or ())}


def evaluate(config, setup, state, workdir, step, writer):
  """Retrieval metrics of every eval split and modality (see gleam_jax.eval.evaluator)."""
  model = eval_model(setup, state)
  modalities = eval_modalities(config)
  encode_query = {m: functools.partial(model.encode, tower=m) for m in modalities}
  encode_query.update({name: encode_query["panorama"] for name in fov_query_sets(config)})
  encode_reference = functools.partial(model.encode, tower="reference")
  results = {}
  batch_size = config.eval.batch_size
  rows = eval_process_rows(setup.mesh, batch_size)
  for split in config.eval.splits:
    def report(encode_q, encode_g, query_sets, gallery, multi_query=()):
      results.update(evaluator.evaluate_retrieval(
          encode_q, encode_g, query_sets, gallery, protocol=config.eval.protocol, mesh=setup.mesh,
          search_cfg=config.eval.search, workdir=workdir, step=step, writer=writer,
          num_examples_png=config.eval.num_examples_png, split=split, multi_query=multi_query))

    query_sets = {m: pipeline.make_eval_batches(config.data, split, m, batch_size, rows) for m in modalities}
    for name, fov in fov_query_sets(config).items():
      query_sets[name] = pipeline.make_eval_batches(config.data, split, "panorama", batch_size, rows, fov)
    report(encode_query, encode_reference, query_sets,
           pipeline.make_gallery_batches(config.data, split, batch_size, rows), multi_query_modalities(config))
    for m in config.eval.get("satellite_to", ()):  # the reverse direction: satellites query views of m
      report(encode_reference, functools.partial(model.encode, tower=m),
             {f"satellite_to_{m}": pipeline.make_satellite_query_batches(config.data, split, m, batch_size, rows)},
             pipeline.make_view_gallery_batches(config.data, split, m, batch_size, rows))
  r1 = ", ".join(f"{k[len('eval/'):-len('/R@1')]} {100 * v:.1f}%" for k, v in results.items()
                 if k.endswith("/R@1"))
  log(f"step {step}: eval R@1: {r1}")
  return results


def eval_process_rows(mesh, batch_size):
  """With several processes, each decodes only the rows of every eval batch that its devices hold."""
  if jax.process_count() == 1:
    return None
  shd.check_batch_divides(batch_size, mesh, what="config.eval.batch_size")
  return shd.process_rows(mesh, batch_size)


def refresh_dss_neighbours(config, setup, state, sampler):
  """DSS: each training location's most similar satellites (current model) share its batches."""
  model = eval_model(setup, state)
  batches = pipeline.make_gallery_batches(config.data, config.data.train_split, config.eval.batch_size,
                                         eval_process_rows(setup.mesh, config.eval.batch_size))
  embeddings, labels = retrieval.embed(lambda x: model.encode(x, tower="reference"), batches, setup.mesh)
  location_ids = labels["location_id"].reshape(-1)
  k = min(int(config.data.sampler.neighbour_range) + 1, len(location_ids))
  index = retrieval.ExactIndex(embeddings, setup.mesh, config.eval.search.query_chunk,
                               config.eval.search.gallery_chunk)
  _, nearest = index.search(embeddings, k)
  own = nearest == np.arange(len(location_ids))[:, None]
  table = np.stack([row[~mask][:k - 1] for row, mask in zip(np.asarray(nearest), own)])
  sampler.set_neighbours(location_ids[table], location_ids)


def init_from_checkpoint(config, state, what="run phase 1 first (its --workdir is the path to give)"):
  """(state with the parameters of `config.init_from`, the step folder they came from); `what`:
  the fix to name when the path does not exist. A job that trained LoRA adapters gives its model with
  them folded into its kernels (its config.json says how); this job's own adapters start afresh."""
  path = os.path.expanduser(config.init_from)
  if not os.path.exists(path):
    raise GleamError(f"config.init_from={config.init_from!r} does not exist: {what}, or set "
                     "--config.init_from to a finished job's workdir.")
  cfg = config.model
  copy_source = lambda name: _model_copy_source(name, cfg)
  source_job = checkpoint.job_directory(path)
  source_config = checkpoint.job_config(source_job)
  source_lora = (source_config or {}).get("lora")
  fix = "Set the model config to the one the checkpoint was trained with."
  if source_config is None:  # LoRA adapters in it (lora/...) could not be folded: their rank and alpha are unknown
    fix += (f" A checkpoint with LoRA adapters (lora/...) is read with its job's config.json, which {source_job} "
            "lacks: copy that job's config.json there.")
  target = {k: v for k, v in state["params"].items() if k != "lora"}
  if lora.enabled(source_lora):  # restored beside the model, then folded in
    adapters = lora.init(state["params"]["model"], source_lora, 0)
    mesh = jax.tree.leaves(state["params"])[0].sharding.mesh
    target["lora"] = shd.place(adapters, jax.tree.map(lambda _: shd.replicated(mesh), adapters))
  params, where, copied = checkpoint.restore_params(path, target, copy_source, fix)
  if "lora" in params:  # folded, on the shardings of the parameters it replaces
    merged = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding), lora.merged_model(params, source_lora),
                          state["params"]["model"])
    params = {**params, "model": merged}
    del params["lora"]
    log(f"folded the LoRA adapters of {where} (rank {int(source_lora.rank)}) into its kernels")
  if "lora" in state["params"]:
    params["lora"] = state["params"]["lora"]
  log(f"initialised parameters from {where}")
  towers = sorted({n.split("/")[1].rsplit("_", 1)[0] for n in copied if n.startswith("model/")})
  if towers:
    log(f"modality towers {', '.join(towers)} start as copies of its query tower")
  return {**state, "params": params}, where


def _model_copy_source(name, model_cfg):
  """'model/uav_encoder/...' -> 'model/encoder/...' (the phase-1 tower a new modality tower copies);
  a LoRA adapter's 'lora/uav_encoder.blocks.0...' -> 'lora/encoder.blocks.0...' likewise."""
  root, _, rest = name.partition("/")
  if root not in ("model", "lora"):
    return None
  if root == "lora":  # adapters are keyed by their kernel's '.'-joined name
    key, _, leaf = rest.partition("/")
    source = _model_copy_source(f"model/{key.replace('.', '/')}", model_cfg)
    return source and f"lora/{source[len('model/'):].replace('/', '.')}/{leaf}"
  source = gleam_c.tower_copy_source(rest, bool(model_cfg.separate_towers),
                                     tuple(model_cfg.get("modality_towers", ()) or ()))
  return source and f"model/{source}"


def run(config, workdir):
  """Trains GLEAM-C as `config` says; returns the last evaluation's metrics."""
  check_config(config)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every write at INFO; progress goes to stdout
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = shd.make_mesh(config.mesh)
  batch_size = int(config.batch_size)
  accum_steps = int(config.grad_accum_steps)
  shd.check_batch_divides(batch_size, mesh)
  micro_shards = accum_steps * shd.batch_shards(mesh)  # a batch splits into this many equal blocks
  if batch_size % micro_shards:
    raise GleamError(f"config.batch_size={batch_size} does not split into config.grad_accum_steps={accum_steps} "
                     f"micro-batches over the mesh's {shd.batch_shards(mesh)} data shards: use a multiple of "
                     f"{micro_shards}.")
  eval_process_rows(mesh, int(config.eval.batch_size))  # an eval batch that does not divide fails now
  seed = int(config.seed)

  with contextlib.ExitStack() as cleanup:  # closes the stream, manager and writer on any exit
    index = sources.get_index(config.data, config.data.train_split)
    stream = pipeline.ModalityStreams(config.data, batch_size, seed, index,
                                      multiple=math.lcm(micro_shards, jax.process_count()))
    cleanup.callback(stream.close)
    steps_per_epoch = stream.steps_per_epoch
    total_steps = int(config.total_steps)
    if config.get("total_epochs"):
      total_steps = int(math.ceil(float(config.total_epochs) * steps_per_epoch))
    optim.learning_rate_schedule(config.optim, total_steps)  # one the steps cannot hold stops before building

    manager = checkpoint.make_manager(workdir, config.checkpoint.max_to_keep, config.checkpoint.async_save)
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)  # runs first: callbacks run last-in, first-out
    resuming = manager.latest_step() is not None
    setup, state = create_train_state(
        build_model(config.model, seed, pretrained=not resuming), config.optim, total_steps, mesh,
        config.sharding_rules, loss_name=config.loss.name, label_smoothing=config.loss.label_smoothing, seed=seed,
        accum_steps=accum_steps, lora_cfg=config.get("lora"))
    step, last_good = 0, None
    if resuming:
      state, data_state, step = checkpoint.restore(manager, state)
      stream.set_state(data_state["stream"])
      last_good = (step, checkpoint.step_path(manager, step))
      if jax.process_index() == 0:
        truncate_metrics(workdir, step)
      log(f"resumed from {last_good[1]}")
    elif config.get("init_from"):
      state, _ = init_from_checkpoint(config, state)
    step = int(step)

    groups = ", ".join(f"{m} {b}" for m, b in stream.batch_sizes.items())
    log(f"{len(jax.devices())} devices, mesh {dict(mesh.shape)}; model {parameter_sizes(state['params'], config.get('lora'))}; "
         f"{steps_per_epoch} steps/epoch of {batch_size} pairs ({groups}"
         f"{f'; in {accum_steps} micro-batches' if accum_steps > 1 else ''}); training to step {total_steps}")
    partitions = optim.describe_partitions(state["params"], config.optim)
    if partitions:
      log(partitions)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    cleanup.callback(writer.close)
    train_step = make_train_step(setup)
    rate = RateEta(total_steps)  # steps/s; times the batch: pairs/s, times a step's FLOPs: FLOP/s
    peak = mfu.peak_flops(jax.devices()[0], config.model.dtype)
    peak = peak and peak * len(jax.devices())
    pending = []
    results = {}
    dss_every = max(1, int(config.get("dss_refresh_every_epochs", 1)))
    first_step = step
    while step < total_steps:
      if (config.data.sampler.name == "dss" and stream.batches_in_epoch == stream.steps_per_epoch
          and (stream.epoch + 1) % dss_every == 0):
        refresh_dss_neighbours(config, setup, state, stream)
      batch = shd.shard_batch(step_inputs(next(stream)), mesh)
      state, metrics = train_step(state, batch)
      if step == first_step:
        step_flops = step_model_flops(config.model, batch)
      step += 1
      pending.append((step, metrics))
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        rate.reset(step)  # the first step compiles: rate and ETA count from here
      is_log, is_ckpt, is_eval = due(step, total_steps, config)
      if is_log or is_ckpt or is_eval:
        pending = jax.device_get(pending)
        check_finite(pending, last_good, config.optim.get("clip_norm"))
        if is_log:
          m = dict(pending[-1][1])
          steps_per_s, eta = rate.update(step)
          m.update(pairs_per_s=steps_per_s * batch_size, epoch=step / steps_per_epoch,
                   model_tflops_per_s=step_flops * steps_per_s / 1e12)
          speed = f"{m['pairs_per_s']:.1f} pairs/s"
          if peak:
            m["mfu"] = step_flops * steps_per_s / peak
            speed += f" MFU {m['mfu']:.1%}"
          writer.write(step, m)
          log(f"step {step}/{total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} logit scale "
               f"{m['logit_scale']:.2f} grad norm {m['grad_norm']:.3f} batch acc {m['batch_acc']:.2f} "
               f"{speed} ETA {format_eta(eta)}")
        pending = []
      if is_ckpt:
        checkpoint.save(manager, step, state, {"stream": stream.get_state()})
        last_good = (step, checkpoint.step_path(manager, step))
      if is_eval:
        results = evaluate(config, setup, state, workdir, step, writer)
    return results
