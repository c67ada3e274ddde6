"""gleam_jax: cross-view geo-localization in JAX/Flax (GLEAM-C and GLEAM-X)."""
