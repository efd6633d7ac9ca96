"""metrics.py against scikit-learn (the independent reference) and hand-made cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from wikitopics_jax.eval import metrics
from wikitopics_jax import taxonomy
from wikitopics_jax.errors import InputError

# Score styles: continuous (few ties), rounded to 1 decimal (heavy ties), 2 distinct values, constant.
SCORE_STYLES = ["continuous", "one_decimal", "two_values", "constant"]


def _scores(rng: np.random.Generator, shape: tuple[int, int], style: str) -> np.ndarray:
  raw = rng.random(shape)
  if style == "one_decimal":
    return np.round(raw, 1)
  if style == "two_values":
    return np.where(raw < 0.5, 0.25, 0.75)
  if style == "constant":
    return np.full(shape, 0.3)
  return raw


def _labels(rng: np.random.Generator, num_images: int) -> np.ndarray:
  """Columns with assorted positive rates plus edge cases: one positive, all positive, none positive."""
  rates = [0.5, 0.2, 0.05]
  y = np.stack([rng.random(num_images) < r for r in rates], axis=1).astype(np.int64)
  single = np.zeros((num_images, 1), np.int64)
  single[rng.integers(num_images)] = 1
  all_positive = np.ones((num_images, 1), np.int64)
  none_positive = np.zeros((num_images, 1), np.int64)
  return np.concatenate([y, single, all_positive, none_positive], axis=1)


def _case(seed: int, style: str, num_images: int = 97) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = _labels(rng, num_images)
  # Make scores informative for some columns so that AP is not just the base rate.
  scores = _scores(rng, y.shape, style)
  if style == "continuous":
    scores = np.clip(scores + 0.3 * y * rng.random(y.shape), 0, 1)
  return y, scores


def _sklearn_per_column(fn, y: np.ndarray, scores: np.ndarray) -> np.ndarray:
  out = []
  for j in range(y.shape[1]):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      try:
        out.append(fn(y[:, j], scores[:, j]))
      except ValueError:
        out.append(np.nan)
  return np.array(out, dtype=np.float64)


def _sklearn_trapezoid(y: np.ndarray, s: np.ndarray) -> float:
  precision, recall, _ = skm.precision_recall_curve(y, s)
  return skm.auc(recall, precision)


@pytest.fixture(params=[None, 40], ids=["one_chunk", "many_chunks"])
def chunking(request, monkeypatch):
  # A tiny element budget forces one column per chunk: the chunked path must agree too.
  if request.param is not None:
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", request.param)


# ---------------------------------------------------------------------------------------------------
# Ranking metrics


@pytest.fixture(params=["serial", "threads"])
def threading(request, monkeypatch):
  # Forces the thread pool (and micro AP's sorted pieces, 3 of them) even on tiny inputs and one core.
  if request.param == "threads":
    monkeypatch.setattr(metrics, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(metrics, "_available_cpus", lambda: 3)


@pytest.mark.parametrize("style", SCORE_STYLES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn(style, seed, threading):
  y, scores = _case(seed, style)
  ours = metrics.average_precision(y, scores)
  reference = _sklearn_per_column(skm.average_precision_score, y, scores)
  has_positive = y.sum(axis=0) > 0
  np.testing.assert_allclose(ours[has_positive], reference[has_positive], rtol=0, atol=1e-12)
  assert np.all(np.isnan(ours[~has_positive]))


def _quantised_case(seed: int, dtype, num_images: int = 3000) -> tuple[np.ndarray, np.ndarray]:
  """Heavy ties: informative scores rounded to 2 decimals, one column with 3 levels, the edge columns."""
  rng = np.random.default_rng(seed)
  y = _labels(rng, num_images)
  scores = np.round(0.7 * rng.random(y.shape) + 0.3 * y, 2)
  scores[:, 1] = rng.integers(0, 3, num_images) / 2
  return y, scores.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_equals_sklearn_to_1e12_with_heavy_ties(dtype, seed, threading):
  y, scores = _quantised_case(seed, dtype)
  ours = metrics.average_precision(y, scores)
  reference = _sklearn_per_column(skm.average_precision_score, y, scores)
  np.testing.assert_allclose(ours[:-1], reference[:-1], rtol=0, atol=1e-12)
  assert ours[4] == 1.0  # all positive: precision 1 at every threshold
  assert np.isnan(ours[-1])  # no positive
  assert metrics.micro_average_precision(y, scores) == pytest.approx(
      skm.average_precision_score(y, scores, average="micro"), rel=0, abs=1e-12)


def test_average_precision_ties_like_sklearn_on_signed_zeros_and_neighbouring_floats():
  # -0.0 == 0.0 is one threshold; adjacent float32 values are two.
  tiny = np.nextafter(np.float32(0.5), np.float32(1))
  scores = np.array([[0.0], [-0.0], [0.5], [tiny], [-0.0], [0.5]], np.float32)
  y = np.array([[1], [0], [0], [1], [1], [0]])
  assert metrics.average_precision(y, scores)[0] == pytest.approx(
      skm.average_precision_score(y[:, 0], scores[:, 0]), rel=0, abs=1e-15)
  assert metrics.micro_average_precision(y, scores) == pytest.approx(
      skm.average_precision_score(y[:, 0], scores[:, 0]), rel=0, abs=1e-15)


def test_average_precision_without_images_or_labels():
  assert np.all(np.isnan(metrics.average_precision(np.zeros((0, 3)), np.zeros((0, 3)))))
  assert metrics.average_precision(np.zeros((4, 0)), np.zeros((4, 0))).shape == (0,)
  assert np.isnan(metrics.micro_average_precision(np.zeros((0, 3)), np.zeros((0, 3))))
  assert np.isnan(metrics.micro_average_precision(np.zeros((4, 2)), np.ones((4, 2))))


def test_average_precision_is_not_the_trapezoid_area():
  # One tie group mixing a positive and a negative, then a positive: AP 0.75, trapezoid 0.6875.
  y = np.array([[1], [0], [1]])
  scores = np.array([[0.9], [0.9], [0.1]])
  assert metrics.average_precision(y, scores)[0] == pytest.approx(
      skm.average_precision_score(y[:, 0], scores[:, 0]))
  assert metrics.average_precision(y, scores)[0] == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))
  assert metrics.pr_auc_trapezoid(y, scores)[0] == pytest.approx(_sklearn_trapezoid(y[:, 0], scores[:, 0]))
  assert metrics.pr_auc_trapezoid(y, scores)[0] != pytest.approx(metrics.average_precision(y, scores)[0])


@pytest.mark.parametrize("style", SCORE_STYLES)
def test_micro_average_precision_matches_sklearn(style, threading):
  y, scores = _case(3, style)
  assert metrics.micro_average_precision(y, scores) == pytest.approx(
      skm.average_precision_score(y, scores, average="micro"), rel=0, abs=1e-12)


def test_macro_average_precision_excludes_labels_without_positives():
  y, scores = _case(4, "one_decimal")
  has_positive = y.sum(axis=0) > 0
  reference = _sklearn_per_column(skm.average_precision_score, y, scores)
  macro, excluded = metrics.macro_average_precision(y, scores)
  assert excluded == int((~has_positive).sum()) == 1
  assert macro == pytest.approx(reference[has_positive].mean(), abs=1e-6)
  # scikit-learn scores the empty column 0 and would lower the macro average.
  assert macro > reference.mean()


def test_macro_average_precision_without_any_positive_is_nan():
  macro, excluded = metrics.macro_average_precision(np.zeros((5, 3)), np.random.default_rng(0).random((5, 3)))
  assert np.isnan(macro) and excluded == 3


@pytest.mark.parametrize("style", SCORE_STYLES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pr_auc_trapezoid_matches_sklearn_auc_of_pr_curve(style, seed, chunking):
  y, scores = _case(seed, style)
  ours = metrics.pr_auc_trapezoid(y, scores)
  reference = _sklearn_per_column(_sklearn_trapezoid, y, scores)
  has_positive = y.sum(axis=0) > 0
  np.testing.assert_allclose(ours[has_positive], reference[has_positive], rtol=0, atol=1e-6)
  assert np.all(np.isnan(ours[~has_positive]))


@pytest.mark.parametrize("style", SCORE_STYLES)
@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_sklearn(style, seed, chunking):
  y, scores = _case(seed, style)
  ours = metrics.roc_auc(y, scores)
  reference = _sklearn_per_column(skm.roc_auc_score, y, scores)
  defined = (y.sum(axis=0) > 0) & (y.sum(axis=0) < y.shape[0])
  np.testing.assert_allclose(ours[defined], reference[defined], rtol=0, atol=1e-6)
  # All-positive and no-positive columns: undefined (scikit-learn raises).
  assert np.all(np.isnan(ours[~defined])) and (~defined).sum() == 2


def test_ranking_metrics_accept_float32_and_bool():
  y, scores = _case(5, "continuous")
  ours = metrics.average_precision(y.astype(bool), scores.astype(np.float32))
  reference = _sklearn_per_column(skm.average_precision_score, y, scores.astype(np.float32))
  np.testing.assert_allclose(ours[:-1], reference[:-1], rtol=0, atol=1e-12)


def test_ranking_metrics_reject_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    metrics.average_precision(np.ones((3, 1)), np.array([[0.1], [np.nan], [0.2]]))
  with pytest.raises(ValueError, match="shape"):
    metrics.roc_auc(np.ones((3, 2)), np.ones((3, 1)))
  with pytest.raises(ValueError, match="0 and 1"):
    metrics.average_precision(np.full((3, 1), 2), np.ones((3, 1)))


def test_random_baseline_ap_is_the_positive_rate_and_a_random_scorer_reaches_it():
  rng = np.random.default_rng(6)
  y, _ = _case(6, "continuous", num_images=400)
  rates, mean = metrics.random_baseline_ap(y)
  np.testing.assert_allclose(rates, y.mean(axis=0))
  assert mean == pytest.approx(y.mean(axis=0)[y.sum(axis=0) > 0].mean())
  # Expected AP of random scores: average many random scorers on a 10% column.
  column = (rng.random(3000) < 0.1).astype(np.int64)
  random_scores = rng.random((3000, 200))
  aps = metrics.average_precision(np.repeat(column[:, None], 200, axis=1), random_scores)
  assert aps.mean() == pytest.approx(column.mean(), abs=0.01)


# ---------------------------------------------------------------------------------------------------
# Thresholded metrics


def _prediction_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = _labels(rng, 83)
  y_pred = (rng.random(y.shape) < 0.3).astype(np.int64)
  y_pred[:, 2] = 0  # never predicted
  y_pred[:, 5] = 1  # predicted everywhere, never present
  y_pred[:7] = 0  # some images with no predicted label
  y[7:10] = 0  # some images with no true label (and y_pred[7:10] may be empty too)
  y_pred[8:10] = 0
  return y, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_f1_matches_sklearn(seed):
  y, y_pred = _prediction_case(seed)
  ours = metrics.precision_recall_f1(y, y_pred)
  p, r, f, support = skm.precision_recall_fscore_support(y, y_pred, average=None, zero_division=0)
  np.testing.assert_allclose(ours.precision, p, atol=1e-12)
  np.testing.assert_allclose(ours.recall, r, atol=1e-12)
  np.testing.assert_allclose(ours.f1, f, atol=1e-12)
  np.testing.assert_array_equal(ours.support, support)
  for average in ("macro", "micro", "samples"):
    p, r, f, _ = skm.precision_recall_fscore_support(y, y_pred, average=average, zero_division=0)
    got = getattr(ours, average)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f), abs=1e-12), average


def test_macro_over_a_label_group_matches_sklearn_labels_argument():
  y, y_pred = _prediction_case(3)
  ours = metrics.precision_recall_f1(y, y_pred).macro_over([0, 2, 5])
  p, r, f, _ = skm.precision_recall_fscore_support(y, y_pred, labels=[0, 2, 5], average="macro",
                                                   zero_division=0)
  assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f), abs=1e-12)


def test_predict_labels_uses_greater_or_equal_and_per_label_thresholds():
  probs = np.array([[0.5, 0.2], [0.49, 0.3]])
  np.testing.assert_array_equal(metrics.predict_labels(probs, 0.5), [[True, False], [False, False]])
  np.testing.assert_array_equal(metrics.predict_labels(probs, [0.49, 0.3]), [[True, False], [True, True]])
  with pytest.raises(ValueError, match="one value per label"):
    metrics.predict_labels(probs, [0.1, 0.2, 0.3])


def test_labels_per_image():
  assert metrics.labels_per_image(np.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]])) == pytest.approx(5 / 3)


def test_label_groups_breaks_ties_by_index():
  top, rest = metrics.label_groups([3, 9, 9, 1, 5, 9, 0], top_k=3)
  np.testing.assert_array_equal(top, [1, 2, 5])
  np.testing.assert_array_equal(rest, [0, 3, 4, 6])
  top, rest = metrics.label_groups([3, 9, 9, 1, 5, 9, 0], top_k=5)
  np.testing.assert_array_equal(top, [1, 2, 5, 4, 0])
  # Many ties among many labels, against Python's sort on (-frequency, index).
  frequencies = np.random.default_rng(0).integers(0, 4, size=200)
  top, rest = metrics.label_groups(frequencies, top_k=50)
  expected = sorted(range(200), key=lambda i: (-frequencies[i], i))
  np.testing.assert_array_equal(top, expected[:50])
  np.testing.assert_array_equal(rest, sorted(expected[50:]))
  top, rest = metrics.label_groups([1, 2], top_k=5)
  np.testing.assert_array_equal(top, [1, 0])
  assert rest.size == 0


def test_hierarchy_violation_rate_on_the_real_taxonomy():
  tax = taxonomy.load("v1.3")
  idx = tax.index
  y = np.zeros((4, tax.num_labels), np.uint8)
  y[0, [idx["Plants"], idx["Nature"], idx["STEM"]]] = 1  # coherent
  y[1, [idx["Plants"], idx["STEM"]]] = 1  # Nature missing
  y[2, idx["Logos & Symbols"]] = 1  # a root: coherent
  y[3, [idx["Art"]]] = 1  # Culture missing
  assert metrics.hierarchy_violation_rate(y, tax.ancestor_matrix) == pytest.approx(0.5)
  # Against a loop over the parent relation on random predictions.
  rng = np.random.default_rng(0)
  y = (rng.random((300, tax.num_labels)) < 0.08).astype(np.uint8)

  def violates(row) -> bool:
    present = {tax.labels[i] for i in np.flatnonzero(row)}
    return any(p not in present for label in present for p in tax.parents_of(label))

  expected = np.mean([violates(row) for row in y])
  assert 0 < expected < 1
  assert metrics.hierarchy_violation_rate(y, tax.ancestor_matrix) == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------
# evaluate_predictions, format_report, streaming


NAMES = ["Common", "Medium", "Rare", "Single", "Everywhere", "Absent"]


def _probs_case(seed: int = 0, num_images: int = 120) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  y = _labels(rng, num_images)
  probs = np.clip(0.6 * rng.random(y.shape) + 0.35 * y, 0, 1).astype(np.float32)
  return y, probs


def test_evaluate_predictions_matches_sklearn_and_is_strict_json():
  y, probs = _probs_case()
  thresholds = np.array([0.5, 0.4, 0.3, 0.6, 0.5, 0.55])
  train_frequencies = np.array([10, 500, 20, 30, 40, 50])
  result = metrics.evaluate_predictions(y, probs, label_names=NAMES, thresholds=thresholds,
                                        train_frequencies=train_frequencies, top_k=2)
  json.dumps(result, allow_nan=False)
  y_pred = probs >= thresholds
  has_positive = y.sum(axis=0) > 0
  reference_ap = _sklearn_per_column(skm.average_precision_score, y, probs)
  assert result["macro_ap"] == pytest.approx(reference_ap[has_positive].mean(), abs=1e-6)
  assert result["micro_ap"] == pytest.approx(skm.average_precision_score(y, probs, average="micro"), abs=1e-6)
  assert result["labels_without_positives"] == ["Absent"]
  assert result["random_baseline_ap"] == pytest.approx(y.mean(axis=0)[has_positive].mean())
  assert result["macro_ap_over_baseline"] == pytest.approx(result["macro_ap"] / result["random_baseline_ap"])
  for average in ("macro", "micro", "samples"):
    p, r, f, _ = skm.precision_recall_fscore_support(y, y_pred, average=average, zero_division=0)
    assert (result["precision"][average], result["recall"][average], result["f1"][average]) == pytest.approx(
        (p, r, f), abs=1e-12)
  groups = result["groups"]
  assert groups["source"] == "train_frequencies"
  assert groups["top"]["labels"] == ["Medium", "Absent"]
  rest = [0, 2, 3, 4]
  assert groups["rest"]["labels"] == [NAMES[i] for i in rest]
  _, _, f_rest, _ = skm.precision_recall_fscore_support(y, y_pred, labels=rest, average="macro",
                                                        zero_division=0)
  assert groups["rest"]["f1"] == pytest.approx(f_rest, abs=1e-12)
  assert groups["top"]["macro_ap"] == pytest.approx(reference_ap[1], abs=1e-6)  # "Absent" has no AP
  assert result["labels_per_image"] == pytest.approx(
      {"true": y.sum(1).mean(), "predicted": y_pred.sum(1).mean()})
  assert "hierarchy_violation_rate" not in result
  per_label = {row["name"]: row for row in result["per_label"]}
  assert per_label["Absent"]["ap"] is None and per_label["Absent"]["roc_auc"] is None
  assert per_label["Everywhere"]["roc_auc"] is None
  assert per_label["Rare"]["threshold"] == pytest.approx(0.3)
  assert per_label["Medium"]["f1"] == pytest.approx(skm.f1_score(y[:, 1], y_pred[:, 1], zero_division=0))
  assert per_label["Common"]["ap"] == pytest.approx(reference_ap[0], abs=1e-6)


def test_evaluate_predictions_groups_default_to_test_support_and_reports_violations():
  tax = taxonomy.load("v1.3")
  rng = np.random.default_rng(1)
  y = tax.close((rng.random((150, tax.num_labels)) < 0.05).astype(np.uint8))
  probs = rng.random(y.shape)
  result = metrics.evaluate_predictions(y, probs, label_names=tax.labels, ancestor_matrix=tax.ancestor_matrix)
  top, _ = metrics.label_groups(y.sum(axis=0), 5)
  assert result["groups"]["source"] == "test_support"
  assert result["groups"]["top"]["labels"] == [tax.labels[i] for i in top]
  expected = np.mean(tax.violations((probs >= 0.5).astype(np.uint8)) > 0)
  assert result["hierarchy_violation_rate"] == pytest.approx(expected)


def test_evaluate_predictions_with_an_unattainable_threshold_is_strict_json():
  y, probs = _probs_case()
  result = metrics.evaluate_predictions(y, probs, label_names=NAMES, thresholds=[0.5, np.inf, 0.5, 0.5, 0.5, 0.5])
  json.dumps(result, allow_nan=False)
  medium = result["per_label"][1]
  assert medium["threshold"] is None and medium["predicted"] == 0 and medium["recall"] == 0


def test_evaluate_predictions_rejects_wrong_label_names():
  y, probs = _probs_case()
  with pytest.raises(InputError, match="5 label names"):
    metrics.evaluate_predictions(y, probs, label_names=NAMES[:5])


def test_format_report_shows_baseline_ratio_and_sorted_aligned_table():
  y, probs = _probs_case()
  result = metrics.evaluate_predictions(y, probs, label_names=NAMES)
  report = metrics.format_report(result)
  assert f"Macro AP {result['macro_ap']:.4f}" in report
  assert f"random baseline {result['random_baseline_ap']:.4f}" in report
  assert f"ratio {result['macro_ap_over_baseline']:.2f}x" in report
  assert "top-5 (macro)" in report and "rest (macro)" in report and "Labels per image" in report
  lines = report.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("label "))
  table = lines[header:]
  assert len({len(line) for line in table}) == 1  # aligned
  supports = [int(line.split()[-8]) for line in table[1:]]
  assert supports == sorted(supports, reverse=True)
  assert table[1].startswith("Everywhere") and table[-1].startswith("Absent")
  assert "n/a" in table[-1]


def test_streaming_equals_in_memory():
  y, probs = _probs_case(seed=2, num_images=301)
  probs64 = probs.astype(np.float64) + 1e-9  # stored as float32, so compare against the float32 copy
  stream = metrics.StreamingLabelScores(len(NAMES), initial_capacity=8)
  for start, stop in [(0, 5), (5, 5), (5, 100), (100, 101), (101, 301)]:
    stream.add(y[start:stop], probs64[start:stop])
  assert len(stream) == 301
  assert stream.y_true.dtype == np.uint8 and stream.probs.dtype == np.float32
  kwargs = dict(label_names=NAMES, thresholds=np.linspace(0.3, 0.6, len(NAMES)),
                train_frequencies=[1, 2, 3, 4, 5, 6])
  expected = metrics.evaluate_predictions(y, probs64.astype(np.float32), **kwargs)
  assert stream.evaluate(**kwargs) == expected


def test_streaming_rejects_bad_batches():
  stream = metrics.StreamingLabelScores(2)
  with pytest.raises(ValueError, match="expected 2"):
    stream.add(np.zeros((3, 3)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match="0 and 1"):
    stream.add(np.full((3, 2), 0.7), np.zeros((3, 2)))
  assert len(stream) == 0
