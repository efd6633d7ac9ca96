"""The jit-compiled train and eval steps (functional: state in, state out; the state is donated)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from wikitopics_jax import optimizers
from wikitopics_jax.data import pipeline
from wikitopics_jax.models import multimodal


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The multimodal model's keyword inputs present in the batch (none for an image-only batch, so
  the image model is called exactly as before)."""
  return {k: batch[k] for k in multimodal.TEXT_INPUTS if k in batch}


def make_train_step(task, *, state_sharding, batch_sharding, replicated_sharding,
                    skip_nonfinite: bool = False, grad_accum_steps: int = 1, augment_fn=None):
  """Returns jitted `(state, batch) -> (state, metrics)`; the input state's buffers are donated.

  metrics["finite"] says whether loss, gradient norm and updated parameters were finite. With `skip_nonfinite`, a step
  whose update is not finite leaves the state unchanged (the step counter included).

  `grad_accum_steps` = k > 1: the batch is split into k micro-batches, run one after the other
  (`lax.scan`, so activations take the memory of one micro-batch), their gradients summed in float32
  and averaged, then one optimiser update. Micro-batch j holds rows j, j + k, ... of every device's
  shard, so each stays spread over all devices without moving data. For a loss that is a mean over
  examples and a model without batch statistics, this is the full batch's gradient up to rounding.
  BatchNorm in training mode normalises each micro-batch by its own statistics, and its running
  statistics are updated once per micro-batch (k times per step). The reported loss is the mean of
  the micro-batch losses.

  `augment_fn(images_uint8, index, is_duplicate) -> images_uint8` (`augment_device.from_augmentations`)
  augments the whole uint8 batch on the device first, keyed by each example's global position.

  Text inputs in the batch (`multimodal.TEXT_INPUTS`: text_ids, text_mask, has_text, has_image) go to
  the model as keywords, split into the micro-batches like the images; augmentation leaves them be.
  """
  graphdef = task.train_graphdef
  objective = task.objective
  schedule = task.schedule
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
  mesh = batch_sharding.mesh
  micro_sharding = NamedSharding(mesh, P(None, *batch_sharding.spec))

  def micro_batches(x: jax.Array) -> jax.Array:
    # (B, ...) -> (k, B / k, ...): row i goes to micro-batch i % k; a device's rows stay on it.
    b = x.shape[0]
    x = jnp.swapaxes(x.reshape(b // grad_accum_steps, grad_accum_steps, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def accumulated_value_and_grad(model, wrt, batch):
    """Mean loss and mean gradient over the micro-batches; model variables (BatchNorm statistics,
    RNG counts) are carried from one micro-batch to the next. Images are converted to float inside
    the loop, one micro-batch at a time."""
    model_graphdef, model_state = nnx.split(model)
    trainable = nnx.state(model, wrt)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

    def body(carry, micro):
      variables, grad_sum, loss_sum = carry
      m = nnx.merge(model_graphdef, variables)
      images = pipeline.normalize_images(micro["image"], m.input_normalization)
      labels = micro["labels"].astype(jnp.float32)
      inputs = model_inputs(micro)
      loss, grads = nnx.value_and_grad(
          lambda m: objective(m(images, **inputs), labels), argnums=nnx.DiffState(0, wrt))(m)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (nnx.state(m), grad_sum, loss_sum + loss.astype(jnp.float32)), None

    (variables, grad_sum, loss_sum), _ = jax.lax.scan(
        body, (model_state, zeros, jnp.zeros((), jnp.float32)),
        {k: micro_batches(batch[k]) for k in ("image", "labels", *model_inputs(batch))})
    nnx.update(model, variables)
    grads = jax.tree.map(lambda g, p: (g / grad_accum_steps).astype(p.dtype), grad_sum, trainable)
    return loss_sum / grad_accum_steps, grads

  def train_step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, Any]]:
    # The input values, captured before merge: the update may mutate variables in place.
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    if augment_fn is not None:
      batch = {**batch, "image": augment_fn(batch["image"], batch["index"], batch["is_duplicate"])}
    # Gradients of the trainable Params only (config.trainable_layers; frozen ones get none).
    if grad_accum_steps == 1:
      images = pipeline.normalize_images(batch["image"], model.input_normalization)
      labels = batch["labels"].astype(jnp.float32)
      inputs = model_inputs(batch)

      def loss_fn(model):
        logits = model(images, **inputs)
        return objective(logits, labels)

      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
    else:
      loss, grads = accumulated_value_and_grad(model, optimizer.wrt, batch)
    step = optimizer.step[...]
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    param_norm = optax.tree.norm(nnx.state(model, nnx.Param))
    # An update can overflow the parameters even when loss and gradients were finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    new_state = nnx.state((model, optimizer))
    if skip_nonfinite:
      new_leaves, treedef = jax.tree.flatten(new_state)
      new_state = jax.tree.unflatten(
          treedef, [jnp.where(finite, new, old) for new, old in zip(new_leaves, old_leaves)])
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "learning_rate": schedule(step),
        "finite": finite,
    }
    return new_state, metrics

  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding), donate_argnums=(0,))


def make_eval_step(task, *, state_sharding, batch_sharding, use_ema: bool = False):
  """Returns jitted `(state, batch) -> {probs, loss}`; `use_ema` evaluates the EMA of the Params
  (with the raw model's BatchNorm statistics, themselves a moving average)."""
  graphdef = task.eval_graphdef
  objective = task.objective
  if use_ema and not task.ema_decay:
    raise ValueError("use_ema needs config.ema.decay > 0")

  def eval_step(state: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model, optimizer = nnx.merge(graphdef, state)
    if use_ema:
      params = nnx.as_pure(nnx.state(model, optimizer.wrt))
      nnx.update(model, optimizers.ema_params(nnx.as_pure(optimizer.opt_state), params,
                                              task.ema_decay))
    logits = model(pipeline.normalize_images(batch["image"], model.input_normalization),
                   **model_inputs(batch))
    labels = batch["labels"].astype(jnp.float32)
    return {"probs": objective.probabilities(logits),
            "loss": objective.per_example(logits, labels)}

  return jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=batch_sharding)
