"""Suite `pipeline`: decoded (and augmented) images/s of the Grain training iterator vs a bare
read-and-decode loop over the same records, side by side in alternating rounds.

A synthetic dataset (`synthetic.generate`, 64x64 raw records) is written to a temporary directory.
Ours: `pipeline.train_dataset` (shuffle, this process's rows of each global batch, batched read,
decode into the batch), in the main process (worker_count=0) and with 2 worker processes (Grain
`mp_prefetch`); with `emit_example_info=True` (device augmentation: the host only decodes); and with
the thesis's naive host augmentation (`augment.NaiveAugment`: zoom, rotation, shift, flip on every
image), for comparison.
Baseline, the ceiling: a bare loop that reads the same ArrayRecord records one by one in a random
order and decodes them with `records.decode_record`, in as many processes as ours uses (a spawn
process pool, each decoding its share; results are not sent back, so the ceiling has no
inter-process transfer). Worker start-up is in the warm-up.

Alternating rounds: while the bare loop runs, worker processes (and Grain read threads, if
`pipeline.READ_OPTIONS` had any) work ahead into bounded buffers, so each of our runs first takes as
many batches as those buffers can hold (timed, but not counted as work) and then `batches_per_run`
batches produced from empty buffers: the steady-state rate, a little under-stated.
Images/s per core: in the main process, images per CPU second of the process (all its threads);
with workers, images/s divided by the worker count. The rows say how many such cores 100k images/s
would need.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import tempfile
import time

import grain
import numpy as np

from wikitopics_jax.data import augment
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.data import records
from wikitopics_jax.data import synthetic
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
  """`batches_per_run` batches of `pipeline.train_dataset` per run, after taking what Grain read
  ahead while another loop ran."""

  def __init__(self, data_dir: str, *, batch_size: int, batches_per_run: int, worker_count: int,
               drain: bool, augmentations: list | None = None, emit_example_info: bool = False):
    self.dataset = pipeline.train_dataset(data_dir, "train", batch_size=batch_size, seed=0,
                                          hierarchical=False, worker_count=worker_count,
                                          augmentations=augmentations,
                                          emit_example_info=emit_example_info)
    self.iterator = iter(self.dataset)
    self.batches_per_run = batches_per_run
    # Batches that can be ready before a run starts: Grain's read-ahead buffer and the batches in its
    # read threads, per process (none with pipeline.READ_OPTIONS' 0 threads), plus, per worker, the
    # one in its output queue and the one it has built while that one waits.
    options = pipeline.READ_OPTIONS
    read_ahead = options.prefetch_buffer_size + options.num_threads if options.num_threads else 0
    self.buffered = (read_ahead * max(1, worker_count) + 2 * worker_count) if drain else 0
    # CPU seconds of this process (all its threads: Grain's, the reader's) and batches, per run.
    self.cpu_seconds, self.batches = 0.0, 0

  def run(self) -> None:
    start = time.process_time()
    for _ in range(self.buffered + self.batches_per_run):
      next(self.iterator)
    self.cpu_seconds += time.process_time() - start
    self.batches += self.buffered + self.batches_per_run

  def warmup(self) -> None:
    for _ in range(2):
      self.run()

  def close(self) -> None:
    self.iterator.close()


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  num_images, image_size = (256, 32) if ctx.tiny else (8192, 64)
  # Long runs: Grain hands over batches in bursts, which short runs would catch or miss.
  batch_size, batches_per_run = (16, 4) if ctx.tiny else (64, 100)
  repeats = 2 if ctx.tiny else 5
  images_per_run = batch_size * batches_per_run
  # (what, augmentation, emit_example_info, worker counts)
  variants = [("decoded {images}", None, False, (0, 2)),
              ("decoded {images} for device augmentation (with example info)", None, True, (0,)),
              ("decoded+augmented {images}", "naive", False, (0, 2))]
  rows = []
  with tempfile.TemporaryDirectory(prefix="wikitopics-bench-") as tmp:
    data_dir = os.path.join(tmp, "data")
    manifest = synthetic.generate(data_dir, num_images=num_images, image_size=image_size, seed=0,
                                  split_fractions=(("train", 1.0),))
    paths = manifest_lib.split_paths(data_dir, manifest.split("train"))
    for what, augmentation, emit_example_info, worker_counts in variants:
      for workers in worker_counts:
        processes = max(1, workers)
        # --tiny does not drain the read-ahead buffers (its figures mean nothing anyway).
        ours = GrainLoop(data_dir, batch_size=batch_size, batches_per_run=batches_per_run,
                         worker_count=workers, drain=not ctx.tiny,
                         augmentations=[augment.NaiveAugment()] if augmentation else None,
                         emit_example_info=emit_example_info)
        bare = BareLoop(paths, num_images, images_per_run, processes)
        try:
          stats = runner.measure_alternating(
              [runner.Candidate("ours", ours.run, work=images_per_run, warmup=ours.warmup),
               runner.Candidate("bare", bare.run, work=images_per_run, warmup=bare.warmup)],
              repeats=repeats, unit="images/s", settling_round=True)
        finally:
          ours.close()
          bare.close()
        ours_stats, bare_stats = stats["ours"][0], stats["bare"][0]
        if workers == 0:
          # The main process decodes on several threads (the reader decompresses a batch's records
          # in parallel), so its cores are its CPU seconds, not 1.
          per_core = ours.batches * batch_size / max(ours.cpu_seconds, 1e-9)
        else:
          per_core = ours_stats.median / processes
        label = ("in the main process (worker_count=0)" if workers == 0
                 else f"{workers} worker processes")
        option = ", emit_example_info=True" if emit_example_info else ""
        rows.append(runner.Row(
            SUITE, f"{what.format(images=f'{image_size}x{image_size} images')}, batch {batch_size}, "
                   f"{label}",
            f"Grain train_dataset{' + naive augmentation' if augmentation else ''}{option}, "
            f"worker_count={workers}", "images/s", ours_stats,
            baseline=f"bare read+decode loop, {processes} process{'es' if processes > 1 else ''}",
            baseline_stats=bare_stats,
            note=f"{per_core:,.0f} images/s per core: 100k images/s needs "
                 f"{100_000 / per_core:.1f} cores; baseline is the ceiling (no shuffle, "
                 "augmentation, batching or transfer); alternating rounds",
            extra={"num_images": num_images, "images_per_run": images_per_run,
                   "worker_count": workers, "baseline_processes": processes,
                   "augmentation": ("device" if emit_example_info else augmentation or "none"),
                   "emit_example_info": emit_example_info,
                   "ours_images_per_second_per_core": per_core,
                   "cores_for_100k_images_per_second": 100_000 / per_core,
                   "baseline_images_per_second_per_core": bare_stats.median / processes}))
  return rows
