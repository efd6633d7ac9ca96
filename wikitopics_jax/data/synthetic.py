"""The embedded default dataset: deterministic synthetic Wikipedia-like multilabel images.

A new user can train and watch a model really learn without downloading WIT. `generate` writes an
ArrayRecord dataset directory (see `manifest`) whose labels mimic the real data:

* Label frequencies follow the long-tailed WIT distribution: the "flat data" counts of a
  390,000-image WIT sample (`WIT_FLAT_COUNTS`), floored at `min_label_freq`. Without the floor,
  Belief, STEM and Food would get 0-2 examples in 20,000 images: nothing to learn from and an
  undefined average precision on the test split. The floor (0.003 -> 60 examples in 20,000, about 6
  per evaluation split) keeps every label learnable and measurable while the head labels stay 100x
  more frequent than the tail.
* Labels co-occur like topics do, via a Gaussian copula: every image draws one latent factor per
  top-level category (taxonomy root); label l's latent is ``a * z_root(l) + sqrt(1 - a^2) * e_l``
  (a = `ROOT_LOADING`) and l is positive iff the latent exceeds the normal quantile of its target
  frequency, so each marginal is exact in expectation and labels under one root co-occur.
* Both label views: the sampled labels are the "flat" ones; the hierarchical ones are
  ``taxonomy.close(flat)``.
* ``label_noise`` mimics the heuristic WIT labels: each positive flat label is dropped with that
  probability and, at the same rate per positive, a wrong label (one the image's clean hierarchical
  labels do not contain, drawn in proportion to the target frequencies, so the marginals roughly
  survive) is added. The pixels are drawn from the CLEAN labels; the stored labels are the noisy
  ones, as with real data whose labels, not images, are wrong.

Pixels: a smooth random colour gradient plus noise as background; every clean flat label adds one
texture patch (see `Signature`: oriented gratings, checkers, hexagonal dots, rings or spokes with a
label-specific orientation and spatial frequency) with random phase, position, size (30-50% of the
image width) and contrast. Patches modulate luminance equally in all channels around zero, so the
image's mean colour says nothing about its labels: a model must learn local texture. The frequencies
(4.5 to 11 cycles per image) stay below the Nyquist limit at 24 px, so a 64 px dataset resized to
32 px keeps its signatures.

Text (`records` contexts; `synthetic_texts`): each image gets a title and a caption, bags of words
standing in for a page title and a caption. Every label has its own vocabulary (`label_vocabulary`:
LABEL_WORDS words such as "animals0".."animals4"); there is also a general vocabulary of
pseudo-words (`GENERAL_WORDS`) that says nothing about labels. An image's words are:
* one word per CLEAN flat label, each with probability `text_signal`. As the pixels, the text shows
  the true labels, so with `label_noise` some words name labels that the stored (heuristic) labels
  miss, as a real caption can name a topic its heuristic labels lack;
* Poisson(`text_distractors`) distractor words of wrong labels (not among the clean hierarchical
  ones), drawn in proportion to the labels' target frequencies as the added wrong labels are, so a
  label word never proves its label;
* 2 + Poisson(4) general words.
They are shuffled; the first 1-3 (capitalised) form the title, the rest the caption. A share
`text_missing_fraction` of the images has no text at all (no text fields in its record). With the
defaults (0.9, 0.2, 0.3), a bag-of-words logistic regression on the text alone reaches a macro AP
around 0.5 on the test split (tests/test_text_data.py checks 0.35-0.8): text helps, and neither it
nor the pixels alone solve the task. The text comes from its own random stream per chunk, so images
and labels are the same as without it.

Determinism: the output depends only on the arguments (and not on `num_workers`): images are made
in fixed-size chunks, each from random streams derived from (seed, chunk index) with
`numpy.random.SeedSequence`. Same numpy version on the same kind of CPU -> byte-identical shards
(numpy's SIMD sin/cos may differ in the last bit across CPU kinds, which can flip a pixel by one
level; labels and splits never change).

Speed, measured once on a 2-core CPU machine shared with other jobs (load ~3), num_workers=2:
20,000 images at 64x64: 24 s (185 MB); at 32x32: 7 s (50 MB). Reusing a finished dataset: ~1 ms.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

# Bump whenever the same arguments would produce different bytes: it is part of the reuse check.
GENERATOR_VERSION = 2  # 2: text per image.

# Per-label counts of the "flat data" in a 390,000-image sample of WIT (the test set logged by the
# thesis code, github.com/epfl-dlab/wiki_image_classification).
WIT_SAMPLE_SIZE = 390_000
WIT_FLAT_COUNTS = {
    "Animals": 823, "Architecture": 7877, "Art": 10470, "Belief": 3, "Chemistry": 428,
    "Culture": 97017, "Diagrams": 980, "Events": 20365, "Food": 34, "Fossils": 1102,
    "Geology": 2081, "History": 51362, "Landscapes": 1635, "Literature": 938,
    "Logos & Symbols": 1016, "Maps & Flags": 5427, "Mathematics": 93, "Medicine & Health": 433,
    "Monuments & Memorials": 663,
    "Music": 2408, "Nature": 53963, "People": 86865, "Places": 142227, "Plants": 4291,
    "Politics": 20806, "STEM": 1, "Society": 121500, "Space": 565, "Sports": 23966,
    "Technology & Engineering": 21296, "Transportation": 8918,
}

# Loading of a label's latent on its root's factor: latents under one root correlate by a^2 = 0.36.
ROOT_LOADING = 0.6

DEFAULT_SPLITS = (("train", 0.7), ("val", 0.1), ("threshold", 0.1), ("test", 0.1))
MIN_IMAGE_SIZE = 24  # The finest signature (11 cycles per image) needs more than 22 px.

# Shards of about this size: few enough files, small enough to be read in parallel.
_SHARD_TARGET_BYTES = 64 << 20
# Pixels per generation chunk (bounds memory); chunk boundaries are part of the output definition.
_CHUNK_PIXELS = 1 << 20
_SPLIT_STREAM = 0
_CHUNK_STREAM = 1
_LABEL_STREAM, _NOISE_STREAM, _IMAGE_STREAM, _TEXT_STREAM = 0, 1, 2, 3

# Text model (see the module docstring).
LABEL_WORDS = 5
_GENERAL_MIN_WORDS, _GENERAL_MEAN_EXTRA_WORDS = 2, 4.0
_TITLE_MAX_WORDS = 3


def _general_words(count: int = 300) -> tuple[str, ...]:
  """Pronounceable pseudo-words from consonant-vowel syllables (no digits, unlike label words)."""
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  # Stride 31 (coprime with 70*70) scatters consecutive words over the syllable pairs.
  pairs = [syllables[k // len(syllables)] + syllables[k % len(syllables)]
           for k in (31 * j % len(syllables)**2 for j in range(count))]
  return tuple(w + ("n" if j % 3 == 0 else "") for j, w in enumerate(pairs))


GENERAL_WORDS = _general_words()

# Pixel levels (0-255). Background and patch ranges are chosen so that pixels (almost) never clip:
# clipping would make the mean colour depend on how many patches an image has.
_BACKGROUND_LOW, _BACKGROUND_HIGH = 90.0, 165.0
_GRADIENT_AMPLITUDE = 28.0
_PIXEL_NOISE_STD = 5.0
_CONTRAST_LOW, _CONTRAST_HIGH = 18.0, 50.0  # Faint patches make hard examples.
_TEXTURE_LIMIT = 55.0  # Overlapping patches saturate smoothly (an odd function keeps zero mean).
_RADIUS_LOW, _RADIUS_HIGH = 0.15, 0.25  # In image widths: patch diameter 30-50% of the image.
_ORIENTATION_JITTER_DEG = 5.0
_FREQUENCY_JITTER = 0.07


@dataclasses.dataclass(frozen=True)
class Signature:
  """A label's texture: ``family`` with its orientation and spatial frequency.

  ``frequency`` is in cycles per image width (for "spokes": the number of arms), so a signature
  looks the same at every image size. The zero-mean patterns, with phase(s) p:
    grating: cos(k.x + p)          one Fourier peak at `orientation_deg`
    checker: two gratings at 90 degrees (a rotated checkerboard of blobs)
    dots:    three gratings at 120 degrees with phases summing to 0 (a hexagonal dot lattice)
    rings:   cos(2 pi f r + p), concentric, no orientation
    spokes:  cos(n angle + p), n arms radiating from the patch centre
  """
  family: str
  orientation_deg: float
  frequency: float

  def describe(self) -> str:
    if self.family == "rings":
      return f"rings, {self.frequency:g} cycles/image"
    if self.family == "spokes":
      return f"spokes, {self.frequency:g} arms, at {self.orientation_deg:g} deg"
    return f"{self.family} at {self.orientation_deg:g} deg, {self.frequency:g} cycles/image"


def _signature_catalogue() -> list[Signature]:
  """Distinct signatures, the most distinguishable first: label i of a taxonomy gets entry i."""
  freqs = (4.5, 7.0, 11.0)
  cat = [Signature("grating", o, f) for f in freqs for o in (0.0, 45.0, 90.0, 135.0)]
  cat += [Signature("checker", o, f) for f in freqs for o in (0.0, 45.0)]
  cat += [Signature("dots", o, f) for f in freqs for o in (0.0, 30.0)]
  cat += [Signature("rings", 0.0, f) for f in freqs]
  cat += [Signature("spokes", 0.0, n) for n in (6.0, 10.0)]
  # Finer orientations only for taxonomies with more than 29 labels.
  offsets = (22.5, 67.5, 112.5, 157.5)
  cat += [Signature("grating", o, 7.0) for o in offsets]
  cat += [Signature("grating", o, f) for f in (4.5, 11.0) for o in offsets]
  cat += [Signature("grating", 11.25 + 22.5 * k, f) for f in freqs for k in range(8)]
  return cat


def label_signatures(tax: taxonomy_lib.Taxonomy) -> dict[str, Signature]:
  """Label name -> its texture signature (by label index)."""
  catalogue = _signature_catalogue()
  if tax.num_labels > len(catalogue):
    raise InputError(f"taxonomy {tax.version!r} has {tax.num_labels} labels; the synthetic "
                     f"generator has distinct texture signatures for at most {len(catalogue)}")
  return dict(zip(tax.labels, catalogue))


def label_vocabulary(tax: taxonomy_lib.Taxonomy) -> dict[str, tuple[str, ...]]:
  """Label name -> its LABEL_WORDS text words: the name's letters, lower case, then 0..4."""
  vocabulary = {}
  for i, label in enumerate(tax.labels):
    stem = "".join(c for c in label.lower() if c.isalnum()) or "label"
    if any(stem == "".join(c for c in other.lower() if c.isalnum()) for other in tax.labels[:i]):
      stem = f"{stem}x{i}"  # Two names that differ only in punctuation.
    vocabulary[label] = tuple(f"{stem}{k}" for k in range(LABEL_WORDS))
  return vocabulary


