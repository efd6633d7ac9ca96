"""A second model family, registered as "toy_convnet", for the tests of the training machinery.

Resume, preemption, device-count invariance and the losses are properties of the trainer, the
checkpoints and the input pipeline, not of the EfficientNet; this model has every kind of state
they carry (Params, BatchNorm statistics, a dropout RNG stream) and compiles in seconds, where
efficientnet_tiny takes tens of seconds per program. `WIKITOPICS_SLOW_TESTS=1` runs those tests on
efficientnet_tiny instead (`training_model()`). It is also the proof that a model family plugs in
through the registry and `set_trainable_layers` alone, with no edit to task.py.

Importing this module registers the model; the test config `tests/toy_config.py` imports it, so a
`wikitopics train --config=tests/toy_config.py:DATA` subprocess has it too.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from wikitopics_jax import models
from wikitopics_jax.errors import InputError

NAME = "toy_convnet"


class ToyConvNet(nnx.Module):
  """Three 3x3 conv + BatchNorm + swish blocks, global average pooling, dropout, a linear head."""

  def __init__(self, *, num_labels: int, dropout_rate: float, rngs: nnx.Rngs):
    self.input_normalization = None  # Pixels scaled to [0, 1] by the train and eval steps.
    self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.conv3 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.head = nnx.Linear(32, num_labels, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.swish(self.bn1(self.conv1(x)))
    x = jax.nn.swish(self.bn2(self.conv2(x)))
    x = jax.nn.swish(self.bn3(self.conv3(x)))
    return self.head(self.dropout(x.mean(axis=(1, 2))))

  def set_trainable_layers(self, num_layers: int | None):
    if num_layers is not None:
      raise InputError(f"trainable_layers={num_layers}: {NAME} has no layer groups; use None")
    return nnx.Param


@models.MODELS.register(NAME)
def _build(cfg, *, num_labels: int, rngs: nnx.Rngs) -> ToyConvNet:
  return ToyConvNet(num_labels=num_labels, dropout_rate=0.2 if cfg.dropout_rate is None else cfg.dropout_rate,
                    rngs=rngs)


def training_model() -> str:
  """The model of the training-machinery tests: the toy, or efficientnet_tiny with slow tests on."""
  return "efficientnet_tiny" if os.environ.get("WIKITOPICS_SLOW_TESTS") else NAME
