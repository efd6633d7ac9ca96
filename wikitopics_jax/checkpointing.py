"""Checkpoints, behind one module so an Orbax API change touches one file.

Each checkpoint holds the train state (parameters, optimiser state, BatchNorm statistics, RNG state) as
a pure pytree, the Grain iterator state, and JSON metadata (step, config, the dataset's taxonomy).
Kept: the latest `keep_latest` plus the best by the validation metric; `best.json` in the checkpoint
directory names the best step and is only written once that checkpoint is complete on disk.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from wikitopics_jax.errors import InputError

BEST_MARKER = "best.json"
# Replica-parallel saving splits each replicated array across its replicas, so every replica writes a
# slice: one eagerly compiled slice program per array shape and device, seconds of compilation at
# every process's first save. Worth it only for big arrays on accelerators; off on CPU, whose
# devices share one host memory.
_MIN_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
_array_handler_registered = False


def _register_array_handler() -> None:
  global _array_handler_registered
  if _array_handler_registered:
    return
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(
          use_replica_parallel=jax.default_backend() != "cpu",
          min_slice_bytes_for_replica_parallel=_MIN_BYTES_FOR_REPLICA_PARALLEL,
          array_metadata_store=array_metadata_store.Store()),
      override=True)
  _array_handler_registered = True


class Checkpointer:

  def __init__(self, directory: str, *, keep_latest: int = 2, best_metric: str = "val_loss",
               best_mode: str = "min", async_save: bool = True, read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise InputError(f"config.checkpoint.best_mode={best_mode!r}; valid: 'min', 'max'")
    _register_array_handler()
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=keep_latest),
        # BestN keeps the last n after sorting; reverse=True sorts descending, keeping the minimum.
        preservation_policy.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                  n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Kept in memory: every process takes the same keep/mark decisions from the same metrics, and
    # none of them reads a marker that process 0 may be rewriting.
    self._best = self.best()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None = None,
           meta: dict[str, Any], metrics: dict[str, float] | None = None, force: bool = False) -> None:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if metrics is not None and self._is_better(metrics):
      # The marker must never point at a checkpoint that is still being written.
      self._manager.wait_until_finished()
      self._best = {"step": int(step), "metric": self.best_metric,
                    "value": float(metrics[self.best_metric])}
      if jax.process_index() == 0:  # one writer on a shared file system
        _atomic_write_json(os.path.join(self.directory, BEST_MARKER), self._best)
      if jax.process_count() > 1:
        # Nobody reads the marker (evaluate_best) before it is there.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"best checkpoint marker {step}")

  def _is_better(self, metrics: dict[str, float]) -> bool:
    value = float(metrics[self.best_metric])
    if not math.isfinite(value):
      return False
    best = self._best
    if best is None or best["step"] not in self.all_steps():
      return True
    return value < best["value"] if self.best_mode == "min" else value > best["value"]

  def best(self) -> dict[str, Any] | None:
    path = os.path.join(self.directory, BEST_MARKER)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def best_step(self) -> int | None:
    best = self.best()
    return None if best is None else int(best["step"])

  def resolve_step(self, which: str | int) -> int:
    """"best", "latest" or a step number -> an existing step; clear error otherwise."""
    steps = self.all_steps()
    if not steps:
      raise InputError(f"{self.directory}: no checkpoints")
    if which == "best":
      step = self.best_step()
      if step is None:
        raise InputError(f"{self.directory}: no best checkpoint marked (no {BEST_MARKER})")
    elif which == "latest":
      step = steps[-1]
    else:
      step = int(which)
    if step not in steps:
      raise InputError(f"{self.directory}: no checkpoint at step {step}; available: {steps}")
    return step

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, *,
              data_iterator: grain.DatasetIterator | None = None) -> tuple[Any, dict[str, Any]]:
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The flat state of a checkpoint as host arrays, without a model (for inspection and tests)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return dict(restored["state"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _atomic_write_json(path: str, data: dict[str, Any]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def to_checkpoint_tree(state_pure: Any) -> dict[str, Any]:
  """A pure pytree (int keys, typed PRNG keys) -> flat {"a/b/c": array} that any Orbax version stores."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state_pure)[0]:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    flat["/".join(_path_name(p) for p in path)] = leaf
  return flat


def from_checkpoint_tree(flat: dict[str, Any], like: Any) -> Any:
  """Inverse of `to_checkpoint_tree`, shaped like the pure pytree `like` (strict: names must match)."""
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = ["/".join(_path_name(p) for p in path) for path, _ in leaves_with_path]
  missing = sorted(set(names) - set(flat))
  unexpected = sorted(set(flat) - set(names))
  if missing or unexpected:
    raise InputError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                     f"{unexpected[:5]}")
  leaves = []
  for name, (_, ref) in zip(names, leaves_with_path):
    value = flat[name]
    if jax.dtypes.issubdtype(getattr(ref, "dtype", None), jax.dtypes.prng_key):
      value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref))
    elif tuple(value.shape) != tuple(ref.shape):
      raise InputError(f"checkpoint entry {name!r} has shape {tuple(value.shape)}, the model expects "
                       f"{tuple(ref.shape)}")
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_checkpoint_tree(state_pure: Any, sharding: Any = None) -> dict[str, Any]:
  """ShapeDtypeStructs of `to_checkpoint_tree(state_pure)` (what StandardRestore needs)."""
  flat = jax.eval_shape(to_checkpoint_tree, state_pure)
  if sharding is not None:
    flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in flat.items()}
  return flat


def _path_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)
