"""Multilabel evaluation metrics in NumPy, defined exactly as scikit-learn defines them.

Conventions:
- `y_true`, `y_pred`: (N, L) binary matrices (any dtype holding 0/1); `scores`/`probs`: (N, L) finite
  floats. One column per label.
- Average precision (AP) is scikit-learn's: the step-wise sum of (R_n - R_{n-1}) * P_n over the
  distinct score thresholds, tied scores entering together. The thesis called the *trapezoid* area
  under the PR curve "PR-AUC" (in the thesis code); `pr_auc_trapezoid` computes that one for
  comparison and says so in its name. They differ: the trapezoid interpolates linearly between PR
  points, which is optimistic.
- A label without positives in `y_true` has no defined AP, PR-AUC or ROC-AUC: it gets NaN
  (scikit-learn warns and returns 0 for AP, which silently drags macro averages down). Macro averages
  skip such labels and report how many were skipped.
- Hard predictions are `probs >= threshold` (the same rule `thresholds.py` optimises).
- Precision, recall and F1 use zero_division=0: a class never predicted has precision 0, a class never
  present has recall 0, and an F1 with an empty denominator is 0, as scikit-learn's
  `precision_recall_fscore_support(..., zero_division=0)`. Macro P/R/F1 average over *all* labels, as
  scikit-learn does.

Average precision sorts each column's scores and its positives' scores (values, not an argsort) and
counts, for each distinct positive score, the images scoring at least as high; columns (or, for micro
AP, pieces of the flattened scores) run on one thread per core. The other ranking metrics sort each
column once and work on cumulative counts at the ends of tie groups, vectorised over columns; columns
are processed in chunks so that memory stays bounded for big test sets.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from wikitopics_jax.errors import InputError

# Elements per column chunk of the ranking metrics: a handful of (rows, chunk) int64 arrays live at once.
_CHUNK_ELEMENTS = 1 << 22
# Below this many scores, average precision runs on the calling thread: a pool would cost more.
_PARALLEL_MIN_ELEMENTS = 1 << 18


# ---------------------------------------------------------------------------------------------------
# Input checks


def as_label_matrix(y: Any, name: str = "y") -> np.ndarray:
  """Validates an (N, L) matrix of 0/1 values and returns it as bool."""
  y = np.asarray(y)
  if y.ndim != 2:
    raise ValueError(f"{name} must be a (num_images, num_labels) matrix, got shape {y.shape}")
  if y.dtype != bool and not np.all((y == 0) | (y == 1)):
    raise ValueError(f"{name} must hold only 0 and 1")
  return y.astype(bool, copy=False)


def _as_score_matrix(scores: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.shape != shape:
    raise ValueError(f"{name} has shape {scores.shape}, expected {shape} (as y_true)")
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  # NaN would break the sort and every tie group after it.
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{name} holds NaN or infinite values")
  return scores


def check_labels_and_scores(y_true: Any, scores: Any, scores_name: str = "scores"
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Validates a binary (N, L) y_true and finite scores of the same shape; returns (bool, float) arrays."""
  y_true = as_label_matrix(y_true, "y_true")
  return y_true, _as_score_matrix(scores, scores_name, y_true.shape)


# ---------------------------------------------------------------------------------------------------
# The shared ranking core


