"""Suite `pipeline`: decoded images/s of the Grain training pipeline vs a bare read-and-decode loop.

A synthetic dataset (`synthetic.generate`, 64x64) is written to a temporary directory. Ours:
`pipeline.train_dataset` (shuffle, decode, batch) in the main process (worker_count=0), with one worker
process, and with one worker process per core. Baseline, the ceiling: a bare loop that reads the same
ArrayRecord records in the same random order and decodes them with `records.decode_record`, in one
process, or in as many processes as ours uses (a spawn process pool, each decoding its share; results
are not sent back, so the ceiling has no inter-process transfer). Worker start-up is in the warm-up.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import tempfile

import grain
import numpy as np

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

  def __init__(self, data_dir: str, *, batch_size: int, batches_per_run: int, worker_count: int):
    self.dataset = pipeline.train_dataset(data_dir, "train", batch_size=batch_size, seed=0,
                                          hierarchical=False, worker_count=worker_count)
    self.iterator = iter(self.dataset)
    self.batches_per_run = batches_per_run

  def run(self) -> None:
    for _ in range(self.batches_per_run):
      next(self.iterator)

  def warmup(self) -> None:
    for _ in range(3):  # Worker start-up, then a full run with the workers going.
      self.run()

  def close(self) -> None:
    self.iterator.close()


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  cores = runner.core_count()
  num_images, image_size = (256, 32) if ctx.tiny else (8192, 64)
  batch_size, batches_per_run = (16, 4) if ctx.tiny else (64, 40)
  repeats = 2 if ctx.tiny else 5
  images_per_run = batch_size * batches_per_run
  rows = []
  with tempfile.TemporaryDirectory(prefix="wikitopics-bench-") as tmp:
    data_dir = os.path.join(tmp, "data")
    manifest = synthetic.generate(data_dir, num_images=num_images, image_size=image_size, seed=0,
                                  split_fractions=(("train", 1.0),))
    paths = manifest_lib.split_paths(data_dir, manifest.split("train"))
    settings = [(0, "in the main process (worker_count=0)", 1),
                (1, "1 worker process", 1)]
    if cores > 1:
      settings.append((cores, f"{cores} worker processes (one per core)", cores))
    loops = []
    try:
      bare = {}
      for processes in sorted({p for _, _, p in settings}):
        bare[processes] = BareLoop(paths, num_images, images_per_run, processes)
        loops.append(bare[processes])
      grain_loops = {}
      for workers, _, _ in settings:
        grain_loops[workers] = GrainLoop(data_dir, batch_size=batch_size,
                                         batches_per_run=batches_per_run, worker_count=workers)
        loops.append(grain_loops[workers])
      # One alternation per baseline, with the Grain settings it is compared against.
      for processes in sorted(bare):
        compared = [w for w, _, p in settings if p == processes]
        candidates = [runner.Candidate(f"grain{w}", grain_loops[w].run, work=images_per_run,
                                       warmup=grain_loops[w].warmup) for w in compared]
        candidates.append(runner.Candidate("bare", bare[processes].run, work=images_per_run,
                                           warmup=bare[processes].warmup))
        stats = runner.measure_alternating(candidates, repeats=repeats, unit="images/s")
        for workers, label, _ in settings:
          if workers in compared:
            rows.append(runner.Row(
                SUITE, f"decoded {image_size}x{image_size} images, batch {batch_size}, {label}",
                f"Grain train_dataset, worker_count={workers}", "images/s",
                stats[f"grain{workers}"][0],
                baseline=f"bare read+decode loop, {processes} process{'es' if processes > 1 else ''}",
                baseline_stats=stats["bare"][0],
                note="baseline is the ceiling (no shuffle buffer, batching or transfer)",
                extra={"num_images": num_images, "images_per_run": images_per_run,
                       "worker_count": workers, "baseline_processes": processes}))
    finally:
      for loop in loops:
        loop.close()
  return rows