def synthetic_texts(rng: np.random.Generator, clean: np.ndarray, clean_hier: np.ndarray,
                    vocabulary: Sequence[Sequence[str]], log_p: np.ndarray, *, signal: float,
                    missing_fraction: float, distractors: float
                    ) -> list[tuple[str, str] | None]:
  """(title, caption) per image, None for an image without text; see the module docstring.

  clean, clean_hier: (n, L) bool labels the text describes; vocabulary: words of label index l;
  log_p: log target frequency per label (distractor label weights).
  """
  n, num_labels = clean.shape
  missing = rng.random(n) < missing_fraction
  named = clean & (rng.random((n, num_labels)) < signal)
  word_choice = rng.integers(0, LABEL_WORDS, (n, num_labels))
  num_distractors = rng.poisson(distractors, n)
  num_general = _GENERAL_MIN_WORDS + rng.poisson(_GENERAL_MEAN_EXTRA_WORDS, n)
  texts: list[tuple[str, str] | None] = []
  for i in range(n):
    words = [vocabulary[l][word_choice[i, l]] for l in np.flatnonzero(named[i])]
    if num_distractors[i]:
      # Gumbel top-k: wrong labels without replacement, in proportion to their frequencies.
      scores = log_p + rng.gumbel(size=num_labels)
      scores[clean_hier[i]] = -np.inf
      wrong = np.argsort(-scores, kind="stable")[:num_distractors[i]]
      words += [vocabulary[l][rng.integers(LABEL_WORDS)] for l in wrong if np.isfinite(scores[l])]
    words += [GENERAL_WORDS[j] for j in rng.integers(0, len(GENERAL_WORDS), num_general[i])]
    words = [words[j] for j in rng.permutation(len(words))]
    title_length = int(rng.integers(1, _TITLE_MAX_WORDS + 1))
    # Drawn for every image, so one image's text does not shift the next one's draws.
    if missing[i]:
      texts.append(None)
      continue
    title = " ".join(w.capitalize() for w in words[:title_length])
    texts.append((title, " ".join(words[title_length:])))
  return texts


