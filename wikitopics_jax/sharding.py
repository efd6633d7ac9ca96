"""The device mesh and how arrays are laid out on it (jit-only SPMD; no pmap).

Parameters and optimiser state are replicated; batches are split over the `data` axis. Under jit with
a sharded batch, BatchNorm statistics are computed over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wikitopics_jax import pipeline
from wikitopics_jax.errors import InputError

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """1-D data-parallel mesh over all devices of all processes (or the first `num_devices`)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise InputError(f"config.mesh.num_devices={num_devices} but only {len(devices)} devices exist")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def per_process_batch_size(global_batch_size: int, mesh: Mesh, *, key: str = "config.batch_size") -> int:
  """Checks divisibility and returns how many examples each process loads per step."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise InputError(f"{key}={global_batch_size} is not divisible by the {num_devices} devices of the mesh")
  return global_batch_size // jax.process_count()


def process_share() -> pipeline.ProcessShare:
  return pipeline.ProcessShare(index=jax.process_index(), count=jax.process_count())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Each process's rows -> one global array per key, sharded over the data axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def put_replicated(tree: Any, sharding: NamedSharding) -> Any:
  """Host values (identical on every process) -> global arrays replicated over `sharding`'s mesh.

  `jax.device_put` cannot target devices of other processes; every process builds its own shards.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already global (restored from a checkpoint with this sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)
