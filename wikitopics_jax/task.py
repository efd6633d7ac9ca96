"""What a training or evaluation job is made of, built from the config and the dataset's manifest.

The model is split once (`nnx.split`) into a train-mode and an eval-mode graph definition that share one
state; jitted steps `nnx.merge` inside. The loss's class statistics and the hierarchy matrix come from
the dataset manifest, so the matrix is always in the label order the data was built with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from wikitopics_jax import losses
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax import models
from wikitopics_jax import optimizers
from wikitopics_jax.models import multimodal
from wikitopics_jax.models import pretrained
from wikitopics_jax.errors import InputError


@dataclasses.dataclass
class Task:
  train_graphdef: Any
  eval_graphdef: Any
  state: nnx.State            # (model, optimizer) state, on host until placed on the mesh
  objective: Any              # losses.Objective
  schedule: optax.Schedule
  num_labels: int
  label_names: tuple[str, ...]
  num_params: int
  num_trainable_params: int = 0  # Params the optimiser updates (all unless config.trainable_layers).
  ema_decay: float = 0.0         # > 0: the optimiser state keeps an EMA of the trainable Params.


def objective_for(config: ml_collections.ConfigDict, manifest: manifest_lib.Manifest):
  hierarchical = bool(config.data.hierarchical)
  train = manifest.splits.get(config.data.train_split)
  positives = None if train is None else train.positives(hierarchical)
  num_examples = None if train is None else train.num_examples
  return losses.from_config(config.loss, positives=positives, num_examples=num_examples,
                            ancestor_matrix=manifest.taxonomy.ancestor_matrix)


def model_config_for(config: ml_collections.ConfigDict, manifest: manifest_lib.Manifest):
  """config.model with image_size taken from the dataset (or checked against it)."""
  model_cfg = ml_collections.ConfigDict(config.model.to_dict())
  height, width, _ = manifest.image_shape
  if height != width:
    raise InputError(f"{config.data.dir}: images are {height}x{width}; models expect square images")
  if model_cfg.image_size is None:
    model_cfg.image_size = height
  elif model_cfg.image_size != height:
    raise InputError(f"config.model.image_size={model_cfg.image_size} but the dataset in "
                     f"{config.data.dir} has {height}x{width} images")
  return model_cfg


def build(config: ml_collections.ConfigDict, manifest: manifest_lib.Manifest, *,
          total_steps: int) -> Task:
  num_labels = manifest.taxonomy.num_labels
  rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
  model = models.create_model(model_config_for(config, manifest), num_labels=num_labels, rngs=rngs,
                              text_cfg=config.get("text"))
  # config.init: ImageNet weights go into the image backbone (a multimodal model's `image`).
  image_model = model.image if isinstance(model, multimodal.MultimodalClassifier) else model
  if image_model is not None:
    pretrained.init_from_config(config, image_model)
  elif config.get("init", "random") != "random":
    raise InputError(f"config.init={config.init!r}: a text-only model (config.text.image=False) has "
                     "no image backbone to initialise")
  # config.trainable_layers: frozen Params get no optimiser state, frozen BatchNorms keep their stats.
  # Every model family implements `set_trainable_layers` (returns the filter of trainable Params).
  trainable = model.set_trainable_layers(config.get("trainable_layers"))
  ema_decay = float(config.get("ema", {}).get("decay", 0.0) or 0.0)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.schedule, total_steps=total_steps,
                                           ema_decay=ema_decay)
  optimizer = nnx.Optimizer(model, tx, wrt=trainable)
  model.eval()
  eval_graphdef, _ = nnx.split((model, optimizer))
  model.train()
  train_graphdef, state = nnx.split((model, optimizer))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return Task(train_graphdef=train_graphdef, eval_graphdef=eval_graphdef, state=state,
              objective=objective_for(config, manifest), schedule=schedule, num_labels=num_labels,
              label_names=manifest.taxonomy.labels, num_params=num_params,
              num_trainable_params=models.count_parameters(model, trainable), ema_decay=ema_decay)