def target_frequencies(tax: taxonomy_lib.Taxonomy, min_label_freq: float) -> dict[str, float]:
  """Per-label marginal frequency of the clean flat labels: WIT's, floored at `min_label_freq`.

  Labels missing from the WIT table (other taxonomy versions) get the floor.
  """
  return {l: max(WIT_FLAT_COUNTS.get(l, 0) / WIT_SAMPLE_SIZE, min_label_freq) for l in tax.labels}


def generate(out_dir: str, *, num_images: int = 20000, image_size: int = 64, seed: int = 0,
             taxonomy: str | taxonomy_lib.Taxonomy = "v1.3", label_noise: float = 0.0,
             min_label_freq: float = 0.003,
             split_fractions: Sequence[tuple[str, float]] | Mapping[str, float] = DEFAULT_SPLITS,
             num_shards_per_split: int | None = None,
             num_workers: int | None = None, text_signal: float = 0.9,
             text_missing_fraction: float = 0.2,
             text_distractors: float = 0.3) -> manifest_lib.Manifest:
  """Writes the synthetic dataset to `out_dir` (or reuses it) and returns its manifest.

  If `out_dir` already holds a finished dataset made with the same settings, it is returned as is,
  cheaply (a training job may call this every time). Any other non-empty `out_dir` is an InputError.
  The dataset is written to a temporary sibling directory and renamed into place at the end, so a
  crash never leaves a half-written dataset.

  Args:
    out_dir: dataset directory to create.
    num_images: total over all splits.
    image_size: height = width in pixels (RGB, stored raw).
    seed: the only source of randomness.
    taxonomy: shipped version name, taxonomy file path, or a Taxonomy.
    label_noise: probability of dropping each positive flat label, and rate of added wrong labels
      per positive label (the images always show the clean labels).
    min_label_freq: floor of every label's target frequency.
    split_fractions: (split name, fraction) pairs summing to 1. Rare labels are spread over the
      splits in proportion first (stratified), so every split gets its share of the tail.
    num_shards_per_split: files per split; None -> about 64 MiB per file.
    num_workers: generation threads (numpy releases the GIL); None -> the available CPUs, at most 8.
      Does not change the output.
    text_signal: probability that each clean label of an image puts one of its words in the text.
    text_missing_fraction: share of images without any text.
    text_distractors: mean number of words of wrong labels per image with text.
  """
  tax = taxonomy if isinstance(taxonomy, taxonomy_lib.Taxonomy) else taxonomy_lib.load(taxonomy)
  out_dir = os.path.abspath(out_dir)
  splits = _check_arguments(num_images=num_images, image_size=image_size, seed=seed,
                            label_noise=label_noise, min_label_freq=min_label_freq,
                            split_fractions=split_fractions,
                            num_shards_per_split=num_shards_per_split, num_workers=num_workers,
                            text_signal=text_signal, text_missing_fraction=text_missing_fraction,
                            text_distractors=text_distractors)
  split_sizes = _apportion(num_images, [f for _, f in splits])
  for (name, _), size in zip(splits, split_sizes):
    if size == 0:
      raise InputError(f"synthetic data: split {name!r} gets no images out of {num_images}; "
                       f"raise num_images or the split's fraction")
  bytes_per_example = image_size * image_size * 3 + 2 * tax.num_labels + 64
  num_shards = {}
  for (name, _), size in zip(splits, split_sizes):
    wanted = num_shards_per_split or math.ceil(size * bytes_per_example / _SHARD_TARGET_BYTES)
    num_shards[name] = max(1, min(wanted, size))
  freqs = target_frequencies(tax, min_label_freq)
  signatures = label_signatures(tax)
  settings = {
      "generator": __name__,
      "generator_version": GENERATOR_VERSION,
      "seed": int(seed),
      "num_images": int(num_images),
      "image_size": int(image_size),
      "taxonomy_version": tax.version,
      "label_noise": float(label_noise),
      "min_label_freq": float(min_label_freq),
      "split_fractions": [[name, frac] for name, frac in splits],
      "num_shards_per_split": num_shards,
      "root_loading": ROOT_LOADING,
      "target_label_frequency": freqs,
      "text_signal": float(text_signal),
      "text_missing_fraction": float(text_missing_fraction),
      "text_distractors": float(text_distractors),
  }

  existing = _reusable(out_dir, settings, tax)
  if existing is not None:
    return existing

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  try:
    os.chmod(tmp_dir, 0o755)  # mkdtemp's 0700 would otherwise become the dataset's mode.
    info = {**settings, "label_signatures": {l: s.describe() for l, s in signatures.items()}}
    _write_dataset(tmp_dir, tax=tax, splits=splits, split_sizes=split_sizes, num_shards=num_shards,
                   freqs=freqs, signatures=list(signatures.values()), num_images=num_images,
                   image_size=image_size, seed=seed, label_noise=label_noise, info=info,
                   text_model={"signal": text_signal, "missing_fraction": text_missing_fraction,
                               "distractors": text_distractors},
                   num_workers=num_workers or min(_available_cpus(), 8))
    try:
      # Replaces an empty out_dir; fails if another process finished first.
      os.replace(tmp_dir, out_dir)
    except OSError:
      existing = _reusable(out_dir, settings, tax)
      if existing is None:
        raise
      shutil.rmtree(tmp_dir)
      return existing
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return manifest_lib.read(out_dir)


