"""GLEAM-X's non-matching pairs mined from a GLEAM-C job's confusions (`examples.negatives_from`): each
query's wrong satellites ranked by the GLEAM-C model's own cosines, and the draw built on them."""
import numpy as np
import pytest

from config_files import tiny_config
from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main, retrieve
from gleam_jax.data import gleam_x, sources
from gleam_jax.data.config import data_config
from gleam_jax.errors import GleamError
from gleam_jax.train import sft


@pytest.fixture(scope="module")
def c_job(tiny_cfg, tmp_path_factory):
  """A two-step GLEAM-C phase-1 job (panoramas) on the tiny world."""
  workdir = str(tmp_path_factory.mktemp("negatives") / "c")
  main.run(tiny_config("c_phase1", tiny_cfg.data_dir, total_steps=2, **{"eval.at_end": False,
                                                                        "optim.warmup_steps": 0}), workdir)
  return workdir


def test_confusions_are_the_most_similar_wrong_satellites(c_job, tiny_cfg):
  data = data_config(**dict(tiny_cfg.to_dict(), modalities=("panorama",)))
  negatives = retrieve.confusions(c_job, data, "test", ("panorama",), k=3)
  source = sources.get_source(data, "test")
  index = sources.get_index(data, "test", source)
  rows = np.flatnonzero((index["modality"] == 2) & index["is_query"])
  assert sorted(negatives) == sorted(rows.tolist())
  model, config = retrieve.load_model(c_job)
  embed = lambda image, size, tower: np.asarray(model.encode(retrieve.prepare(image, size, config.data)[None],
                                                             tower=tower))[0]
  locations = np.unique(index["location_id"])
  satellites = np.stack([embed(source.image(int(np.flatnonzero(index["location_id"] == loc)[0]), "satellite"),
                               config.data.satellite_size, "reference") for loc in locations])
  for r in rows[:5]:
    record = source[int(r)]
    cosines = satellites @ embed(record["query"], config.data.panorama_size, "panorama")
    cosines[locations == record["location_id"]] = -np.inf
    np.testing.assert_array_equal(negatives[int(r)], locations[np.argsort(-cosines, kind="stable")[:3]])
  # the draw: every non-matching satellite is one of its query's candidates (panoramas: one per location)
  drawn = gleam_x.examples(data, "test", 16, seed=2, negatives={r: c[:1] for r, c in negatives.items()})
  row_of = {int(index["location_id"][r]): int(r) for r in rows}
  wrong = [ex for ex in drawn if not ex["match"]]
  assert len(wrong) == 8
  for ex in wrong:
    assert ex["satellite_location_id"] == negatives[row_of[ex["location_id"]]][0]
    np.testing.assert_array_equal(ex["satellite"], source.image(
        int(np.flatnonzero(index["location_id"] == ex["satellite_location_id"])[0]), "satellite"))


def test_a_job_mines_its_pairs_negatives_with_the_gleam_c_job(c_job, tiny_cfg):
  config = tiny_config("x_sft", tiny_cfg.data_dir, arg=f"tiny,negatives_from={c_job}",
                       **{"data.modalities": ("panorama",)})
  assert (config.examples.negatives_from, config.examples.negatives_top_k) == (c_job, 10)
  train = sft.load_examples(config, "train")
  negatives = retrieve.confusions(c_job, config.data, config.data.train_split, ("panorama",), k=10)
  source = sources.get_source(config.data, config.data.train_split)
  index = sources.get_index(config.data, config.data.train_split, source)
  row_of = {int(index["location_id"][r]): int(r) for r in negatives}
  assert all(ex["satellite_location_id"] in negatives[row_of[ex["location_id"]]] for ex in train if not ex["match"])
  plain = gleam_x.examples(config.data, config.data.train_split, len(train), int(config.seed))
  assert [ex["satellite_location_id"] for ex in train] != [ex["satellite_location_id"] for ex in plain]
  with pytest.raises(GleamError, match=r"draw the pairs with GLEAM-C's confusions"):
    gleam_x.job_examples(config, "train")
  other = data_config(**dict(tiny_cfg.to_dict(), config="s64", modalities=("panorama",)))
  with pytest.raises(GleamError, match=r"trained on synthetic_cvgl/tiny, the pairs are drawn from synthetic_cvgl/s64"):
    retrieve.confusions(c_job, other, "test", ("panorama",), k=1)
  every = tiny_config("x_sft", tiny_cfg.data_dir, arg=f"tiny,negatives_from={c_job}")
  with pytest.raises(GleamError, match=r"trained for the query modalities panorama, not uav, streetmap, ground"):
    sft.load_examples(every, "eval")
