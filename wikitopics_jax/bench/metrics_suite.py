"""Suite `metrics`: macro average precision of 1,000,000 x 31 predictions, ours vs scikit-learn.

Ours: `metrics.average_precision` (one sort per column, vectorised over columns). Baseline: a loop of
`sklearn.metrics.average_precision_score` over the columns, the usual way to get per-class AP. Labels
have WIT's frequencies (floored at 1e-4 so every label has positives); scores are noisy functions of
the labels, so the APs are realistic and not all 1.
"""

from __future__ import annotations

import warnings

import numpy as np

from wikitopics_jax import metrics
from wikitopics_jax import synthetic
from wikitopics_jax.bench import runner

SUITE = "metrics"


def labels_and_scores(num_images: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  freqs = np.array([max(c / synthetic.WIT_SAMPLE_SIZE, 1e-4) for c in synthetic.WIT_FLAT_COUNTS.values()])
  y = rng.random((num_images, freqs.size), dtype=np.float32) < freqs
  scores = rng.random((num_images, freqs.size), dtype=np.float32) + 0.5 * y
  return y, scores


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  num_images = 10_000 if ctx.tiny else 1_000_000
  y, scores = labels_and_scores(num_images, seed=0)
  candidates = [runner.Candidate("ours", lambda: metrics.average_precision(y, scores))]
  try:
    from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    ctx.skip(SUITE, "scikit-learn baseline", f"scikit-learn is not installed ({e})")
    average_precision_score = None

  def sklearn_ap():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "No positive class found" for labels without positives.
      return np.array([average_precision_score(y[:, j], scores[:, j]) for j in range(y.shape[1])])

  if average_precision_score is not None:
    candidates.append(runner.Candidate("sklearn", sklearn_ap))
  stats = runner.measure_alternating(candidates, repeats=2 if ctx.tiny else 3, unit="s",
                                     on_failure=lambda c, why: ctx.skip(SUITE, c.name, why))
  row = runner.Row(SUITE, f"per-label AP (then macro), {num_images:,} x {y.shape[1]} float32 scores",
                   "metrics.average_precision", "s", stats["ours"][0],
                   extra={"num_images": num_images, "num_labels": int(y.shape[1])})
  if "sklearn" in stats:
    row.baseline = "sklearn average_precision_score per column"
    row.baseline_stats = stats["sklearn"][0]
    # Labels without positives: NaN here, 0 (with a warning) in scikit-learn.
    defined = y.any(axis=0)
    difference = metrics.average_precision(y, scores)[defined] - sklearn_ap()[defined]
    row.extra["ap_max_abs_diff"] = float(np.max(np.abs(difference)))
  return [row]
