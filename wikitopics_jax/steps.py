"""The jit-compiled train and eval steps (functional: state in, state out; the state is donated)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wikitopics_jax import pipeline


def make_train_step(task, *, state_sharding, batch_sharding, replicated_sharding):
  graphdef = task.train_graphdef
  objective = task.objective
  schedule = task.schedule

  def train_step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, Any]]:
    model, optimizer = nnx.merge(graphdef, state)
    images = pipeline.normalize_images(batch["image"])
    labels = batch["labels"].astype(jnp.float32)

    def loss_fn(model):
      logits = model(images)
      return objective(logits, labels)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    step = optimizer.step[...]
    optimizer.update(model, grads)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(nnx.state(model, nnx.Param)),
        "learning_rate": schedule(step),
    }
    return nnx.state((model, optimizer)), metrics

  return jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding), donate_argnums=(0,))


def make_eval_step(task, *, state_sharding, batch_sharding):
  graphdef = task.eval_graphdef
  objective = task.objective

  def eval_step(state: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model, _ = nnx.merge(graphdef, state)
    logits = model(pipeline.normalize_images(batch["image"]))
    labels = batch["labels"].astype(jnp.float32)
    return {"probs": objective.probabilities(logits),
            "loss": objective.per_example(logits, labels)}

  return jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=batch_sharding)
