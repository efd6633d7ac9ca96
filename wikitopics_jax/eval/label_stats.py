"""Imbalance and concurrence statistics of a multilabel label matrix, as defined by mldr.

Every measure follows the R package mldr by the measures' authors (F. Charte, D. Charte: "Working with
multilabel datasets in R: the mldr package", The R Journal 7(2), 2015; source: github.com/fcharte/mldr,
R/measures.R), which implements:

- IRLbl and meanIR: Charte, Rivera, del Jesus, Herrera, "Addressing imbalance in multilabel
  classification: Measures and random resampling algorithms", Neurocomputing 163 (2015) 3-16, eqs. 1-2
  (the thesis's eqs. 2.10-2.11).
- SCUMBLE: Charte, Rivera, del Jesus, Herrera, "Dealing with difficult minority labels in imbalanced
  multilabel data sets", Neurocomputing 326-327 (2019) 39-53 (first at HAIS 2014).

Definitions, for a binary matrix y of N images (rows) and L labels (columns), count_j = sum_i y_ij:

- labels per image (mldr's *cardinality*) = sum_ij y_ij / N; positive-label ratio (*density*) =
  cardinality / L. The thesis's Table 3.1 reports these two (1.77 and 5.71% for the flat data).
- IRLbl_j = max_k count_k / count_j. For a label without positives the ratio is undefined: the
  per-label output holds None, and, as mldr does (`IRLbl[IRLbl == Inf] <- 0`), the aggregates below
  treat it as 0. So meanIR = sum_j IRLbl_j / L with such labels adding 0 but still counted in L
  (mldr: `mean(IRLbl, na.rm = TRUE)`, and only NaN is removed); median IR and CVIR use the same vector.
  max IR is the largest defined IRLbl. Without any positive at all, every IR aggregate is None.
- CVIR (Charte et al. 2015, eq. 3; not computed by mldr) = sd(IRLbl) / meanIR with the sample standard
  deviation (divisor L - 1) over the same vector.
- SCUMBLE of image i (mldr's `.SCUMBLE`) = 1 - geometric_mean(IRLbl_j : y_ij = 1) /
  arithmetic_mean(IRLbl_j : y_ij = 1), and 0 for an image without labels. The means run over the
  image's own labels (mldr divides by `.labelcount`, not by L as the 2014 paper's formula does; the
  thesis code used L and so its SCUMBLE values are not comparable). An image with one label has 0. The
  geometric mean is computed as exp(mean(log)) instead of mldr's product ^ (1/k): the same value to a
  few ulps, without overflow.
- dataset SCUMBLE = mean over all N images (label-less images included, at 0); SCUMBLE CV
  (`scumble.cv`) = sd / mean over the N images (sample sd), None where mldr gets NaN/NA (mean 0, N < 2).
- per-label SCUMBLE (mldr's `labels$SCUMBLE`) = mean SCUMBLE of the images having the label, 0 for a
  label without positives; its CV (`labels$SCUMBLE.CV`) = sd / mean over those images, None (mldr's NA)
  for a label with at most one positive, 0 where the label's mean SCUMBLE is 0.
- labelsets (mldr's `num.labelsets`, `num.single.labelsets`, `max.frequency`): distinct label vectors,
  those held by exactly one image, and the most images sharing one vector.
- co-occurrence: C = y^T y, C_jk = number of images with both labels j and k (C_jj = count_j).

Everything is computed once per distinct label vector weighted by its number of images, so 3M images
with a few thousand distinct vectors cost a sort and a few small matrix products.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colors as mpl_colors
from matplotlib.figure import Figure

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax.errors import InputError
from wikitopics_jax.eval.metrics import as_label_matrix

# Records read per ArrayRecord batch request in `read_split_labels`.
_READ_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class LabelSets:
  """The distinct label vectors of a label matrix: images with the same vector are interchangeable
  for every statistic here and for the resampling heuristics."""
  sets: np.ndarray  # (G, L) bool, distinct rows
  inverse: np.ndarray  # (N,) int64: image i has label vector sets[inverse[i]]
  multiplicity: np.ndarray  # (G,) int64: number of images per distinct vector

  @property
  def num_sets(self) -> int:
    return self.sets.shape[0]


def label_sets(y: Any) -> LabelSets:
  """Groups the rows of a binary (N, L) matrix by label vector (in no particular group order)."""
  y = as_label_matrix(y)
  num_images, num_labels = y.shape
  packed = np.packbits(y, axis=1)
  num_bytes = packed.shape[1]
  if num_images == 0 or num_bytes == 0:
    sets = np.zeros((min(num_images, 1), num_labels), bool)
    return LabelSets(sets, np.zeros(num_images, np.int64), np.full(sets.shape[0], num_images, np.int64))
  if num_bytes <= 8:
    # One integer key per row: sorting integers is much faster than sorting byte strings.
    padded = np.zeros((num_images, 8), np.uint8)
    padded[:, :num_bytes] = packed
    keys = padded.view(np.uint64).ravel()
  else:
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, num_bytes))).ravel()
  unique_keys, inverse, multiplicity = np.unique(keys, return_inverse=True, return_counts=True)
  unique_bytes = unique_keys.view(np.uint8).reshape(unique_keys.size, -1)[:, :num_bytes]
  sets = np.unpackbits(unique_bytes, axis=1, count=num_labels).astype(bool)
  return LabelSets(sets, inverse.astype(np.int64).ravel(), multiplicity.astype(np.int64))


def _json_float(value: float) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def irlbl_vector(counts: Any) -> np.ndarray:
  """mldr's IRLbl vector: max count / count, 0 for labels without positives, NaN if all are empty."""
  counts = np.asarray(counts, dtype=np.float64)
  max_count = counts.max(initial=0.0)
  if max_count == 0:
    return np.full(counts.shape, np.nan)
  irlbl = np.zeros(counts.shape)
  np.divide(max_count, counts, out=irlbl, where=counts > 0)
  return irlbl


