"""thresholds.py against brute-force searches scored by scikit-learn."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from wikitopics_jax import metrics
from wikitopics_jax import thresholds
from wikitopics_jax.errors import InputError


def _case(seed: int, decimals: int | None, num_images: int = 60) -> tuple[np.ndarray, np.ndarray]:
  """Random labels with assorted rates (one column without positives) and informative scores."""
  rng = np.random.default_rng(seed)
  rates = np.array([0.5, 0.25, 0.1, 0.03, 0.0])
  y = (rng.random((num_images, rates.size)) < rates).astype(np.int64)
  y[rng.integers(num_images), 3] = 1  # at least one positive in the rare column
  scores = np.clip(rng.random(y.shape) * 0.8 + 0.25 * y * rng.random(y.shape), 0, 1)
  if decimals is not None:
    scores = np.round(scores, decimals)
  return y, scores


def _brute_force(y: np.ndarray, s: np.ndarray, score_fn, allowed_fn=lambda y, pred: True) -> float | None:
  """The highest-scoring candidate threshold, scanning distinct scores from the top (first max wins)."""
  best, best_value = None, -np.inf
  for t in np.unique(s)[::-1]:
    pred = s >= t
    if not allowed_fn(y, pred):
      continue
    value = score_fn(y, pred)
    if value > best_value:
      best, best_value = t, value
  return best


def _f1(y, pred) -> float:
  # Counted directly from the masks (scikit-learn's formula; sklearn itself is too slow in a loop here).
  tp = np.sum((y == 1) & pred)
  fp = np.sum((y == 0) & pred)
  fn = np.sum((y == 1) & ~pred)
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


@pytest.fixture(params=[None, 70], ids=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
  if request.param is not None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", request.param)


@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_f1_optimal_thresholds_equal_brute_force(seed, decimals, chunking):
  y, scores = _case(seed, decimals)
  ours = thresholds.f1_optimal_thresholds(y, scores)
  for j in range(y.shape[1] - 1):
    expected = _brute_force(y[:, j], scores[:, j], _f1)
    assert ours[j] == expected, j
    # The threshold reproduces the optimum with the `>=` rule, and no grid point beats it.
    best = skm.f1_score(y[:, j], scores[:, j] >= ours[j])
    grid = np.linspace(0, 1, 201)
    assert best >= max(_f1(y[:, j], scores[:, j] >= t) for t in grid) - 1e-12


def test_f1_ties_go_to_the_highest_threshold():
  # F1 is 2/3 at t=0.9 (1 TP of 2) and at t=0.6 (2 TP, 2 FP).
  y = np.array([[1], [0], [0], [1]])
  scores = np.array([[0.9], [0.8], [0.7], [0.6]])
  assert thresholds.f1_optimal_thresholds(y, scores)[0] == 0.9


def test_classes_without_positives_get_the_fallback_never_zero():
  y, scores = _case(3, 1)
  no_positive = y.shape[1] - 1
  assert y[:, no_positive].sum() == 0
  ours = thresholds.f1_optimal_thresholds(y, scores)
  assert ours[no_positive] == thresholds.DEFAULT_FALLBACK
  assert np.all(ours > 0)
  assert not np.all(scores[:, no_positive] >= ours[no_positive])
  assert thresholds.f1_optimal_thresholds(y, scores, fallback=0.9)[no_positive] == 0.9
  with pytest.raises(ValueError, match="> 0"):
    thresholds.f1_optimal_thresholds(y, scores, fallback=0.0)
  # The prototype's grid search, for contrast: threshold 0 on the empty class, predicting every image.
  grid = np.linspace(0, 1, 21)
  prototype = grid[np.argmax([_f1(y[:, no_positive], scores[:, no_positive] >= t) for t in grid])]
  assert prototype == 0


def test_bootstrap_thresholds_are_deterministic_medians_of_subset_optima():
  y, scores = _case(4, 2, num_images=300)
  first = thresholds.bootstrap_thresholds(y, scores, seed=7)
  again = thresholds.bootstrap_thresholds(y, scores, seed=7)
  other = thresholds.bootstrap_thresholds(y, scores, seed=8)
  np.testing.assert_array_equal(first.thresholds, again.thresholds)
  np.testing.assert_array_equal(first.per_subset, again.per_subset)
  assert not np.array_equal(first.per_subset, other.per_subset, equal_nan=True)
  assert first.per_subset.shape == (7, y.shape[1])
  for j in range(y.shape[1]):
    column = first.per_subset[:, j]
    finite = column[~np.isnan(column)]
    # Every subset optimum is one of the label's scores (an exact PR-curve operating point).
    assert np.all(np.isin(finite, scores[:, j]))
    expected = np.median(finite) if finite.size else thresholds.DEFAULT_FALLBACK
    assert first.thresholds[j] == pytest.approx(expected)
  # The rare column (~3% of 300 images, 60-image subsets) and the empty one have subsets without positives.
  assert np.all(np.isnan(first.per_subset[:, -1])) and first.thresholds[-1] == thresholds.DEFAULT_FALLBACK
  assert np.all(first.thresholds > 0)


def test_bootstrap_subsets_are_drawn_with_replacement_at_the_given_fraction():
  # One subset as large as the data but drawn *with replacement*: its optimum differs from the full data's.
  y, scores = _case(5, None, num_images=200)
  full = thresholds.f1_optimal_thresholds(y, scores)
  boot = [thresholds.bootstrap_thresholds(y, scores, num_subsets=1, fraction=1.0, seed=s).thresholds
          for s in range(5)]
  assert any(not np.array_equal(b[:-1], full[:-1]) for b in boot)
  with pytest.raises(ValueError, match="fraction"):
    thresholds.bootstrap_thresholds(y, scores, fraction=0)


@pytest.mark.parametrize("min_precision", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("decimals", [None, 1])
def test_recall_at_precision_equals_brute_force_and_meets_the_constraint(min_precision, decimals, chunking):
  y, scores = _case(6, decimals, num_images=80)
  ours = thresholds.recall_at_precision_thresholds(y, scores, min_precision)

  def precise_enough(y_col, pred) -> bool:
    return pred.any() and np.sum((y_col == 1) & pred) / np.sum(pred) >= min_precision

  def recall(y_col, pred) -> float:
    return np.sum((y_col == 1) & pred) / np.sum(y_col == 1)

  attained = 0
  for j in range(y.shape[1]):
    expected = _brute_force(y[:, j], scores[:, j], recall, precise_enough) if y[:, j].any() else None
    if expected is None:
      assert ours[j] == np.inf, j
      continue
    attained += 1
    assert ours[j] == expected, j
    assert skm.precision_score(y[:, j], scores[:, j] >= ours[j]) >= min_precision
  assert attained >= 2


def test_recall_at_precision_unattainable_predicts_nothing():
  y = np.array([[0], [1], [0], [1]])
  scores = np.array([[0.9], [0.8], [0.7], [0.1]])
  assert thresholds.recall_at_precision_thresholds(y, scores, 0.9)[0] == np.inf
  assert thresholds.recall_at_precision_thresholds(y, scores, 0.5)[0] == 0.1
  # Per-label minimum precision: the second label reaches precision 1 at full recall at 0.8.
  y2 = np.concatenate([y, [[1], [1], [0], [0]]], axis=1)
  scores2 = np.repeat(scores, 2, axis=1)
  np.testing.assert_array_equal(thresholds.recall_at_precision_thresholds(y2, scores2, [0.6, 0.9]),
                                [np.inf, 0.8])


LABELS = ["Animals", "Art", "Space"]


def test_save_load_roundtrip(tmp_path):
  path = tmp_path / "thresholds.json"
  values = np.array([0.125, 0.3333333333333333, np.inf])
  thresholds.save_thresholds(path, values, LABELS, {"method": "bootstrap", "num_subsets": np.int64(7)})
  np.testing.assert_array_equal(thresholds.load_thresholds(path, LABELS), values)
  document = json.loads(path.read_text())
  assert document["thresholds"][2] is None and document["meta"]["num_subsets"] == 7
  # Matched by name, not position.
  np.testing.assert_array_equal(thresholds.load_thresholds(path, LABELS[::-1]), values[::-1])
  # Overwrites atomically and leaves no temporary file behind.
  thresholds.save_thresholds(path, values * 0.5, LABELS)
  np.testing.assert_array_equal(thresholds.load_thresholds(path, LABELS), values * 0.5)
  assert os.listdir(tmp_path) == ["thresholds.json"]


def test_load_rejects_mismatching_labels_naming_file_and_labels(tmp_path):
  path = tmp_path / "t.json"
  thresholds.save_thresholds(path, [0.1, 0.2, 0.3], LABELS)
  with pytest.raises(InputError) as error:
    thresholds.load_thresholds(path, ["Animals", "Art", "Music"])
  message = str(error.value)
  assert str(path) in message and "'Music'" in message and "'Space'" in message


def test_load_rejects_missing_and_malformed_files(tmp_path):
  with pytest.raises(InputError, match="cannot read"):
    thresholds.load_thresholds(tmp_path / "absent.json", LABELS)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(InputError, match="bad.json"):
    thresholds.load_thresholds(bad, LABELS)
  bad.write_text(json.dumps({"labels": LABELS, "thresholds": [0.1, "x", 0.3]}))
  with pytest.raises(InputError, match="'Art'"):
    thresholds.load_thresholds(bad, LABELS)
  with pytest.raises(ValueError, match="NaN"):
    thresholds.save_thresholds(tmp_path / "n.json", [0.1, np.nan, 0.3], LABELS)
