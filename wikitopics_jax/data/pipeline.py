"""Grain input pipelines over a dataset directory of ArrayRecord shards.

Train: the shuffled, repeated stream of examples (same seed on every process, reshuffled every epoch)
-> this process's rows of each global batch -> one batched read -> decode into the batch's arrays ->
optional worker processes. Batches straddle epoch boundaries, so no example is dropped; an "epoch" is
`num_examples // global_batch_size` steps. The global batch sequence is the same for any number of
processes.

Each element of the Grain dataset is a whole batch: its records are read with one call per shard
(the C++ reader decompresses them without the GIL) and decoded straight into preallocated (B, H, W, C)
and (B, L) uint8 arrays, with no per-example dicts or Grain per-element overhead; that is what keeps
the iterator near a bare read+decode loop. The iterator's state is the next batch number.

Eval: this process's share -> decode -> batches padded to a fixed size with a `mask`, and every process
yields the same number of batches, so a global batch can always be assembled across hosts.

Text (`emit_text=True`, off by default): each batch also gets "text", a (B,) object array of str, each
example's `records.example_text` (contexts' page title, section title, caption, then attribution
description and alt text, joined by `records.TEXT_SEPARATOR`; "" for none and for eval padding), for a
text tower to tokenise on the host. It comes from the same record unpacking as the image.
`text_tokenizer=` (a text tower's host tokenizer, texts -> (ids, mask)) tokenises it in the pipeline
(`TokenizeText`, in the worker processes when there are any): the batch then holds "text_ids" (B, T)
int32, "text_mask" (B, T) bool and "has_text" (B,) bool instead of "text".

Images stay uint8 until the device (4x less host->device traffic); normalisation happens in the jitted
step (`normalize_images`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import threading

import grain
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax.models.efficientnet import IMAGENET_MEAN, IMAGENET_STD


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


# Batches are built in the thread that asks for them: no Grain read threads or read-ahead buffer.
# A batch's records are already decompressed in parallel by the reader, the trainer overlaps the next
# batch with the running step (`sharding.DevicePrefetch`, asynchronous dispatch), and worker
# processes read ahead by themselves; extra threads only added GIL contention (fewer images per CPU
# second, and fewer per second in one process). Grain's defaults (16 threads, a 500-element buffer)
# are sized for single examples.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  """Which records this process reads: every `count`-th, starting at `index`."""
  index: int = 0
  count: int = 1


class RecordReader:
  """Batched random reads from a split's ArrayRecord shards: one `read(positions)` call per shard
  touched, and no thread pool per call (`ArrayRecordDataSource.__getitems__` starts one).

  Pickles without its open files (worker processes reopen them on first use); safe to share between
  threads, as the readers are.
  """

  def __init__(self, paths: list[str]):
    self.paths = list(paths)
    self._lock = threading.Lock()
    self._readers = [self._open(path) for path in self.paths]
    counts = [reader.num_records() for reader in self._readers]
    self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  @staticmethod
  def _open(path: str) -> ArrayRecordReader:
    # No read-ahead: every read is random access. A batch's records are decompressed in parallel by
    # the reader's thread pool, without the GIL.
    return ArrayRecordReader(path, "readahead_buffer_size:0")

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _reader(self, shard: int) -> ArrayRecordReader:
    reader = self._readers[shard]
    if reader is None:
      with self._lock:
        if self._readers[shard] is None:
          self._readers[shard] = self._open(self.paths[shard])
        reader = self._readers[shard]
    return reader

  def read(self, keys: np.ndarray) -> list[bytes]:
    """Records at the global `keys` (int64), in that order."""
    keys = np.asarray(keys, np.int64)
    if len(keys) and (keys.min() < 0 or keys.max() >= len(self)):
      raise IndexError(f"record keys out of range [0, {len(self)})")
    shards = np.searchsorted(self.starts, keys, side="right") - 1
    out: list[bytes] = [b""] * len(keys)
    for shard in np.unique(shards).tolist():
      rows = np.flatnonzero(shards == shard)
      data = self._reader(shard).read((keys[rows] - self.starts[shard]).tolist())
      for row, record in zip(rows.tolist(), data):
        out[row] = record
    return out

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = [None] * len(self.paths)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


def _split_reader(data_dir: str, split: str):
  """(manifest, RecordReader of the split), checked against the manifest's count."""
  manifest = manifest_lib.read(data_dir)
  info = manifest.split(split, where=data_dir)
  reader = RecordReader(manifest_lib.split_paths(data_dir, info))
  if len(reader) != info.num_examples:
    raise ValueError(f"{data_dir}: split {split!r} has {len(reader)} records, manifest says "
                     f"{info.num_examples}")
  return manifest, reader