def mean_ir(y: Any) -> float:
  """meanIR as mldr computes it (labels without positives count as IRLbl 0); NaN without any positive."""
  return float(np.mean(irlbl_vector(as_label_matrix(y).sum(axis=0))))


def _weighted_sample_sd(values: np.ndarray, weights: np.ndarray) -> float:
  """R's sd() of the multiset where each value repeats `weights` times (divisor n - 1); NaN if n < 2."""
  total = weights.sum()
  if total < 2:
    return math.nan
  mean = np.dot(weights, values) / total
  return math.sqrt(np.dot(weights, (values - mean) ** 2) / (total - 1))


def _set_scumble(sets: np.ndarray, irlbl: np.ndarray) -> np.ndarray:
  """mldr's per-image SCUMBLE for each distinct label vector (0 for the empty vector)."""
  label_count = sets.sum(axis=1)
  has_labels = label_count > 0
  with np.errstate(divide="ignore", invalid="ignore"):
    # Labels of an image always have positives, so IRLbl >= 1 there and its log is defined.
    log_irlbl = np.where(sets, np.log(np.where(sets, irlbl, 1.0)), 0.0)
    geometric = np.exp(log_irlbl.sum(axis=1) / label_count)
    arithmetic = np.where(sets, irlbl, 0.0).sum(axis=1) / label_count
    scumble = 1.0 - geometric / arithmetic
  return np.where(has_labels, scumble, 0.0)


