"""Every registered loss trains the model: the trainer's own jitted train step, tiny model."""

import math
import os
import sys

import jax
import numpy as np
import pytest

from tests import datasets
from wikitopics_jax import losses
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax import sharding
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib
from wikitopics_jax import trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("loss_training") / "data")
  datasets.make_dataset(d, sizes={"train": 64, "val": 16}, image_size=32)
  return d


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_trains(data_dir, name):
  config = tiny.get_config(data_dir)
  config.loss = losses.config(name)
  config.batch_size = 16
  manifest = manifest_lib.read(data_dir)
  task = task_lib.build(config, manifest, total_steps=4)
  mesh = sharding.make_mesh(1)
  placement = sharding.Placement(mesh, task.state)
  train_step = steps.make_train_step(task, state_sharding=placement.state,
                                     batch_sharding=placement.batch,
                                     replicated_sharding=placement.replicated)
  state = sharding.put_replicated(task.state, placement.replicated)
  batches = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=True))
  # The same batch four times: the loss must go down on it.
  batch = sharding.global_batch(next(batches), mesh)
  values = []
  for _ in range(4):
    state, metrics = train_step(state, batch)
    values.append(float(metrics["loss"]))
    assert bool(metrics["finite"])
  assert all(math.isfinite(v) for v in values)
  assert values[-1] < values[0], values
  probs = task.objective.probabilities(jax.numpy.zeros((2, manifest.taxonomy.num_labels)))
  assert np.all((np.asarray(probs) >= 0) & (np.asarray(probs) <= 1))
