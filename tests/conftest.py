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
