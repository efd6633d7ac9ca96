"""Test set-up: 8 fake CPU devices (so sharding code runs here), fast-compile XLA flags and a
persistent XLA cache; the tests of one file on one xdist worker, longest files first."""

import os

import tests

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", tests.xla_flags(8))
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

# The tests of one file run on one xdist worker (`--dist loadfile` in pyproject.toml), which then
# computes the file's shared fixtures once (a session fixture is computed by every worker that runs a
# test needing it). xdist's `loadgroup` would also keep the files sharing tests/trained_runs.py's
# tiny run together, but its groups are lost under pytest 9 (it renames items through an attribute
# pytest 9 no longer reads); at worst that run is made twice, once per worker, the second time from
# the persistent compilation cache.
#
# The longest files start first, so the workers end together instead of one finishing a
# multi-minute test alone at the end (cold-cache durations, docs/testing.md).
_FIRST = ("test_bench.py", "test_multimodal.py", "test_resilience.py", "test_evaluators.py",
          "test_report.py", "test_predict.py", "test_models.py", "test_preemption.py",
          "test_batchnorm.py", "test_text_towers.py", "test_training.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(_FIRST)))