def compute(y: Any, label_names: Sequence[str]) -> dict[str, Any]:
  """All statistics of a binary (N, L) label matrix as a JSON-serialisable dict (see module docstring).

  Per-label values are lists in column order, aligned with `label_names`; undefined values are None.
  """
  y = as_label_matrix(y)
  num_images, num_labels = y.shape
  label_names = [str(n) for n in label_names]
  if len(label_names) != num_labels:
    raise ValueError(f"{len(label_names)} label names for {num_labels} label columns")
  groups = label_sets(y)
  sets, weights = groups.sets, groups.multiplicity
  counts = (sets * weights[:, None]).sum(axis=0).astype(np.int64)
  cooccurrence = (sets * weights[:, None]).T.astype(np.int64) @ sets.astype(np.int64)
  labels_per_set = sets.sum(axis=1)
  has_positives = counts > 0
  irlbl = irlbl_vector(counts)
  any_positive = bool(has_positives.any())

  stats: dict[str, Any] = {
      "num_images": num_images,
      "num_labels": num_labels,
      "label_names": label_names,
      "labels_per_image": None,
      "positive_label_ratio": None,
      "num_images_without_labels": int(weights[labels_per_set == 0].sum()) if num_images else 0,
      "num_labelsets": groups.num_sets if num_images else 0,
      "num_single_labelsets": int(np.sum(weights == 1)) if num_images else 0,
      "max_labelset_frequency": int(weights.max()) if num_images else 0,
      "label_counts": counts.tolist(),
      "label_frequencies": [None] * num_labels,
      "num_labels_without_positives": int(np.sum(~has_positives)),
      "irlbl": [float(v) if ok else None for v, ok in zip(irlbl, has_positives)],
      "mean_ir": None, "max_ir": None, "median_ir": None, "cv_ir": None,
      "scumble": None, "scumble_cv": None,
      "label_scumble": [0.0] * num_labels,
      "label_scumble_cv": [None] * num_labels,
      "cooccurrence": cooccurrence.tolist(),
  }
  if num_images == 0 or num_labels == 0:
    return stats
  cardinality = float(np.dot(weights, labels_per_set)) / num_images
  stats["labels_per_image"] = cardinality
  stats["positive_label_ratio"] = cardinality / num_labels
  stats["label_frequencies"] = (counts / num_images).tolist()
  if any_positive:
    stats["mean_ir"] = float(np.mean(irlbl))
    stats["max_ir"] = float(irlbl[has_positives].max())
    stats["median_ir"] = float(np.median(irlbl))
    stats["cv_ir"] = _json_float(np.std(irlbl, ddof=1) / np.mean(irlbl)) if num_labels > 1 else None

  # Without any positive every image is label-less: SCUMBLE 0 throughout, as in mldr.
  scumble = _set_scumble(sets, irlbl) if any_positive else np.zeros(sets.shape[0])
  dataset_scumble = float(np.dot(weights, scumble)) / num_images
  stats["scumble"] = dataset_scumble
  stats["scumble_cv"] = (_json_float(_weighted_sample_sd(scumble, weights) / dataset_scumble)
                         if dataset_scumble > 0 else None)
  for j in np.flatnonzero(has_positives):
    rows = sets[:, j]
    label_mean = float(np.dot(weights[rows], scumble[rows])) / counts[j]
    stats["label_scumble"][j] = label_mean
    if counts[j] > 1 and label_mean == 0:
      stats["label_scumble_cv"][j] = 0.0
    elif counts[j] > 1:
      label_sd = _weighted_sample_sd(scumble[rows], weights[rows])
      stats["label_scumble_cv"][j] = _json_float(label_sd / label_mean)
  return stats


# ---------------------------------------------------------------------------------------------------
# Datasets on disk


def read_split_labels(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, manifest_lib.Manifest]:
  """(flat, hierarchical) (N, L) uint8 label matrices of a split, in record order, and the manifest.

  Checks the records against the manifest's example count and per-label counts.
  """
  import grain  # pylint: disable=g-import-not-at-top  # heavy; only needed for datasets on disk
  manifest = manifest_lib.read(data_dir)
  info = manifest.split(split, where=data_dir)
  source = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(data_dir, info))
  num_records = len(source)
  where = f"{data_dir}: split {split!r}"
  if num_records != info.num_examples:
    raise InputError(f"{where} has {num_records} records, the manifest says {info.num_examples}")
  num_labels = manifest.taxonomy.num_labels
  flat = np.zeros((num_records, num_labels), np.uint8)
  hier = np.zeros((num_records, num_labels), np.uint8)
  for start in range(0, num_records, _READ_BATCH):
    stop = min(start + _READ_BATCH, num_records)
    for i, data in zip(range(start, stop), source.__getitems__(range(start, stop))):
      example = records.decode_record(data, where=f"{where}, record {i}")
      if example["labels"].size != num_labels or example["labels_hier"].size != num_labels:
        raise InputError(f"{where}, record {i} ({example['id']!r}): label vectors of size "
                         f"{example['labels'].size}/{example['labels_hier'].size}, taxonomy has {num_labels}")
      flat[i] = example["labels"]
      hier[i] = example["labels_hier"]
  for name, labels, expected in (("labels", flat, info.label_counts),
                                 ("labels_hier", hier, info.label_counts_hier)):
    found = labels.sum(axis=0, dtype=np.int64)
    if not np.array_equal(found, np.asarray(expected, np.int64)):
      bad = int(np.flatnonzero(found != np.asarray(expected, np.int64))[0])
      raise InputError(f"{where}: {name} count of {manifest.taxonomy.labels[bad]!r} is {found[bad]} in "
                       f"the records, {expected[bad]} in the manifest")
  return flat, hier, manifest