def _to_iter_dataset(batches: grain.MapDataset, worker_count: int) -> grain.IterDataset:
  ds = batches.to_iter_dataset(READ_OPTIONS)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return ds


_MASK32 = 0xFFFFFFFF
# Up to this many examples, a whole epoch's permutation is computed at once and kept (8 bytes an
# example); above, each batch's positions are permuted on their own.
EPOCH_CACHE_LIMIT = 2**22


@functools.lru_cache(maxsize=64)
def _round_keys(seed: int, rounds: int) -> tuple[int, ...]:
  """`std::seed_seq{seed}.generate(rounds words)`, the key schedule of Grain's index_shuffle."""
  n, v = rounds, [seed & _MASK32]
  out = [0x8B8B8B8B] * n
  t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
  p, q, m = (n - t) // 2, (n - t) // 2 + t, max(len(v) + 1, n)
  mix = lambda x: x ^ (x >> 27)
  for k in range(m):
    r1 = (1664525 * mix(out[k % n] ^ out[(k + p) % n] ^ out[(k - 1) % n])) & _MASK32
    r2 = (r1 + (len(v) if k == 0 else k % n + v[k - 1] if k <= len(v) else k % n)) & _MASK32
    out[(k + p) % n] = (out[(k + p) % n] + r1) & _MASK32
    out[(k + q) % n] = (out[(k + q) % n] + r2) & _MASK32
    out[k % n] = r2
  for k in range(m, m + n):
    r3 = (1566083941 * mix((out[k % n] + out[(k + p) % n] + out[(k - 1) % n]) & _MASK32)) & _MASK32
    r4 = (r3 - k % n) & _MASK32
    out[(k + p) % n] ^= r3
    out[(k + q) % n] ^= r4
    out[k % n] = r4
  return tuple(out)


_CIPHER_TABLE_LIMIT = 1 << 20  # entries (8 MB)


def index_shuffle(index: np.ndarray, max_index: int, seed: int, rounds: int = 4) -> np.ndarray:
  """Grain's `index_shuffle` (a Simon block cipher with cycle walking, the permutation behind
  `MapDataset.shuffle`), vectorised: the C++ one costs several microseconds a call from Python,
  which alone would cap the pipeline near 100k examples/s per core."""
  out = np.array(index, np.uint64, ndmin=1)
  if max_index == 0:
    return np.zeros(out.shape, np.int64)
  block = max(math.ceil(math.log2(max_index)), 16)
  half = (block + block % 2) // 2
  w, mask = np.uint64(half), np.uint64((1 << half) - 1)
  keys = [np.uint64(k) & mask for k in _round_keys(seed, rounds)]

  def rotl(x, r):
    return ((x << np.uint64(r)) | (x >> (w - np.uint64(r)))) & mask

  def f(x):
    return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

  def encrypt(value):
    left, right = (value >> w) & mask, value & mask
    for i in range(0, rounds, 2):
      left ^= f(right) ^ keys[i]
      right ^= f(left) ^ keys[i + 1]
    return (left << w) | right

  domain = 1 << (2 * half)
  # Values past max_index walk on through the cipher until they land in range: about
  # domain / (max_index + 1) steps each. For a small split in a large domain (the domain is at least
  # 2**16), the walk is long, so it follows a table of the whole cipher instead of recomputing it.
  step = encrypt
  if domain <= _CIPHER_TABLE_LIMIT and domain > 8 * (max_index + 1):
    table = encrypt(np.arange(domain, dtype=np.uint64))
    step = lambda value: table[value]
  todo = np.arange(len(out))
  while len(todo):
    value = step(out[todo])
    out[todo] = value
    todo = todo[value > np.uint64(max_index)]
  return out.astype(np.int64)


