"""thresholds.py against brute-force searches scored by scikit-learn."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from wikitopics_jax.eval import evaluation
from wikitopics_jax.eval import metrics
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.eval import thresholds
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


# ---------------------------------------------------------------------------------------------------
# Guarded thresholds: the rule of each label, and applying them with the hierarchy.


def _rare_label_case(num_images: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Three labels: common and well separated; 6 positives the model scores low; 100 positives scored
  like 300 negatives, above all others (the F1 optimum takes all 400: F1 0.4, four times the positives)."""
  rng = np.random.default_rng(seed)
  y = np.zeros((num_images, 3), np.int64)
  y[:, 0] = rng.random(num_images) < 0.3
  y[rng.choice(num_images, 6, replace=False), 1] = 1
  y[rng.choice(num_images, 100, replace=False), 2] = 1
  scores = np.empty(y.shape)
  scores[:, 0] = rng.random(num_images) * 0.5 + 0.45 * y[:, 0]
  scores[:, 1] = np.where(y[:, 1] == 1, rng.random(num_images) * 0.01, rng.random(num_images) * 0.3)
  confusable = y[:, 2] == 1
  confusable[rng.choice(np.flatnonzero(~confusable), 300, replace=False)] = True
  scores[:, 2] = np.where(confusable, 0.1 + 0.1 * rng.random(num_images), 0.09 * rng.random(num_images))
  return y, scores


def test_guard_gives_rare_labels_the_default_and_caps_thresholds_that_predict_too_often():
  y, scores = _rare_label_case()
  guarded = thresholds.guarded_bootstrap_thresholds(y, scores, seed=3)
  median = guarded.bootstrap.thresholds
  # Unguarded, the rare label's threshold is one of its positives' scores (< 0.01): it would be
  # predicted for almost every image; so would the weak label at its F1 optimum.
  assert median[1] < 0.01 and np.mean(scores[:, 1] >= median[1]) > 0.9
  assert np.sum(scores[:, 2] >= median[2]) > 2 * y[:, 2].sum()
  assert guarded.rules == (thresholds.TUNED, thresholds.DEFAULT, thresholds.CAPPED)
  np.testing.assert_array_equal(guarded.positives, [y[:, 0].sum(), 6, 100])
  assert guarded.thresholds[0] == median[0]
  assert guarded.thresholds[1] == thresholds.DEFAULT_FALLBACK
  assert guarded.thresholds[2] > median[2]
  predicted = (scores >= guarded.thresholds).sum(axis=0)
  np.testing.assert_array_equal(guarded.predicted, predicted)
  assert predicted[2] <= 2 * 100
  # The cap is the lowest score that respects it: one distinct score lower predicts too many.
  lower = scores[:, 2][scores[:, 2] < guarded.thresholds[2]].max()
  assert np.sum(scores[:, 2] >= lower) > 200
  # The bound on labels per image: no tuned or capped label predicted beyond twice its positives.
  guarded_columns = np.array([rule != thresholds.DEFAULT for rule in guarded.rules])
  assert np.all(predicted[guarded_columns] <= 2 * guarded.positives[guarded_columns])
  # Looser guards leave the median alone.
  loose = thresholds.guarded_bootstrap_thresholds(y, scores, seed=3, min_positives=1,
                                                  max_predicted_ratio=1e6)
  assert loose.rules == (thresholds.TUNED,) * 3
  np.testing.assert_array_equal(loose.thresholds, median)
  with pytest.raises(ValueError, match="max_predicted_ratio"):
    thresholds.guarded_bootstrap_thresholds(y, scores, max_predicted_ratio=0.5)


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_capped_threshold_is_the_lowest_score_predicting_at_most_the_cap(decimals):
  rng = np.random.default_rng(7)
  column = rng.random(300)
  if decimals is not None:
    column = np.round(column, decimals)  # ties
  for cap in (0, 1, 5, 37, 299, 300, 1000):
    ours = thresholds._lowest_capped_threshold(column, cap)
    allowed = [t for t in np.unique(column) if np.sum(column >= t) <= cap]
    if cap >= column.size:
      assert ours == -np.inf
    elif allowed:
      assert ours == min(allowed)
    else:
      assert ours == np.inf  # more than `cap` images tie at the top score


