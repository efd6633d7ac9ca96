"""Grain input pipelines over a dataset directory of ArrayRecord shards.

Train: source -> shuffle (same seed on every process, reshuffled every epoch) -> repeat -> this
process's rows of each global batch -> decode -> batch -> optional worker processes. Batches straddle
epoch boundaries, so no example is dropped; an "epoch" is `num_examples // global_batch_size` steps.
The global batch sequence is the same for any number of processes.

Eval: this process's share -> decode -> batches padded to a fixed size with a `mask`, and every process
yields the same number of batches, so a global batch can always be assembled across hosts.

Images stay uint8 until the device (4x less host->device traffic); normalisation happens in the jitted
step (`normalize_images`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from wikitopics_jax import manifest as manifest_lib
from wikitopics_jax import records

# ImageNet statistics: keeps inputs in the range pretrained EfficientNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images_uint8: jnp.ndarray, normalization: str | None = None) -> jnp.ndarray:
  """uint8 pixels -> the model's float32 inputs; `normalization` is `model.input_normalization`.

  None or "imagenet": scale to [0, 1], then ImageNet mean/std (random init, Keras B0-B7 weights);
  "lite": (pixel - 127) / 128, what the EfficientNet-Lite ImageNet weights expect.
  """
  if normalization == "lite":
    return (images_uint8.astype(jnp.float32) - 127.0) / 128.0
  if normalization not in (None, "imagenet"):
    raise ValueError(f"unknown input normalization {normalization!r}")
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class DecodeExample(grain.transforms.Map):
  """Record bytes -> {"image": HWC uint8, "labels": (L,) uint8}."""

  def __init__(self, *, hierarchical: bool, source_name: str, image_shape: tuple[int, int, int]):
    self.label_key = "labels_hier" if hierarchical else "labels"
    self.source_name = source_name
    self.image_shape = tuple(image_shape)

  def map(self, record: bytes) -> dict[str, np.ndarray]:
    example = records.decode_record(record, where=self.source_name)
    image = example["image"]
    if image.shape != self.image_shape:
      raise ValueError(f"{self.source_name}: example {example['id']!r} has image shape {image.shape}, "
                       f"manifest says {self.image_shape}")
    return {"image": image, "labels": example[self.label_key]}


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  """Which records this process reads: every `count`-th, starting at `index`."""
  index: int = 0
  count: int = 1


def _split_source(data_dir: str, split: str):
  """(manifest, ArrayRecord source of the split), checked against the manifest's count."""
  manifest = manifest_lib.read(data_dir)
  info = manifest.split(split, where=data_dir)
  source = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(data_dir, info))
  if len(source) != info.num_examples:
    raise ValueError(f"{data_dir}: split {split!r} has {len(source)} records, manifest says "
                     f"{info.num_examples}")
  return manifest, source


def _split_dataset(data_dir: str, split: str, share: ProcessShare):
  manifest, source = _split_source(data_dir, split)
  ds = grain.MapDataset.source(source)
  if share.count > 1:
    ds = ds[share.index::share.count]
  return manifest, ds


def _maybe_prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


class _ExampleOrder:
  """Virtual training set: position i -> (record bytes, is it an oversampled copy)."""

  def __init__(self, source, indices: np.ndarray | None, is_duplicate: np.ndarray | None):
    self.source = source
    self.indices = indices
    self.is_duplicate = is_duplicate

  def __len__(self) -> int:
    return len(self.source) if self.indices is None else len(self.indices)

  def __getitem__(self, i: int):
    if self.indices is None:
      return self.source[i], False
    return self.source[int(self.indices[i])], bool(self.is_duplicate[i])


class _GlobalBatchRows:
  """Index k of this process -> (record, is_duplicate, global position) of its rows of each global
  batch.

  All processes shuffle the whole split with the same seed and take disjoint, contiguous row blocks
  of every global batch, so the global batch (and the training trajectory) does not depend on the
  number of processes, and together the processes read each example exactly once per epoch.
  """

  def __init__(self, shuffled: grain.MapDataset, per_process: int, share: ProcessShare):
    self.shuffled = shuffled
    self.per_process = per_process
    self.global_batch = per_process * share.count
    self.offset = share.index * per_process

  def __call__(self, k: int):
    batch, row = divmod(k, self.per_process)
    position = batch * self.global_batch + self.offset + row
    record, is_duplicate = self.shuffled[position]
    return record, is_duplicate, position


