"""A fastText-style text tower: hashed word/bigram/character n-grams, averaged embeddings.

Host side (`BagTokenizer`, NumPy): each text is lower-cased and split into words (runs of Unicode
word characters, `\\w+`; fastText itself only splits on whitespace, which leaves punctuation glued to
WIT's captions). Every word contributes, in text order,
  * its unigram: the 32-bit FNV-1a hash of its UTF-8 bytes,
  * the bigram with the next word (fastText's `addWordNgrams` combination of the two hashes),
  * the character n-grams (n = min_n..max_n code points, fastText's 3-6) of `<word>`,
each reduced modulo `num_buckets`. The ids are truncated/padded to `max_ids` per text and come with a
boolean mask, so the device program has static shapes. Hashing is FNV-1a as fastText's
`Dictionary::hash` (including its sign extension of bytes >= 0x80), so ids are identical across
processes and runs, unlike Python's salted `hash`. Unlike fastText there is no word vocabulary: words
share the one hashed table with the n-grams (no pass over the corpus is needed).

Device side (`BagOfNgrams`, NNX): an embedding table of `num_buckets` rows trained from scratch
(fastText's uniform(-1/dim, 1/dim) init), averaged over the unmasked ids -> (B, dim). A text with no
ids gives zeros; `has_text(mask)` tells the fusion heads which rows those are.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# fastText's FNV-1a constants (src/dictionary.cc, Dictionary::hash) and its word n-gram multiplier
# (Dictionary::addWordNgrams).
FNV_OFFSET = np.uint32(2166136261)
FNV_PRIME = np.uint32(16777619)
WORD_NGRAM_MULTIPLIER = np.uint64(116049371)

_WORD = re.compile(r"\w+")


def fnv1a_hashes(strings: Sequence[str]) -> np.ndarray:
  """fastText's 32-bit FNV-1a hash of each string's UTF-8 bytes, vectorised: (N,) uint32.

  Bytes are sign-extended before the XOR (fastText's `uint32_t(int8_t(c))`), which only matters for
  non-ASCII text but keeps the ids equal to fastText's.
  """
  encoded = [s.encode("utf-8") for s in strings]
  lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
  hashes = np.full(len(encoded), FNV_OFFSET, np.uint32)
  if not encoded or lengths.max() == 0:
    return hashes
  # One padded (N, max_len) byte matrix, then one vectorised step per byte column.
  flat = np.frombuffer(b"".join(encoded), np.int8)
  rows = np.repeat(np.arange(len(encoded)), lengths)
  cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  matrix = np.zeros((len(encoded), lengths.max()), np.int8)
  matrix[rows, cols] = flat
  extended = matrix.astype(np.int32).view(np.uint32)
  for col in range(matrix.shape[1]):
    live = col < lengths
    hashes = np.where(live, (hashes ^ extended[:, col]) * FNV_PRIME, hashes)
  return hashes


def char_ngrams(word: str, min_n: int = 3, max_n: int = 6) -> list[str]:
  """The n-grams of `<word>` (n in [min_n, max_n] code points) in fastText's order: by start, then n.

  fastText also excludes 1-grams of the boundary markers alone; with min_n >= 2 none can occur.
  """
  bracketed = f"<{word}>"
  return [bracketed[i:i + n] for i in range(len(bracketed))
          for n in range(min_n, max_n + 1) if i + n <= len(bracketed)]


def bigram_hashes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
  """fastText's word bigram hash from two unigram hashes (uint32) -> uint64.

  fastText keeps word hashes in an int32 vector and widens them to uint64 (sign-extending), then
  computes h1 * 116049371 + h2 modulo 2**64; reproduced here in wrapping NumPy arithmetic.
  """
  def widen(h):
    return h.astype(np.uint32).view(np.int32).astype(np.int64).view(np.uint64)
  return widen(first) * WORD_NGRAM_MULTIPLIER + widen(second)


class BagTokenizer:
  """Texts -> (ids (B, max_ids) int32, mask (B, max_ids) bool) of hashed n-grams. Host-side, NumPy.

  None, empty or word-less texts give an all-False mask row. Per-word work (unigram hash and
  character n-gram ids) is cached, since WIT's titles and captions repeat words heavily.
  """

  def __init__(self, num_buckets: int, max_ids: int, *, min_n: int = 3, max_n: int = 6,
               word_ngrams: int = 2, lowercase: bool = True, cache_size: int = 1 << 20):
    if num_buckets < 1 or max_ids < 1:
      raise ValueError(f"num_buckets={num_buckets} and max_ids={max_ids} must be positive")
    if word_ngrams not in (1, 2):
      raise ValueError(f"word_ngrams={word_ngrams}: only unigrams (1) or uni+bigrams (2)")
    if min_n > 0 and not 2 <= min_n <= max_n:
      raise ValueError(f"character n-grams need 2 <= min_n <= max_n, got {min_n}..{max_n} "
                       "(min_n=0 turns them off)")
    self.num_buckets = num_buckets
    self.max_ids = max_ids
    self.min_n, self.max_n = min_n, max_n
    self.word_ngrams = word_ngrams
    self.lowercase = lowercase
    self.cache_size = cache_size
    self._cache: dict[str, tuple[np.uint32, np.ndarray]] = {}

  def words(self, text: str | None) -> list[str]:
    if not text:
      return []
    return _WORD.findall(text.lower() if self.lowercase else text)

  def _fill_cache(self, words: set[str]) -> None:
    """Hashes the uncached words and their character n-grams in one vectorised pass.

    Each word caches (its FNV-1a hash, [unigram id, bigram slot, n-gram ids...]); the slot is filled
    per text, since the bigram depends on the next word.
    """
    new = sorted(w for w in words if w not in self._cache)
    if not new:
      return
    if len(self._cache) + len(new) > self.cache_size:
      self._cache.clear()  # Cheap bound on memory; refilling costs one batch's hashing.
    grams = [char_ngrams(w, self.min_n, self.max_n) if self.min_n else [] for w in new]
    counts = np.fromiter(map(len, grams), np.int64, len(new))
    hashes = fnv1a_hashes(new + [g for gs in grams for g in gs])
    ids = (hashes % self.num_buckets).astype(np.int32)
    word_ids, gram_ids = ids[:len(new)], np.split(ids[len(new):], np.cumsum(counts)[:-1])
    for word, h, uni, word_grams in zip(new, hashes[:len(new)], word_ids, gram_ids):
      self._cache[word] = (h, np.concatenate([[uni, 0], word_grams]).astype(np.int32))

  def text_ids(self, text: str | None) -> np.ndarray:
    """All hashed ids of one text, untruncated, in order: per word its unigram, bigram, n-grams."""
    words = self.words(text)
    if not words:
      return np.zeros(0, np.int32)
    self._fill_cache(set(words))
    entries = [self._cache[w] for w in words]
    flat = np.concatenate([ids for _, ids in entries])
    lengths = np.fromiter((ids.size for _, ids in entries), np.int64, len(entries))
    slots = np.cumsum(lengths) - lengths + 1  # Each word's bigram slot.
    if self.word_ngrams == 2:
      word_hashes = np.fromiter((h for h, _ in entries), np.uint32, len(entries))
      bigrams = bigram_hashes(word_hashes[:-1], word_hashes[1:]) % np.uint64(self.num_buckets)
      flat[slots[:-1]] = bigrams.astype(np.int32)
      unused = slots[-1:]  # The last word has no successor.
    else:
      unused = slots
    return np.delete(flat, unused)

  def __call__(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), self.max_ids), np.int32)
    mask = np.zeros((len(texts), self.max_ids), bool)
    # Hash the whole batch's new words together: one vectorised pass instead of one per text.
    self._fill_cache({w for t in texts for w in self.words(t)})
    for row, text in enumerate(texts):
      found = self.text_ids(text)[:self.max_ids]
      ids[row, :found.size] = found
      mask[row, :found.size] = True
    return ids, mask


def has_text(mask: jax.Array | np.ndarray) -> jax.Array:
  """(B, T) token mask -> (B,) bool: whether the example has any text."""
  return jnp.any(jnp.asarray(mask, bool), axis=-1)


class BagOfNgrams(nnx.Module):
  """Average of hashed n-gram embeddings: (ids (B, T) int, mask (B, T)) -> (B, dim).

  Rows without any unmasked id give zeros. The mean is taken in float32 whatever `dtype` is, then
  cast to `dtype` (float32 when None).
  """

  def __init__(self, num_buckets: int, dim: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.num_buckets = num_buckets
    self.dim = dim
    self.dtype = dtype
    bound = 1.0 / dim  # fastText initialises its input matrix uniformly in [-1/dim, 1/dim].
    self.embed = nnx.Embed(
        num_buckets, dim, param_dtype=param_dtype,
        embedding_init=lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound),
        rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    weights = jnp.asarray(mask, jnp.float32)
    vectors = self.embed(ids).astype(jnp.float32)
    total = jnp.einsum("bt,btd->bd", weights, vectors)
    count = jnp.maximum(weights.sum(axis=-1, keepdims=True), 1.0)
    return (total / count).astype(self.dtype or jnp.float32)
