"""Suite `resampling`: the thesis's heuristic under/oversampling on 3,000,000 x 31 labels.

Labels are independent per label with WIT's flat frequencies (`synthetic.WIT_FLAT_COUNTS`: count / 390,000,
floored at 1e-5). Ours: `heuristic_undersample` (keep 80%) and `heuristic_oversample` (add 20%) on all
images. Baseline: the literal pseudo-code (`literal_heuristic_*`), which takes O(N L) per step for
O(N) steps, i.e. O(N^2); on 3M images that is days, so it is timed on a subset and extrapolated as
t(N) = t(n) * (N / n)^2 (labelled "extrapolated" in the table). A second row per method compares both
on the subset, measured, and checks they choose the same images.
"""

from __future__ import annotations

import numpy as np

from wikitopics_jax.data import resampling
from wikitopics_jax.data import synthetic
from wikitopics_jax.bench import runner

SUITE = "resampling"
MIN_FREQUENCY = 1e-5
METHODS = (
    ("undersampling, keep 80%", resampling.heuristic_undersample,
     resampling.literal_heuristic_undersample, {"keep_fraction": 0.8}),
    ("oversampling, add 20%", resampling.heuristic_oversample,
     resampling.literal_heuristic_oversample, {"extra_fraction": 0.2}),
)


def wit_like_labels(num_images: int, *, seed: int, chunk: int = 1 << 20) -> np.ndarray:
  freqs = np.array([max(c / synthetic.WIT_SAMPLE_SIZE, MIN_FREQUENCY)
                    for c in synthetic.WIT_FLAT_COUNTS.values()], np.float32)
  rng = np.random.default_rng(seed)
  y = np.empty((num_images, freqs.size), bool)
  for start in range(0, num_images, chunk):  # Bounded float32 scratch memory.
    stop = min(start + chunk, num_images)
    y[start:stop] = rng.random((stop - start, freqs.size), dtype=np.float32) < freqs
  return y


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  num_images = 30_000 if ctx.tiny else 3_000_000
  subset = 1_000 if ctx.tiny else 10_000
  y = wit_like_labels(num_images, seed=0)
  y_subset = y[:subset]
  rows = []
  for what, fast, literal, params in METHODS:
    full = runner.measure_alternating(
        [runner.Candidate("fast", lambda fast=fast, params=params: fast(y, **params),
                          warmup=lambda fast=fast, params=params: fast(y_subset, **params))],
        repeats=1 if ctx.tiny else 3, unit="s")["fast"][0]
    on_subset = runner.measure_alternating(
        [runner.Candidate("fast", lambda fast=fast, params=params: fast(y_subset, **params)),
         runner.Candidate("literal", lambda literal=literal, params=params: literal(y_subset, **params))],
        repeats=2 if ctx.tiny else 3, unit="s")
    literal_subset = on_subset["literal"][0]
    same = bool(np.array_equal(fast(y_subset, **params), literal(y_subset, **params)))
    extra = {"num_images": num_images, "subset": subset, "num_labels": int(y.shape[1]),
             "same_result_on_subset": same}
    rows.append(runner.Row(
        SUITE, f"heuristic {what}, {num_images:,} x {y.shape[1]} labels", "fast (label-vector groups)",
        "s", full, baseline="literal pseudo-code",
        baseline_stats=literal_subset.scaled((num_images / subset) ** 2, extrapolated=True),
        note=f"literal extrapolated from {subset:,} images as O(N^2): t(N) = t(n) * (N/n)^2",
        extra=extra))
    rows.append(runner.Row(
        SUITE, f"heuristic {what}, {subset:,} x {y.shape[1]} labels (subset)",
        "fast (label-vector groups)", "s", on_subset["fast"][0], baseline="literal pseudo-code",
        baseline_stats=literal_subset, note="same result" if same else "RESULTS DIFFER",
        extra=extra))
  return rows
