"""The thesis prototype's stack as a benchmark baseline: TF-Keras EfficientNet-B0.

`KerasStep` runs the same work as `model_suites.OurStep` and `TorchStep`: scale a uint8 NHWC batch
(Keras's own Rescaling and Normalization input layers, inside the model), the B0 base of
`keras.applications` with global average pooling, Dense(num_labels) logits, and for training BCE on
the logits and one Adam step (learning rate 1e-3, Keras's epsilon 1e-7); for inference the logits.
It uses `train_on_batch` / `predict_on_batch` in graph mode without XLA (`jit_compile=False`, the
TF-Keras default the thesis trained with; XLA's CPU backend is what the shifted depthwise
convolution works around). TensorFlow's intra-op threads get the same cores as the other sides.
Optional: `pip install -e '.[bench-keras]'`.
"""

from __future__ import annotations

import os

import numpy as np

# keras.applications only builds the B0 of the paper; the tiny test variants have no Keras twin.
KERAS_MODELS = {"efficientnet_b0": "EfficientNetB0"}


def keras_or_reason(threads: int):
  """(keras module, None), or (None, why not) when TensorFlow/Keras cannot be imported."""
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"TensorFlow is not installed ({e}); `pip install -e .[bench-keras]`"
  if keras.backend.backend() != "tensorflow":
    return None, f"KERAS_BACKEND is {keras.backend.backend()!r}, not 'tensorflow'"
  try:  # Only possible before TensorFlow's runtime starts; later calls raise.
    tf.config.threading.set_intra_op_parallelism_threads(threads)
  except RuntimeError:
    pass
  return keras, None


class KerasStep:
  """One train or inference step of Keras's B0 with a Dense head, on a fixed batch."""

  def __init__(self, keras, *, model: str, train: bool, batch: dict[str, np.ndarray],
               num_labels: int, expected_params: int, learning_rate: float, adam_epsilon: float,
               steps_per_run: int):
    if model not in KERAS_MODELS:
      raise ValueError(f"no keras.applications twin of {model} (only {sorted(KERAS_MODELS)})")
    images = batch["image"]
    base = getattr(keras.applications, KERAS_MODELS[model])(
        weights=None, include_top=False, input_shape=images.shape[1:], pooling="avg")
    logits = keras.layers.Dense(num_labels)(base.output)
    self.model = keras.Model(base.input, logits)
    params = sum(int(np.prod(w.shape)) for w in self.model.trainable_weights)
    if params != expected_params:
      raise AssertionError(f"Keras {model} has {params:,} trainable parameters, ours "
                           f"{expected_params:,}: not the same architecture")
    self.model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate, epsilon=adam_epsilon),
        loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=False)
    self.images = images.astype(np.float32)  # Keras's Rescaling layer takes 0-255 pixels.
    self.labels = batch["labels"].astype(np.float32)
    self.train = train
    self.steps_per_run = steps_per_run

  def run(self) -> None:
    for _ in range(self.steps_per_run):
      if self.train:
        self.model.train_on_batch(self.images, self.labels)
      else:
        self.model.predict_on_batch(self.images)
