"""Depthwise 2-D convolution as shifted multiply-adds, for XLA's CPU backend.

`depthwise_conv_shifted`: k*k shifted (strided) slices of the padded input, each multiplied by its
per-channel kernel tap and summed, with a `jax.custom_vjp` whose backward pass is written the same
way. XLA's CPU backend runs grouped convolutions (`lax.conv_general_dilated(...,
feature_group_count=C)`, what `nnx.Conv` does) 8-40x slower than this (measured per layer on 2 CPU
cores; whole-model figures in docs/benchmarks.md). Being a custom VJP, it supports reverse-mode
autodiff only.

Padding is TF/Keras 'SAME' (`tf_same_padding`): for stride 2 TF pads asymmetrically, with the extra
row/column at the bottom/right. This equals `lax.padtype_to_pads(..., "SAME")`; tests check both
against a literal implementation of TF's formula.

`DepthwiseConv` is an `nnx.Conv(C, C, (k, k), feature_group_count=C, padding="SAME")` (same
parameters: kernel (k, k, 1, C), optional bias) that computes this way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from wikitopics_jax.models.xla_cpu.reductions import accumulation_dtype, spatial_sums

Padding = tuple[tuple[int, int], tuple[int, int]]


def tf_same_padding(in_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """(before, after) padding of TF's 'SAME' for one spatial dimension."""
  out_size = math.ceil(in_size / stride)
  pad_total = max((out_size - 1) * stride + kernel_size - in_size, 0)
  return pad_total // 2, pad_total - pad_total // 2


def same_padding_2d(spatial: Sequence[int], kernel_size: int, stride: int) -> Padding:
  height, width = spatial
  return (tf_same_padding(height, kernel_size, stride), tf_same_padding(width, kernel_size, stride))


def _output_size(padded: int, kernel_size: int, stride: int) -> int:
  return (padded - kernel_size) // stride + 1


def tap(padded: jax.Array, row: int, col: int, out_hw: tuple[int, int], stride: int) -> jax.Array:
  """The input pixels that kernel tap (row, col) meets, one per output position."""
  batch, _, _, channels = padded.shape
  out_h, out_w = out_hw
  return lax.slice(
      padded,
      (0, row, col, 0),
      (batch, row + (out_h - 1) * stride + 1, col + (out_w - 1) * stride + 1, channels),
      (1, stride, stride, 1),
  )


def _pad_input(x: jax.Array, padding: Padding) -> jax.Array:
  """x zero-padded for the taps, behind a barrier.

  The barrier keeps XLA from reading the centre tap from x itself (slice(pad(x)) = x): then x was
  written out as well as its padded copy, a whole extra pass over the largest arrays of the model.
  With the padded array the only consumer, the activation that produces x fuses into the pad.
  """
  return lax.optimization_barrier(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))))