@dataclasses.dataclass(frozen=True)
class RankedCounts:
  """Per column, the images sorted by decreasing score with cumulative counts.

  Row k of every (N, C) array describes "predict the top k + 1 images positive". Only rows where
  `is_end` is true are real operating points: there the next image has a strictly lower score, so the
  rule `score >= sorted_scores[k]` predicts exactly the top k + 1 images.
  """
  sorted_scores: np.ndarray  # (N, C) decreasing down each column
  tps: np.ndarray  # (N, C) int64 true positives among the top k + 1
  fps: np.ndarray  # (N, C) int64 false positives among the top k + 1
  is_end: np.ndarray  # (N, C) bool: last row of a tie group
  num_positives: np.ndarray  # (C,) int64

  def previous_end(self, values: np.ndarray, initial: float) -> np.ndarray:
    """values at the previous operating point (the end of the tie group above); `initial` if none."""
    rows = np.arange(values.shape[0])[:, None]
    last_end = np.maximum.accumulate(np.where(self.is_end, rows, -1), axis=0)
    before = np.empty_like(last_end)
    before[0] = -1
    before[1:] = last_end[:-1]
    gathered = np.take_along_axis(values, np.maximum(before, 0), axis=0)
    return np.where(before >= 0, gathered, initial)

  def precision(self) -> np.ndarray:
    return self.tps / (self.tps + self.fps)


def ranked_counts(y_true: np.ndarray, scores: np.ndarray) -> RankedCounts:
  """Sorts every column of `scores` once and counts TP/FP down the ranking (no input checks)."""
  num_rows = scores.shape[0]
  # Order within a tie group is irrelevant: only group ends are read.
  order = np.argsort(scores, axis=0)[::-1]
  sorted_scores = np.take_along_axis(scores, order, axis=0)
  tps = np.cumsum(np.take_along_axis(y_true, order, axis=0), axis=0, dtype=np.int64)
  fps = np.arange(1, num_rows + 1, dtype=np.int64)[:, None] - tps
  is_end = np.ones(scores.shape, dtype=bool)
  is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
  num_positives = tps[-1] if num_rows else np.zeros(scores.shape[1], np.int64)
  return RankedCounts(sorted_scores, tps, fps, is_end, num_positives)