class ShuffledOrder:
  """Positions in the shuffled, repeated stream -> example indices, in the order of
  `grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None)` (epoch e is permuted with
  seed + e), so batches are bitwise those of the earlier per-example Grain pipeline."""

  def __init__(self, num_examples: int, seed: int, epoch_cache_limit: int = EPOCH_CACHE_LIMIT):
    self.num_examples = num_examples
    self.seed = seed
    self.cache_epochs = num_examples <= epoch_cache_limit
    self._epochs: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # Grain's read threads share it.

  def _permute(self, epoch: int, within: np.ndarray) -> np.ndarray:
    return index_shuffle(within, self.num_examples - 1, (self.seed + epoch) % 2**32)

  def _epoch(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._epochs:
        # Batches in flight span at most a few epochs; the oldest is not asked for again.
        while len(self._epochs) >= 3:
          del self._epochs[min(self._epochs)]
        self._epochs[epoch] = self._permute(epoch, np.arange(self.num_examples))
      return self._epochs[epoch]

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs, within = np.divmod(np.asarray(positions, np.int64), self.num_examples)
    out = np.empty(len(within), np.int64)
    for epoch in np.unique(epochs).tolist():
      rows = epochs == epoch
      out[rows] = (self._epoch(epoch)[within[rows]] if self.cache_epochs
                   else self._permute(epoch, within[rows]))
    return out

  def __getstate__(self):
    # Worker processes recompute the epochs they need.
    state = {**self.__dict__, "_epochs": {}}
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class _TrainBatch(grain.transforms.Map):
  """Batch number b -> this process's rows of global batch b, decoded (and augmented) in place.

  All processes shuffle the whole (resampled) training set with the same seed and take disjoint,
  contiguous row blocks of every global batch, so the global batch (and the training trajectory)
  does not depend on the number of processes, and together the processes read each example exactly
  once per epoch. Augmentation draws from a generator seeded by (seed, global position): the same
  images for any number of processes or workers.
  """

  def __init__(self, reader: RecordReader, *, num_examples: int, seed: int, per_process: int,
               share: ProcessShare, indices: np.ndarray | None, is_duplicate: np.ndarray | None,
               label_key: str, image_shape: tuple[int, int, int], num_labels: int,
               augmentations: list, emit_example_info: bool, where: str, emit_text: bool = False):
    self.reader = reader
    self.order = ShuffledOrder(num_examples, seed)
    self.seed = seed
    self.per_process = per_process
    self.global_batch = per_process * share.count
    self.offset = share.index * per_process
    self.indices = indices
    self.is_duplicate = is_duplicate
    self.label_key = label_key
    self.image_shape = tuple(image_shape)
    self.num_labels = num_labels
    self.augmentations = augmentations
    self.emit_example_info = emit_example_info
    self.where = where
    self.emit_text = emit_text

  def map(self, batch: int) -> dict[str, np.ndarray]:
    positions = batch * self.global_batch + self.offset + np.arange(self.per_process, dtype=np.int64)
    order = self.order(positions)
    keys = order if self.indices is None else self.indices[order]
    is_duplicate = (np.zeros(self.per_process, bool) if self.is_duplicate is None
                    else self.is_duplicate[order])
    images = np.empty((self.per_process, *self.image_shape), np.uint8)
    labels = np.empty((self.per_process, self.num_labels), np.uint8)
    text = np.full(self.per_process, "", object) if self.emit_text else None
    for row, record in enumerate(self.reader.read(keys)):
      example_text = records.decode_into(record, images[row], labels[row], label_key=self.label_key,
                                         where=self.where, text=self.emit_text)
      if text is not None:
        text[row] = example_text
    out = {"image": images, "labels": labels}
    if text is not None:
      out["text"] = text
    if self.emit_example_info:
      # The device augments: it needs what seeds the host's generator, and the duplicate flags.
      out["index"] = (positions % 2**32).astype(np.uint32)
      out["is_duplicate"] = is_duplicate
    elif self.augmentations:
      for row in range(self.per_process):
        example = {"image": images[row], "labels": labels[row],
                   "is_duplicate": bool(is_duplicate[row])}
        rng = np.random.default_rng([self.seed, int(positions[row])])
        for augmentation in self.augmentations:
          example = augmentation.random_map(example, rng)
        images[row] = example["image"]
        labels[row] = example["labels"]
    return out


class TokenizeText(grain.transforms.Map):
  """A batch's "text" (B,) -> "text_ids" (B, T) int32, "text_mask" (B, T) bool, "has_text" (B,) bool.

  `tokenizer(texts) -> (ids, mask)` is a text tower's host tokenizer (`models/text`); blank texts
  (no text in the record, eval padding) are given to it as None and have has_text False.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(batch)
    texts = [t if t and t.strip() else None for t in out.pop("text")]
    ids, mask = self.tokenizer(texts)
    out["text_ids"] = np.asarray(ids, np.int32)
    out["text_mask"] = np.asarray(mask, bool)
    out["has_text"] = out["text_mask"].any(axis=-1)
    return out


def train_dataset(data_dir: str, split: str, *, batch_size: int, seed: int, hierarchical: bool,
                  share: ProcessShare = ProcessShare(), worker_count: int = 0,
                  indices: np.ndarray | None = None, is_duplicate: np.ndarray | None = None,
                  augmentations: list | None = None,
                  emit_example_info: bool = False, emit_text: bool = False,
                  text_tokenizer=None) -> grain.IterDataset:
  """Infinite iterator of this process's `batch_size` rows of each global batch:
  {"image": (B, H, W, C) uint8, "labels": (B, L) uint8}.

  indices / is_duplicate: a resampled training set (`resampling.resample`), as an index
  transformation over the records (no copies on disk). augmentations: `augment` RandomMaps applied
  in order on the host. emit_example_info: for augmentation on the device (`augment_device`): adds
  "index" (B,) uint32, each example's global position in the shuffled repeated stream mod 2**32
  (what seeds the host augmentation), and "is_duplicate" (B,) bool, and skips `augmentations`.
  emit_text: adds "text" (B,) object array of str (see the module docstring).
  text_tokenizer: adds the tokenised text instead (`TokenizeText`; implies emit_text).
  `get_state()`/`set_state()` resume at exactly the same batch.
  """
  manifest, reader = _split_reader(data_dir, split)
  if indices is not None:
    indices = np.asarray(indices, np.int64)
    is_duplicate = (np.zeros(len(indices), bool) if is_duplicate is None
                    else np.asarray(is_duplicate, bool))
    if len(indices) and (indices.min() < 0 or indices.max() >= len(reader)):
      raise ValueError(f"{data_dir}: resampled indices out of range for split {split!r}")
  else:
    is_duplicate = None
  num_examples = len(reader) if indices is None else len(indices)
  if num_examples < batch_size * share.count:
    raise ValueError(f"{data_dir}: split {split!r} has {num_examples} examples, fewer than one global "
                     f"batch of {batch_size * share.count}")
  make_batch = _TrainBatch(
      reader, num_examples=num_examples, seed=seed, per_process=batch_size, share=share,
      indices=indices, is_duplicate=is_duplicate,
      label_key="labels_hier" if hierarchical else "labels", image_shape=manifest.image_shape,
      num_labels=manifest.taxonomy.num_labels, augmentations=list(augmentations or []),
      emit_example_info=emit_example_info, where=f"{data_dir}:{split}",
      emit_text=emit_text or text_tokenizer is not None)
  # As many batches as an endless stream of examples holds.
  batches = grain.MapDataset.range(sys.maxsize // batch_size).map(make_batch)
  if text_tokenizer is not None:
    batches = batches.map(TokenizeText(text_tokenizer))
  return _to_iter_dataset(batches, worker_count)


class _EvalBatch(grain.transforms.Map):
  """Batch number b -> rows b*B.. of this process's share, in order, padded with `mask` False."""

  def __init__(self, reader: RecordReader, *, batch_size: int, share: ProcessShare,
               real_length: int, label_key: str, image_shape: tuple[int, int, int],
               num_labels: int, where: str, emit_text: bool = False):
    self.reader = reader
    self.batch_size = batch_size
    self.share = share
    self.real_length = real_length
    self.label_key = label_key
    self.image_shape = tuple(image_shape)
    self.num_labels = num_labels
    self.where = where
    self.emit_text = emit_text

  def map(self, batch: int) -> dict[str, np.ndarray]:
    local = batch * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    mask = local < self.real_length
    index = np.where(mask, local * self.share.count + self.share.index, -1)
    images = np.zeros((self.batch_size, *self.image_shape), np.uint8)
    labels = np.zeros((self.batch_size, self.num_labels), np.uint8)
    text = np.full(self.batch_size, "", object) if self.emit_text else None
    # The real rows come first; padding stays zeros (and "" text).
    for row, record in enumerate(self.reader.read(index[mask])):
      example_text = records.decode_into(record, images[row], labels[row], label_key=self.label_key,
                                         where=self.where, text=self.emit_text)
      if text is not None:
        text[row] = example_text
    out = {"image": images, "index": index, "labels": labels, "mask": mask}
    if text is not None:
      out["text"] = text
    return out


def eval_dataset(data_dir: str, split: str, *, batch_size: int, hierarchical: bool,
                 share: ProcessShare = ProcessShare(), worker_count: int = 0,
                 emit_text: bool = False, text_tokenizer=None) -> tuple[grain.IterDataset, int]:
  """One pass, in order, padded batches with `mask` and `index` (the record's position in the split,
  -1 for padding); returns (dataset, number of batches). emit_text / text_tokenizer: add "text" /
  the tokenised text as in `train_dataset`."""
  manifest, reader = _split_reader(data_dir, split)
  total = len(reader)
  # Every process yields the same number of batches, sized by the largest share.
  per_process_max = math.ceil(total / share.count)
  num_batches = max(1, math.ceil(per_process_max / batch_size))
  make_batch = _EvalBatch(
      reader, batch_size=batch_size, share=share,
      real_length=len(range(share.index, total, share.count)),
      label_key="labels_hier" if hierarchical else "labels", image_shape=manifest.image_shape,
      num_labels=manifest.taxonomy.num_labels, where=f"{data_dir}:{split}",
      emit_text=emit_text or text_tokenizer is not None)
  batches = grain.MapDataset.range(num_batches).map(make_batch)
  if text_tokenizer is not None:
    batches = batches.map(TokenizeText(text_tokenizer))
  return _to_iter_dataset(batches, worker_count), num_batches
