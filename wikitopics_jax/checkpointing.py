"""Checkpoints, behind one module so an Orbax API change touches one file.

Each checkpoint holds the train state (parameters, optimiser state, BatchNorm statistics, RNG state) as
a pure pytree, the Grain iterator state, and JSON metadata (step, config, the dataset's taxonomy).
Kept: the latest `keep_latest` plus the best by the validation metric. Each checkpoint stores its
validation metrics (Orbax's `metrics` item) so that the best survives restarts; `best.json` in the
checkpoint directory names the best step, is only written once that checkpoint is complete on disk,
and is re-derived from the stored metrics when a kill left it behind.

Integrity: the metadata records a checksum of every array; every restore verifies it. A checkpoint
that does not restore or verify raises `CorruptCheckpointError` (one line). `restore_newest` skips
such checkpoints, moving them aside (to `<directory>.corrupt/`) when it writes, and a failed write
(a full disk) raises `CheckpointWriteError` naming the path and the cause.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy

from wikitopics_jax import sharding
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

BEST_MARKER = "best.json"
CHECKSUMS_KEY = "checksums"
# Replica-parallel saving splits each replicated array across its replicas, so every replica writes a
# slice: one eagerly compiled slice program per array shape and device, seconds of compilation at
# every process's first save. Worth it only for big arrays on accelerators; off on CPU, whose
# devices share one host memory.
_MIN_BYTES_FOR_REPLICA_PARALLEL = 1 << 20
_array_handler_registered = False
# Orbax logs each failure of its background threads with a traceback before the failure reaches
# us and we report it in one line; by default its log records are dropped (`show_orbax_logs`).
_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


class _DropOrbaxRecords(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "asyncio":
      # TensorStore futures that Orbax abandoned after the failure it raised.
      return "exception was never retrieved" not in str(record.msg)
    return _ORBAX_SOURCE not in (record.pathname or "")


_DROP_ORBAX = _DropOrbaxRecords()


_default_unraisablehook = sys.unraisablehook


def _quiet_unraisablehook(unraisable) -> None:
  # After a failed read, TensorStore completes futures of Orbax's already-closed event loop: noise
  # about a failure that was raised (and reported in one line) already.
  if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
      unraisable.exc_value):
    return
  _default_unraisablehook(unraisable)


def show_orbax_logs(show: bool) -> None:
  """Routes Orbax's log records (they go through absl's logger) to the output, or drops them."""
  sys.unraisablehook = _default_unraisablehook if show else _quiet_unraisablehook
  for handler_owner in (logging.getLogger("absl"), logging.getLogger("asyncio")):
    if show:
      handler_owner.removeFilter(_DROP_ORBAX)
    elif _DROP_ORBAX not in handler_owner.filters:
      handler_owner.addFilter(_DROP_ORBAX)


show_orbax_logs(False)


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


class CorruptCheckpointError(InputError):
  """A checkpoint that cannot be read back, or whose arrays fail their checksums."""


class CheckpointWriteError(InputError):
  """A checkpoint that could not be written (a full disk, a read-only or vanished directory)."""


class Checkpointer:

  def __init__(self, directory: str, *, keep_latest: int = 2, best_metric: str = "val_loss",
               best_mode: str = "min", async_save: bool = True, read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise InputError(f"config.checkpoint.best_mode={best_mode!r}; valid: 'min', 'max'")
    _register_array_handler()
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    self._keep_latest = keep_latest
    self._async_save = async_save
    self._pending_step = None  # the step an async save may still be writing
    self._open_manager()

  def _open_manager(self) -> None:
    # BestN ranks by (value, step) so that, as in `_is_better`, the earliest of equal values wins,
    # and a non-finite value ranks last; `best_fn` makes Orbax store each checkpoint's metrics,
    # which is what lets BestN keep the best across restarts.
    def rank(metrics):
      value = _finite_or_worst(metrics.get(self.best_metric), self.best_mode)
      step = int(metrics.get("step", 0))
      return (value, step) if self.best_mode == "min" else (value, -step)
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(n=self._keep_latest),
        # BestN keeps the last n after sorting; reverse=True sorts descending, keeping the minimum.
        preservation_policy.BestN(get_metric_fn=rank, reverse=self.best_mode == "min",
                                  n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=rank, best_mode=self.best_mode,
        enable_async_checkpointing=self._async_save, read_only=self.read_only,
        create=not self.read_only, cleanup_tmp_directories=not self.read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Kept in memory: every process takes the same keep/mark decisions from the same metrics, and
    # none of them reads a marker that process 0 may be rewriting.
    self._best = self._derive_best()
    if not self.read_only and self._best != self._read_marker():
      self._write_marker()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iterator: grain.DatasetIterator | None = None,
           meta: dict[str, Any], metrics: dict[str, float] | None = None, force: bool = False) -> None:
    meta = {**meta, CHECKSUMS_KEY: checksums(state)}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iterator)
    stored_metrics = None
    if metrics is not None:
      stored_metrics = {**{k: float(v) for k, v in metrics.items()}, "step": int(step)}
    self._pending_step = int(step)
    with self._writing(step):
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=stored_metrics, force=force)
    if metrics is not None and self._is_better(step, metrics):
      # The marker must never point at a checkpoint that is still being written.
      self.wait()
      self._best = {"step": int(step), "metric": self.best_metric,
                    "value": float(metrics[self.best_metric])}
      self._write_marker()
      if jax.process_count() > 1:
        # Nobody reads the marker (evaluate_best) before it is there.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"best checkpoint marker {step}")

  def _write_marker(self) -> None:
    if jax.process_index() != 0:  # one writer on a shared file system
      return
    path = os.path.join(self.directory, BEST_MARKER)
    with self._writing(None, path):
      if self._best is None:
        if os.path.exists(path):
          os.remove(path)
      else:
        _atomic_write_json(path, self._best)

  def _is_better(self, step: int, metrics: dict[str, float]) -> bool:
    value = float(metrics[self.best_metric])
    if not math.isfinite(value):
      return False
    best = self._best
    if best is None or best["step"] not in self.all_steps():
      return True
    if value == best["value"]:
      return step < best["step"]
    return value < best["value"] if self.best_mode == "min" else value > best["value"]

  def _derive_best(self) -> dict[str, Any] | None:
    """The best step by the metrics stored in the checkpoints (the marker for older checkpoints)."""
    candidates = []
    for step in self.all_steps():
      try:
        metrics = self._manager.metrics(step)
      except Exception:  # pylint: disable=broad-except
        metrics = None  # unreadable metrics: a corrupt checkpoint is never the best
      if metrics and self.best_metric in metrics:
        value = float(metrics[self.best_metric])
        if math.isfinite(value):
          candidates.append((value if self.best_mode == "min" else -value, step, value))
    if candidates:
      _, step, value = min(candidates)
      return {"step": int(step), "metric": self.best_metric, "value": value}
    marker = self._read_marker()
    if marker is not None and marker.get("step") in self.all_steps():
      return marker
    return None

  def _read_marker(self) -> dict[str, Any] | None:
    path = os.path.join(self.directory, BEST_MARKER)
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return None  # a torn marker: the stored metrics are the source of truth

  def best(self) -> dict[str, Any] | None:
    return self._best

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
        raise InputError(f"{self.directory}: no best checkpoint (no checkpoint has "
                         f"{self.best_metric!r})")
    elif which == "latest":
      step = steps[-1]
    else:
      try:
        step = int(which)
      except ValueError:
        raise InputError(f"checkpoint {which!r}: valid: 'best', 'latest' or a step number") from None
    if step not in steps:
      raise InputError(f"{self.directory}: no checkpoint at step {step}; available: {steps}")
    return step

  def restore_meta(self, step: int) -> dict[str, Any]:
    with self._reading(step):
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, *,
              data_iterator: grain.DatasetIterator | None = None) -> tuple[Any, dict[str, Any]]:
    """The state (verified against its checksums) and metadata of checkpoint `step`."""
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iterator)
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    self._verify(step, restored["state"], restored["meta"])
    return restored["state"], restored["meta"]

  def restore_arrays(self, step: int) -> dict[str, Any]:
    """The flat state of a checkpoint as host arrays, without a model (verified, as `restore`)."""
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    state = dict(restored["state"])
    self._verify(step, state, restored["meta"])
    return state

  def restore_newest(self, restore_fn: Callable[[int], Any], *, steps: list[int] | None = None,
                     log: Callable[[str], None] = print) -> tuple[int, Any]:
    """`restore_fn(step)` on the newest checkpoint it succeeds on -> (step, its result).

    A checkpoint that raises `CorruptCheckpointError` is reported in one line and skipped; once an
    older one restores, a writing Checkpointer moves the skipped ones to `<directory>.corrupt/` (kept
    for inspection, out of Orbax's way) and re-derives the best. If none restores, nothing is moved
    and the error names them all.
    """
    steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
    if not steps:
      raise InputError(f"{self.directory}: no checkpoints")
    skipped = []
    for step in steps:
      try:
        result = restore_fn(step)
      except CorruptCheckpointError as e:
        log(f"skipping checkpoint step {step}: {e}")
        skipped.append(step)
        continue
      if skipped:
        log(f"using checkpoint step {step} (newer checkpoint(s) {skipped} are corrupt)")
        if not self.read_only:
          self._quarantine(skipped, log)
      return step, result
    raise CorruptCheckpointError(f"{self.directory}: no checkpoint restores; tried steps {steps}")

  def _quarantine(self, steps: list[int], log: Callable[[str], None]) -> None:
    self.wait()
    if jax.process_index() == 0:
      target_root = self.directory.rstrip(os.sep) + ".corrupt"
      os.makedirs(target_root, exist_ok=True)
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        with self._writing(step, target):
          shutil.move(source, target)
        log(f"moved corrupt checkpoint step {step} to {target}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"corrupt checkpoints moved {steps}")
    self._manager.close()
    self._open_manager()

  def _verify(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    expected = meta.get(CHECKSUMS_KEY)
    if expected is None:
      return  # written before checksums existed
    actual = checksums(state)
    bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
    if bad:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} fails its checksum for {len(bad)} array(s), "
          f"e.g. {bad[0]!r}")

  def _reading(self, step: int):
    return _ErrorsAs(CorruptCheckpointError,
                     f"checkpoint step {step} in {self.directory} is unreadable")

  def _writing(self, step: int | None, path: str | None = None):
    step = self._pending_step if step is None and path is None else step
    where = path or (f"checkpoint {os.path.join(self.directory, str(step))}" if step is not None
                     else f"checkpoints in {self.directory}")
    return _ErrorsAs(CheckpointWriteError, f"could not write {where}", write=True,
                     cleanup=None if path else lambda: self._remove_partial(step))

  def _remove_partial(self, step: int | None) -> None:
    """After a failed save: its temporary directory goes (best effort); finished steps stay."""
    if step is None or jax.process_index() != 0:
      return
    for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(partial, ignore_errors=True)

  def wait(self) -> None:
    with self._writing(None):
      self._manager.wait_until_finished()
    self._pending_step = None

  def close(self) -> None:
    self.wait()
    with self._writing(None):
      self._manager.close()


class _ErrorsAs:
  """Turns any exception of the wrapped Orbax/TensorStore call into a one-line error of ours.

  For writes, only OS errors (ENOSPC, EROFS, ...) are input errors; anything else stays a bug.
  """

  def __init__(self, error_type: type[InputError], prefix: str, write: bool = False,
               cleanup: Callable[[], None] | None = None):
    self.error_type, self.prefix, self.write, self.cleanup = error_type, prefix, write, cleanup

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is None or isinstance(exc, (InputError, KeyboardInterrupt, SystemExit)):
      return False
    cause = _os_error_in(exc)
    if self.write and cause is None:
      return False
    reason = _one_line(cause if cause is not None else _innermost(exc))
    failed = _failed_path(exc)
    if failed:
      reason += f" (writing {failed})"
    if self.cleanup is not None:
      self.cleanup()
    raise self.error_type(f"{self.prefix}: {reason}") from exc


def _failed_path(exc: BaseException) -> str | None:
  """The file that TensorStore names in its message ('Failed writing: "PATH"'), if any."""
  match = re.search(r'Failed (?:writing|to write)[^"]*"([^"]+)"', str(exc))
  return match.group(1) if match else None


def _os_error_in(exc: BaseException) -> OSError | None:
  """The first OSError in an exception's cause/context chain (or in a group), if any."""
  seen = set()
  stack = [exc]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    if isinstance(e, OSError):
      return e
    stack.extend(getattr(e, "exceptions", ()))
    stack.extend([e.__cause__, e.__context__])
  # TensorStore reports OS failures as ValueErrors whose text carries the errno message.
  text = str(exc)
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
    if os.strerror(code) in text:
      return OSError(code, os.strerror(code))
  return None


def _innermost(exc: BaseException) -> BaseException:
  """The root of a chain: Orbax wraps TensorStore's precise error in generic ones."""
  seen = {id(exc)}
  while True:
    nxt = exc.__cause__ or exc.__context__
    if nxt is None or id(nxt) in seen:
      return exc
    seen.add(id(nxt))
    exc = nxt


def _one_line(exc: BaseException) -> str:
  text = " ".join(str(exc).split("[tensorstore_spec")[0].split())
  if len(text) > 300:
    text = text[:297] + "..."
  return f"{type(exc).__name__}: {text}" if not isinstance(exc, OSError) else text


def _finite_or_worst(value: Any, mode: str) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = math.nan
  if math.isfinite(value):
    return value
  return math.inf if mode == "min" else -math.inf


def checksums(flat_state: dict[str, Any]) -> dict[str, str]:
  """name -> BLAKE2b of dtype, shape and bytes of each array (replicated arrays: one local copy)."""
  out = {}
  for name in sorted(flat_state):
    array = _host_array(flat_state[name])
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    out[name] = digest.hexdigest()
  return out


def _host_array(value: Any) -> np.ndarray:
  if isinstance(value, jax.Array):
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    if not value.is_fully_addressable:
      value = value.addressable_data(0)  # replicated: every process holds the whole array
  return np.asarray(value)


def _atomic_write_json(path: str, data: dict[str, Any]) -> None:
  with files.atomic_open(path) as f:
    json.dump(data, f, indent=1)


def restore_state(ckpt: Checkpointer, step: int, state: Any, placement: Any, *,
                  data_iterator=None) -> Any:
  """Checkpoint `step` -> `state` (an nnx module, updated in place) placed on the mesh as
  `placement.replicated` (a `sharding.Placement`); the data iterator's position too, if given."""
  like = nnx.to_pure_dict(state)
  flat, _ = ckpt.restore(step, abstract_checkpoint_tree(like, placement.replicated),
                         data_iterator=data_iterator)
  nnx.replace_by_pure_dict(state, from_checkpoint_tree(flat, like))
  return sharding.put_replicated(state, placement.replicated)


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
