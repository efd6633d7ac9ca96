"""Optimisers and learning-rate schedules from the config (`config.optimizer`, `config.schedule`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


class ParamsEmaState(NamedTuple):
  """Exponential moving average of the parameters *after* each update (zero-initialised)."""
  count: jax.Array
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps an EMA of the parameters in the optimiser state; passes the updates through unchanged.

  Chained last, it sees the final updates, so it tracks exactly the parameters the model will hold.
  The average starts at zero and is debiased when read (`ema_params`), so early reads are a proper
  weighted mean of the parameters seen so far instead of being pulled towards zero.
  """
  if not 0.0 < decay < 1.0:
    raise InputError(f"config.ema.decay must be in (0, 1) or 0 (off), got {decay}")

  def init(params):
    return ParamsEmaState(count=jnp.zeros([], jnp.int32),
                          ema=jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("params_ema needs the parameters (optax update(..., params))")
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
                       state.ema, new_params)
    return updates, ParamsEmaState(count=state.count + 1, ema=ema)

  return optax.GradientTransformation(init, update)


def find_params_ema(opt_state) -> ParamsEmaState | None:
  """The ParamsEmaState inside an optimiser state (a chain's), or None if EMA is off."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEmaState))
           if isinstance(x, ParamsEmaState)]
  return found[0] if found else None


def ema_params(opt_state, params, decay: float):
  """Debiased EMA of `params` (same structure); the raw params before the first update."""
  state = find_params_ema(opt_state)
  if state is None:
    raise ValueError("the optimiser state holds no parameter EMA (config.ema.decay is 0)")
  correction = 1.0 - jnp.asarray(decay, jnp.float32) ** state.count.astype(jnp.float32)
  return jax.tree.map(
      lambda e, p: jnp.where(state.count > 0, e / jnp.maximum(correction, 1e-12), p).astype(p.dtype),
      state.ema, params)


def make_schedule(schedule_cfg: ml_collections.ConfigDict, *, learning_rate: float, total_steps: int):
  kwargs = dict(schedule_cfg)
  name = kwargs.pop("name", "constant")
  return SCHEDULES.build(name, kwargs, key_prefix="config.schedule", learning_rate=learning_rate,
                         total_steps=total_steps)


def make_optimizer(optimizer_cfg: ml_collections.ConfigDict, schedule_cfg: ml_collections.ConfigDict, *,
                   total_steps: int, ema_decay: float = 0.0
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser (with gradient clipping first and the parameter EMA last, if configured)."""
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
  if ema_decay:
    tx = optax.chain(tx, params_ema(ema_decay))
  return tx, schedule
