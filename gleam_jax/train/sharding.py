"""Device mesh, logical axis rules and placement of train state and batches.

One mesh with axes ('data', 'fsdp', 'tensor'), sizes from the config (`-1` = the rest of the
devices). Parameters carry logical axis names (the `out_sharding` metadata of NNX variables); the
config maps them to mesh axes with a list of `(logical, mesh_axes)` rules, MaxText style:

    rules = [('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ('heads', 'tensor')]

`logical_to_spec(('embed', 'mlp'), rules)` -> `P('fsdp', 'tensor')`. A logical name without a rule
(or whose mesh axes are already used by an earlier dimension) is replicated. A rule only applies when
the dimension divides over its mesh axes; otherwise that dimension is replicated (small parameters
such as a 40-channel ConvNeXt atto stem stay whole on a big fsdp axis).

Batches are sharded over ('data', 'fsdp') on their leading dimension. Used by GLEAM-C and GLEAM-X.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gleam_jax.errors import GleamError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices):
  """Resolves the `-1` entry of {data, fsdp, tensor} against `num_devices`."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise GleamError(f"config.mesh ({described}): at most one axis may be -1 (the rest of the devices).")
  if any(s == 0 or s < -1 for s in sizes):
    raise GleamError(f"config.mesh ({described}): sizes must be positive or -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise GleamError(
          f"config.mesh ({described}): the fixed axes multiply to {known}, which does not divide the "
          f"{num_devices} devices; choose sizes whose product divides {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise GleamError(
        f"config.mesh ({described}): the product {math.prod(sizes)} is not the number of devices "
        f"({num_devices}); make the sizes multiply to {num_devices} or set one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
  """A `Mesh` with axes ('data', 'fsdp', 'tensor') from `mesh_cfg` (a dict/ConfigDict of sizes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def single_device_mesh(device=None):
  device = jax.devices()[0] if device is None else device
  return Mesh(np.asarray([device]).reshape(1, 1, 1), MESH_AXES)


def _as_axes(mesh_axes):
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def logical_to_spec(names, rules, shape=None, mesh=None):
  """PartitionSpec for logical axis `names` under `rules` (list of (logical, mesh_axes) pairs).

  With `shape` and `mesh`, a dimension that does not divide over its mesh axes is replicated.
  """
  if names is None:
    return P()
  table = {}
  for logical, mesh_axes in rules:
    table.setdefault(logical, _as_axes(mesh_axes))
  used = set()
  spec = []
  for dim, name in enumerate(names):
    axes = tuple(a for a in table.get(name, ()) if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and shape is not None and mesh is not None:
      if shape[dim] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _logical_names(variable):
  metadata = variable.get_metadata()
  names = metadata.get("out_sharding") or metadata.get("sharding_names")
  return tuple(names) if names else None


def state_specs(state, rules, mesh=None):
  """PartitionSpecs for an `nnx.State` of Variables (from `nnx.split`), from their logical names."""
  def spec(variable):
    value = variable.get_value()
    return logical_to_spec(_logical_names(variable), rules, getattr(value, "shape", None), mesh)
  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state, mesh, rules):
  """NamedShardings for an `nnx.State` of Variables, as a tree of pure values (no Variables)."""
  specs = state_specs(state, rules, mesh)
  return nnx.to_pure_dict(jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                       is_leaf=lambda x: isinstance(x, P)))


def replicated(mesh):
  return NamedSharding(mesh, P())


def on_mesh(sharding, mesh):
  """A sharding jit chose for an output, as a NamedSharding on `mesh` (replicated if it is not one)."""
  if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
    return sharding
  return replicated(mesh)


def batch_sharding(mesh, axis=0):
  """Dimension `axis` (the batch: 0, or 1 behind a leading micro-batch axis) over ('data', 'fsdp'), the
  rest replicated."""
  return NamedSharding(mesh, P(*[None] * axis, BATCH_AXES))


def batch_shards(mesh):
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_divides(global_batch_size, mesh, what="config.batch_size"):
  """Fails before compiling when the global batch does not split evenly over the data axes."""
  shards = batch_shards(mesh)
  processes = jax.process_count()
  if global_batch_size % shards or global_batch_size % processes:
    raise GleamError(
        f"{what}={global_batch_size} does not divide over the mesh's data axes "
        f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} = {shards} shards, {processes} "
        f"process(es)); use a multiple of {math.lcm(shards, processes)}.")


def process_rows(mesh, global_batch_size):
  """The rows of a `global_batch_size` batch sharded over ('data', 'fsdp') that this process's devices
  hold, ascending: the rows this process reads, in the order `jax.make_array_from_process_local_data`
  takes them."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  held = set()
  for index in index_map.values():
    held.update(range(*index[0].indices(global_batch_size)))
  return np.asarray(sorted(held), np.int64)


def shard_batch(batch, mesh, axis=0):
  """Per-process NumPy batch -> global jax.Arrays, dimension `axis` sharded over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh, axis)
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def place(tree, shardings):
  """device_put a pytree onto a matching tree of shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                                        sharding=s), tree, shardings)
