r"""Command line of the benchmarks (absl flags).

  python -m wikitopics_jax.bench [--suites=train_step,losses] [--tiny] [--out=bench.json]
      [--markdown_out=bench.md] [--profile_dir=DIR] [--bench_mode=auto|cpu|accelerator]
      [--notorch_compile]

Prints the results as a markdown table and writes them, with the machine and versions, as JSON.
`run_from_flags()` is the entry point for another absl program (the `wikitopics bench` command).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging

from wikitopics_jax import host_allocator
from wikitopics_jax.bench import runner

_SUITES = flags.DEFINE_list("suites", None, "Suites to run, in order (default: all: "
                            f"{','.join(runner.SUITE_ORDER)}).")
_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes and few repeats: checks that every suite runs "
                          "(seconds to a minute each); the figures mean nothing.")
_MARKDOWN_OUT = flags.DEFINE_string("markdown_out", None, "Also write the markdown table there.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", None, "Trace the timed steps of train_step into DIR with jax.profiler (view with "
    "`xprof --logdir DIR` or TensorBoard). Tracing slows the steps: do not publish profiled figures.")
_MODE = flags.DEFINE_enum(
    "bench_mode", "auto", ["auto", "cpu", "accelerator"],
    "Model suite settings: 'cpu' (B0 fp32 vs PyTorch on CPU), 'accelerator' (B0/B2 bf16, batch 256, "
    "MFU) or 'auto' (accelerator when jax.default_backend() != 'cpu').")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", True, "Include torch.compile baselines on CPU "
                                   "(slow to compile on a small CPU).")
# The flags of `wikitopics bench` besides --out, which each entry point defines itself
# (wikitopics_jax/main.py refuses the other commands' flags there).
FLAG_NAMES = ("suites", "tiny", "markdown_out", "profile_dir", "bench_mode", "torch_compile")
_DEFAULT_JAX_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "wikitopics_jax", "xla")


def run_from_flags(out: str | None = None) -> dict[str, Any]:
  """Runs the suites the flags name, prints the table, writes the JSON to `out` (default
  bench.json); returns the report."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Grain and Orbax log at INFO.
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    # Compilation is outside the timed runs; the cache only makes the next run start sooner.
    jax.config.update("jax_compilation_cache_dir", _DEFAULT_JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  runner.load_suites()
  names = _SUITES.value or list(runner.SUITE_ORDER)
  for name in names:
    runner.SUITES.get(name)  # Lists the valid names on a typo, before anything runs.
  mode = _MODE.value
  if mode == "auto":
    mode = "cpu" if jax.default_backend() == "cpu" else "accelerator"
  ctx = runner.Context(tiny=_TINY.value, profile_dir=_PROFILE_DIR.value, mode=mode,
                       torch_compile=_TORCH_COMPILE.value,
                       log=lambda message: print(message, flush=True))
  report = runner.run_suites(names, ctx)
  table = runner.markdown_table(report)
  print("\n" + table + "\n", flush=True)
  out = out or "bench.json"
  runner.write_json(report, out)
  if _MARKDOWN_OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_MARKDOWN_OUT.value)), exist_ok=True)
    with open(_MARKDOWN_OUT.value, "w") as f:
      f.write(table + "\n")
  print(f"Wrote {os.path.abspath(out)}", flush=True)
  if ctx.profile_dir:
    print(f"Profile: xprof --logdir {ctx.profile_dir}  (or tensorboard --logdir {ctx.profile_dir})")
  return report


def main(argv: list[str], *, out: str | None = None) -> None:
  host_allocator.apply_flag()  # Before JAX starts its threads.
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  report = run_from_flags(out)
  if report["failed"]:
    sys.exit(1)
