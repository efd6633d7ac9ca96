"""Suite `pipeline`: decoded (and augmented) images/s of the Grain training pipeline vs a bare
read-and-decode loop.

A synthetic dataset (`synthetic.generate`, 64x64) is written to a temporary directory. Ours:
`pipeline.train_dataset` (shuffle, decode, batch), plain and with the thesis's naive augmentation
(`augment.NaiveAugment`: zoom, rotation, shift, flip on every image), in the main process
(worker_count=0; Grain still decodes with its read threads there), with one worker process, and with
one worker process per core.
Baseline, the ceiling: a bare loop that reads the same ArrayRecord records in the same random order
and decodes them with `records.decode_record`, in one process, or in as many processes as ours uses (a
spawn process pool, each decoding its share; results are not sent back, so the ceiling has no
inter-process transfer). Worker start-up is in the warm-up.

Unlike the other suites these are not interleaved: Grain reads ahead (read threads, worker buffers),
so while another loop is timed it would fill its buffers and its next run would be served from them.
Each loop is measured alone: warm-up (which empties the read-ahead buffer), back-to-back timed runs,
close. Consumed back to back, the buffers stay empty and the figure is the steady-state rate.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import tempfile

import grain
import numpy as np

from wikitopics_jax import augment
from wikitopics_jax import manifest as manifest_lib
from wikitopics_jax import pipeline
from wikitopics_jax import records
from wikitopics_jax import synthetic
from wikitopics_jax.bench import runner

SUITE = "pipeline"


@functools.lru_cache(maxsize=4)
def _source(paths: tuple[str, ...]) -> grain.sources.ArrayRecordDataSource:
  return grain.sources.ArrayRecordDataSource(list(paths))


def decode_records(paths: tuple[str, ...], indices: np.ndarray) -> int:
  """The bare loop: read each record and decode it. Runs in pool processes too (top-level)."""
  source = _source(paths)
  for index in indices:
    records.decode_record(source[int(index)])
  return len(indices)


class BareLoop:
  """`images_per_run` decodes per run, cycling through a fixed random order, in `processes` processes."""

  def __init__(self, paths: list[str], num_records: int, images_per_run: int, processes: int):
    self.paths = tuple(paths)
    self.order = np.random.default_rng(0).permutation(num_records)
    self.images_per_run = images_per_run
    self.position = 0
    self.pool = None
    if processes > 1:
      # spawn: forking a process that runs XLA's threads can deadlock.
      self.pool = concurrent.futures.ProcessPoolExecutor(
          processes, mp_context=multiprocessing.get_context("spawn"))
      self.processes = processes

  def _next_indices(self) -> np.ndarray:
    positions = (self.position + np.arange(self.images_per_run)) % len(self.order)
    self.position = (self.position + self.images_per_run) % len(self.order)
    return self.order[positions]

  def run(self) -> None:
    indices = self._next_indices()
    if self.pool is None:
      decode_records(self.paths, indices)
      return
    shares = np.array_split(indices, self.processes)
    done = sum(self.pool.map(decode_records, [self.paths] * len(shares), shares))
    assert done == len(indices)

  def warmup(self) -> None:
    if self.pool is not None:
      # Start every process and open the files there (map gives each process a task when all are
      # busy long enough; a few rounds make that near certain).
      for _ in range(3):
        self.run()
    self.run()

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=True)


class GrainLoop:
  """`batches_per_run` batches of `pipeline.train_dataset` per run."""

  def __init__(self, data_dir: str, *, batch_size: int, batches_per_run: int, worker_count: int,
               drain: bool, augmentations: list | None = None):
    self.dataset = pipeline.train_dataset(data_dir, "train", batch_size=batch_size, seed=0,
                                          hierarchical=False, worker_count=worker_count,
                                          augmentations=augmentations)
    self.iterator = iter(self.dataset)
    self.batches_per_run = batches_per_run
    # Grain reads ahead into a buffer (ReadOptions.prefetch_buffer_size batches, in each worker
    # process when there are workers) while nobody consumes, e.g. during start-up. The warm-up
    # empties it, so that the timed runs see the production rate, not the buffer.
    buffered = grain.ReadOptions().prefetch_buffer_size * max(1, worker_count)
    self.warmup_batches = 2 * batches_per_run + (buffered if drain else 0)

  def run(self) -> None:
    for _ in range(self.batches_per_run):
      next(self.iterator)

  def warmup(self) -> None:
    for _ in range(self.warmup_batches):
      next(self.iterator)

  def close(self) -> None:
    self.iterator.close()


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  cores = runner.core_count()
  num_images, image_size = (256, 32) if ctx.tiny else (8192, 64)
  # Long runs: Grain hands over batches in bursts, which short runs would catch or miss.
  batch_size, batches_per_run = (16, 4) if ctx.tiny else (64, 100)
  repeats = 2 if ctx.tiny else 5
  images_per_run = batch_size * batches_per_run
  settings = [(0, "in the main process (worker_count=0)", 1), (1, "1 worker process", 1)]
  if cores > 1:
    settings.append((cores, f"{cores} worker processes (one per core)", cores))
  rows = []
  with tempfile.TemporaryDirectory(prefix="wikitopics-bench-") as tmp:
    data_dir = os.path.join(tmp, "data")
    manifest = synthetic.generate(data_dir, num_images=num_images, image_size=image_size, seed=0,
                                  split_fractions=(("train", 1.0),))
    paths = manifest_lib.split_paths(data_dir, manifest.split("train"))
    # Not interleaved: a prefetching pipeline works ahead while another one is timed, so each is
    # measured alone, back to back, and closed before the next starts.
    bare = {processes: runner.measure_alone(
                BareLoop(paths, num_images, images_per_run, processes), work=images_per_run,
                repeats=repeats, unit="images/s")
            for processes in sorted({p for _, _, p in settings})}
    for augmentations, what in (([], "decoded"), ([augment.NaiveAugment()], "decoded+augmented")):
      for workers, label, processes in settings:
        # --tiny skips draining the read-ahead buffers (its figures mean nothing anyway).
        grain_loop = GrainLoop(data_dir, batch_size=batch_size, batches_per_run=batches_per_run,
                               worker_count=workers, drain=not ctx.tiny, augmentations=augmentations)
        ours = runner.measure_alone(grain_loop, work=images_per_run, repeats=repeats,
                                    unit="images/s")
        augmented = " + naive augmentation" if augmentations else ""
        rows.append(runner.Row(
            SUITE, f"{what} {image_size}x{image_size} images, batch {batch_size}, {label}",
            f"Grain train_dataset{augmented}, worker_count={workers}", "images/s", ours,
            baseline=f"bare read+decode loop, {processes} process{'es' if processes > 1 else ''}",
            baseline_stats=bare[processes],
            note="baseline is the ceiling (no shuffle, augmentation, batching or transfer); "
                 "measured one after the other, not interleaved",
            extra={"num_images": num_images, "images_per_run": images_per_run,
                   "worker_count": workers, "baseline_processes": processes,
                   "augmentation": "naive" if augmentations else "none",
                   "ours_images_per_second_per_worker": ours.median / max(workers, 1)}))
  return rows
