"""Tiny on-disk datasets for tests, written directly with the record format (independent of the
synthetic generator): label j lights up a fixed square in one colour channel, so a tiny model learns
it in a few steps."""

from __future__ import annotations

import os

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax import taxonomy as taxonomy_lib


def make_dataset(data_dir: str, *, sizes: dict[str, int] | None = None, image_size: int = 32,
                 seed: int = 0, shards: int = 2, taxonomy: str = "v1.3") -> manifest_lib.Manifest:
  sizes = sizes or {"train": 256, "val": 64, "threshold": 64, "test": 64}
  tax = taxonomy_lib.load(taxonomy)
  rng = np.random.default_rng(seed)
  os.makedirs(data_dir, exist_ok=True)
  leaves = [tax.index[l] for l in tax.leaves]
  splits = {}
  next_id = 0
  for split, n in sizes.items():
    flat = np.zeros((n, tax.num_labels), np.uint8)
    for i in range(n):
      flat[i, rng.choice(leaves, size=rng.integers(1, 3), replace=False)] = 1
    hier = tax.close(flat)
    files = [f"{split}-{s:05d}-of-{shards:05d}.array_record" for s in range(shards)]
    writers = [ArrayRecordWriter(os.path.join(data_dir, f), "group_size:1") for f in files]
    cells = image_size // 8
    for i in range(n):
      image = rng.integers(0, 60, (image_size, image_size, 3)).astype(np.uint8)
      for j in np.flatnonzero(flat[i]):
        r, c = divmod(j % 16, 4)
        image[r * cells * 2:(r * 2 + 1) * cells, c * cells * 2:(c * 2 + 1) * cells, j % 3] = 255
      writers[i % shards].write(records.encode_example(
          example_id=f"ex{next_id:06d}", image=image, labels=flat[i], labels_hier=hier[i]))
      next_id += 1
    for w in writers:
      w.close()
    splits[split] = manifest_lib.SplitInfo(
        files=files, num_examples=n, label_counts=flat.sum(0).tolist(),
        label_counts_hier=hier.sum(0).tolist())
  m = manifest_lib.Manifest(taxonomy=tax, image_shape=(image_size, image_size, 3), image_encoding="raw",
                            splits=splits, info={"generator": "tests/datasets.py", "seed": seed})
  manifest_lib.write(data_dir, m)
  return m


def read_split(data_dir: str, split: str) -> list[dict]:
  import grain  # pylint: disable=g-import-not-at-top
  m = manifest_lib.read(data_dir)
  src = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(data_dir, m.split(split)))
  return [records.decode_record(src[i]) for i in range(len(src))]
