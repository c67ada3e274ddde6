"""Evaluates a trained GLEAM-C checkpoint, as Sample4Geo's eval scripts do:

    python -m gleam_jax.main --config=configs/c_phase1.py --workdir=W_EVAL \
        --config.trainer=evaluate --config.init_from=W_TRAINED [--config.data.name=vigor ...]

The model of `config.model` with the parameters of `config.init_from` (a workdir, its checkpoints
folder or one step folder) is evaluated by the retrieval evaluators of `config.eval` on
`config.data`, which may be another dataset or split than it was trained on. Metrics
(`metrics.jsonl`, TensorBoard), summaries and report PNGs go into this job's workdir, at the step of
the checkpoint read; the trained job's workdir is only read."""
import os

from absl import logging
import jax

from gleam_jax.errors import GleamError
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import sharding as shd
from gleam_jax.utils.writer import MetricWriter


def run(config, workdir):
  """Returns the evaluation's metrics."""
  contrastive.check_config(config)
  logging.set_verbosity(logging.WARNING)  # Orbax logs each read at INFO; the results go to stdout
  if not config.get("init_from"):
    raise GleamError("config.trainer='evaluate' evaluates a trained model: set --config.init_from to the "
                     "workdir (or a checkpoint folder) of a GLEAM-C training job.")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = shd.make_mesh(config.mesh)
  contrastive.eval_process_rows(mesh, int(config.eval.batch_size))  # fails before building anything
  seed = int(config.seed)
  setup, state = contrastive.create_train_state(
      contrastive.build_model(config.model, seed, pretrained=False), config.optim, int(config.total_steps), mesh,
      config.sharding_rules, loss_name=config.loss.name, label_smoothing=config.loss.label_smoothing, seed=seed,
      with_optimizer=False)
  state, where = contrastive.init_from_checkpoint(config, state, "check the path of the trained job")
  step = checkpoint.step_of(where)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    return contrastive.evaluate(config, setup, state, workdir, step, writer)
  finally:
    writer.close()