def dataset_stats(data_dir: str, split: str, hierarchical: bool | None = None) -> dict[str, Any]:
  """Statistics of a dataset split: {"split", "taxonomy", "flat": ..., "hierarchical": ...}.

  hierarchical: None for both label kinds, True for the hierarchical (closed) labels only, False for
  the flat labels only.
  """
  flat, hier, manifest = read_split_labels(data_dir, split)
  names = list(manifest.taxonomy.labels)
  result: dict[str, Any] = {"data_dir": data_dir, "split": split, "taxonomy": manifest.taxonomy.version}
  if hierarchical in (None, False):
    result["flat"] = compute(flat, names)
  if hierarchical in (None, True):
    result["hierarchical"] = compute(hier, names)
  return result


# ---------------------------------------------------------------------------------------------------
# Table 3.1


def _format_count(value: int | None) -> str:
  return "-" if value is None else f"{value:,}"


def _format_float(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _format_percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


_TABLE_COLUMNS = (
    # (header, formatter of a stats dict). The first five are the thesis's Table 3.1, in its order.
    ("# images", lambda s: _format_count(s["num_images"])),
    ("# labels", lambda s: _format_count(s["num_labels"])),
    ("SCUMBLE", lambda s: _format_float(s["scumble"], ".4f")),
    ("Labels per image", lambda s: _format_float(s["labels_per_image"], ".2f")),
    ("Positive labels ratio", lambda s: _format_percent(s["positive_label_ratio"])),
    ("meanIR", lambda s: _format_float(s["mean_ir"], ",.1f")),
    ("max IRLbl", lambda s: _format_float(s["max_ir"], ",.1f")),
    ("median IRLbl", lambda s: _format_float(s["median_ir"], ",.1f")),
)


def format_table(stats_flat: Mapping[str, Any] | None, stats_hier: Mapping[str, Any] | None, *,
                 kinds: tuple[str, str] = ("Flat", "Hierarchical")) -> str:
  """The thesis's Table 3.1 as a Markdown table: one row per label kind, its five columns in its order
  (# images, # labels, SCUMBLE, labels per image, positive labels ratio), then meanIR, max and median
  IRLbl. A None argument leaves its row out; `kinds` names the rows."""
  rows = [("Type", *(header for header, _ in _TABLE_COLUMNS))]
  for kind, stats in zip(kinds, (stats_flat, stats_hier)):
    if stats is not None:
      rows.append((kind, *(fmt(stats) for _, fmt in _TABLE_COLUMNS)))
  widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]

  def line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                             for c, (cell, w) in enumerate(zip(cells, widths))) + " |"

  separator = "|" + "|".join(":" + "-" * (w + 1) if c == 0 else "-" * (w + 1) + ":"
                             for c, w in enumerate(widths)) + "|"
  return "\n".join([line(rows[0]), separator, *(line(row) for row in rows[1:])])


# ---------------------------------------------------------------------------------------------------
# Figures (written with the Agg canvas of a standalone Figure: no pyplot state, no display needed)


def _save(fig: Figure, path: str | os.PathLike) -> str:
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def _check_names(values: np.ndarray, names: Sequence[str], what: str) -> None:
  if values.shape != (len(names),):
    raise ValueError(f"{what} has shape {values.shape}, expected ({len(names)},) as the label names")


