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


def accumulation_dtype(dtype) -> jnp.dtype:
  """The dtype that products and sums of `dtype` values accumulate in: float32 at least.

  bf16 products summed in bf16 would lose precision; XLA's native convolutions and jnp.mean
  accumulate bf16 in float32 too.
  """
  return jnp.promote_types(dtype, jnp.float32)


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


def _variadic_sum(arrays: list[jax.Array], axis: int) -> list[jax.Array]:
  count = len(arrays)
  if count == 1:
    # One operand would go to the library kernel (so would two if one result were unused: XLA drops
    # it). Sum the two halves of the channels as two operands.
    a = arrays[0]
    channels = a.shape[-1]
    if channels % 2:
      a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, 1)])
    half = a.shape[-1] // 2
    low, high = _variadic_sum([a[..., :half], a[..., half:]], axis)
    return [jnp.concatenate([low, high], -1)[..., :channels]]
  zeros = tuple(jnp.zeros((), a.dtype) for a in arrays)
  return list(lax.reduce(tuple(arrays), zeros,
                         lambda a, b: tuple(a[i] + b[i] for i in range(count)), (axis,)))


# Rows summed per step of the first stage. XLA's emitter loops over the output elements and, for
# each, over the summed axis. Over all rows of a map that code is scalar (the LLVM IR that XLA dumps
# for a 56-row sum has no vector instruction); with a short constant inner loop it is vectorised
# along the channels. In throwaway timings groups of 5-8 rows ran faster than one pass over all
# rows, and groups of 2-4 slower.
_GROUP_SIZES = (8, 7, 6, 5)


def _rows_per_group(height: int) -> int:
  if height <= max(_GROUP_SIZES):
    return height
  # The fewest zero rows to pad to a multiple; on a tie the larger group.
  return min(_GROUP_SIZES, key=lambda g: (-height % g, -g))


def sum_rows(arrays: list[jax.Array]) -> list[jax.Array]:
  """[sum(a, axis=1) for a in arrays] (NHWC arrays of one shape), each input read once.

  Two variadic reduces: groups of `_rows_per_group` rows (zero-padded at the bottom to whole
  groups), then the group sums.
  """
  batch, height, width, channels = arrays[0].shape
  group = _rows_per_group(height)
  groups = -(-height // group)
  if groups * group != height:
    arrays = [jnp.pad(a, ((0, 0), (0, groups * group - height), (0, 0), (0, 0))) for a in arrays]
  grouped = [a.reshape(batch, groups, group, width, channels) for a in arrays]
  group_sums = _variadic_sum(grouped, 2)
  if groups == 1:
    return [jnp.squeeze(s, 1) for s in group_sums]
  return _variadic_sum(group_sums, 1)


def spatial_sums(arrays: list[jax.Array]) -> list[jax.Array]:
  """[sum(a, axis=(1, 2)) for a in arrays] for NHWC arrays of one shape, reading them once.

  Rows go first (`sum_rows`, all arrays at once: (B, H, W, C) -> (B, W, C)), then columns (a
  tree): (B, C) each.
  """
  return [tree_sum(rows, 1) for rows in sum_rows(arrays)]


def channel_sums(arrays: list[jax.Array]) -> list[jax.Array]:
  """[sum(a, axis=(0, 1, 2)) for a in arrays] for NHWC arrays of one shape, reading them once.

  `spatial_sums`, then the batch (a plain sum of a (B, C) array; under a sharded batch, the
  cross-device part).
  """
  return [jnp.sum(sums, axis=0) for sums in spatial_sums(arrays)]
