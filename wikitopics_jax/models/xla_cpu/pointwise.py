"""1x1, stride-1 convolutions as matrix products, for XLA's CPU backend.

XLA's CPU backend runs the contraction faster than the equivalent convolution (forward and both
gradients); other backends lower the convolution to the same matrix product themselves. The product
is taken on the (pixels, channels) matrix rather than on the 4-D array: the kernel gradient of a 4-D
contraction made XLA materialise the output gradient transposed (channels-major) in a strided copy,
the most expensive fusion of a B0 train step on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from wikitopics_jax.models.xla_cpu.depthwise import square


def fits(conv: nnx.Conv) -> bool:
  """Whether `PointwiseConv` computes what this `nnx.Conv` computes."""
  return (tuple(conv.kernel_size) == (1, 1) and conv.feature_group_count == 1
          and conv.padding in ("SAME", "VALID")
          and square(conv.strides, 1) == 1 and square(conv.input_dilation, 1) == 1
          and conv.mask is None)


class PointwiseConv(nnx.Conv):
  """A 1x1, stride-1 `nnx.Conv` (same parameters; see `fits`) computed as a matrix product."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None:
      return super().__call__(inputs, out_sharding=out_sharding)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
    kernel = kernel.reshape(kernel.shape[-2:])
    pixels = inputs.reshape(-1, inputs.shape[-1])
    y = jnp.matmul(pixels, kernel, precision=self.precision)
    y = y.reshape(*inputs.shape[:-1], kernel.shape[-1])
    return y if bias is None else y + bias
