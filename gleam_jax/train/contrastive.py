"""GLEAM-C contrastive trainer: `run(config, workdir)`, and the jitted train step it is built on.

The train step (reused by `gleam_jax.bench.train_step`):

    setup, state = create_train_state(model, optim_cfg, total_steps, mesh, rules,
                                      loss_name='infonce', label_smoothing=0.1, seed=0)
    train_step = make_train_step(setup)          # jitted, state donated
    state, metrics = train_step(state, batch)    # batch: {'query': (B,H,W,3), 'satellite': (B,Hs,Ws,3)}

- `model` is a `GleamC` (anything with `encode(images, tower)` and a `logit_scale` Param); its
  config decides the compute dtype (bfloat16 option, parameters stay float32) and remat.
- `state` is a dict pytree of jax.Arrays placed on `mesh`: `step`, `params` (`{'model': ...}` plus
  `loss_bias` for the sigmoid loss), `opt_state`, `model_state` (non-parameter variables) and `rng`
  (key data; drop path draws from `fold_in(rng, step)`, so a resumed run draws the same noise).
- `batch` arrays are global jax.Arrays sharded over ('data', 'fsdp') (`sharding.shard_batch`) or
  host NumPy arrays of the global batch; images are float32/bfloat16 (already normalised) or uint8
  (normalised in the step with ImageNet mean/std).
- `metrics`: loss, lr, logit_scale (exp, clipped), grad_norm (trainable parameters), batch_acc.

The loss covers the global batch: the (B x B) logits are computed from the embeddings, so GSPMD
all-gathers embeddings across the data axes and never the images.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gleam_jax.train import losses
from gleam_jax.train import optim
from gleam_jax.train import sharding as shd

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
  return nnx.merge(setup.graphdef, params, setup.rng_state, model_state)


def create_train_state(model, optim_cfg, total_steps, mesh, rules, loss_name="infonce",
                       label_smoothing=0.1, seed=0):
  """(TrainSetup, state placed on `mesh`) for `model`; the model object is not used afterwards."""
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
  params = shd.place(params, param_shardings)
  tx, schedule = optim.make_optimizer(optim_cfg, params, total_steps)
  opt_state = jax.jit(tx.init)(params)
  opt_shardings = jax.tree.map(lambda x: _on_mesh(x.sharding, mesh), opt_state)
  state = {
      "step": jnp.int32(0),
      "params": params,
      "opt_state": opt_state,
      "model_state": nnx.to_pure_dict(rest),
      "rng": jax.random.key_data(jax.random.key(seed)),
  }
  shardings = {
      "step": shd.replicated(mesh),
      "params": param_shardings,
      "opt_state": opt_shardings,
      "model_state": rest_shardings,
      "rng": shd.replicated(mesh),
  }
  state = shd.place(state, shardings)
  setup = TrainSetup(
      graphdef=graphdef, rng_state=nnx.to_pure_dict(rng_state), tx=tx, schedule=schedule,
      loss_name=loss_name, label_smoothing=float(label_smoothing), mesh=mesh, shardings=shardings,
      trainable=optim.trainable_mask(params, optim_cfg))
  return setup, state


def _on_mesh(sharding, mesh):
  """A sharding jit chose for an output, as a NamedSharding on `mesh` (replicated if it is not one)."""
  if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
    return sharding
  return shd.replicated(mesh)


def _loss_fn(setup, params, model_state, rng, step, batch):
  model = merge_model(setup, params["model"], model_state)
  model.train()
  nnx.reseed(model, dropout=jax.random.fold_in(jax.random.wrap_key_data(rng), step))
  query = model.encode(normalise_images(batch["query"]), tower="query")
  reference = model.encode(normalise_images(batch["satellite"]), tower="reference")
  loss = losses.contrastive_loss(
      setup.loss_name, query, reference, model.logit_scale[...], params.get("loss_bias"),
      setup.label_smoothing)
  _, _, _, new_model_state = split_model(model)
  aux = {
      "logit_scale": losses.logit_scale_value(model.logit_scale[...]),
      "batch_acc": losses.retrieval_accuracy(query, reference),
  }
  return loss, (nnx.to_pure_dict(new_model_state), aux)


def _grads(setup, state, batch):
  grad_fn = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)
  (loss, (model_state, aux)), grads = grad_fn(
      setup, state["params"], state["model_state"], state["rng"], state["step"], batch)
  return loss, grads, model_state, aux


def _train_step(setup, state, batch):
  loss, grads, model_state, aux = _grads(setup, state, batch)
  grad_norm = optax.tree.norm(jax.tree.map(
      lambda g, t: g if t else jnp.zeros_like(g), grads, setup.trainable))
  updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
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
  sharding = shd.batch_sharding(setup.mesh)
  return {k: sharding for k in STEP_INPUTS}


def step_inputs(batch):
  return {k: batch[k] for k in STEP_INPUTS}


def make_train_step(setup):
  """Jitted `(state, batch) -> (state, metrics)`, explicit shardings, state donated."""
  jitted = jax.jit(
      lambda state, batch: _train_step(setup, state, batch),
      in_shardings=(setup.shardings, batch_shardings(setup)),
      out_shardings=(setup.shardings, shd.replicated(setup.mesh)),
      donate_argnums=(0,))

  def train_step(state, batch):
    batch = step_inputs(batch)
    shd.check_batch_divides(batch["query"].shape[0], setup.mesh, what="batch size")
    return jitted(state, batch)
  train_step.jitted = jitted
  return train_step


def make_grad_fn(setup):
  """Jitted `(state, batch) -> (loss, grads)` (for tests and diagnostics; state not donated)."""
  jitted = jax.jit(
      lambda state, batch: _grads(setup, state, batch)[:2],
      in_shardings=(setup.shardings, batch_shardings(setup)))
  return lambda state, batch: jitted(state, step_inputs(batch))
