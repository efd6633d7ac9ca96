"""Squeeze-and-excitation's two spatial operations, with sums that XLA's CPU backend fuses.

`spatial_mean(x)` (the squeeze) and `scale_channels(x, gate)` (the excitation) equal
`jnp.mean(x, axis=(1, 2))` and `x * gate[:, None, None, :]` for NHWC x and a (B, C) gate, with the
same gradients: custom-VJP ops that sum over space with `reductions.spatial_sums`. XLA hands the
plain code's sums (the mean, and the gate's gradient `sum(grad_out * x)` per image and channel) to a
single-threaded library reduction, with the product written out first (see `reductions`). Being
custom VJPs, they support reverse-mode autodiff only. `SpatialMean` and `ScaleChannels` are the
model's layers of the same names computed this way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wikitopics_jax.models import efficientnet
from wikitopics_jax.models.xla_cpu.reductions import accumulation_dtype, spatial_sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mean(x: jax.Array, spatial: tuple[int, int]) -> jax.Array:
  (total,) = spatial_sums([x.astype(accumulation_dtype(x.dtype))])
  return (total / (spatial[0] * spatial[1])).astype(x.dtype)


def _mean_fwd(x, spatial):
  return _mean(x, spatial), None


def _mean_bwd(spatial, _, grad_out):
  height, width = spatial
  grad = grad_out / (height * width)
  return (jnp.broadcast_to(grad[:, None, None, :], (grad.shape[0], height, width, grad.shape[1])),)


_mean.defvjp(_mean_fwd, _mean_bwd)


@jax.custom_vjp
def _scale(x: jax.Array, gate: jax.Array) -> jax.Array:
  return x * gate[:, None, None, :]


def _scale_fwd(x, gate):
  return _scale(x, gate), (x, gate)


def _scale_bwd(residuals, grad_out):
  x, gate = residuals
  grad_x = grad_out * gate[:, None, None, :]
  acc_dtype = accumulation_dtype(x.dtype)
  (grad_gate,) = spatial_sums([grad_out.astype(acc_dtype) * x.astype(acc_dtype)])
  return grad_x.astype(x.dtype), grad_gate.astype(gate.dtype)


_scale.defvjp(_scale_fwd, _scale_bwd)


def spatial_mean(x: jax.Array) -> jax.Array:
  """jnp.mean(x, axis=(1, 2)) of NHWC x: (B, C) in x's dtype."""
  return _mean(x, (x.shape[1], x.shape[2]))


def scale_channels(x: jax.Array, gate: jax.Array) -> jax.Array:
  """x * gate[:, None, None, :] for NHWC x and a (B, C) gate of the same dtype."""
  return _scale(x, gate)


class SpatialMean(efficientnet.SpatialMean):

  def __call__(self, x: jax.Array) -> jax.Array:
    return spatial_mean(x)


class ScaleChannels(efficientnet.ScaleChannels):

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    return scale_channels(x, gate)
