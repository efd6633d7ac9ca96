"""Per-label decision thresholds (thesis section 3.2.1, after Esposito et al.'s GHOST).

Every threshold here is used as `score >= threshold` (as `metrics.predict_labels`). The search is exact:
the candidates are all distinct scores of a label, the operating points of its precision-recall curve,
and the chosen threshold is a score value itself, so applying it to the same data reproduces the
optimum exactly.

The prototype searched `linspace(0, 1, 21)`, 0 included; classes whose best F1 was 0 got threshold 0 and
were predicted positive for every image (in the thesis code). Here F1 is 0 at every threshold
only when a label has no positives, and such a label gets `fallback` (0.5 by default, the untuned
rule): without evidence the label is predicted exactly as without threshold moving, and never with
threshold 0.

Guarded thresholds (`guarded_bootstrap_thresholds`, what training saves). A bootstrap F1 optimum is
only as good as the positives behind it: with a handful of positives the optimum of a subset is often
the score of its single positive, however low, and the median of such optima (0.001-0.01 on the demo)
predicts the label for a third of all images. So each label gets one of three rules, recorded per
label in thresholds.json:

  "tuned"    the bootstrap median of F1-optimal thresholds (the thesis's rule);
  "capped"   that median predicted the label for more than `max_predicted_ratio` (2) times as many
             images of the tuning split as have it: raised to the lowest score that respects the cap;
  "default"  fewer than `min_positives` (20) positives in the tuning split: `fallback` (0.5), the
             untuned rule; a 20% bootstrap subset would hold about 4 of them.

The cap bounds what threshold moving can add: on the tuning split no label is predicted for more than
twice the images that have it, so predicted labels per image stay under twice the true ones.

Thresholds tuned on hierarchical (closed) labels are applied with closure (`close_predictions`):
per-label thresholds let a child pass while its parent does not, and every predicted label's
ancestors are added (what `predict --coherent` does after the max constraint).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from wikitopics_jax.eval import metrics
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

DEFAULT_FALLBACK = 0.5
# Beside the checkpoints of a training workdir: the per-class thresholds tuned for its best checkpoint.
THRESHOLDS_FILE = "thresholds.json"

DEFAULT_MIN_POSITIVES = 20
DEFAULT_MAX_PREDICTED_RATIO = 2.0
_FORMAT = "wikitopics_jax.thresholds/2"

# Per-label rules of `guarded_bootstrap_thresholds` (module docstring).
TUNED = "tuned"
CAPPED = "capped"
DEFAULT = "default"
RULES = (TUNED, CAPPED, DEFAULT)


def _chosen_scores(counts: metrics.RankedCounts, objective: np.ndarray) -> np.ndarray:
  """Per column, the score at the operating point maximising `objective` (-inf = not allowed).

  argmax returns the first maximum down the ranking, so ties go to the highest threshold: the
  fewest predicted positives for the same objective.
  """
  best_row = np.argmax(objective, axis=0)
  columns = np.arange(objective.shape[1])
  chosen = counts.sorted_scores[best_row, columns].astype(np.float64)
  return np.where(np.isfinite(objective[best_row, columns]), chosen, np.nan)


def _f1_optimal_or_nan(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """F1-optimal thresholds; NaN where a label has no positives (F1 = 0 at every threshold)."""

  def from_counts(counts: metrics.RankedCounts) -> np.ndarray:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P).
    f1 = 2 * counts.tps / (counts.tps + counts.fps + counts.num_positives)
    objective = np.where(counts.is_end & (counts.num_positives > 0), f1, -np.inf)
    return _chosen_scores(counts, objective)

  return metrics.map_column_chunks(from_counts, y_true, scores)


def _check_fallback(fallback: float) -> float:
  fallback = float(fallback)
  if not math.isfinite(fallback) or fallback <= 0:
    raise ValueError(f"fallback threshold must be finite and > 0 (0 predicts every image positive), "
                     f"got {fallback}")
  return fallback


def f1_optimal_thresholds(y_true: Any, scores: Any, *, fallback: float = DEFAULT_FALLBACK) -> np.ndarray:
  """Per label, the threshold maximising F1 on (y_true, scores).

  Candidates are all distinct scores (the exact PR curve); the returned threshold is the lowest
  score predicted positive, so `scores >= t` reproduces the optimal F1. When several thresholds reach
  the same best F1, the highest one is returned. Labels without positives (the only case where the best
  F1 is 0) get `fallback`.

  Args:
    y_true: (N, L) binary ground truth of a held-out validation set.
    scores: (N, L) predicted probabilities.
    fallback: threshold for labels without positives; must be > 0.

  Returns:
    (L,) float64 thresholds.
  """
  fallback = _check_fallback(fallback)
  y_true, scores = metrics.check_labels_and_scores(y_true, scores)
  thresholds = _f1_optimal_or_nan(y_true, scores)
  return np.where(np.isnan(thresholds), fallback, thresholds)


class BootstrapThresholds(NamedTuple):
  thresholds: np.ndarray  # (L,) median over subsets
  per_subset: np.ndarray  # (num_subsets, L); NaN where a subset held no positive of the label


def bootstrap_thresholds(
    y_true: Any,
    scores: Any,
    *,
    num_subsets: int = 7,
    fraction: float = 0.2,
    seed: int = 0,
    fallback: float = DEFAULT_FALLBACK,
) -> BootstrapThresholds:
  """The thesis's thresholds: median of F1-optimal thresholds over random subsets (Figure 3.6).

  Draws `num_subsets` subsets of round(fraction * N) images with replacement (as the thesis), finds
  each label's F1-optimal threshold on each subset, and takes the median over the subsets in which the
  label has positives; a subset without positives carries no evidence about the threshold, so it is
  NaN in `per_subset` and left out of the median. Labels without positives in every subset get
  `fallback`.

  Returns:
    BootstrapThresholds(thresholds (L,), per_subset (num_subsets, L)) — the latter is Figure 4.2.
  """
  fallback = _check_fallback(fallback)
  y_true, scores = metrics.check_labels_and_scores(y_true, scores)
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  num_images = y_true.shape[0]
  subset_size = max(1, round(fraction * num_images))
  rng = np.random.default_rng(seed)
  per_subset = np.full((num_subsets, y_true.shape[1]), np.nan)
  if num_images:
    for k in range(num_subsets):
      rows = rng.integers(0, num_images, size=subset_size)
      per_subset[k] = _f1_optimal_or_nan(y_true[rows], scores[rows])
  has_value = ~np.all(np.isnan(per_subset), axis=0)
  thresholds = np.full(y_true.shape[1], fallback)
  # nanmedian only on columns with a value: it warns on all-NaN columns.
  thresholds[has_value] = np.nanmedian(per_subset[:, has_value], axis=0)
  return BootstrapThresholds(thresholds, per_subset)


class GuardedThresholds(NamedTuple):
  thresholds: np.ndarray    # (L,) the thresholds to use
  rules: tuple[str, ...]    # (L,) TUNED, CAPPED or DEFAULT
  positives: np.ndarray     # (L,) positives in the tuning data
  predicted: np.ndarray     # (L,) images of the tuning data predicted positive at `thresholds`
  bootstrap: BootstrapThresholds  # the unguarded medians and every subset's optimum
  min_positives: int
  max_predicted_ratio: float
  fallback: float

  def rule_descriptions(self) -> dict[str, str]:
    return rule_descriptions(self.min_positives, self.max_predicted_ratio, self.fallback)


def rule_descriptions(min_positives: int, max_predicted_ratio: float, fallback: float) -> dict[str, str]:
  return {TUNED: "median of the F1-optimal thresholds of the bootstrap subsets",
          CAPPED: f"the tuned threshold predicted the label for more than {max_predicted_ratio:g}x its "
                  f"positives; raised to the lowest score that predicts at most {max_predicted_ratio:g}x",
          DEFAULT: f"{fallback:g}: fewer than {min_positives} positives to tune on"}


def count_rules(rules: Sequence[str]) -> str:
  """"24 tuned, 3 capped, 4 default": for printouts."""
  return ", ".join(f"{sum(r == rule for r in rules)} {rule}" for rule in RULES if rule in rules)


def _lowest_capped_threshold(scores: np.ndarray, max_predicted: int) -> float:
  """The lowest score t with at most `max_predicted` scores >= t; +inf if ties at the top exceed it."""
  if max_predicted >= scores.size:
    return -np.inf
  # Any t at or below the (max_predicted + 1)-th highest score predicts too many.
  too_low = np.sort(scores)[::-1][max_predicted]
  above = scores[scores > too_low]
  return float(above.min()) if above.size else np.inf


def guarded_bootstrap_thresholds(
    y_true: Any,
    scores: Any,
    *,
    num_subsets: int = 7,
    fraction: float = 0.2,
    seed: int = 0,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    max_predicted_ratio: float = DEFAULT_MAX_PREDICTED_RATIO,
    fallback: float = DEFAULT_FALLBACK,
) -> GuardedThresholds:
  """`bootstrap_thresholds` with the per-label guards of the module docstring.

  Args:
    y_true, scores: (N, L) ground truth and probabilities of the tuning split.
    num_subsets, fraction, seed: as `bootstrap_thresholds`.
    min_positives: labels with fewer positives in y_true get `fallback` (rule DEFAULT).
    max_predicted_ratio: a threshold may predict at most this many times the label's positives
      (counted on all of y_true); a lower one is raised (rule CAPPED).
    fallback: the default threshold.
  """
  fallback = _check_fallback(fallback)
  if int(min_positives) != min_positives or min_positives < 0:
    raise ValueError(f"min_positives must be an integer >= 0, got {min_positives}")
  if not math.isfinite(max_predicted_ratio) or max_predicted_ratio < 1:
    raise ValueError(f"max_predicted_ratio must be >= 1 (the label's own positives), got "
                     f"{max_predicted_ratio}")
  y_true, scores = metrics.check_labels_and_scores(y_true, scores)
  boot = bootstrap_thresholds(y_true, scores, num_subsets=num_subsets, fraction=fraction, seed=seed,
                              fallback=fallback)
  positives = y_true.sum(axis=0).astype(np.int64)
  thresholds = boot.thresholds.copy()
  rules = []
  for j in range(y_true.shape[1]):
    column = scores[:, j].astype(np.float64)
    # A label no subset drew a positive of has no tuned value either.
    if positives[j] < max(int(min_positives), 1) or np.all(np.isnan(boot.per_subset[:, j])):
      thresholds[j] = fallback
      rules.append(DEFAULT)
      continue
    max_predicted = math.floor(max_predicted_ratio * positives[j])
    if np.sum(column >= thresholds[j]) > max_predicted:
      thresholds[j] = _lowest_capped_threshold(column, max_predicted)
      rules.append(CAPPED)
    else:
      rules.append(TUNED)
  predicted = metrics.predict_labels(scores, thresholds).sum(axis=0).astype(np.int64)
  return GuardedThresholds(thresholds, tuple(rules), positives, predicted, boot, int(min_positives),
                           float(max_predicted_ratio), fallback)


def close_predictions(predicted: Any, ancestor_matrix: Any) -> np.ndarray:
  """Adds every predicted label's ancestors: (N, L) bool, closed under the hierarchy R.

  R[i, j] = 1 iff j is i or a descendant of i (`Taxonomy.ancestor_matrix`, transitively closed), so
  label i is predicted iff some predicted label is i or below it.
  """
  predicted = np.asarray(predicted, dtype=bool)
  matrix = np.asarray(ancestor_matrix) != 0
  if predicted.ndim != 2 or matrix.shape != (predicted.shape[1], predicted.shape[1]):
    raise ValueError(f"predictions of shape {predicted.shape} and an ancestor matrix of shape "
                     f"{matrix.shape}")
  # float32 matmul: exact for these counts (< 2**24 labels).
  return (predicted.astype(np.float32) @ matrix.T.astype(np.float32)) > 0


def apply_thresholds(probs: Any, thresholds: Any, ancestor_matrix: Any = None) -> np.ndarray:
  """probs >= thresholds, then (if ancestor_matrix is given) closed under the hierarchy. (N, L) bool."""
  predicted = metrics.predict_labels(probs, thresholds)
  return predicted if ancestor_matrix is None else close_predictions(predicted, ancestor_matrix)


def recall_at_precision_thresholds(y_true: Any, scores: Any, min_precision: float | Sequence[float]
                                   ) -> np.ndarray:
  """Per label, the threshold with the highest recall among those with precision >= min_precision.

  This is the operating point Wikimedia's ORES offers ("maximum recall @ precision >= X"). Among
  thresholds with the same best recall the highest (hence most precise) one is returned.

  Args:
    y_true: (N, L) binary ground truth.
    scores: (N, L) predicted probabilities.
    min_precision: scalar or (L,) minimum precision in [0, 1].

  Returns:
    (L,) float64 thresholds; +inf (predict nothing) where no threshold reaches the precision or the
    label has no positives. `save_thresholds` stores +inf as null.
  """
  y_true, scores = metrics.check_labels_and_scores(y_true, scores)
  min_precision = np.broadcast_to(np.asarray(min_precision, dtype=np.float64), (y_true.shape[1],))
  if np.any(~((min_precision >= 0) & (min_precision <= 1))):
    raise ValueError(f"min_precision must be in [0, 1], got {min_precision}")
  thresholds = np.full(y_true.shape[1], np.inf)
  if y_true.shape[0] == 0:
    return thresholds
  for cols in metrics.column_chunks(*y_true.shape):
    counts = metrics.ranked_counts(y_true[:, cols], scores[:, cols])
    allowed = counts.is_end & (counts.precision() >= min_precision[cols]) & (counts.num_positives > 0)
    # Recall is TP / P with P fixed per label: maximise TP.
    thresholds[cols] = _chosen_scores(counts, np.where(allowed, counts.tps.astype(np.float64), -np.inf))
  return np.where(np.isnan(thresholds), np.inf, thresholds)


def save_thresholds(path: str | os.PathLike, thresholds: Any, label_names: Sequence[str],
                    meta: Mapping[str, Any] | None = None, *, rules: Sequence[str] | None = None,
                    close_predictions: bool = False) -> None:
  """Writes per-label thresholds as JSON, atomically (temporary file + os.replace).

  Format: {"format", "labels": [...], "thresholds": [...], "rules": [...] or null, "close_predictions",
  "meta": {...}}; +inf ("predict nothing") is written as null so the file stays strict JSON. `rules`
  says per label how its threshold was chosen (TUNED, CAPPED, DEFAULT); `close_predictions` that the
  ancestors of predicted labels are to be added (thresholds tuned on hierarchical labels).
  """
  thresholds = np.asarray(thresholds, dtype=np.float64)
  label_names = [str(name) for name in label_names]
  if thresholds.shape != (len(label_names),):
    raise ValueError(f"{len(label_names)} label names but thresholds of shape {thresholds.shape}")
  if len(set(label_names)) != len(label_names):
    raise ValueError(f"duplicate label names: {sorted({n for n in label_names if label_names.count(n) > 1})}")
  if np.any(np.isnan(thresholds) | (thresholds == -np.inf)):
    raise ValueError("thresholds hold NaN or -inf")
  if rules is not None and len(rules) != len(label_names):
    raise ValueError(f"{len(label_names)} label names but {len(rules)} rules")
  document = {
      "format": _FORMAT,
      "labels": label_names,
      "thresholds": [None if t == np.inf else float(t) for t in thresholds],
      "rules": None if rules is None else [str(rule) for rule in rules],
      "close_predictions": bool(close_predictions),
      "meta": dict(meta or {}),
  }
  text = json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n"
  path = os.fspath(path)
  with files.atomic_open(path) as f:
    f.write(text)


def _json_default(value: Any) -> Any:
  # numpy scalars and arrays in `meta`.
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"meta value of type {type(value).__name__} is not JSON-serialisable")


class ThresholdFile(NamedTuple):
  thresholds: np.ndarray            # (L,) in the order asked for; +inf = predict nothing
  rules: tuple[str, ...] | None     # (L,) per-label rule, None in files written without rules
  close_predictions: bool           # add the ancestors of predicted labels
  meta: dict[str, Any]


def load_thresholds(path: str | os.PathLike, label_names: Sequence[str]) -> np.ndarray:
  """The thresholds of a `save_thresholds` file in the order of `label_names` (see `read_thresholds`)."""
  return read_thresholds(path, label_names).thresholds


def read_thresholds(path: str | os.PathLike, label_names: Sequence[str]) -> ThresholdFile:
  """Reads a `save_thresholds` file, returning its thresholds and rules in the order of `label_names`.

  Labels are matched by name, so a file written in another label order is reordered; a file whose
  label set differs from `label_names` is an InputError naming the file and the mismatching labels
  (thresholds of another taxonomy version must not be applied by position).
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      document = json.load(f)
  except OSError as e:
    raise InputError(f"{path}: cannot read thresholds: {e.strerror or e}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: not a JSON thresholds file: {e}") from None
  if not isinstance(document, dict) or not isinstance(document.get("labels"), list) \
      or not isinstance(document.get("thresholds"), list):
    raise InputError(f"{path}: expected a JSON object with 'labels' and 'thresholds' lists")
  file_labels, values = document["labels"], document["thresholds"]
  if len(file_labels) != len(values):
    raise InputError(f"{path}: {len(file_labels)} labels but {len(values)} thresholds")
  if len(set(file_labels)) != len(file_labels):
    duplicates = sorted({label for label in file_labels if file_labels.count(label) > 1})
    raise InputError(f"{path}: duplicate labels {duplicates}")
  for label, value in zip(file_labels, values):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is not None and not (is_number and math.isfinite(value)):
      raise InputError(f"{path}: threshold of label {label!r} is {value!r}, not a finite number or null")
  file_rules = document.get("rules")
  if file_rules is not None and (not isinstance(file_rules, list) or len(file_rules) != len(file_labels)
                                 or not all(isinstance(rule, str) for rule in file_rules)):
    raise InputError(f"{path}: 'rules' must be a list of {len(file_labels)} strings, one per label")
  wanted = [str(name) for name in label_names]
  missing = [name for name in wanted if name not in file_labels]
  unexpected = [name for name in file_labels if name not in wanted]
  if missing or unexpected:
    raise InputError(f"{path}: threshold labels do not match the model's labels: "
                     f"missing {missing}, unexpected {unexpected}")
  position = {label: k for k, label in enumerate(file_labels)}
  order = [position[name] for name in wanted]
  thresholds = np.array([np.inf if values[k] is None else float(values[k]) for k in order], np.float64)
  rules = None if file_rules is None else tuple(file_rules[k] for k in order)
  meta = document.get("meta") if isinstance(document.get("meta"), dict) else {}
  return ThresholdFile(thresholds, rules, bool(document.get("close_predictions", False)), meta)
