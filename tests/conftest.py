"""Test set-up: 8 fake CPU devices (so sharding code runs here) and a persistent XLA cache."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from wikitopics_jax import host_allocator  # pylint: disable=g-import-not-at-top,wrong-import-position

host_allocator.keep_freed_memory()  # As the CLI does, before JAX starts its threads.

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(os.path.expanduser("~"), ".cache", "wikitopics_jax", "xla-tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Grain's worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests that share an expensive module-level run go to one xdist worker (`--dist loadgroup` in
# pyproject.toml), which then computes it once: the benchmark module's tiny run of every suite, and
# the tiny training run of tests/trained_runs.py (a module cache, one per worker).
_GROUPS = {"test_bench.py": "bench_suites", "test_report.py": "tiny_run", "test_predict.py": "tiny_run",
           "test_evaluators.py": "tiny_run"}
# The longest files start first, so the workers end together instead of one finishing a
# multi-minute test alone at the end (cold-cache durations, docs/testing.md).
_FIRST = ("test_preemption.py", "test_bench.py", "test_ema.py", "test_resilience.py", "test_evaluators.py",
          "test_experiments.py", "test_grad_accum.py", "test_loss_training.py", "test_batchnorm.py")


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    group = _GROUPS.get(item.path.name)
    if group:
      item.add_marker(pytest.mark.xdist_group(group))
  rank = {name: i for i, name in enumerate(_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))
