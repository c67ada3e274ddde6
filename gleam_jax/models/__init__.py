"""Flax NNX models.

Parameters carry *logical* axis names (`nnx.Param(..., sharding_names=('embed', 'mlp'))` or
`nnx.with_partitioning(init, ('embed', 'mlp'))`; they appear as the `out_sharding` metadata).
They are not placed eagerly: `gleam_jax.train.sharding` maps logical names to mesh axes with the
config's rules and places the state. Hence eager variable sharding is turned off here.
"""
import flax

flax.config.update("flax_always_shard_variable", False)
