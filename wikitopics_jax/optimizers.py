"""Optimisers and learning-rate schedules from the config (`config.optimizer`, `config.schedule`)."""

from __future__ import annotations

import ml_collections
import optax

from wikitopics_jax.errors import InputError
from wikitopics_jax.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@SCHEDULES.register("constant")
def _constant(learning_rate: float, total_steps: int, warmup_steps: int = 0):
  del total_steps
  if warmup_steps:
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.constant_schedule(learning_rate)


@SCHEDULES.register("cosine")
def _cosine(learning_rate: float, total_steps: int, warmup_steps: int = 0, end_fraction: float = 0.0):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
      end_value=learning_rate * end_fraction)


@SCHEDULES.register("step")
def _step(learning_rate: float, total_steps: int, warmup_steps: int = 0, decay_factor: float = 0.1,
          decay_at_fractions: tuple[float, ...] = (0.5, 0.75)):
  boundaries = {int(f * total_steps): decay_factor for f in decay_at_fractions}
  decay = optax.piecewise_constant_schedule(learning_rate, boundaries)
  if not warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay],
                              [warmup_steps])


@OPTIMIZERS.register("adam")
def _adam(schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
  # eps=1e-7 is Keras's default, which the thesis used.
  return optax.adam(schedule, b1=b1, b2=b2, eps=eps)


@OPTIMIZERS.register("adamw")
def _adamw(schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7, weight_decay: float = 1e-4):
  return optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def _sgd(schedule, momentum: float = 0.9, nesterov: bool = False):
  return optax.sgd(schedule, momentum=momentum, nesterov=nesterov)


def make_schedule(schedule_cfg: ml_collections.ConfigDict, *, learning_rate: float, total_steps: int):
  kwargs = dict(schedule_cfg)
  name = kwargs.pop("name", "constant")
  return SCHEDULES.build(name, kwargs, key_prefix="config.schedule", learning_rate=learning_rate,
                         total_steps=total_steps)


def make_optimizer(optimizer_cfg: ml_collections.ConfigDict, schedule_cfg: ml_collections.ConfigDict, *,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  kwargs = dict(optimizer_cfg)
  name = kwargs.pop("name", "adam")
  learning_rate = kwargs.pop("learning_rate", None)
  if learning_rate is None or learning_rate <= 0:
    raise InputError(f"config.optimizer.learning_rate must be > 0, got {learning_rate}")
  schedule = make_schedule(schedule_cfg, learning_rate=learning_rate, total_steps=total_steps)
  grad_clip_norm = kwargs.pop("grad_clip_norm", None)
  tx = OPTIMIZERS.build(name, kwargs, key_prefix="config.optimizer", schedule=schedule)
  if grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx, schedule