def _available_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset / container CPU sets.
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _check_arguments(*, num_images, image_size, seed, label_noise, min_label_freq, split_fractions,
                     num_shards_per_split, num_workers, text_signal, text_missing_fraction,
                     text_distractors) -> list[tuple[str, float]]:
  """Validates the arguments; returns the splits as (name, fraction) pairs."""
  where = "synthetic data"

  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  if not is_int(num_images) or num_images < 1:
    raise InputError(f"{where}: num_images must be a positive integer, got {num_images!r}")
  if not is_int(image_size) or image_size < MIN_IMAGE_SIZE:
    raise InputError(f"{where}: image_size must be an integer >= {MIN_IMAGE_SIZE} (the finest "
                     f"texture signature needs it), got {image_size!r}")
  if not is_int(seed) or seed < 0:
    raise InputError(f"{where}: seed must be a non-negative integer, got {seed!r}")
  if not 0.0 <= label_noise < 1.0:
    raise InputError(f"{where}: label_noise must be in [0, 1), got {label_noise!r}")
  if not 0.0 < min_label_freq <= 0.5:
    raise InputError(f"{where}: min_label_freq must be in (0, 0.5], got {min_label_freq!r}")
  for name, value in (("text_signal", text_signal),
                      ("text_missing_fraction", text_missing_fraction)):
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
      raise InputError(f"{where}: {name} must be in [0, 1], got {value!r}")
  if not (isinstance(text_distractors, (int, float)) and 0.0 <= text_distractors <= 20.0):
    raise InputError(f"{where}: text_distractors must be in [0, 20], got {text_distractors!r}")
  pairs = list(split_fractions.items() if isinstance(split_fractions, Mapping) else split_fractions)
  try:
    splits = [(str(name), float(frac)) for name, frac in pairs]
  except (TypeError, ValueError):
    raise InputError(f"{where}: split_fractions must be (name, fraction) pairs, got "
                     f"{split_fractions!r}") from None
  manifest_lib.check_split_names([n for n, _ in splits], f"{where}: split_fractions")
  if any(not f > 0 for _, f in splits) or abs(sum(f for _, f in splits) - 1.0) > 1e-6:
    raise InputError(f"{where}: split fractions must be positive and sum to 1, got {splits}")
  if num_shards_per_split is not None and (not is_int(num_shards_per_split)
                                           or num_shards_per_split < 1):
    raise InputError(f"{where}: num_shards_per_split must be a positive integer or None, got "
                     f"{num_shards_per_split!r}")
  if num_workers is not None and (not is_int(num_workers) or num_workers < 1):
    raise InputError(f"{where}: num_workers must be a positive integer or None, got "
                     f"{num_workers!r}")
  return splits


