"""Convolution of an input with few channels (the RGB stem) as k*k*C broadcast multiply-adds.

XLA's CPU backend runs the stem (3x3/2, 3 -> 32 channels) through a library convolution that is
slow for 3 input channels, and its kernel gradient made two transposed copies (a profile of the B0
train step at 224x224). Here the forward pass is one fused loop over the output with k*k*C
multiply-adds per element (the shifted slices of the padded input, each channel broadcast along
the output channels), and the kernel gradient is one matrix product of the patch matrix
(pixels x k*k*C) with the output gradient; both ran faster in throwaway timings. The input
gradient (unused when the input is the image, then removed by XLA) is the library convolution's.

`FewChannelConv` is an `nnx.Conv` (same parameters) that computes this way. Being a custom VJP, the
op supports reverse-mode autodiff only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from wikitopics_jax.models.xla_cpu.depthwise import Padding, same_padding_2d, square, tap
from wikitopics_jax.models.xla_cpu.reductions import accumulation_dtype

# Inputs with at most this many channels take the multiply-adds.
MAX_CHANNELS = 4


def _taps(x: jax.Array, kernel_size: int, stride: int, padding: Padding) -> list[jax.Array]:
  """The shifted slices of the padded input, one per kernel tap, row-major."""
  padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_hw = tuple((padded.shape[axis] - kernel_size) // stride + 1 for axis in (1, 2))
  return [tap(padded, row, col, out_hw, stride)
          for row in range(kernel_size) for col in range(kernel_size)]


def _native(x, kernel, stride, padding):
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def few_channel_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  """Convolution of NHWC x with an HWIO kernel (square), explicit padding ((t, b), (l, r))."""
  kernel_size, _, channels, _ = kernel.shape
  acc_dtype = accumulation_dtype(x.dtype)
  weights = kernel.astype(acc_dtype)
  out = None
  for index, shifted in enumerate(_taps(x.astype(acc_dtype), kernel_size, stride, padding)):
    row, col = divmod(index, kernel_size)
    for channel in range(channels):
      term = shifted[..., channel:channel + 1] * weights[row, col, channel]
      out = term if out is None else out + term
  return out.astype(x.dtype)


def _fwd(x, kernel, stride, padding):
  return few_channel_conv(x, kernel, stride, padding), (x, kernel)


def _bwd(stride, padding, residuals, grad_out):
  x, kernel = residuals
  kernel_size, _, channels, out_channels = kernel.shape
  # Patch columns in HWIO order (tap-major, channel-minor), as the kernel flattens.
  patches = jnp.concatenate(_taps(x, kernel_size, stride, padding), axis=-1)
  grad_kernel = lax.dot_general(
      patches.reshape(-1, kernel_size * kernel_size * channels),
      grad_out.reshape(-1, out_channels), (((0,), (0,)), ((), ())),
      preferred_element_type=accumulation_dtype(kernel.dtype))
  _, input_vjp = jax.vjp(lambda x: _native(x, kernel, stride, padding), x)
  return input_vjp(grad_out)[0], grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


few_channel_conv.defvjp(_fwd, _bwd)


def fits(conv: nnx.Conv) -> bool:
  """Whether `FewChannelConv` computes what this `nnx.Conv` computes (at most `MAX_CHANNELS` input
  channels, 'SAME' padding, a square kernel and stride, no dilation or groups)."""
  kernel_size = tuple(conv.kernel_size)
  return (conv.in_features <= MAX_CHANNELS and conv.feature_group_count == 1
          and len(kernel_size) == 2 and kernel_size[0] == kernel_size[1] and conv.padding == "SAME"
          and square(conv.strides, 1) is not None and square(conv.input_dilation, 1) == 1
          and square(conv.kernel_dilation, 1) == 1 and conv.mask is None)


class FewChannelConv(nnx.Conv):
  """An `nnx.Conv` (same parameters; see `fits`) that runs `few_channel_conv` on NHWC inputs."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None or inputs.ndim != 4 or inputs.shape[-1] > MAX_CHANNELS:
      return super().__call__(inputs, out_sharding=out_sharding)
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    stride = square(self.strides, 1)
    padding = same_padding_2d(inputs.shape[1:3], kernel.shape[0], stride)
    y = few_channel_conv(inputs, kernel, stride, padding)
    return y if bias is None else y + bias
