"""One tiny training run shared by the evaluate, report and predict tests (training costs ~20 s).

A module-level cache rather than a fixture: pytest fixtures cannot be shared between test modules
without conftest.py, and this run is needed by two of them.
"""

from __future__ import annotations

import os

from tests import datasets
from tests.test_training import tiny_config
from wikitopics_jax import trainer

_RUNS: dict[str, tuple[str, str]] = {}
SPLIT_SIZES = {"train": 128, "val": 32, "threshold": 32, "test": 48}
NUM_CHECKPOINTS = 3  # 3 epochs of 4 steps, one checkpoint per epoch, all kept.


def tiny_run(tmp_path_factory) -> tuple[str, str]:
  """(workdir, data_dir) of a finished 3-epoch run with checkpoints at steps 4, 8, 12 and thresholds."""
  if "run" not in _RUNS:
    base = tmp_path_factory.mktemp("tiny_run")
    data_dir = os.path.join(base, "data")
    workdir = os.path.join(base, "run")
    datasets.make_dataset(data_dir, sizes=SPLIT_SIZES, image_size=32)
    config = tiny_config(data_dir, num_epochs=NUM_CHECKPOINTS,
                         **{"checkpoint.keep_latest": NUM_CHECKPOINTS})
    # A second during-training evaluator: its metrics land in metrics.jsonl under its own name.
    config.evals.val_ranking = {"type": "ranking", "split": "val", "during_training": True}
    trainer.train_and_evaluate(config, workdir)
    _RUNS["run"] = (workdir, data_dir)
  return _RUNS["run"]
