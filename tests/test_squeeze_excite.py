"""The xla_cpu squeeze-and-excitation ops and layers against NumPy formulas: values and gradients,
float32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wikitopics_jax.models.xla_cpu import squeeze_excite

# 17 rows: grouped row sums with zero rows padded and a second stage; 7 rows: one group; 1x1 maps.
SHAPES = [(2, 17, 5, 3), (3, 7, 7, 4), (2, 1, 1, 2), (2, 33, 9, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_spatial_mean_and_scale_channels_match_numpy(shape, dtype):
  rng = np.random.default_rng(sum(shape))
  x = rng.normal(size=shape)
  gate = rng.uniform(size=(shape[0], shape[3]))
  grad_mean = rng.normal(size=(shape[0], shape[3]))
  grad_scaled = rng.normal(size=shape)
  # Round the inputs to the tested dtype first, so that the reference sees the same numbers.
  x, gate, grad_mean, grad_scaled = (np.asarray(jnp.asarray(a, dtype), np.float64)
                                     for a in (x, gate, grad_mean, grad_scaled))

  @jax.jit
  def run(x, gate, grad_mean, grad_scaled):
    # Through the layers that replace the model's SpatialMean and ScaleChannels.
    mean, mean_vjp = jax.vjp(squeeze_excite.SpatialMean(), x)
    scaled, scale_vjp = jax.vjp(squeeze_excite.ScaleChannels(), x, gate)
    return mean, mean_vjp(grad_mean)[0], scaled, *scale_vjp(grad_scaled)

  got = run(*(jnp.asarray(a, dtype) for a in (x, gate, grad_mean, grad_scaled)))
  height, width = shape[1:3]
  want = (x.mean((1, 2)),
          np.broadcast_to(grad_mean[:, None, None, :] / (height * width), shape),
          x * gate[:, None, None, :],
          grad_scaled * gate[:, None, None, :],
          (grad_scaled * x).sum((1, 2)))
  names = ("mean", "d mean / dx", "scaled", "d scaled / dx", "d scaled / d gate")
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 outputs keep 8 bits of mantissa.
  for name, g, w in zip(names, got, want):
    assert g.dtype == dtype and g.shape == w.shape, name
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol, atol=tol * np.abs(w).max(),
                               err_msg=name)
