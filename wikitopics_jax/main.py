r"""Command line: `wikitopics <command> [flags]` (or `python -m wikitopics_jax.main <command>`).

Commands:
  train     --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  evaluate  --workdir=DIR [--checkpoint=best|latest|STEP] [--split=test]
  generate  --data_dir=DIR [--num_images=20000 --image_size=64 --seed=0 --label_noise=0]

Bad input (a missing file, an unknown label, a wrong config key) prints one line naming it and exits 2.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "evaluate: 'best', 'latest' or a step number.")
_SPLIT = flags.DEFINE_string("split", "test", "evaluate: which split of the dataset.")
_THRESHOLDS = flags.DEFINE_string(
    "thresholds", "saved", "evaluate: 'saved' (tuned thresholds of this checkpoint, else 0.5), a "
    "number in (0, 1), or a thresholds JSON file.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "generate: output dataset directory.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 20000, "generate: number of images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "generate: image side in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: random seed.")
_LABEL_NOISE = flags.DEFINE_float("label_noise", 0.0, "generate: label noise rate.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "wikitopics_jax", "xla"),
    "Persistent XLA compilation cache ('' disables).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). On Cloud TPU and SLURM the "
    "cluster is detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

COMMANDS = ("train", "evaluate", "generate")


def _require(flag, name: str, command: str):
  if flag.value is None:
    raise app.UsageError(f"{command} needs --{name}")
  return flag.value


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: wikitopics {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  command = argv[1]
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    # Orbax and Grain log every save and read at INFO; our progress lines go to stdout.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if _JAX_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)

  if command == "generate":
    from wikitopics_jax import synthetic  # pylint: disable=g-import-not-at-top
    out = _require(_DATA_DIR, "data_dir", command)
    manifest = synthetic.generate(out, num_images=_NUM_IMAGES.value, image_size=_IMAGE_SIZE.value,
                                  seed=_SEED.value, label_noise=_LABEL_NOISE.value)
    print(f"{out}: " + ", ".join(f"{k} {v.num_examples}" for k, v in manifest.splits.items()))
  elif command == "train":
    from wikitopics_jax import trainer  # pylint: disable=g-import-not-at-top
    config = _require(_CONFIG, "config", command)
    trainer.train_and_evaluate(config, _require(_WORKDIR, "workdir", command))
  elif command == "evaluate":
    from wikitopics_jax import evaluate_job  # pylint: disable=g-import-not-at-top
    evaluate_job.evaluate(_require(_WORKDIR, "workdir", command), checkpoint=_CHECKPOINT.value,
                          split=_SPLIT.value, config_override=_CONFIG.value,
                          thresholds=_THRESHOLDS.value)


def main(argv: list[str]) -> None:
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  try:
    _main(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # trainer.NonFiniteError: the message names step and quantity
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
