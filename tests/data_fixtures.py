"""The 'tiny' synthetic_cvgl dataset, built once per test run (shared by pytest-xdist workers:
the build holds a file lock, so a second worker waits for the first and then reads)."""
import os

import pytest

from gleam_jax.data import sources
from gleam_jax.data.config import data_config


def tiny_data_dir(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # one folder for all workers of this run
  return str(base / "gleam_data_tiny")


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
  """data_config of the tiny world (phase 2: all modalities), built on first use. Panoramas are
  read square here, so one TrainStream can mix all four modalities in one batch array."""
  cfg = data_config(config="tiny", data_dir=tiny_data_dir(tmp_path_factory),
                    modalities=("uav", "streetmap", "panorama", "ground"), query_size=(32, 32),
                    panorama_size=(32, 32), satellite_size=(32, 32), read_threads=2)
  sources.get_builder(cfg)
  return cfg
