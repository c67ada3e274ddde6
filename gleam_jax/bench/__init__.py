"""Benchmarks: `python -m gleam_jax.bench.<name>`; each prints ratios against its reference."""
