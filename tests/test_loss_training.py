"""Every registered loss trains the model end to end (a few steps, tiny model, real trainer)."""

import json
import math
import os
import sys

import pytest

from tests import datasets
from wikitopics_jax import losses
from wikitopics_jax import trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("loss_training") / "data")
  datasets.make_dataset(d, sizes={"train": 64, "val": 32, "threshold": 32, "test": 32}, image_size=32)
  return d


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_trains_and_evaluates(tmp_path, data_dir, name):
  config = tiny.get_config(data_dir)
  config.loss.name = name
  config.num_train_steps = 3
  config.mesh.num_devices = 1
  result = trainer.train_and_evaluate(config, str(tmp_path / name))
  with open(tmp_path / name / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  train_losses = [r["loss"] for r in rows if "loss" in r]
  assert len(train_losses) == 3 and all(math.isfinite(l) for l in train_losses)
  assert 0.0 <= result["macro_ap"] <= 1.0
  if name == "chmcnn":
    # Max-constraint probabilities under one threshold never violate the hierarchy.
    assert result["hierarchy_violation_rate"] == 0.0