def _forward_from_padded(padded: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv as shifted multiply-adds.

  padded: (B, H + pads, W + pads, C), from `_pad_input`; kernel: (k, k, C).
  """
  k = kernel.shape[0]
  acc_dtype = accumulation_dtype(padded.dtype)
  out_hw = (_output_size(padded.shape[1], k, stride), _output_size(padded.shape[2], k, stride))
  taps = kernel.astype(acc_dtype)
  out = None
  for row in range(k):
    for col in range(k):
      term = tap(padded, row, col, out_hw, stride).astype(acc_dtype) * taps[row, col]
      out = term if out is None else out + term
  return out.astype(padded.dtype)


def _shifted_forward(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  """Depthwise conv as shifted multiply-adds. x: (B, H, W, C), kernel: (k, k, C)."""
  return _forward_from_padded(_pad_input(x, padding), kernel, stride)


def _input_grad(grad_out: jax.Array, kernel: jax.Array, x_shape, stride: int,
                padding: Padding) -> jax.Array:
  """Correlation of the (zero-interleaved for stride > 1) output gradient with the flipped kernel.

  dx[p] = sum_t g_pad[p + t] * kernel[k - 1 - t], where g_pad is the output gradient with stride - 1
  zeros between entries and padded (or cropped, for negative amounts) so that index p + t of g_pad
  is output position (p + before - (k - 1 - t)) / stride.
  """
  k = kernel.shape[0]
  _, height, width, _ = x_shape
  acc_dtype = accumulation_dtype(grad_out.dtype)
  g = grad_out.astype(acc_dtype)
  config = [(0, 0, 0)]
  for axis, size in ((1, height), (2, width)):
    before = padding[axis - 1][0]
    dilated = (g.shape[axis] - 1) * stride + 1
    low = k - 1 - before
    high = size + k - 1 - low - dilated
    config.append((low, high, stride - 1))
  config.append((0, 0, 0))
  g_pad = lax.pad(g, jnp.zeros((), acc_dtype), config)
  taps = kernel.astype(acc_dtype)
  dx = None
  for row in range(k):
    for col in range(k):
      term = tap(g_pad, row, col, (height, width), 1) * taps[k - 1 - row, k - 1 - col]
      dx = term if dx is None else dx + term
  return dx


# Products summed by one reduce in the kernel gradient: all 9 of a 3x3 kernel, a 5x5 kernel's 25 in
# two reduces. In throwaway timings 25 operands in one reduce ran slower than 13 + 12.
_MAX_TAPS_PER_REDUCE = 13


def _kernel_grad(padded: jax.Array, grad_out: jax.Array, kernel_size: int,
                 stride: int) -> jax.Array:
  """Per tap: sum over batch and space of the shifted (padded) input times the output gradient."""
  acc_dtype = accumulation_dtype(padded.dtype)
  g = grad_out.astype(acc_dtype)
  out_hw = g.shape[1:3]
  taps = [(row, col) for row in range(kernel_size) for col in range(kernel_size)]
  reduces = -(-len(taps) // _MAX_TAPS_PER_REDUCE)
  per_reduce = -(-len(taps) // reduces)
  per_tap = []
  for first in range(0, len(taps), per_reduce):
    # The shifted slices and products fuse into the reduce: the input and the output gradient are
    # read once for all its taps.
    products = [tap(padded, row, col, out_hw, stride).astype(acc_dtype) * g
                for row, col in taps[first:first + per_reduce]]
    per_tap += spatial_sums(products)  # (B, C) each
  return jnp.sum(jnp.stack(per_tap), axis=1).reshape(kernel_size, kernel_size, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: Padding) -> jax.Array:
  """Depthwise conv, x: (B, H, W, C), kernel: (k, k, C), explicit padding ((t, b), (l, r))."""
  return _shifted_forward(x, kernel, stride, padding)


def _shifted_fwd(x, kernel, stride, padding):
  padded = _pad_input(x, padding)
  # The padded input is the residual: the kernel gradient reads it as it is, and x is never
  # written out on its own (see _pad_input).
  return _forward_from_padded(padded, kernel, stride), (padded, kernel)


def _shifted_bwd(stride, padding, residuals, grad_out):
  padded, kernel = residuals
  # Without the barrier XLA merges the kernel gradient's slices of the padded input with the
  # forward pass's identical ones (CSE); a slice with two consumers is then written out, k*k copies
  # of the input per layer. Distinct values let each side fuse its own slices.
  padded = lax.optimization_barrier(padded)
  x_shape = (padded.shape[0], padded.shape[1] - sum(padding[0]),
             padded.shape[2] - sum(padding[1]), padded.shape[3])
  dx = _input_grad(grad_out, kernel, x_shape, stride, padding)
  dkernel = _kernel_grad(padded, grad_out, kernel.shape[0], stride)
  return dx.astype(padded.dtype), dkernel.astype(kernel.dtype)


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1,
                   padding: str | Padding = "SAME") -> jax.Array:
  """Depthwise conv of x (B, H, W, C) with kernel (k, k, C) or (k, k, 1, C), shifted.

  Args:
    x: NHWC input.
    kernel: one k x k filter per channel.
    stride: the same stride along height and width.
    padding: "SAME" (TF semantics), "VALID" or explicit ((top, bottom), (left, right)).

  Returns:
    (B, ceil(H / stride), ceil(W / stride), C) for "SAME", in x's dtype.
  """
  if kernel.ndim == 4:
    kernel = kernel.reshape(kernel.shape[0], kernel.shape[1], kernel.shape[3])
  k = kernel.shape[0]
  if kernel.shape[1] != k or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"kernel {kernel.shape} does not fit a square depthwise conv of {x.shape}")
  if padding == "SAME":
    padding = same_padding_2d(x.shape[1:3], k, stride)
  elif padding == "VALID":
    padding = ((0, 0), (0, 0))
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return depthwise_conv_shifted(x, kernel, stride, padding)


def square(value, default) -> int | None:
  """An nnx.Conv stride/dilation setting as one int when it is the same on both axes, else None."""
  value = default if value is None else value
  values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
  return values[0] if len(values) == 2 and values[0] == values[1] else None


def fits(conv: nnx.Conv) -> bool:
  """Whether `DepthwiseConv` computes what this `nnx.Conv` computes."""
  kernel_size = tuple(conv.kernel_size)
  return (conv.feature_group_count == conv.in_features == conv.out_features > 1
          and len(kernel_size) == 2 and kernel_size[0] == kernel_size[1] and conv.padding == "SAME"
          and square(conv.strides, 1) is not None and square(conv.input_dilation, 1) == 1
          and square(conv.kernel_dilation, 1) == 1 and conv.mask is None)


class DepthwiseConv(nnx.Conv):
  """A depthwise `nnx.Conv` (same parameters; see `fits`) computed by `depthwise_conv_shifted`."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None or inputs.ndim != 4:
      return super().__call__(inputs, out_sharding=out_sharding)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = depthwise_conv(inputs, kernel, stride=square(self.strides, 1), padding="SAME")
    return y if bias is None else y + bias
