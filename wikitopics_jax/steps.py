"""The jit-compiled train and eval steps (functional: state in, state out; the state is donated)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wikitopics_jax import optimizers
from wikitopics_jax import pipeline


def make_train_step(task, *, state_sharding, batch_sharding, replicated_sharding,
                    skip_nonfinite: bool = False):
  """Returns jitted `(state, batch) -> (state, metrics)`; the input state's buffers are donated.

  metrics["finite"] says whether loss, gradient norm and updated parameters were finite. With `skip_nonfinite`, a step
  whose update is not finite leaves the state unchanged (the step counter included).
  """
  graphdef = task.train_graphdef
  objective = task.objective
  schedule = task.schedule

  def train_step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, Any]]:
    # The input values, captured before merge: the update may mutate variables in place.
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    images = pipeline.normalize_images(batch["image"], model.input_normalization)
    labels = batch["labels"].astype(jnp.float32)

    def loss_fn(model):
      logits = model(images)
      return objective(logits, labels)

    # Gradients of the trainable Params only (config.trainable_layers; frozen ones get none).
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model)
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
    logits = model(pipeline.normalize_images(batch["image"], model.input_normalization))
    labels = batch["labels"].astype(jnp.float32)
    return {"probs": objective.probabilities(logits),
            "loss": objective.per_example(logits, labels)}

  return jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=batch_sharding)