def _reusable(out_dir: str, settings: dict, tax: taxonomy_lib.Taxonomy
              ) -> manifest_lib.Manifest | None:
  """The finished dataset in out_dir if made with `settings`; None if out_dir is absent or empty."""
  if not os.path.exists(out_dir):
    return None
  if not os.path.isdir(out_dir):
    raise InputError(f"synthetic data: out_dir {out_dir!r} exists and is not a directory")
  if not os.listdir(out_dir):
    return None
  if not os.path.exists(os.path.join(out_dir, manifest_lib.MANIFEST_NAME)):
    raise InputError(f"synthetic data: out_dir {out_dir!r} is not empty and holds no finished "
                     f"dataset (no {manifest_lib.MANIFEST_NAME}); refusing to overwrite it. Pass "
                     f"an empty or new directory.")
  existing = manifest_lib.read(out_dir)
  differences = [f"{key}: {existing.info.get(key)!r} there, {value!r} asked"
                 for key, value in settings.items() if existing.info.get(key) != value]
  if existing.taxonomy.to_json() != tax.to_json():
    differences.append(f"taxonomy: {existing.taxonomy.version!r} there, {tax.version!r} asked "
                       f"(labels or parents differ)")
  if differences:
    shown = "; ".join(d if len(d) < 300 else d[:300] + "..." for d in differences)
    raise InputError(f"synthetic data: out_dir {out_dir!r} holds a dataset made with other "
                     f"settings ({shown}); refusing to overwrite it. Delete it or pass another "
                     f"out_dir.")
  return existing


def _chunk_rng(seed: int, chunk: int, stream: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(
      np.random.SeedSequence(seed, spawn_key=(_CHUNK_STREAM, chunk, stream))))


