"""The xla_cpu fused BatchNorm+activation (train mode) against nnx.BatchNorm followed by jax.nn's
activation under JAX's autodiff: outputs, gradients and running statistics, also on a batch sharded
over 8 fake devices; and the fused sums against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wikitopics_jax import sharding
from wikitopics_jax.models import efficientnet, xla_cpu
from wikitopics_jax.models.xla_cpu import batchnorm, reductions

REFERENCE_ACTIVATIONS = {"swish": jax.nn.silu, "relu6": jax.nn.relu6, "identity": lambda y: y}
CHANNELS = 6


@pytest.fixture
def fused_calls(monkeypatch):
  """Counts the layers that took the fused op (so that no test compares nnx with itself)."""
  calls = []
  original = batchnorm.train_batch_norm_activation

  def counting(*args, **kwargs):
    calls.append(args[3])
    return original(*args, **kwargs)

  monkeypatch.setattr(batchnorm, "train_batch_norm_activation", counting)
  return calls


def _layers(dtype, activation="swish", **extra):
  """Our fused BatchNorm + `activation` and a plain nnx.BatchNorm with the same (non-trivial) scale,
  bias and stats."""
  kwargs = dict(momentum=0.9, epsilon=1e-3, dtype=dtype, param_dtype=jnp.float32, **extra)
  ours = batchnorm.BatchNormActivation(CHANNELS, activation=activation, rngs=nnx.Rngs(0), **kwargs)
  reference = nnx.BatchNorm(CHANNELS, rngs=nnx.Rngs(0), **kwargs)
  for layer in (ours, reference):
    layer.scale[...] = jnp.linspace(-1.5, 2.0, CHANNELS)
    layer.bias[...] = jnp.linspace(0.5, -0.7, CHANNELS)
    layer.mean[...] = jnp.linspace(-0.2, 0.3, CHANNELS)
    layer.var[...] = jnp.linspace(0.5, 2.0, CHANNELS)
  return ours, reference


def _inputs(shape=(3, 7, 5, CHANNELS)):
  x = jax.random.normal(jax.random.key(0), shape) * 2.5 + 0.7
  weights = jax.random.normal(jax.random.key(1), shape)  # Makes the loss's gradient non-uniform.
  return x, weights


def _value_and_grads(layer, x, weights, apply):
  def loss(layer, x):
    out = apply(layer, x)
    return jnp.sum(out.astype(jnp.float32) * weights), out

  (_, out), (grad_layer, grad_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
  return {"out": out, "grad_x": grad_x, "grad_scale": grad_layer.scale[...],
          "grad_bias": grad_layer.bias[...], "mean": layer.mean[...], "var": layer.var[...]}


def _relative_errors(got, expected):
  return {key: float(np.max(np.abs(np.asarray(got[key], np.float32)
                                   - np.asarray(expected[key], np.float32)))
                     / (np.max(np.abs(np.asarray(expected[key], np.float32))) + 1e-12))
          for key in expected}


@pytest.mark.parametrize("activation", sorted(batchnorm.DERIVATIVES))
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
def test_fused_train_mode_matches_nnx_batchnorm_and_autodiff(activation, dtype, tolerance,
                                                             fused_calls):
  ours, reference = _layers(dtype, activation)
  x, weights = _inputs()
  x = x.astype(dtype)
  got = _value_and_grads(ours, x, weights, lambda layer, x: layer(x))
  expected = _value_and_grads(reference, x, weights,
                              lambda layer, x: REFERENCE_ACTIVATIONS[activation](layer(x)))
  assert fused_calls == [activation]
  assert got["out"].dtype == dtype and got["grad_x"].dtype == dtype
  assert ours.mean[...].dtype == jnp.float32 and ours.var[...].dtype == jnp.float32
  errors = _relative_errors(got, expected)
  assert max(errors.values()) < tolerance, errors
  # The running statistics moved towards the batch's (not left alone, not replaced).
  assert not np.allclose(got["mean"], jnp.linspace(-0.2, 0.3, CHANNELS))


def test_bf16_relu6_gradient_is_zero_where_the_output_rounds_to_6(fused_calls):
  """Pre-activations in [5.98, 6) round to 6 in bf16, where relu6's gradient is 0 (as nnx's)."""
  ours, reference = _layers(jnp.bfloat16, "relu6")
  for layer in (ours, reference):
    layer.scale[...] = jnp.full(CHANNELS, 1e-3)
    layer.bias[...] = jnp.full(CHANNELS, 5.99)
  x, weights = _inputs()
  got = _value_and_grads(ours, x.astype(jnp.bfloat16), weights, lambda layer, x: layer(x))
  expected = _value_and_grads(reference, x.astype(jnp.bfloat16), weights,
                              lambda layer, x: jax.nn.relu6(layer(x)))
  assert fused_calls == ["relu6"]
  np.testing.assert_array_equal(np.asarray(got["out"], np.float32), 6.0)
  np.testing.assert_array_equal(expected["grad_bias"], 0.0)
  np.testing.assert_array_equal(got["grad_bias"], 0.0)
  np.testing.assert_array_equal(got["grad_scale"], 0.0)


def test_constant_channel_and_slow_variance(fused_calls):
  """A constant channel (variance 0, clamped) matches nnx; use_fast_variance=False keeps nnx's code."""
  x, weights = _inputs()
  x = x.at[..., 2].set(3.25)
  ours, reference = _layers(jnp.float32)
  got = _value_and_grads(ours, x, weights, lambda layer, x: layer(x))
  expected = _value_and_grads(reference, x, weights, lambda layer, x: jax.nn.silu(layer(x)))
  assert fused_calls == ["swish"]
  errors = _relative_errors(got, expected)
  assert max(errors.values()) < 2e-6, errors
  ours, reference = _layers(jnp.float32, use_fast_variance=False)
  got = _value_and_grads(ours, x, weights, lambda layer, x: layer(x))
  expected = _value_and_grads(reference, x, weights, lambda layer, x: jax.nn.silu(layer(x)))
  assert fused_calls == ["swish"]  # No second call: the slow variance is nnx's.
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_eval_and_frozen_use_running_statistics(fused_calls):
  ours, reference = _layers(jnp.float32)
  x, _ = _inputs()
  ours.eval()
  reference.eval()
  expected = jax.nn.silu(reference(x))
  np.testing.assert_allclose(ours(x), expected, rtol=1e-6, atol=1e-6)
  ours.train()
  ours.frozen = True
  before = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
  np.testing.assert_allclose(ours(x), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ours.mean[...], before[0])
  np.testing.assert_array_equal(ours.var[...], before[1])
  assert not fused_calls


