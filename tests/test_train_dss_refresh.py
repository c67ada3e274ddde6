"""DSS in the GLEAM-C trainer: the satellite neighbour table is recomputed at the configured epochs
from the current model, the next epoch's order is built from it, and it survives a resume."""
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax.data import pipeline
from gleam_jax.data import samplers
from gleam_jax.eval import retrieval
from gleam_jax.train import checkpoint
from gleam_jax.train import contrastive
from gleam_jax.train import sharding as shd
from config_files import tiny_config
from test_main_contrastive import train_losses

STEPS = 9
REFRESH_EVERY = 2
NEIGHBOURS = 4


def dss_config(data_dir):
  return tiny_config("c_phase1", data_dir, batch_size=8, total_steps=STEPS,
                     dss_refresh_every_epochs=REFRESH_EVERY,
                     **{"data.sampler.name": "dss", "data.sampler.neighbour_range": NEIGHBOURS,
                        "checkpoint.every_steps": 1, "checkpoint.max_to_keep": STEPS + 1,
                        "eval.at_end": False})


def stream_states(workdir):
  """{step: the panorama stream's state saved with checkpoint `step`}."""
  manager = checkpoint.make_manager(workdir, max_to_keep=STEPS + 1, async_save=False)
  states = {s: manager.restore(s, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]["stream"]
            for s in manager.all_steps()}
  manager.close()
  return {s: state["streams"]["panorama"] for s, state in states.items()}


def table_of(sampler_state):
  neighbours = sampler_state.get("neighbours")
  return None if neighbours is None else samplers.decode_array(neighbours)


def nearest_satellites(config, params=None, checkpoint_path=None):
  """Each train location's NEIGHBOURS most similar other locations (satellite embeddings of the
  model with `params`, or of the checkpoint's parameters), by a NumPy brute-force search."""
  mesh = shd.make_mesh(config.mesh)
  setup, state = contrastive.create_train_state(
      contrastive.build_model(config.model, int(config.seed)), config.optim, STEPS, mesh, config.sharding_rules)
  if checkpoint_path is not None:
    state["params"], _, _ = checkpoint.restore_params(checkpoint_path, state["params"])
  model = contrastive.eval_model(setup, state)
  gallery = pipeline.make_gallery_batches(config.data, config.data.train_split, 8)
  embeddings, labels = retrieval.embed(lambda x: model.encode(x, tower="reference"), gallery, mesh)
  _, nearest = retrieval.brute_force_topk(embeddings, embeddings, NEIGHBOURS + 1)
  location_ids = labels["location_id"].reshape(-1)
  return np.stack([location_ids[[j for j in row if j != i][:NEIGHBOURS]] for i, row in enumerate(nearest)])


@pytest.mark.slow
def test_dss_neighbours_refresh_from_the_model_and_resume(tiny_cfg, tmp_path):
  config = dss_config(tiny_cfg.data_dir)
  workdir = str(tmp_path / "run")
  main.run(config, workdir)
  states = stream_states(workdir)
  assert sorted(states) == list(range(1, STEPS + 1))

  # No table in epochs 0 and 1; the refresh before epoch 2 (every 2 epochs) sets it.
  for step, state in states.items():
    has_table = table_of(state["sampler"]) is not None
    assert has_table == (state["epoch"] >= REFRESH_EVERY), (step, state["epoch"])
  refreshed_at = min(s for s, state in states.items() if state["epoch"] == REFRESH_EVERY)
  assert states[refreshed_at]["batches_in_epoch"] == 1
  table = table_of(states[refreshed_at]["sampler"])
  # Epoch 2's order was drawn with that table.
  np.testing.assert_array_equal(table_of(states[refreshed_at]["sampler_at_epoch_start"]), table)

  # It is the nearest-satellite table of the model at the end of epoch 1, not of the initial model.
  end_of_epoch_1 = os.path.join(workdir, "checkpoints", str(refreshed_at - 1))
  np.testing.assert_array_equal(table, nearest_satellites(config, checkpoint_path=end_of_epoch_1))
  assert not np.array_equal(table[:, 0], nearest_satellites(config)[:, 0])

  # A resume after the refresh reads the table from the checkpoint and sees the same batches.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  for step in range(refreshed_at + 1, STEPS + 1):
    shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
  main.run(config, resumed)
  straight, again = train_losses(workdir), train_losses(resumed)
  assert sorted(again) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([again[s] for s in range(refreshed_at + 1, STEPS + 1)],
                             [straight[s] for s in range(refreshed_at + 1, STEPS + 1)], rtol=1e-5)
  np.testing.assert_array_equal(table_of(stream_states(resumed)[STEPS]["sampler"]), table)
