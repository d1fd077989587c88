"""Device mesh and shardings: data parallel over `data`, parameters replicated or FSDP."""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with a `data` axis over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards the batch axis, which follows `leading_axes` unsharded axes (e.g. a scan axis)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int) -> P:
  """Shards the largest axis divisible by `num_shards`; small or indivisible arrays replicate."""
  if int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def param_shardings(abstract_tree: Any, mesh: Mesh, *, fsdp: bool, min_size: int) -> Any:
  """NamedShardings for a tree of ShapeDtypeStructs (parameters, EMA, optimizer state)."""
  num_shards = mesh.shape[DATA_AXIS]

  def one(leaf):
    if not fsdp or not hasattr(leaf, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(leaf.shape, num_shards, min_size))

  return jax.tree.map(one, abstract_tree)


def host_to_global(batch: Any, mesh: Mesh, leading_axes: int = 0) -> Any:
  """Per-process numpy batches → global arrays sharded on the batch axis.

  Each process passes its own slice; the global batch is the concatenation over processes
  in process order.
  """
  sharding = data_sharding(mesh, leading_axes)
  num_processes = jax.process_count()

  def one(x):
    x = np.asarray(x)
    global_shape = list(x.shape)
    global_shape[leading_axes] *= num_processes
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

  return jax.tree.map(one, batch)
