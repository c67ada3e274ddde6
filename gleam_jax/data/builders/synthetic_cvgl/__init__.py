"""TFDS builder of the synthetic cross-view world (gleam_jax/data/synthetic)."""
