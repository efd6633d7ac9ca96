"""Suite `ingest`: images/s of `ingest.run_ingest` vs a bare PIL decode-and-resize loop (the ceiling).

Inputs are written once to a temporary directory: JPEG photos-like images (smooth colour fields with
noise and edges, 320x240 like a Wikimedia thumbnail, quality 90) in the Commons hash layout and a
JSON Lines labels table naming one or two v1.3 labels per image. Ours: a complete ingest into a fresh
output directory (table read, filtering, hashing into splits, decode + resize to 64x64, ArrayRecord
shards, manifest), with 1 worker process and with one per core. Baseline: a loop that reads the same
files and does only what no ingest can avoid, `PIL.Image.open(...).convert("RGB").resize((64, 64))`,
in as many processes as ours (a spawn pool; no results sent back). Per-process figures are in the
row's `extra`. Runs are not interleaved (each ingest starts its own processes; measuring them one
after the other keeps the two from competing for the cores).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from wikitopics_jax.data import ingest
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.data import wit
from wikitopics_jax.bench import runner

SUITE = "ingest"
SOURCE_SIZE = (320, 240)


def photo_like_jpeg(rng: np.random.Generator, size: tuple[int, int] = SOURCE_SIZE) -> bytes:
  """A JPEG that costs what a photo costs to decode: smooth gradients, edges and sensor-like noise."""
  width, height = size
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = []
  for _ in range(3):
    a, b, c = rng.uniform(-1, 1, 3)
    field = 128 + 60 * np.sin(a * x / 23 + b * y / 17 + c * 6)
    field += np.where((x - width * rng.uniform()) * rng.uniform(-1, 1) > y - height * rng.uniform(), 40, -40)
    channels.append(field)
  pixels = np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def write_inputs(root: str, num_images: int) -> tuple[str, str, list[str]]:
  """-> (labels table, image directory, image paths)."""
  rng = np.random.default_rng(0)
  leaves = list(taxonomy_lib.load("v1.3").leaves)
  image_dir = os.path.join(root, "images")
  paths, rows = [], []
  for i in range(num_images):
    file = wit.file_from_title(f"Bench_photo_{i:05d}.jpg")
    path = os.path.join(image_dir, file.relative_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(photo_like_jpeg(rng))
    paths.append(path)
    labels = list(rng.choice(leaves, size=1 + i % 2, replace=False))
    rows.append({"id": str(i), "url": file.url(), "labels": labels})
  table = os.path.join(root, "labels.jsonl")
  with open(table, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in rows)
  return table, image_dir, paths


def decode_and_resize(paths: list[str], size: int) -> int:
  """The bare loop (top level: it runs in pool processes too)."""
  for path in paths:
    with Image.open(path) as image:
      image.convert("RGB").resize((size, size))
  return len(paths)


class BareLoop:
  def __init__(self, paths: list[str], size: int, processes: int):
    self.paths, self.size, self.processes = paths, size, processes
    self.pool = None
    if processes > 1:
      # spawn: forking a process that runs XLA's threads can deadlock.
      self.pool = concurrent.futures.ProcessPoolExecutor(
          processes, mp_context=multiprocessing.get_context("spawn"))

  def run(self) -> None:
    if self.pool is None:
      decode_and_resize(self.paths, self.size)
      return
    shares = [list(s) for s in np.array_split(np.array(self.paths, dtype=object), self.processes)]
    assert sum(self.pool.map(decode_and_resize, shares, [self.size] * len(shares))) == len(self.paths)

  def warmup(self) -> None:
    for _ in range(2 if self.pool is not None else 1):  # starts the pool's processes
      self.run()

  def close(self) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True)


class IngestLoop:
  """A whole ingest into a fresh directory per run (a finished output would be returned as is)."""

  def __init__(self, root: str, table: str, image_dir: str, size: int, workers: int):
    self.root, self.table, self.image_dir, self.workers = root, table, image_dir, workers
    self.settings = ingest.IngestSettings(image_size=size, examples_per_shard=256)
    self.runs = 0
    self.num_examples = None

  def run(self) -> None:
    out = os.path.join(self.root, f"out-{self.workers}-{self.runs}")
    self.runs += 1
    manifest = ingest.run_ingest(out, labels=[self.table], image_dirs=[self.image_dir],
                                 settings=self.settings, num_workers=self.workers, progress=False)
    self.num_examples = sum(s.num_examples for s in manifest.splits.values())
    shutil.rmtree(out)

  def warmup(self) -> None:
    self.run()

  def close(self) -> None:
    pass


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  cores = runner.core_count()
  num_images = 64 if ctx.tiny else 2000
  repeats = 2 if ctx.tiny else 3
  size = 64
  rows = []
  with tempfile.TemporaryDirectory(prefix="wikitopics-bench-ingest-") as tmp:
    table, image_dir, paths = write_inputs(tmp, num_images)
    for processes in sorted({1, cores}):
      bare = runner.measure_alone(BareLoop(paths, size, processes), work=num_images,
                                  repeats=repeats, unit="images/s")
      loop = IngestLoop(tmp, table, image_dir, size, processes)
      ours = runner.measure_alone(loop, work=num_images, repeats=repeats, unit="images/s")
      if loop.num_examples != num_images:
        raise RuntimeError(f"ingest kept {loop.num_examples} of {num_images} benchmark images")
      plural = "es" if processes > 1 else ""
      rows.append(runner.Row(
          SUITE, f"ingest of {num_images} JPEGs {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} -> {size}x{size} "
          f"ArrayRecord, {processes} process{plural}",
          f"wikitopics ingest, {processes} worker{'s' if processes > 1 else ''}", "images/s", ours,
          baseline=f"bare PIL open+convert+resize loop, {processes} process{plural}",
          baseline_stats=bare,
          note="baseline is the ceiling (no table, hashing, label closure or writing); measured "
               "one after the other, not interleaved",
          extra={"num_images": num_images, "processes": processes,
                 "ours_images_per_second_per_process": ours.median / processes,
                 "baseline_images_per_second_per_process": bare.median / processes}))
  return rows