class _DecodeAndAugment(grain.transforms.Map):
  """Decodes, then augments with a generator seeded by (seed, global position): the same images
  for any number of processes or workers."""

  def __init__(self, decode: DecodeExample, augmentations: list, seed: int):
    self.decode = decode
    self.augmentations = augmentations
    self.seed = seed

  def map(self, item):
    record, is_duplicate, position = item
    example = self.decode.map(record)
    if self.augmentations:
      example["is_duplicate"] = is_duplicate
      rng = np.random.default_rng([self.seed, position])
      for augmentation in self.augmentations:
        example = augmentation.random_map(example, rng)
      del example["is_duplicate"]
      example["image"] = np.ascontiguousarray(example["image"])
    return example


def train_dataset(data_dir: str, split: str, *, batch_size: int, seed: int, hierarchical: bool,
                  share: ProcessShare = ProcessShare(), worker_count: int = 0,
                  indices: np.ndarray | None = None, is_duplicate: np.ndarray | None = None,
                  augmentations: list | None = None) -> grain.IterDataset:
  """Infinite iterator of this process's `batch_size` rows of each global batch.

  indices / is_duplicate: a resampled training set (`resampling.resample`), as an index
  transformation over the records (no copies on disk). augmentations: `augment` RandomMaps applied
  in order. `get_state()`/`set_state()` resume at exactly the same batch.
  """
  manifest, source = _split_source(data_dir, split)
  if indices is not None:
    indices = np.asarray(indices, np.int64)
    is_duplicate = (np.zeros(len(indices), bool) if is_duplicate is None
                    else np.asarray(is_duplicate, bool))
    if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
      raise ValueError(f"{data_dir}: resampled indices out of range for split {split!r}")
  examples = _ExampleOrder(source, indices, is_duplicate)
  if len(examples) < batch_size * share.count:
    raise ValueError(f"{data_dir}: split {split!r} has {len(examples)} examples, fewer than one global "
                     f"batch of {batch_size * share.count}")
  decode = DecodeExample(hierarchical=hierarchical, source_name=f"{data_dir}:{split}",
                         image_shape=manifest.image_shape)
  shuffled = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(None)
  ds = (grain.MapDataset.range(len(shuffled))
        .map(_GlobalBatchRows(shuffled, batch_size, share))
        .map(_DecodeAndAugment(decode, list(augmentations or []), seed))
        .batch(batch_size, drop_remainder=True))
  return _maybe_prefetch(ds.to_iter_dataset(), worker_count)


def eval_dataset(data_dir: str, split: str, *, batch_size: int, hierarchical: bool,
                 share: ProcessShare = ProcessShare(), worker_count: int = 0
                 ) -> tuple[grain.IterDataset, int]:
  """One pass, in order, padded batches with `mask`; returns (dataset, number of batches)."""
  manifest, ds = _split_dataset(data_dir, split, share)
  total = manifest.split(split).num_examples
  # Every process yields the same number of batches, sized by the largest share.
  per_process_max = math.ceil(total / share.count)
  num_batches = max(1, math.ceil(per_process_max / batch_size))
  padded_length = num_batches * batch_size
  decode = DecodeExample(hierarchical=hierarchical, source_name=f"{data_dir}:{split}",
                         image_shape=manifest.image_shape)
  ds = ds.map(decode)
  real_length = len(ds)
  h, w, c = manifest.image_shape
  num_labels = manifest.taxonomy.num_labels

  def pad(index: int) -> dict[str, Any]:
    if index < real_length:
      example = ds[index]
      return {**example, "mask": np.bool_(True), "index": np.int64(index * share.count + share.index)}
    return {"image": np.zeros((h, w, c), np.uint8), "labels": np.zeros(num_labels, np.uint8),
            "mask": np.bool_(False), "index": np.int64(-1)}

  padded = grain.MapDataset.range(padded_length).map(pad).batch(batch_size, drop_remainder=True)
  return _maybe_prefetch(padded.to_iter_dataset(), worker_count), num_batches
