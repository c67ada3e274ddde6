"""The data_stats trainer: counts of the tiny dataset, through gleam_jax.main's dispatch."""
import json
import os

import ml_collections

from data_fixtures import tiny_cfg  # noqa: F401  (session fixture)
from gleam_jax import main
from gleam_jax.data import synthetic


def test_data_stats_reports_the_tiny_dataset(tiny_cfg, tmp_path, capsys):
  config = ml_collections.ConfigDict({"trainer": "data_stats", "data": tiny_cfg})
  main.run(config, str(tmp_path))
  with open(os.path.join(tmp_path, "data_stats.json")) as f:
    stats = json.load(f)
  spec = synthetic.spec_from_name("tiny")
  assert stats["dataset"] == "synthetic_cvgl/tiny"
  for split, n in (("train", spec.train_locations), ("test", spec.test_locations),
                   ("test_cross_city", spec.cross_city_locations)):
    s = stats["splits"][split]
    assert s["locations"] == n
    assert s["records"] == n * (3 + spec.uav_views)
    assert s["records_per_modality"] == {"uav": n * spec.uav_views, "streetmap": n, "panorama": n, "ground": n}
    assert s["image_size"] == {"uav": [32, 32], "streetmap": [32, 32], "panorama": [32, 64], "ground": [32, 32],
                               "satellite": [32, 32]}
  assert len(stats["splits"]["test_cross_city"]["cities"]) == spec.cross_city
  assert not set(stats["splits"]["test_cross_city"]["cities"]) & set(stats["splits"]["train"]["cities"])
  assert stats["build_seconds"] > 0
  out = capsys.readouterr().out
  assert "synthetic_cvgl/tiny" in out and "test_cross_city" in out
