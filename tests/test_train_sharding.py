"""Mesh construction, logical axis rules and batch checks."""
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import gleam_jax.models  # noqa: F401  (params are not placed eagerly)
from gleam_jax.errors import GleamError
from gleam_jax.train import sharding as shd

RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))


def test_mesh_shape_resolves_minus_one_and_rejects_bad_products():
  assert shd.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
  assert shd.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(GleamError, match=r"data=3.*divide the 8 devices"):
    shd.mesh_shape({"data": 3, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(GleamError, match=r"product 4 is not the number of devices \(8\)"):
    shd.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(GleamError, match="at most one axis"):
    shd.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_make_mesh_uses_all_devices():
  mesh = shd.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_logical_to_spec():
  assert shd.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
  assert shd.logical_to_spec(("batch", None), RULES) == P(("data", "fsdp"))
  assert shd.logical_to_spec((None, "unknown"), RULES) == P()
  # A mesh axis is used once per array: the second 'embed' stays replicated.
  assert shd.logical_to_spec(("embed", "embed"), RULES) == P("fsdp")
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  # With a mesh: size-1 axes are dropped and a dimension that does not divide is replicated.
  assert shd.logical_to_spec(("embed", "mlp"), RULES, (8, 6), mesh) == P("fsdp")
  assert shd.logical_to_spec(("embed", "mlp"), RULES, (6, 8), mesh) == P()


def test_state_shardings_follow_param_metadata():
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  lin = nnx.Linear(8, 12, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                   rngs=nnx.Rngs(0))
  _, params = nnx.split(lin, nnx.Param)
  shardings = shd.state_shardings(params, mesh, RULES)
  assert shardings["kernel"].spec == P("fsdp")
  assert shardings["bias"].spec == P()
  placed = shd.place(nnx.to_pure_dict(params), shardings)
  assert placed["kernel"].sharding.shard_shape((8, 12)) == (2, 12)


def test_batch_must_divide_over_data_axes():
  mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  shd.check_batch_divides(16, mesh)
  with pytest.raises(GleamError, match=r"batch_size=12 .*data=2 x fsdp=4 = 8 shards.*multiple of 8"):
    shd.check_batch_divides(12, mesh, what="config.batch_size")
  batch = shd.shard_batch({"x": np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert batch["x"].sharding.shard_shape((16, 3)) == (2, 3)
