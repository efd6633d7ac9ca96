"""BatchNorm and the activation after it as one op in training, for XLA's CPU backend.

`BatchNormActivation` is the model's `BatchNorm` (same parameters and statistics, also freezable)
that applies an activation (`activation`, one of DERIVATIVES) to its output:
`ACTIVATIONS[activation](BatchNorm(x))`. In training mode it is one `jax.custom_vjp` op
(`train_batch_norm_activation`) with the statistics, running-average updates and gradients of
`nnx.BatchNorm` followed by the activation (equal up to floating-point rounding: sums run in another
order), but fewer passes over memory:
- forward: one fused pass for both statistics (sum and sum of squares), one to normalise and
  activate;
- backward: one fused pass for the two per-channel sums of the gradient (the activation's derivative
  is recomputed from the input, not stored or shared with the forward pass), one to write the input
  gradient.
XLA's own autodiff of the same code stores intermediate activations and sums each statistic and each
gradient sum in a separate single-threaded library reduction (see `reductions`). Eval mode, frozen
layers, `use_fast_variance=False`, `axis_name` (pmap), inputs that are not NHWC and layers without
scale or bias keep `nnx.BatchNorm`'s code. Being a custom VJP, the fused op supports reverse-mode
autodiff only (`jax.grad`, not `jax.jvp` / `jax.jacfwd`); build with config.model.kernels="xla"
for forward mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax.nnx.module import first_from
from jax import lax

from wikitopics_jax.models import efficientnet
from wikitopics_jax.models.efficientnet import ACTIVATIONS
from wikitopics_jax.models.xla_cpu.reductions import channel_sums


def _swish_derivative(y: jax.Array) -> jax.Array:
  s = jax.nn.sigmoid(y)
  return s * (1 + y * (1 - s))


def _relu6_derivative(y: jax.Array) -> jax.Array:
  # jax.nn.relu6's gradient: 1 strictly inside (0, 6), 0 elsewhere (also at the kinks).
  return ((y > 0) & (y < 6)).astype(y.dtype)


# d ACTIVATIONS[name](y) / dy, elementwise, as JAX's autodiff: the activations the op can fuse.
DERIVATIVES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": _swish_derivative,
    "relu6": _relu6_derivative,
    "identity": jnp.ones_like,
}


def _statistics(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance as nnx.BatchNorm's fast variance: E[x^2] - E[x]^2 >= 0."""
  count = x32.size // x32.shape[-1]
  total, total_of_squares = channel_sums([x32, x32 * x32])
  mean = total / count
  return mean, jnp.maximum(0.0, total_of_squares / count - mean * mean)


def _pre_activation(x32, mean, inv_std, scale, bias, dtype) -> jax.Array:
  """nnx's normalisation, rounded to the compute dtype as nnx.BatchNorm's output is.

  Forward and backward both use this, so the activation's derivative is taken exactly where the
  forward pass applied it (for relu6 in bf16, 5.99 rounds to 6, where the derivative is 0).
  """
  stats_dtype = x32.dtype
  y = (x32 - mean) * (inv_std * scale.astype(stats_dtype)) + bias.astype(stats_dtype)
  return y.astype(dtype)


def _fused_forward(x, scale, bias, activation, epsilon):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # Statistics: float32 at least, as nnx.
  mean, var = _statistics(x32)
  inv_std = lax.rsqrt(var + epsilon)
  out = ACTIVATIONS[activation](_pre_activation(x32, mean, inv_std, scale, bias, x.dtype))
  return (out, mean, var), (x, mean, inv_std, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x, scale, bias, activation, epsilon):
  return _fused_forward(x, scale, bias, activation, epsilon)[0]


def _fused_backward(activation, epsilon, residuals, cotangents):
  del epsilon
  # The barrier keeps XLA from merging the activation recomputed here with the forward pass's
  # (CSE): merged, the forward writes the sigmoid out for this pass to read, one extra full-size
  # write and read per layer, and the forward's normalise-and-activate splits into two passes.
  x, mean, inv_std, scale, bias = lax.optimization_barrier(residuals)
  grad_out = cotangents[0]  # The statistics leave through stop_gradient: no other cotangents.
  x32 = x.astype(mean.dtype)
  y = _pre_activation(x32, mean, inv_std, scale, bias, x.dtype).astype(mean.dtype)
  grad_y = grad_out.astype(mean.dtype) * DERIVATIVES[activation](y)
  normalized = (x32 - mean) * inv_std
  grad_bias, grad_scale = channel_sums([grad_y, grad_y * normalized])
  count = x32.size // x32.shape[-1]
  # d/dx of (x - mean) * inv_std through the batch statistics (the textbook BatchNorm backward).
  grad_x = (scale.astype(mean.dtype) * inv_std) * (
      grad_y - (grad_bias + normalized * grad_scale) / count)
  return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(bias.dtype)


_fused.defvjp(_fused_forward, _fused_backward)


def train_batch_norm_activation(x: jax.Array, scale: jax.Array, bias: jax.Array, activation: str,
                                epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """ACTIVATIONS[activation](BatchNorm(x)) with batch statistics, as one custom-VJP op.

  x: NHWC (channels last), in the compute dtype; scale and bias as nnx.BatchNorm passes them.
  Returns (output, batch mean, batch variance); the statistics are float32 (or x's dtype if wider)
  and are for the running averages: they come back through `stop_gradient`.
  """
  out, mean, var = _fused(x, scale, bias, activation, epsilon)
  return out, lax.stop_gradient(mean), lax.stop_gradient(var)


class BatchNormActivation(efficientnet.BatchNorm):
  """The model's BatchNorm followed by `ACTIVATIONS[self.activation]`; one fused op in training.

  Built by `xla_cpu.apply` from a `BatchNorm` (same Variables), with `activation` set to the
  activation that followed it in the model (then replaced by the identity there).
  """

  def __init__(self, *args, activation: str = "identity", **kwargs):
    super().__init__(*args, **kwargs)
    self.activation = activation

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = first_from(
        use_running_average, self.use_running_average,
        error_msg="No `use_running_average` argument was provided to BatchNormActivation")
    fused = (not self.frozen and not use_running_average and mask is None
             and self.use_fast_variance and self.axis_name is None and x.ndim == 4
             and self.axis in (-1, 3) and self.scale is not None and self.bias is not None)
    if not fused:
      return ACTIVATIONS[self.activation](super().__call__(x, use_running_average, mask=mask))
    # The same promotion as nnx.BatchNorm.__call__ (running statistics included).
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], self.scale[...], self.bias[...]), dtype=self.dtype)
    out, mean, var = train_batch_norm_activation(x, scale, bias, self.activation, self.epsilon)
    self.mean[...] = lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
    self.var[...] = lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
    return out