def _chunk_bounds(num_images: int, image_size: int) -> list[tuple[int, int]]:
  size = int(np.clip(_CHUNK_PIXELS // (image_size * image_size), 8, 512))
  return [(start, min(start + size, num_images)) for start in range(0, num_images, size)]


def _sample_labels(tax: taxonomy_lib.Taxonomy, freqs: dict[str, float], num_images: int,
                   chunks: list[tuple[int, int]], seed: int, label_noise: float
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Clean and noisy flat labels, (N, L) bool each."""
  roots = tax.roots
  root_of = np.array([roots.index(_first_root(tax, l)) for l in tax.labels])
  p = np.array([freqs[l] for l in tax.labels])
  normal = statistics.NormalDist()
  thresholds = np.array([normal.inv_cdf(1.0 - q) for q in p])
  log_p = np.log(p)
  clean = np.zeros((num_images, tax.num_labels), bool)
  noisy = np.zeros_like(clean)
  for chunk, (start, stop) in enumerate(chunks):
    n = stop - start
    rng = _chunk_rng(seed, chunk, _LABEL_STREAM)
    z_root = rng.standard_normal((n, len(roots)))
    own = rng.standard_normal((n, tax.num_labels))
    latent = ROOT_LOADING * z_root[:, root_of] + math.sqrt(1 - ROOT_LOADING**2) * own
    clean[start:stop] = latent > thresholds
    noisy[start:stop] = _add_label_noise(_chunk_rng(seed, chunk, _NOISE_STREAM), clean[start:stop],
                                         tax.close(clean[start:stop].astype(np.uint8)).astype(bool),
                                         label_noise, log_p)
  return clean, noisy


def _first_root(tax: taxonomy_lib.Taxonomy, label: str) -> str:
  while tax.parents_of(label):
    label = tax.parents_of(label)[0]
  return label


def _add_label_noise(rng: np.random.Generator, clean: np.ndarray, clean_hier: np.ndarray,
                     rate: float, log_p: np.ndarray) -> np.ndarray:
  """Drops each positive with prob. `rate`; per positive, adds a wrong label with prob. `rate`."""
  if rate == 0:
    return clean.copy()
  n, num_labels = clean.shape
  dropped = clean & (rng.random((n, num_labels)) < rate)
  event_image = np.nonzero(clean & (rng.random((n, num_labels)) < rate))[0]
  # Gumbel-max: a label drawn in proportion to its target frequency among the wrong ones.
  scores = log_p + rng.gumbel(size=(len(event_image), num_labels))
  scores[clean_hier[event_image]] = -np.inf
  wrong = scores.argmax(axis=1)
  possible = np.isfinite(scores[np.arange(len(event_image)), wrong])
  noisy = clean & ~dropped
  noisy[event_image[possible], wrong[possible]] = True
  return noisy


def _apportion(total: int, fractions: Sequence[float]) -> np.ndarray:
  """Integer shares of `total` proportional to `fractions` (largest remainder; ties favour the
  split with the smaller share so far, then the earlier split)."""
  exact = np.asarray(fractions, np.float64) * total
  shares = np.floor(exact + 1e-9).astype(np.int64)
  remainder = exact - shares
  order = sorted(range(len(shares)), key=lambda s: (-round(remainder[s], 9), shares[s], s))
  for s in order[:total - int(shares.sum())]:
    shares[s] += 1
  return shares


def _assign_splits(labels: np.ndarray, fractions: Sequence[float], split_sizes: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """Split index per example, stratified: the positives of each label, rarest label first, are
  spread over the splits in proportion; the rest fill the splits to their exact sizes."""
  split_of = np.full(len(labels), -1, np.int64)
  capacity = split_sizes.copy()

  def place(examples, quota):
    start = 0
    for s, q in enumerate(quota):
      split_of[examples[start:start + q]] = s
      start += q
    capacity[:] -= quota

  for label in np.argsort(labels.sum(axis=0), kind="stable"):
    examples = rng.permutation(np.flatnonzero(labels[:, label] & (split_of < 0)))
    quota = np.minimum(_apportion(len(examples), fractions), capacity)
    for _ in range(len(examples) - int(quota.sum())):
      quota[np.argmax(capacity - quota)] += 1  # A full split's share goes to the emptiest.
    place(examples, quota)
  place(rng.permutation(np.flatnonzero(split_of < 0)), capacity.copy())
  return split_of


def _render_chunk(rng: np.random.Generator, clean: np.ndarray, image_size: int,
                  signatures: Sequence[Signature]) -> np.ndarray:
  """(n, S, S, 3) uint8 images showing the clean flat labels (n, L)."""
  n, size = len(clean), image_size
  # Pixel centres in image widths, so every length below is resolution-independent.
  axis = ((np.arange(size, dtype=np.float32) + 0.5) / size)
  grid_x, grid_y = axis[None, None, :], axis[None, :, None]

  base = rng.uniform(_BACKGROUND_LOW, _BACKGROUND_HIGH, (n, 1, 1, 3)).astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
  ramp = (grid_x - 0.5) * np.cos(angle) + (grid_y - 0.5) * np.sin(angle)  # Zero-mean.
  gradient = rng.uniform(-_GRADIENT_AMPLITUDE, _GRADIENT_AMPLITUDE, (n, 1, 1, 3)).astype(np.float32)

  images, labels = np.nonzero(clean)  # One patch per positive, sorted by image.
  num_patches = len(images)
  radius = rng.uniform(_RADIUS_LOW, _RADIUS_HIGH, num_patches)
  centre = 0.8 * radius[:, None] + rng.random((num_patches, 2)) * (1 - 1.6 * radius[:, None])
  contrast = rng.uniform(_CONTRAST_LOW, _CONTRAST_HIGH, num_patches)
  phase = rng.uniform(0, 2 * np.pi, (num_patches, 2))
  orientation = np.deg2rad(np.array([signatures[l].orientation_deg for l in labels])
                           + rng.uniform(-_ORIENTATION_JITTER_DEG, _ORIENTATION_JITTER_DEG,
                                         num_patches))
  family = np.array([signatures[l].family for l in labels], dtype=np.str_)
  frequency = np.array([signatures[l].frequency for l in labels], np.float64)
  jitter = rng.uniform(1 - _FREQUENCY_JITTER, 1 + _FREQUENCY_JITTER, num_patches)
  # A spoke count must stay an integer (else a seam at the angle's branch cut).
  frequency = np.where(family == "spokes", frequency, frequency * jitter)

  def per_patch(values, select):
    return values[select].astype(np.float32)[:, None, None]

  patches = np.empty((num_patches, size, size), np.float32)
  for name in ("grating", "checker", "dots", "rings", "spokes"):
    select = family == name
    if not select.any():
      continue
    dx = grid_x - per_patch(centre[:, 0], select)
    dy = grid_y - per_patch(centre[:, 1], select)
    theta, freq = per_patch(orientation, select), per_patch(frequency, select)
    p0, p1 = per_patch(phase[:, 0], select), per_patch(phase[:, 1], select)
    dist = np.sqrt(dx * dx + dy * dy)

    def wave(angle_offset, wave_phase):
      along = dx * np.cos(theta + angle_offset) + dy * np.sin(theta + angle_offset)
      return np.cos(2 * np.pi * freq * along + wave_phase)

    # Each pattern is scaled to the RMS of a single cosine, so contrast means the same for all.
    if name == "grating":
      pattern = wave(0, p0)
    elif name == "checker":
      pattern = (wave(0, p0) + wave(np.pi / 2, p1)) / np.sqrt(2)
    elif name == "dots":
      pattern = (wave(0, p0) + wave(2 * np.pi / 3, p1) + wave(4 * np.pi / 3, -p0 - p1)) / np.sqrt(3)
    elif name == "rings":
      pattern = np.cos(2 * np.pi * freq * dist + p0)
    else:
      pattern = np.cos(freq * (np.arctan2(dy, dx) - theta) + p0)
    # Flat top, cosine taper over the outer 30% of the radius: soft edges, no ringing.
    taper = np.clip((dist / per_patch(radius, select) - 0.7) / 0.3, 0, 1)
    window = 0.5 + 0.5 * np.cos(np.pi * taper)
    patches[select] = per_patch(contrast, select) * window * pattern

  # Sum the patches per image; within one rank every image appears at most once.
  first = np.searchsorted(images, images, side="left")
  rank = np.arange(num_patches) - first
  texture = np.zeros((n, size, size), np.float32)
  for r in range(int(rank.max(initial=-1)) + 1):
    texture[images[rank == r]] += patches[rank == r]
  texture = _TEXTURE_LIMIT * np.tanh(texture / _TEXTURE_LIMIT)

  pixels = base + ramp[..., None] * gradient + texture[..., None]
  pixels += rng.standard_normal((n, size, size, 3), dtype=np.float32) * _PIXEL_NOISE_STD
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _write_dataset(data_dir: str, *, tax: taxonomy_lib.Taxonomy, splits: list[tuple[str, float]],
                   split_sizes: np.ndarray, num_shards: dict[str, int], freqs: dict[str, float],
                   signatures: list[Signature], num_images: int, image_size: int, seed: int,
                   label_noise: float, info: dict, num_workers: int, text_model: dict) -> None:
  chunks = _chunk_bounds(num_images, image_size)
  clean, noisy = _sample_labels(tax, freqs, num_images, chunks, seed, label_noise)
  vocabulary = list(label_vocabulary(tax).values())
  log_p = np.log([freqs[l] for l in tax.labels])
  noisy_u8 = noisy.astype(np.uint8)
  hier_u8 = tax.close(noisy_u8)
  split_rng = np.random.Generator(np.random.PCG64(
      np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,))))
  split_of = _assign_splits(noisy, [f for _, f in splits], split_sizes, split_rng)
  names = [name for name, _ in splits]
  # Within a split: id order; shard = contiguous range of positions.
  position = np.empty(num_images, np.int64)
  for s in range(len(names)):
    members = np.flatnonzero(split_of == s)
    position[members] = np.arange(len(members))
  files = {name: [f"{name}-{i:05d}-of-{num_shards[name]:05d}.array_record"
                  for i in range(num_shards[name])] for name in names}
  id_width = max(6, len(str(num_images - 1)))

  def encoded_chunk(chunk: int) -> list[bytes]:
    start, stop = chunks[chunk]
    pixels = _render_chunk(_chunk_rng(seed, chunk, _IMAGE_STREAM), clean[start:stop], image_size,
                           signatures)
    chunk_clean = clean[start:stop]
    texts = synthetic_texts(
        _chunk_rng(seed, chunk, _TEXT_STREAM), chunk_clean,
        tax.close(chunk_clean.astype(np.uint8)).astype(bool), vocabulary, log_p,
        signal=text_model["signal"], missing_fraction=text_model["missing_fraction"],
        distractors=text_model["distractors"])
    encoded = []
    for i, text in zip(range(start, stop), texts):
      fields = {}
      if text is not None:
        title, caption = text
        fields = dict(page_title=title, caption=caption, contexts=[(title, "", caption)])
      encoded.append(records.encode_example(
          example_id=f"synthetic-{i:0{id_width}d}", image=pixels[i - start], labels=noisy_u8[i],
          labels_hier=hier_u8[i], image_encoding="raw", **fields))
    return encoded, sum(text is not None for text in texts), sum(
        bool(text and text[1]) for text in texts)

  open_writers: dict[int, tuple[int, ArrayRecordWriter]] = {}
  with_title = with_caption = 0
  try:
    for chunk, (encoded, titles, captions) in enumerate(
        _in_order(encoded_chunk, len(chunks), num_workers)):
      with_title += titles
      with_caption += captions
      start = chunks[chunk][0]
      for offset, record in enumerate(encoded):
        i = start + offset
        s = int(split_of[i])
        name = names[s]
        shard = int(position[i]) * num_shards[name] // int(split_sizes[s])
        if s not in open_writers or open_writers[s][0] != shard:
          if s in open_writers:
            open_writers.pop(s)[1].close()
          path = os.path.join(data_dir, files[name][shard])
          open_writers[s] = (shard, ArrayRecordWriter(path, "group_size:1"))
        open_writers[s][1].write(record)
  finally:
    for _, writer in open_writers.values():
      writer.close()

  split_infos = {}
  for s, name in enumerate(names):
    members = split_of == s
    split_infos[name] = manifest_lib.SplitInfo(
        files=files[name], num_examples=int(members.sum()),
        label_counts=noisy_u8[members].sum(axis=0, dtype=np.int64).tolist(),
        label_counts_hier=hier_u8[members].sum(axis=0, dtype=np.int64).tolist())
  info = {**info, manifest_lib.TEXT_FIELDS_KEY: manifest_lib.text_fields_info(
      fields=["page_title", "reference_description"], examples=num_images,
      counts={"page_title": with_title, "reference_description": with_caption, "any": with_title})}
  manifest_lib.write(data_dir, manifest_lib.Manifest(
      taxonomy=tax, image_shape=(image_size, image_size, 3), image_encoding="raw",
      splits=split_infos, info=info))


def _in_order(make_chunk, num_chunks: int, num_workers: int) -> Iterator:
  """Chunks 0..n-1 in order, made by `num_workers` threads with a bounded look-ahead (memory)."""
  if num_workers == 1:
    yield from (make_chunk(c) for c in range(num_chunks))
    return
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    pending = []
    next_chunk = 0
    try:
      while pending or next_chunk < num_chunks:
        while next_chunk < num_chunks and len(pending) < 2 * num_workers:
          pending.append(pool.submit(make_chunk, next_chunk))
          next_chunk += 1
        yield pending.pop(0).result()
    finally:
      for future in pending:
        future.cancel()
