"""Benchmarks of this codebase against baselines measured side by side (`python -m wikitopics_jax.bench`).

`runner` holds the suite registry, the timing and the report; each `*_suite(s)` module registers its
suites when `runner.load_suites()` imports it. See docs/benchmarks.md.
"""
