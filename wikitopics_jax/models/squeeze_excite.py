"""Squeeze-and-excitation's two spatial operations, with sums that XLA's CPU backend fuses.

`spatial_mean(x)` (the squeeze) and `scale_channels(x, gate)` (the excitation) equal
`jnp.mean(x, axis=(1, 2))` and `x * gate[:, None, None, :]` for NHWC x and a (B, C) gate, with the
same gradients. On CPU they are custom-VJP ops that sum over space with `reductions.spatial_sums`.
XLA hands the plain code's sums (the mean, and the gate's gradient `sum(grad_out * x)` per image
and channel) to a single-threaded library reduction, with the product written out first (see
`reductions`). Other backends get the plain code. Being custom VJPs, the CPU ops support
reverse-mode autodiff only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wikitopics_jax.models.reductions import accumulation_dtype, spatial_sums


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
  if jax.default_backend() != "cpu":
    return jnp.mean(x, axis=(1, 2))
  return _mean(x, (x.shape[1], x.shape[2]))


def scale_channels(x: jax.Array, gate: jax.Array) -> jax.Array:
  """x * gate[:, None, None, :] for NHWC x and a (B, C) gate of the same dtype."""
  if jax.default_backend() != "cpu":
    return x * gate[:, None, None, :]
  return _scale(x, gate)
