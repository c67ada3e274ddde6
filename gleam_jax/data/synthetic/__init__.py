"""A seeded procedural world of cities, rendered into geometrically consistent cross-view images.

    from gleam_jax.data import synthetic
    spec = synthetic.spec_from_name("s64")
    views = synthetic.render_location(spec, synthetic.split_location_ids(spec, "test")[0])

See docs/synthetic_world.md for the world, the view conventions and the baselines.
"""
from gleam_jax.data.synthetic.render import project_point
from gleam_jax.data.synthetic.render import render_location
from gleam_jax.data.synthetic.spec import DEFAULT_PRESET
from gleam_jax.data.synthetic.spec import MODALITIES
from gleam_jax.data.synthetic.spec import PRESETS
from gleam_jax.data.synthetic.spec import SPLITS
from gleam_jax.data.synthetic.spec import VIEWS
from gleam_jax.data.synthetic.spec import WORLD_VERSION
from gleam_jax.data.synthetic.spec import WorldSpec
from gleam_jax.data.synthetic.spec import spec_from_name
from gleam_jax.data.synthetic.spec import split_location_ids


def save_views_figure(spec, location_id, path, rows=1):
  """PNG of a location's views side by side (see `figure.py`, also runnable as a module)."""
  from gleam_jax.data.synthetic import figure  # not at import time: `python -m ...figure` runs it
  figure.save_views_figure(spec, location_id, path, rows=rows)
