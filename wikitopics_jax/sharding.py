"""The device mesh and how arrays are laid out on it (jit-only SPMD; no pmap).

Parameters and optimiser state are replicated; batches are split over the `data` axis. Under jit with
a sharded batch, BatchNorm statistics are computed over the global batch.
"""

from __future__ import annotations

import collections
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wikitopics_jax.data import pipeline
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


class Placement:
  """Shardings of one job's state (replicated) and batches (split over the data axis) on the mesh."""

  def __init__(self, mesh: Mesh, state: Any):
    self.mesh = mesh
    self.replicated = replicated(mesh)
    self.batch = batch_sharded(mesh)
    self.state = jax.tree.map(lambda _: self.replicated, state)


def per_process_batch_size(global_batch_size: int, mesh: Mesh, *, key: str = "config.batch_size") -> int:
  """Checks divisibility and returns how many examples each process loads per step."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise InputError(f"{key}={global_batch_size} is not divisible by the {num_devices} devices of the mesh")
  return global_batch_size // jax.process_count()


def check_grad_accum(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
  """Each micro-batch must split evenly over the devices (steps.make_train_step's micro_batches)."""
  num_devices = mesh.devices.size
  if grad_accum_steps < 1 or global_batch_size % (grad_accum_steps * num_devices):
    raise InputError(f"config.grad_accum_steps={grad_accum_steps}: config.batch_size="
                     f"{global_batch_size} must be divisible by grad_accum_steps x the "
                     f"{num_devices} devices of the mesh")


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """A barrier of the coordination service (no device collective); a no-op in one process."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


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


class DevicePrefetch(grain.DatasetIterator):
  """Process-local batches -> global sharded arrays, `size` of them transferred ahead.

  The next batch is loaded and copied while the current step runs. `get_state()` is the
  wrapped iterator's state after the last batch handed out, not after the last one prefetched, so
  a checkpoint resumes at the first batch not trained on. Restore the wrapped iterator before
  wrapping it (or call `set_state`, which drops the prefetched batches).
  """

  def __init__(self, iterator: grain.DatasetIterator, mesh: Mesh, size: int = 2):
    super().__init__()
    if size < 1:
      raise InputError(f"config.data.prefetch_to_device={size} must be >= 1")
    self._iterator = iterator
    self._mesh = mesh
    self._size = size
    self._queue: collections.deque = collections.deque()  # (state after the batch, batch)
    self._state = iterator.get_state()

  def _fill(self) -> None:
    while len(self._queue) < self._size:
      local = next(self._iterator)
      self._queue.append((self._iterator.get_state(), global_batch(local, self._mesh)))

  def __next__(self) -> dict[str, jax.Array]:
    # Called while the previous step still runs on the devices (dispatch is asynchronous): the host
    # work and device copy of the newest batch overlap it, and `size - 1` batches stay queued.
    self._fill()
    self._state, batch = self._queue.popleft()
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._queue.clear()
    self._iterator.set_state(state)
    self._state = self._iterator.get_state()
