"""data_config: defaults, overrides, and one clear GleamError per bad value."""
import pytest

from gleam_jax.data.config import data_config, query_shape, validate
from gleam_jax.errors import GleamError


def test_defaults_and_overrides():
  c = data_config()
  assert c.name == "synthetic_cvgl" and c.config == "s64" and c.modalities == ("panorama",)
  assert tuple(c.mean) == (0.485, 0.456, 0.406) and tuple(c.std) == (0.229, 0.224, 0.225)
  assert query_shape(c, "panorama") == (64, 128)
  c = data_config(modalities=("uav", "panorama"), modality_weights={"uav": 3.0}, augment={"flip": 0.0},
                  overrides={"seed": 7})
  assert c.modality_weights.uav == 3.0 and c.modality_weights.panorama == 1.0  # dicts merge
  assert c.augment.flip == 0.0 and c.augment.rotate == 0.75
  assert c.overrides.seed == 7
  assert query_shape(c, "panorama") == (64, 128) and query_shape(c, "uav") == (64, 64)  # each its own
  assert query_shape(c, "ground") == (64, 64)
  assert query_shape(data_config(ground_frame="panorama"), "ground") == (64, 128)  # a partial panorama
  c.lock()
  c.worker_count = 2  # a locked config still takes new values of known keys
  validate(c)
  with pytest.raises(AttributeError):
    c.worker_cuont = 2


@pytest.mark.parametrize("kw, message", [
    ({"nope": 1}, r"unknown field 'nope'"),
    ({"config": "s32"}, r"data.config='s32' is not a builder config of synthetic_cvgl; choose one of \('tiny', 's64', 's128'\)"),
    ({"modalities": ("drone",)}, r"data.modalities=\('drone',\): it must be a non-empty subset of \('uav', 'streetmap', 'panorama', 'ground'\)"),
    ({"modalities": ("uav", "uav")}, r"without repeats"),
    ({"modalities": ("uav",), "modality_weights": {"uav": 0.0}}, r"data.modality_weights.uav=0.0"),
    ({"satellite_size": (64,)}, r"data.satellite_size=\(64,\) is impossible"),
    ({"augment": {"flip": 1.5}}, r"data.augment.flip=1.5: it must be a probability"),
    ({"augment": {"blur_sigma": (2.0, 1.0)}}, r"data.augment.blur_sigma"),
    ({"sampler": {"name": "random"}}, r"data.sampler.name='random'; choose one of \('shuffle', 'gps', 'dss'\)"),
    ({"sampler": {"neighbours_per_anchor": 9, "neighbour_range": 4}}, r"neighbours_per_anchor <= neighbour_range"),
    ({"worker_count": -1}, r"data.worker_count=-1: it must be an int >= 0"),
    ({"read_threads": 0}, r"data.read_threads=0: it must be an int >= 1"),
    ({"std": (0.2, 0.2, 0.0)}, r"std > 0"),
])
def test_bad_values_name_the_key(kw, message):
  with pytest.raises(GleamError, match=message):
    data_config(**kw)


def test_world_overrides_from_the_command_line(monkeypatch):
  """The locked config takes a WorldSpec field as `--config.data.overrides.<field>=...`; those not
  given stay None and are not passed on (the preset's values and config name are kept)."""
  from absl import flags
  from ml_collections import config_flags
  from config_files import REPO
  from gleam_jax.data.config import world_overrides
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  argv = ["prog", f"--config={REPO}/configs/c_phase1.py:tiny", "--config.data.overrides.seed=3",
          "--config.data.overrides.uav_fov_deg=50"]
  monkeypatch.setattr("sys.argv", argv)  # ml_collections reads the overrides from sys.argv
  values(argv)
  assert world_overrides(values.config.data) == {"seed": 3, "uav_fov_deg": 50.0}
  assert world_overrides(data_config()) == {}
  c = data_config(overrides={"uav_altitude_m": [40.0, 70.0]})  # as read back from a job's config.json
  assert world_overrides(c) == {"uav_altitude_m": (40.0, 70.0)}