def plot_label_distribution(counts: Sequence[int], names: Sequence[str], path: str | os.PathLike, *,
                            log_scale: bool = True, title: str | None = None) -> str:
  """Thesis Figure 3.4: images per label as horizontal bars, most frequent label on top.

  Labels without positives get no bar on a log axis but keep their name and a "0" note.
  """
  counts = np.asarray(counts, dtype=np.int64)
  _check_names(counts, names, "counts")
  order = np.argsort(counts, kind="stable")
  fig = Figure(figsize=(8, max(3.0, 0.3 * len(names) + 1)))
  ax = fig.subplots()
  positions = np.arange(len(order))
  ax.barh(positions, counts[order], color="tab:blue", alpha=0.75)
  ax.set_yticks(positions, [names[j] for j in order])
  if log_scale:
    ax.set_xscale("log")
    for p, j in zip(positions, order):
      if counts[j] == 0:
        ax.annotate("0", (0, p), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
  ax.set_xlabel("Number of images" + (" (log scale)" if log_scale else ""))
  ax.set_ylabel("Label")
  ax.set_title(title or f"Label distribution ({int(counts.max(initial=0)):,} images in the largest label)")
  ax.grid(True, axis="x", alpha=0.4)
  return _save(fig, path)


def _mean_ir_of_irlbl(irlbl: np.ndarray) -> float:
  # mldr's convention: an undefined IRLbl (NaN, from None) counts as 0.
  return float(np.mean(np.nan_to_num(irlbl, nan=0.0)))


def plot_imbalance_ratios(irlbl_before: Sequence[float | None], irlbl_after: Sequence[float | None],
                          names: Sequence[str], path: str | os.PathLike, *,
                          labels: tuple[str, str] = ("Original", "Resampled"), log_scale: bool = True,
                          title: str | None = None) -> str:
  """Thesis Figure 4.1: IRLbl per label before and after resampling, side by side, meanIR in the legend.

  IRLbl values may be None (label without positives): no bar, and 0 in the meanIR as in mldr.
  """
  before = np.array([np.nan if v is None else v for v in irlbl_before], dtype=np.float64)
  after = np.array([np.nan if v is None else v for v in irlbl_after], dtype=np.float64)
  _check_names(before, names, "irlbl_before")
  _check_names(after, names, "irlbl_after")
  fig = Figure(figsize=(max(8.0, 0.4 * len(names) + 2), 5))
  ax = fig.subplots()
  x = np.arange(len(names))
  width = 0.4
  ax.bar(x - width / 2, np.nan_to_num(before), width,
         label=f"{labels[0]}, meanIR {_mean_ir_of_irlbl(before):.1f}")
  ax.bar(x + width / 2, np.nan_to_num(after), width,
         label=f"{labels[1]}, meanIR {_mean_ir_of_irlbl(after):.1f}")
  ax.set_xticks(x, list(names), rotation=75, ha="right")
  if log_scale:
    ax.set_yscale("log")
  ax.set_ylabel("IRLbl (max label count / label count)")
  ax.set_title(title or "Imbalance ratio per label")
  ax.legend()
  ax.grid(True, axis="y", alpha=0.4)
  return _save(fig, path)


def plot_cooccurrence(matrix: Any, names: Sequence[str], path: str | os.PathLike, *,
                      title: str | None = None) -> str:
  """Heat map of the label co-occurrence counts (diagonal = label counts), log colour scale, zeros blank."""
  matrix = np.asarray(matrix, dtype=np.float64)
  if matrix.shape != (len(names), len(names)):
    raise ValueError(f"matrix has shape {matrix.shape}, expected ({len(names)}, {len(names)})")
  fig = Figure(figsize=(0.32 * len(names) + 3, 0.32 * len(names) + 2))
  ax = fig.subplots()
  masked = np.ma.masked_less_equal(matrix, 0)
  norm = mpl_colors.LogNorm(vmin=1, vmax=max(1.0, float(matrix.max(initial=1))))
  image = ax.imshow(masked, cmap="viridis", norm=norm, interpolation="nearest")
  ax.set_xticks(np.arange(len(names)), list(names), rotation=90)
  ax.set_yticks(np.arange(len(names)), list(names))
  fig.colorbar(image, ax=ax, label="images with both labels")
  ax.set_title(title or "Label co-occurrence")
  return _save(fig, path)
