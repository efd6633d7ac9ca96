"""Benchmarks of this codebase against baselines measured side by side (`python -m wikitopics_jax.bench`).

Importing the package registers every suite in `runner.SUITES`; see docs/benchmarks.md.
"""

from wikitopics_jax.bench import runner
# Each suite module registers its suites on import.
from wikitopics_jax.bench import model_suites  # noqa: F401  ("train_step", "inference")
from wikitopics_jax.bench import pipeline_suite  # noqa: F401  ("pipeline")
from wikitopics_jax.bench import losses_suite  # noqa: F401  ("losses")
from wikitopics_jax.bench import metrics_suite  # noqa: F401  ("metrics")
from wikitopics_jax.bench import resampling_suite  # noqa: F401  ("resampling")

SUITE_ORDER = ("train_step", "inference", "pipeline", "losses", "metrics", "resampling")