def column_chunks(num_rows: int, num_cols: int) -> Iterator[slice]:
  """Column slices whose (num_rows, chunk) blocks stay under a fixed element budget."""
  step = max(1, _CHUNK_ELEMENTS // max(num_rows, 1))
  for start in range(0, num_cols, step):
    yield slice(start, min(start + step, num_cols))


def map_column_chunks(fn, y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Applies fn(RankedCounts) -> (C,) to column chunks and concatenates; all NaN without images."""
  num_rows, num_cols = scores.shape
  if num_rows == 0:
    return np.full(num_cols, np.nan)
  parts = [fn(ranked_counts(y_true[:, cols], scores[:, cols])) for cols in column_chunks(num_rows, num_cols)]
  return np.concatenate(parts) if parts else np.zeros(0)


def _divide_or_nan(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  numerator = np.asarray(numerator, dtype=np.float64)
  denominator = np.asarray(denominator, dtype=np.float64)
  out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _divide_or_zero(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  numerator = np.asarray(numerator, dtype=np.float64)
  denominator = np.asarray(denominator, dtype=np.float64)
  out = np.zeros(np.broadcast(numerator, denominator).shape)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


# ---------------------------------------------------------------------------------------------------
# Ranking metrics


def _available_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset / container CPU sets.
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _count_below(scores: np.ndarray, thresholds: np.ndarray, pieces: int,
                 pool: concurrent.futures.Executor | None) -> np.ndarray:
  """Per threshold (sorted), how many of `scores` are strictly below it.

  Sorts the scores in `pieces` parts, on the pool if given, and sums the parts' binary searches: a
  long column (micro AP's) is sorted on all cores, and no argsort is needed since only counts matter.
  """
  def count(part: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(part), thresholds, side="left")

  parts = np.array_split(scores, pieces) if pieces > 1 else [scores]
  counts = pool.map(count, parts) if pool is not None and len(parts) > 1 else map(count, parts)
  return sum(counts, np.zeros(thresholds.shape, np.int64))


def _binary_average_precision(positive: np.ndarray, scores: np.ndarray, pieces: int = 1,
                              pool: concurrent.futures.Executor | None = None) -> float:
  """scikit-learn's AP of one 1-D column; NaN without positives.

  Only the distinct scores of positives are thresholds where recall moves: at such a score t,
  R_n - R_{n-1} = (positives scoring exactly t) / P and P_n = (positives scoring >= t) / (images
  scoring >= t), every tie at t included as in scikit-learn's `precision_recall_curve`. So one sort of
  the positives' scores and one of all scores (for the counts of images above each t) suffice.
  """
  positive_scores = np.sort(scores[positive])
  num_positives = positive_scores.size
  if num_positives == 0:
    return math.nan
  starts = np.flatnonzero(np.concatenate(([True], positive_scores[1:] != positive_scores[:-1])))
  thresholds = positive_scores[starts]
  new_tps = np.diff(starts, append=num_positives)
  tps = num_positives - starts
  predicted = scores.size - _count_below(scores, thresholds, pieces, pool)
  return float(np.sum(new_tps * (tps / predicted)) / num_positives)


def _thread_pool(num_tasks: int, num_elements: int) -> concurrent.futures.ThreadPoolExecutor | None:
  """A pool of one thread per core for big inputs (NumPy's sort and search release the GIL)."""
  workers = min(_available_cpus(), num_tasks)
  if workers < 2 or num_elements < _PARALLEL_MIN_ELEMENTS:
    return None
  return concurrent.futures.ThreadPoolExecutor(workers)


def average_precision(y_true: Any, scores: Any) -> np.ndarray:
  """Per-label average precision, as `sklearn.metrics.average_precision_score` per column.

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds in decreasing order; images with
  tied scores enter the ranking together. Each column costs a sort of its scores and one of its
  positives' scores (no argsort); columns run on one thread per core.

  Args:
    y_true: (N, L) binary ground truth.
    scores: (N, L) finite scores (higher = more likely positive).

  Returns:
    (L,) float64; NaN for labels without positives (undefined; scikit-learn would warn and give 0).
  """
  y_true, scores = check_labels_and_scores(y_true, scores)
  num_cols = scores.shape[1]

  def column(j: int) -> float:
    # A strided column is copied once by the sort; no transposed copy of the whole matrix is needed.
    return _binary_average_precision(y_true[:, j], scores[:, j])

  pool = _thread_pool(num_cols, scores.size)
  if pool is None:
    return np.array([column(j) for j in range(num_cols)], dtype=np.float64)
  with pool:
    return np.array(list(pool.map(column, range(num_cols))), dtype=np.float64)


def macro_average_precision(y_true: Any, scores: Any) -> tuple[float, int]:
  """Mean AP over the labels that have at least one positive.

  Returns:
    (macro AP, number of labels excluded for having no positives). NaN if every label is excluded.
  """
  return _nan_mean_and_excluded(average_precision(y_true, scores))


def micro_average_precision(y_true: Any, scores: Any) -> float:
  """AP of the flattened (image, label) pairs, as scikit-learn's average='micro'. NaN if no positives.

  The flattened scores are sorted in one piece per core, in parallel (see `_count_below`).
  """
  y_true, scores = check_labels_and_scores(y_true, scores)
  pieces = _available_cpus()
  pool = _thread_pool(pieces, scores.size)
  if pool is None:
    return _binary_average_precision(y_true.ravel(), scores.ravel())
  with pool:
    return _binary_average_precision(y_true.ravel(), scores.ravel(), pieces, pool)


def _pr_trapezoid_from_counts(counts: RankedCounts) -> np.ndarray:
  precision = counts.precision()
  new_tps = counts.tps - counts.previous_end(counts.tps, 0)
  # The PR curve starts at (recall 0, precision 1), as scikit-learn's precision_recall_curve.
  previous_precision = counts.previous_end(precision, 1.0)
  area = np.where(counts.is_end, new_tps * (precision + previous_precision) / 2, 0.0).sum(axis=0)
  return _divide_or_nan(area, counts.num_positives)


def pr_auc_trapezoid(y_true: Any, scores: Any) -> np.ndarray:
  """Per-label trapezoid area under the PR curve: the thesis's "PR-AUC" (NOT average precision).

  Equals `sklearn.metrics.auc(recall, precision)` on `precision_recall_curve` output: linear
  interpolation between the operating points, starting from (recall 0, precision 1). Reported only to
  compare with the thesis's figures; prefer `average_precision`.

  Returns:
    (L,) float64; NaN for labels without positives.
  """
  y_true, scores = check_labels_and_scores(y_true, scores)
  return map_column_chunks(_pr_trapezoid_from_counts, y_true, scores)


def _roc_auc_from_counts(counts: RankedCounts) -> np.ndarray:
  # Integer trapezoids in (FP, TP) space: a tie group crossing a positive counts half, as sklearn.
  new_fps = counts.fps - counts.previous_end(counts.fps, 0)
  previous_tps = counts.previous_end(counts.tps, 0)
  doubled_area = np.where(counts.is_end, new_fps * (counts.tps + previous_tps), 0).sum(axis=0)
  num_negatives = counts.tps.shape[0] - counts.num_positives
  return _divide_or_nan(doubled_area / 2, counts.num_positives * num_negatives)


def roc_auc(y_true: Any, scores: Any) -> np.ndarray:
  """Per-label ROC-AUC, as `sklearn.metrics.roc_auc_score` per column (ties count half).

  Returns:
    (L,) float64; NaN for labels with no positives or no negatives (scikit-learn raises there).
  """
  y_true, scores = check_labels_and_scores(y_true, scores)
  return map_column_chunks(_roc_auc_from_counts, y_true, scores)


def random_baseline_ap(y_true: Any) -> tuple[np.ndarray, float]:
  """The AP of a random scorer: per label, its positive rate.

  A random ranking has, in expectation, precision equal to the positive rate at every recall, so its AP
  tends to the rate as N grows (it is slightly above it for tiny N). Macro AP is only meaningful next
  to this baseline: the thesis's rare labels have baselines near 1e-5.

  Returns:
    (per-label rates (L,), their mean over labels with at least one positive, as the macro AP).
  """
  y_true = as_label_matrix(y_true, "y_true")
  if y_true.shape[0] == 0:
    return np.full(y_true.shape[1], np.nan), math.nan
  rates = y_true.mean(axis=0, dtype=np.float64)
  with_positives = rates > 0
  mean = float(rates[with_positives].mean()) if with_positives.any() else math.nan
  return rates, mean


def _nan_mean_and_excluded(values: np.ndarray) -> tuple[float, int]:
  defined = ~np.isnan(values)
  mean = float(values[defined].mean()) if defined.any() else math.nan
  return mean, int((~defined).sum())


# ---------------------------------------------------------------------------------------------------
# Thresholded metrics


def predict_labels(probs: Any, thresholds: float | Sequence[float] | np.ndarray = 0.5) -> np.ndarray:
  """Hard predictions `probs >= threshold`, thresholds a scalar or one per label. Returns (N, L) bool."""
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must be a (num_images, num_labels) matrix, got shape {probs.shape}")
  thresholds = np.asarray(thresholds, dtype=np.float64)
  if thresholds.ndim > 1 or (thresholds.ndim == 1 and thresholds.shape[0] != probs.shape[1]):
    raise ValueError(f"thresholds must be a scalar or have one value per label ({probs.shape[1]}), "
                     f"got shape {thresholds.shape}")
  if np.any(np.isnan(thresholds)):
    raise ValueError("thresholds hold NaN")
  return probs >= thresholds


@dataclasses.dataclass(frozen=True)
class PrecisionRecallF1:
  """Per-label precision/recall/F1 and their macro, micro and samples averages (zero_division=0)."""
  precision: np.ndarray  # (L,)
  recall: np.ndarray  # (L,)
  f1: np.ndarray  # (L,)
  support: np.ndarray  # (L,) int64 positives in y_true
  predicted: np.ndarray  # (L,) int64 positives in y_pred
  macro: dict[str, float]  # keys precision, recall, f1
  micro: dict[str, float]
  samples: dict[str, float]

  def macro_over(self, indices: Sequence[int] | np.ndarray) -> dict[str, float]:
    """Macro averages over a subset of labels (as sklearn's average='macro' with labels=indices)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
      return {"precision": math.nan, "recall": math.nan, "f1": math.nan}
    return {"precision": float(self.precision[indices].mean()), "recall": float(self.recall[indices].mean()),
            "f1": float(self.f1[indices].mean())}


def _prf(true_positives, num_predicted, num_true) -> dict[str, np.ndarray]:
  return {
      "precision": _divide_or_zero(true_positives, num_predicted),
      "recall": _divide_or_zero(true_positives, num_true),
      # 2TP / (2TP + FP + FN), scikit-learn's form; 0 when nothing is predicted or present.
      "f1": _divide_or_zero(2 * true_positives, num_predicted + num_true),
  }


def precision_recall_f1(y_true: Any, y_pred: Any) -> PrecisionRecallF1:
  """Precision, recall and F1 per label plus macro, micro and samples averages.

  Equal to `sklearn.metrics.precision_recall_fscore_support(y_true, y_pred, average=..., zero_division=0)`:
  zero_division=0 scores an undefined ratio as 0 instead of NaN, so a label the model never predicts (or
  that never occurs) pulls the macro average down rather than vanishing from it; that is the honest
  reading for a long-tailed taxonomy, and the one the thesis's numbers use.

  Args:
    y_true: (N, L) binary ground truth.
    y_pred: (N, L) binary predictions.
  """
  y_true = as_label_matrix(y_true, "y_true")
  y_pred = as_label_matrix(y_pred, "y_pred")
  if y_pred.shape != y_true.shape:
    raise ValueError(f"y_pred has shape {y_pred.shape}, expected {y_true.shape} (as y_true)")
  both = y_true & y_pred
  tp, predicted, support = both.sum(axis=0), y_pred.sum(axis=0), y_true.sum(axis=0)
  per_label = _prf(tp, predicted, support)
  micro = _prf(tp.sum(), predicted.sum(), support.sum())
  per_image = _prf(both.sum(axis=1), y_pred.sum(axis=1), y_true.sum(axis=1))

  def mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan

  return PrecisionRecallF1(
      precision=per_label["precision"], recall=per_label["recall"], f1=per_label["f1"],
      support=support.astype(np.int64), predicted=predicted.astype(np.int64),
      macro={k: mean(v) for k, v in per_label.items()},
      micro={k: float(v) for k, v in micro.items()},
      samples={k: mean(v) for k, v in per_image.items()},
  )


def labels_per_image(y: Any) -> float:
  """Mean number of positive labels per image (label cardinality)."""
  y = as_label_matrix(y, "y")
  return float(y.sum(axis=1).mean()) if y.shape[0] else math.nan


def label_groups(frequencies: Any, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Splits labels into the `top_k` most frequent ("top-5" in the thesis) and the rest.

  Ties are broken by label index (lower first). Returns (top indices by decreasing frequency, rest
  indices in increasing index order).
  """
  frequencies = np.asarray(frequencies, dtype=np.float64)
  if frequencies.ndim != 1:
    raise ValueError(f"frequencies must be one value per label, got shape {frequencies.shape}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  order = np.lexsort((np.arange(frequencies.size), -frequencies))
  top = order[:top_k]
  return top, np.sort(order[top_k:])


def hierarchy_violation_rate(y_pred: Any, ancestor_matrix: Any) -> float:
  """Fraction of images whose predicted set holds a label without all of its ancestors.

  Args:
    y_pred: (N, L) binary predictions.
    ancestor_matrix: (L, L) with R[i, j] = 1 iff j is i or a descendant of i (`Taxonomy.ancestor_matrix`).
  """
  y_pred = as_label_matrix(y_pred, "y_pred")
  matrix = np.asarray(ancestor_matrix)
  num_labels = y_pred.shape[1]
  if matrix.shape != (num_labels, num_labels):
    raise ValueError(f"ancestor_matrix has shape {matrix.shape}, expected ({num_labels}, {num_labels})")
  if y_pred.shape[0] == 0:
    return math.nan
  # closed[n, i] = some predicted label of image n is i or below i. float32 matmul: exact for these counts.
  closed = (y_pred.astype(np.float32) @ (matrix != 0).astype(np.float32).T) > 0
  return float(np.any(closed & ~y_pred, axis=1).mean())


# ---------------------------------------------------------------------------------------------------
# Everything at once


def _json_float(value: Any) -> float | None:
  """NaN/inf -> None so that the result is strict JSON (an inf threshold predicts nothing)."""
  value = float(value)
  return value if math.isfinite(value) else None


def evaluate_predictions(
    y_true: Any,
    probs: Any,
    *,
    label_names: Sequence[str],
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    train_frequencies: Any = None,
    ancestor_matrix: Any = None,
    top_k: int = 5,
) -> dict[str, Any]:
  """All metrics of a test set in one strict-JSON dict (undefined values and inf thresholds are None).

  Args:
    y_true: (N, L) binary ground truth.
    probs: (N, L) predicted probabilities.
    label_names: the L label names, in column order.
    thresholds: scalar or (L,) per-label thresholds; predictions are `probs >= threshold`.
    train_frequencies: (L,) training-set label counts defining the top-k/rest groups; without it the
      groups come from the test support (the thesis's groups are by training frequency).
    ancestor_matrix: (L, L) C-HMCNN matrix R; if given, the hierarchy violation rate is reported.
    top_k: size of the "top" group.

  Returns:
    A dict with keys num_images, num_labels, threshold_rule, macro_ap, micro_ap,
    labels_without_positives, random_baseline_ap, macro_ap_over_baseline, macro_pr_auc_trapezoid,
    macro_roc_auc, precision/recall/f1 (each {macro, micro, samples}), groups ({top, rest, source,
    top_k}), labels_per_image ({true, predicted}), hierarchy_violation_rate (if ancestor_matrix),
    per_label (list of dicts).
  """
  y_true, probs = check_labels_and_scores(y_true, probs, "probs")
  num_images, num_labels = y_true.shape
  label_names = [str(name) for name in label_names]
  if len(label_names) != num_labels:
    raise InputError(f"{len(label_names)} label names given for {num_labels} label columns")
  y_pred = predict_labels(probs, thresholds)
  per_label_thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (num_labels,))

  ap = average_precision(y_true, probs)
  macro_ap, _ = _nan_mean_and_excluded(ap)
  trapezoid = pr_auc_trapezoid(y_true, probs)
  auc = roc_auc(y_true, probs)
  baseline, macro_baseline = random_baseline_ap(y_true)
  prf = precision_recall_f1(y_true, y_pred)

  if train_frequencies is not None:
    frequencies = np.asarray(train_frequencies, dtype=np.float64)
    if frequencies.shape != (num_labels,):
      raise InputError(f"train_frequencies has shape {frequencies.shape}, expected ({num_labels},)")
    group_source = "train_frequencies"
  else:
    frequencies, group_source = prf.support, "test_support"
  top, rest = label_groups(frequencies, top_k)

  def group(indices: np.ndarray) -> dict[str, Any]:
    group_ap, excluded = _nan_mean_and_excluded(ap[indices]) if indices.size else (math.nan, 0)
    return {"labels": [label_names[i] for i in indices], "macro_ap": _json_float(group_ap),
            "labels_without_positives": excluded,
            **{k: _json_float(v) for k, v in prf.macro_over(indices).items()}}

  result: dict[str, Any] = {
      "num_images": int(num_images),
      "num_labels": int(num_labels),
      "threshold_rule": "prob >= threshold",
      "macro_ap": _json_float(macro_ap),
      "micro_ap": _json_float(micro_average_precision(y_true, probs)),
      "labels_without_positives": [label_names[i] for i in np.flatnonzero(np.isnan(ap))],
      "random_baseline_ap": _json_float(macro_baseline),
      "macro_ap_over_baseline": _json_float(macro_ap / macro_baseline if macro_baseline > 0 else math.nan),
      "macro_pr_auc_trapezoid": _json_float(_nan_mean_and_excluded(trapezoid)[0]),
      "macro_roc_auc": _json_float(_nan_mean_and_excluded(auc)[0]),
      **{metric: {average: _json_float(getattr(prf, average)[metric])
                  for average in ("macro", "micro", "samples")}
         for metric in ("precision", "recall", "f1")},
      "groups": {"top_k": int(top_k), "source": group_source, "top": group(top), "rest": group(rest)},
      "labels_per_image": {"true": _json_float(labels_per_image(y_true)),
                           "predicted": _json_float(labels_per_image(y_pred))},
  }
  if ancestor_matrix is not None:
    result["hierarchy_violation_rate"] = _json_float(hierarchy_violation_rate(y_pred, ancestor_matrix))
  result["per_label"] = [
      {"name": label_names[i], "support": int(prf.support[i]), "predicted": int(prf.predicted[i]),
       "ap": _json_float(ap[i]), "baseline_ap": _json_float(baseline[i]),
       "pr_auc_trapezoid": _json_float(trapezoid[i]), "roc_auc": _json_float(auc[i]),
       "precision": float(prf.precision[i]), "recall": float(prf.recall[i]), "f1": float(prf.f1[i]),
       "threshold": _json_float(per_label_thresholds[i])}
      for i in range(num_labels)
  ]
  return result


def _fmt(value: float | None, digits: int = 4) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def per_label_order(row: dict[str, Any]) -> tuple:
  """Most supported label first; labels that were not evaluated last."""
  return (row["support"] is None, -(row["support"] or 0), row["name"])


def format_report(result: dict[str, Any]) -> str:
  """A text report of an `evaluate_predictions` result: summary block, then a per-label table."""
  lines = [f"Images: {result['num_images']}   labels: {result['num_labels']}   "
           f"rule: {result['threshold_rule']}"]
  missing = result["labels_without_positives"]
  if missing:
    lines.append(f"Labels without positives (excluded from macro AP/PR-AUC/ROC-AUC): {len(missing)}: "
                 + ", ".join(missing))
  if result.get("labels_not_evaluated"):
    lines.append("Labels the ground truth cannot judge (left out of every metric): "
                 + ", ".join(result["labels_not_evaluated"]))
  macro_ap, baseline = result["macro_ap"], result["random_baseline_ap"]
  ratio = result["macro_ap_over_baseline"]
  lines.append(f"Macro AP {_fmt(macro_ap)}   random baseline {_fmt(baseline)}   "
               f"ratio {'n/a' if ratio is None else f'{ratio:.2f}x'}")
  lines.append(f"Micro AP {_fmt(result['micro_ap'])}")
  lines.append(f"Macro PR-AUC (trapezoid, the thesis's metric) {_fmt(result['macro_pr_auc_trapezoid'])}   "
               f"macro ROC-AUC {_fmt(result['macro_roc_auc'])}")
  lines.append("")
  groups = result["groups"]
  top_k = groups["top_k"]
  rows = [("all (macro)", {m: result[m]["macro"] for m in ("precision", "recall", "f1")}),
          ("all (micro)", {m: result[m]["micro"] for m in ("precision", "recall", "f1")}),
          ("all (samples)", {m: result[m]["samples"] for m in ("precision", "recall", "f1")}),
          (f"top-{top_k} (macro)", groups["top"]),
          ("rest (macro)", groups["rest"])]
  lines.append(f"{'':<16}{'precision':>10}{'recall':>10}{'F1':>10}")
  for name, values in rows:
    lines.append(f"{name:<16}" + "".join(f"{_fmt(values[m]):>10}" for m in ("precision", "recall", "f1")))
  lines.append(f"(groups by {groups['source']}; top-{top_k}: {', '.join(groups['top']['labels'])})")
  lines.append("")
  per_image = result["labels_per_image"]
  lines.append(f"Labels per image: truth {_fmt(per_image['true'], 3)}   "
               f"predicted {_fmt(per_image['predicted'], 3)}")
  if "hierarchy_violation_rate" in result:
    rate = result["hierarchy_violation_rate"]
    lines.append(f"Hierarchy violations: {'n/a' if rate is None else f'{100 * rate:.2f}%'} of images "
                 "(a predicted label without all its ancestors)")
  lines.append("")

  columns = [("support", "support", "d"), ("predicted", "predicted", "d"), ("AP", "ap", "f"),
             ("baseline", "baseline_ap", "f"), ("P", "precision", "f"), ("R", "recall", "f"),
             ("F1", "f1", "f"), ("threshold", "threshold", "f")]
  per_label = sorted(result["per_label"], key=per_label_order)
  name_width = max([len("label")] + [len(row["name"]) for row in per_label]) + 2
  widths = [max(len(title), 9) + 2 for title, _, _ in columns]
  titles = [title for title, _, _ in columns]
  lines.append(f"{'label':<{name_width}}" + "".join(f"{title:>{w}}" for title, w in zip(titles, widths)))
  for row in per_label:
    cells = [_fmt(row[key]) if kind == "f" or row[key] is None else str(row[key])
             for _, key, kind in columns]
    lines.append(f"{row['name']:<{name_width}}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Streaming accumulation


class StreamingLabelScores:
  """Accumulates (y_true, probs) batches for one evaluation at the end.

  Stores probabilities as float32 and labels as uint8 in arrays that double when full, so 390k images x
  31 labels take ~60 MB. Evaluating the accumulated arrays gives exactly what `evaluate_predictions` gives
  on the concatenated batches (with the probabilities cast to float32, as the model emits them).
  """

  def __init__(self, num_labels: int, initial_capacity: int = 4096):
    if num_labels <= 0:
      raise ValueError(f"num_labels must be positive, got {num_labels}")
    self.num_labels = int(num_labels)
    self._y_true = np.zeros((max(1, initial_capacity), self.num_labels), np.uint8)
    self._probs = np.zeros((max(1, initial_capacity), self.num_labels), np.float32)
    self._size = 0

  def __len__(self) -> int:
    return self._size

  def add(self, y_true: Any, probs: Any) -> None:
    """Appends a batch: y_true (B, L) binary, probs (B, L); jax arrays are fine."""
    y_true = as_label_matrix(y_true, "y_true")
    probs = _as_score_matrix(probs, "probs", y_true.shape)
    if y_true.shape[1] != self.num_labels:
      raise ValueError(f"batch has {y_true.shape[1]} labels, expected {self.num_labels}")
    needed = self._size + y_true.shape[0]
    if needed > self._y_true.shape[0]:
      capacity = max(needed, 2 * self._y_true.shape[0])
      self._y_true = self._grown(self._y_true, capacity)
      self._probs = self._grown(self._probs, capacity)
    self._y_true[self._size:needed] = y_true
    self._probs[self._size:needed] = probs
    self._size = needed

  def _grown(self, array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros((capacity, self.num_labels), array.dtype)
    grown[:self._size] = array[:self._size]
    return grown

  @property
  def y_true(self) -> np.ndarray:
    return self._y_true[:self._size]

  @property
  def probs(self) -> np.ndarray:
    return self._probs[:self._size]

  def evaluate(self, **kwargs: Any) -> dict[str, Any]:
    """`evaluate_predictions` on everything added; kwargs as there (label_names is required)."""
    return evaluate_predictions(self.y_true, self.probs, **kwargs)