def test_closing_predictions_adds_ancestors_and_leaves_no_violation():
  tax = taxonomy_lib.load("v1.3")
  rng = np.random.default_rng(0)
  probs = rng.random((400, tax.num_labels))
  thresholds_per_label = rng.uniform(0.3, 0.9, tax.num_labels)
  plain = thresholds.apply_thresholds(probs, thresholds_per_label)
  closed = thresholds.apply_thresholds(probs, thresholds_per_label, tax.ancestor_matrix)
  assert metrics.hierarchy_violation_rate(plain, tax.ancestor_matrix) > 0.5
  assert metrics.hierarchy_violation_rate(closed, tax.ancestor_matrix) == 0
  np.testing.assert_array_equal(closed, tax.close(plain.astype(np.uint8)).astype(bool))
  assert np.all(closed >= plain)


def test_summarize_with_closure_scores_the_closed_predictions():
  tax = taxonomy_lib.load("v1.3")
  rng = np.random.default_rng(1)
  labels = tax.close((rng.random((300, tax.num_labels)) < 0.1).astype(np.uint8))
  probs = np.clip(rng.random(labels.shape) * 0.7 + 0.3 * labels, 0, 1).astype(np.float32)
  t = rng.uniform(0.3, 0.9, tax.num_labels)
  predictions = {"labels": labels, "probs": probs, "loss": np.zeros(300, np.float32)}
  rules = [thresholds.TUNED] * (tax.num_labels - 1) + [thresholds.DEFAULT]
  common = dict(label_names=tax.labels, thresholds=t, ancestor_matrix=tax.ancestor_matrix)
  plain = evaluation.summarize(predictions, **common)
  closed = evaluation.summarize(predictions, close=True, rules=rules, **common)
  y_pred = tax.close((probs >= t).astype(np.uint8))
  assert closed["hierarchy_violation_rate"] == 0 < plain["hierarchy_violation_rate"]
  assert closed["f1"]["micro"] == pytest.approx(skm.f1_score(labels, y_pred, average="micro"))
  assert closed["recall"]["macro"] == pytest.approx(
      skm.recall_score(labels, y_pred, average="macro", zero_division=0))
  assert closed["labels_per_image"]["predicted"] == pytest.approx(y_pred.sum(1).mean())
  per_label_f1 = skm.f1_score(labels, y_pred, average=None, zero_division=0)
  np.testing.assert_allclose([row["f1"] for row in closed["per_label"]], per_label_f1)
  assert [row["predicted"] for row in closed["per_label"]] == y_pred.sum(0).tolist()
  # Ranking metrics and thresholds do not depend on the rule.
  assert closed["macro_ap"] == plain["macro_ap"]
  assert [row["threshold"] for row in closed["per_label"]] == [row["threshold"] for row in plain["per_label"]]
  assert closed["per_label"][-1]["threshold_rule"] == thresholds.DEFAULT
  assert closed["threshold_rules"][thresholds.DEFAULT] == [tax.labels[-1]]
  assert "ancestors" in closed["threshold_rule"]


def test_rules_and_closure_round_trip_and_the_file_is_world_readable(tmp_path):
  path = tmp_path / "thresholds.json"
  old_umask = os.umask(0o022)
  try:
    thresholds.save_thresholds(path, [0.2, 0.5, np.inf], LABELS,
                               rules=[thresholds.TUNED, thresholds.DEFAULT, thresholds.CAPPED],
                               close_predictions=True, meta={"split": "threshold"})
  finally:
    os.umask(old_umask)
  # Like every other output (mkstemp would have made it 0600).
  assert os.stat(path).st_mode & 0o777 == 0o644
  saved = thresholds.read_thresholds(path, LABELS[::-1])
  np.testing.assert_array_equal(saved.thresholds, [np.inf, 0.5, 0.2])
  assert saved.rules == (thresholds.CAPPED, thresholds.DEFAULT, thresholds.TUNED)
  assert saved.close_predictions and saved.meta == {"split": "threshold"}
  assert os.listdir(tmp_path) == ["thresholds.json"]
  # Files without rules (written before them) still load, unclosed.
  path.write_text(json.dumps({"labels": LABELS, "thresholds": [0.1, 0.2, 0.3]}))
  saved = thresholds.read_thresholds(path, LABELS)
  assert saved.rules is None and not saved.close_predictions
  path.write_text(json.dumps({"labels": LABELS, "thresholds": [0.1, 0.2, 0.3], "rules": ["tuned"]}))
  with pytest.raises(InputError, match="'rules'"):
    thresholds.read_thresholds(path, LABELS)