def test_statistics_are_global_when_the_batch_is_sharded(fused_calls):
  """With the batch split over 8 devices, jit computes the same statistics and gradients as on one."""
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  x, weights = _inputs((16, 6, 5, CHANNELS))

  @jax.jit
  def train(graphdef, state, x, weights):
    layer = nnx.merge(graphdef, state)
    result = _value_and_grads(layer, x, weights,
                              lambda layer, x: layer(x))
    return result

  ours, _ = _layers(jnp.float32)
  graphdef, state = nnx.split(ours)
  single = train(graphdef, state, x, weights)
  batch = sharding.batch_sharded(mesh)
  sharded = train(graphdef, state, jax.device_put(x, batch), jax.device_put(weights, batch))
  assert len(sharded["grad_x"].sharding.device_set) == 8
  assert fused_calls == ["swish", "swish"]  # One trace each.
  errors = _relative_errors(sharded, single)
  assert max(errors.values()) < 1e-5, errors
  # And both equal the statistics of the whole batch.
  expected_mean = 0.9 * np.linspace(-0.2, 0.3, CHANNELS) + 0.1 * np.asarray(x).mean((0, 1, 2))
  np.testing.assert_allclose(sharded["mean"], expected_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (3, 7, 5, 4), (2, 16, 9, 8), (1, 33, 3, 5)])
def test_channel_sums_and_tree_sum_match_numpy(shape):
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=shape).astype(np.float32) for _ in range(3)]
  for count in (1, 3):
    got = jax.jit(reductions.channel_sums)([jnp.asarray(a) for a in arrays[:count]])
    for a, g in zip(arrays, got):
      np.testing.assert_allclose(g, a.astype(np.float64).sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
  for axis in (1, 2):
    np.testing.assert_allclose(reductions.tree_sum(jnp.asarray(arrays[0]), axis),
                               arrays[0].astype(np.float64).sum(axis), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("replaced", [("batch_norm",), xla_cpu.KINDS])
def test_tiny_model_trains_the_same_with_xla_cpu_and_plain_layers(replaced, fused_calls):
  """One train-mode loss and its parameter gradients, and the updated statistics, of the whole tiny
  model (swish, SE, residuals) agree between the plain model ("xla": nnx.BatchNorm and autodiff)
  and the same model with the fused BatchNorm alone, then with every xla_cpu layer."""
  from wikitopics_jax import models  # pylint: disable=g-import-not-at-top
  # Batch 16: at batch 4, the tiny model's last maps (2x2) give statistics of 16 values, and changing
  # the input by one ulp moves nnx's own gradients by 1e-4 (relative); at 16 the two agree to 1e-5.
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  results = {}
  for impl in ("fused", "nnx"):
    cfg = models.default_model_config()
    cfg.update(name="efficientnet_tiny", head="gap", image_size=32, kernels="xla",
               drop_connect_rate=0.0, dropout_rate=0.0)
    model = models.create_model(cfg, num_labels=5, rngs=nnx.Rngs(params=0, dropout=1))
    if impl == "fused":
      xla_cpu.apply(model, skip=set(xla_cpu.KINDS) - set(replaced))
    assert isinstance(model.stem.bn, batchnorm.BatchNormActivation) == (impl == "fused")

    @nnx.jit
    def loss_and_grads(model, x):
      return nnx.value_and_grad(lambda model: jnp.sum(jnp.sin(model(x))))(model)

    loss, grads = loss_and_grads(model, x)
    results[impl] = (loss, nnx.state(grads, nnx.Param), nnx.state(model, nnx.BatchStat))
    if impl == "fused":  # Every BatchNorm of the model (stem, blocks, top) took the fused op.
      layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, efficientnet.BatchNorm)]
      assert len(fused_calls) == len(layers) > 20
  (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = results["fused"], results["nnx"]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-4)  # float32 sums in another order.
  for got, expected in ((grads, ref_grads), (stats, ref_stats)):
    a = np.concatenate([np.ravel(v[...]) for _, v in nnx.to_flat_state(got)])
    b = np.concatenate([np.ravel(v[...]) for _, v in nnx.to_flat_state(expected)])
    # Float32 sums in another order, through 10 blocks. Some true gradients are 0 (the bias of a
    # BatchNorm whose output feeds another BatchNorm), so errors are relative to the whole tree's.
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 5e-4
