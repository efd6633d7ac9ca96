"""Suite `metrics`: average precision of 1,000,000 x 31 predictions, ours vs scikit-learn.

Two rows. Macro: `metrics.average_precision` against a loop of `sklearn.metrics.average_precision_score`
over the columns, the usual way to get per-class AP. Micro: `metrics.micro_average_precision` against
`average_precision_score` on the raveled (31,000,000,) arrays, which is what average='micro' computes.
Ours sorts score values (no argsort) on one thread per core; each row also times ours on one thread,
in the same alternating rounds, so that the speedup of the method can be told from that of the cores.
Labels have WIT's frequencies (floored at 1e-4 so every label has positives); scores are noisy
functions of the labels, so the APs are realistic and not all 1.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from wikitopics_jax.eval import metrics
from wikitopics_jax.data import synthetic
from wikitopics_jax.bench import runner

SUITE = "metrics"
# Warm-ups run on this many images: a full-size sklearn micro AP takes half a minute and warms nothing
# that a small call does not.
WARMUP_IMAGES = 10_000


def labels_and_scores(num_images: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  freqs = np.array([max(c / synthetic.WIT_SAMPLE_SIZE, 1e-4) for c in synthetic.WIT_FLAT_COUNTS.values()])
  y = rng.random((num_images, freqs.size), dtype=np.float32) < freqs
  scores = rng.random((num_images, freqs.size), dtype=np.float32) + 0.5 * y
  return y, scores


@contextlib.contextmanager
def _one_thread():
  # metrics has no public thread setting; raising its size floor keeps every call on the caller's thread.
  saved = metrics._PARALLEL_MIN_ELEMENTS  # pylint: disable=protected-access
  metrics._PARALLEL_MIN_ELEMENTS = np.iinfo(np.int64).max  # pylint: disable=protected-access
  try:
    yield
  finally:
    metrics._PARALLEL_MIN_ELEMENTS = saved  # pylint: disable=protected-access


def _sklearn_macro(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "No positive class found" for labels without positives.
    return np.array([average_precision_score(y[:, j], scores[:, j]) for j in range(y.shape[1])])


def _sklearn_micro(y: np.ndarray, scores: np.ndarray) -> float:
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  return float(average_precision_score(y.ravel(), scores.ravel()))


def _compare(ctx: runner.Context, measured: str, ours_name: str, ours_fn, baseline_name: str,
             baseline_fn, y: np.ndarray, scores: np.ndarray, *, threads: int, repeats: int,
             sklearn_available: bool) -> runner.Row:
  """Times ours (all threads), ours on one thread and the baseline in alternating rounds."""
  small = (y[:WARMUP_IMAGES], scores[:WARMUP_IMAGES])
  results = {}

  def candidate(name, fn, wrap=contextlib.nullcontext):
    def run():
      with wrap():
        results[name] = fn(y, scores)

    def warmup():
      with wrap():
        fn(*small)

    return runner.Candidate(name, run, warmup=warmup)

  candidates = [candidate("ours", ours_fn), candidate("ours_one_thread", ours_fn, _one_thread)]
  if sklearn_available:
    candidates.append(candidate("sklearn", baseline_fn))
  stats = runner.measure_alternating(candidates, repeats=repeats, unit="s",
                                     on_failure=lambda c, why: ctx.skip(SUITE, c.name, why))
  row = runner.Row(SUITE, measured, ours_name, "s", stats["ours"][0], note=f"ours on {threads} threads",
                   extra={"num_images": int(y.shape[0]), "num_labels": int(y.shape[1]), "threads": threads})
  one_thread = stats.get("ours_one_thread", (None,))[0]
  if one_thread is not None:
    row.note += f"; on one thread {runner.format_figure(_stats_json(one_thread))} s"
    row.extra["one_thread_stats"] = _stats_json(one_thread)
  if "sklearn" in stats:
    row.baseline, row.baseline_stats = baseline_name, stats["sklearn"][0]
    if one_thread is not None:
      row.extra["one_thread_speedup"] = row.baseline_stats.median / one_thread.median
    # Labels without positives: NaN in ours, 0 (with a warning) in scikit-learn.
    difference = np.asarray(results["ours"]) - np.asarray(results["sklearn"])
    row.extra["ap_max_abs_diff"] = float(np.nanmax(np.abs(difference)))
  return row


def _stats_json(stats: runner.Stats) -> dict:
  return {"median": stats.median, "low": stats.low, "high": stats.high, "repeats": stats.repeats,
          "spread_percent": stats.spread_percent}


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  num_images = 10_000 if ctx.tiny else 1_000_000
  repeats = 2 if ctx.tiny else 3
  y, scores = labels_and_scores(num_images, seed=0)
  try:
    import sklearn.metrics  # pylint: disable=g-import-not-at-top,unused-import
    sklearn_available = True
  except ImportError as e:
    ctx.skip(SUITE, "scikit-learn baselines", f"scikit-learn is not installed ({e})")
    sklearn_available = False
  num_labels = y.shape[1]
  cpus = metrics._available_cpus()  # pylint: disable=protected-access
  macro = _compare(
      ctx, f"per-label AP (then macro), {num_images:,} x {num_labels} float32 scores",
      "metrics.average_precision", metrics.average_precision,
      "sklearn average_precision_score per column", _sklearn_macro, y, scores,
      threads=min(cpus, num_labels), repeats=repeats,
      sklearn_available=sklearn_available)
  micro = _compare(
      ctx, f"micro AP, {num_images:,} x {num_labels} float32 scores ({y.size:,} pairs)",
      "metrics.micro_average_precision", metrics.micro_average_precision,
      "sklearn average_precision_score on the raveled arrays", _sklearn_micro, y, scores,
      threads=cpus, repeats=repeats, sklearn_available=sklearn_available)
  return [macro, micro]
