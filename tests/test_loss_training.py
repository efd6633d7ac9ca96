"""Every registered loss trains a model through the trainer's own jitted train step (the task built
from the config, as `train` builds it), on the toy model of tests/toy_model.py: the losses see only
logits, and the EfficientNet's own training is tests/test_training.py's."""

import math

import jax
import numpy as np
import pytest

from tests import datasets
from tests import toy_config
from wikitopics_jax import losses
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax import sharding
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("loss_training") / "data")
  datasets.make_dataset(d, sizes={"train": 64, "val": 16}, image_size=32)
  return d


@pytest.mark.parametrize("name", losses.names())
def test_every_loss_trains(data_dir, name):
  config = toy_config.get_config(data_dir)
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
