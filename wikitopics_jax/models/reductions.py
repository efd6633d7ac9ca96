"""Sums over the batch and spatial axes of NHWC arrays, written so that XLA's CPU backend fuses them.

XLA's CPU backend hands a single-operand `reduce` to a library kernel. That kernel runs on one
thread and cannot read fused inputs, so whatever is summed (a product, a shifted slice, an
activation's derivative) is first written out in full. A variadic `reduce` (several operands, one
result each) stays with XLA's own emitter, which fuses the operands' producers, reads each input once
for all results and splits the loop across threads; elementwise adds of halves (`tree_sum`) fuse too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def tree_sum(a: jax.Array, axis: int) -> jax.Array:
  """sum(a, axis) as a tree of elementwise adds of halves.

  Used on the spatial axes only: slicing the batch axis would cut across its sharding.
  """
  while a.shape[axis] > 1:
    size = a.shape[axis]
    half = size // 2
    odd = lax.slice_in_dim(a, 2 * half, size, axis=axis)
    a = lax.slice_in_dim(a, 0, half, axis=axis) + lax.slice_in_dim(a, half, 2 * half, axis=axis)
    if odd.shape[axis]:
      first = lax.slice_in_dim(a, 0, 1, axis=axis) + odd
      a = lax.concatenate([first, lax.slice_in_dim(a, 1, half, axis=axis)], axis)
  return jnp.squeeze(a, axis)


def sum_rows(arrays: list[jax.Array]) -> list[jax.Array]:
  """[sum(a, axis=1) for a in arrays] as one variadic reduce (arrays of one shape)."""
  count = len(arrays)
  if count == 1:  # One operand would go to the library kernel: pair it with (broadcast) zeros.
    return sum_rows([arrays[0], jnp.zeros(arrays[0].shape, arrays[0].dtype)])[:1]
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  return list(lax.reduce(tuple(arrays), zeros,
                         lambda a, b: tuple(a[i] + b[i] for i in range(count)), (1,)))


def channel_sums(arrays: list[jax.Array]) -> list[jax.Array]:
  """[sum(a, axis=(0, 1, 2)) for a in arrays] for NHWC arrays of one shape, reading them once.

  Rows go first (one variadic reduce over all arrays: (B, H, W, C) -> (B, W, C)), then columns (a
  tree), then the batch (a plain sum of a (B, C) array; under a sharded batch, the cross-device
  part).
  """
  return [jnp.sum(tree_sum(rows, 1), axis=0) for rows in sum_rows(arrays)]
