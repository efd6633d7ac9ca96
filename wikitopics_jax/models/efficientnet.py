"""EfficientNet B0-B7 and EfficientNet-Lite0-4 in Flax NNX, built as Keras / the TF reference build them.

The layers are plain `nnx.Conv` (the depthwise one with `feature_group_count`), `nnx.BatchNorm`,
`nnx.Linear` and jnp ops; faster drop-in layers with the same parameters may replace some of them
after construction (`models.create_model`, config.model.kernels).

Architecture (Tan & Le, ICML 2019; `keras.applications.efficientnet`):
  stem:   3x3/2 conv -> BatchNorm -> activation
  blocks: MBConv = [1x1 expand conv -> BN -> act] -> kxk depthwise conv -> BN -> act
          -> [squeeze-and-excitation] -> 1x1 project conv -> BN -> [stochastic depth + residual]
  top:    1x1 conv -> BN -> activation (Keras's `top_conv`; part of the base model)
  head:   one of HEADS (not part of the base model).

Scaling follows Keras exactly: filters are `round_filters` (multiply, round to a multiple of 8, add 8
when rounding lost more than 10%), repeats `ceil(depth * repeats)`, the stochastic-depth rate of block
b is `drop_connect_rate * b / num_blocks`. BatchNorm uses Keras's momentum 0.99 and epsilon 1e-3.
The SE bottleneck is `max(1, int(block_input_filters * 0.25))`.

Lite variants follow the TF EfficientNet-Lite reference (`efficientnet_lite_builder.py`): ReLU6, no SE,
stem (32) and top (1280) channels not scaled, and the first and last stages' repeats not scaled.

Inputs: NHWC float32 images, already normalised by the input pipeline as the model's
`input_normalization` says (`pipeline.normalize_images`): None or "imagenet" = pixels scaled to
[0, 1], then `(x - IMAGENET_MEAN) / IMAGENET_STD` per channel (what Keras's EfficientNet does inside the
model for its ImageNet weights); "lite" = `(pixel - 127) / 128`, what the TF EfficientNet-Lite
ImageNet weights expect (`pretrained.load_imagenet` sets it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from wikitopics_jax.errors import InputError

# Per-channel mean and std of ImageNet's RGB pixels in [0, 1] (the "imagenet" input normalisation).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMALIZATIONS = ("imagenet", "lite")

HEADS = ("thesis", "gap", "imagenet")
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
SE_RATIO = 0.25
DEPTH_DIVISOR = 8
DEFAULT_DROP_CONNECT_RATE = 0.2
THESIS_HIDDEN_UNITS = 128
IMAGENET_CLASSES = 1000

INIT_METADATA_KEY = "initializer"
_TRUNCATED_NORMAL_STDDEV = 0.87962566103423978  # Stddev of a unit normal truncated to [-2, 2].


@dataclasses.dataclass(frozen=True)
class VarianceScaling:
  """`jax.nn.initializers.variance_scaling` (= Keras's VarianceScaling) as an inspectable value.

  Each Param records its initializer in its metadata, so `initialise` can draw all of a model's
  random values with two RNG calls instead of one per parameter shape.
  """
  scale: float
  mode: str  # "fan_in", "fan_out" or "fan_avg".
  distribution: str  # "truncated_normal" or "uniform".
  in_axis: int = -2
  out_axis: int = -1

  def multiplier(self, shape: tuple[int, ...]) -> float:
    """Factor applied to unit variates: truncated normal on [-2, 2], or uniform on [-1, 1]."""
    receptive = math.prod(shape) / (shape[self.in_axis] * shape[self.out_axis])
    fan_in, fan_out = shape[self.in_axis] * receptive, shape[self.out_axis] * receptive
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
    variance = self.scale / fan
    if self.distribution == "truncated_normal":
      return math.sqrt(variance) / _TRUNCATED_NORMAL_STDDEV
    return math.sqrt(3 * variance)

  def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    shape = tuple(shape)
    return (_unit_variates(key, self.distribution, shape) * self.multiplier(shape)).astype(dtype)


def _unit_variates(key: jax.Array, distribution: str, shape: tuple[int, ...]) -> jax.Array:
  if distribution == "truncated_normal":
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Constant:
  value: float

  def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    del key
    return jnp.full(shape, self.value, dtype)


def init_metadata(initializer: VarianceScaling | Constant) -> dict[str, Any]:
  return {INIT_METADATA_KEY: initializer}


def initialise(build: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """`build(rngs)`, with the values drawn in one compiled program instead of one per shape.

  Building eagerly compiles a random-number kernel per distinct parameter shape, about a second each
  on a small CPU (a minute for B2). Here the module is built abstractly (`nnx.eval_shape`) and every
  Param is then drawn from one truncated-normal and one uniform vector according to the initializer
  in its metadata; BatchNorm statistics start at mean 0 / var 1 and each RNG stream gets its own key
  folded from `rngs`. Same distributions as eager construction; different draws.
  """
  # Named streams, so that forked streams keep their tag ('dropout') and get keys from that stream.
  abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0, params=0, dropout=0)))
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  base_keys = {"params": rngs.params()}  # Other streams are drawn from only when the model has them.
  plans = []  # One entry per leaf: ("const", v) / ("random", distribution, offset, m) / ("key", tag).
  offsets = {"truncated_normal": 0, "uniform": 0}
  for path, variable in flat:
    shape = tuple(variable.shape)
    init = variable.get_metadata().get(INIT_METADATA_KEY)
    if isinstance(variable, nnx.RngKey):
      if variable.tag not in base_keys:
        base_keys[variable.tag] = rngs[variable.tag]()
      plans.append(("key", variable.tag))
    elif isinstance(variable, nnx.RngCount):
      plans.append(("const", 0))
    elif isinstance(variable, nnx.BatchStat) and path[-1] in ("mean", "var"):
      plans.append(("const", 0.0 if path[-1] == "mean" else 1.0))
    elif isinstance(init, Constant):
      plans.append(("const", init.value))
    elif isinstance(init, VarianceScaling):
      plans.append(("random", init.distribution, offsets[init.distribution], init.multiplier(shape)))
      offsets[init.distribution] += math.prod(shape)
    else:
      raise ValueError(f"{'/'.join(map(str, path))}: no initializer in its metadata")

  @jax.jit
  def draw(keys):
    unit = {name: _unit_variates(jax.random.fold_in(keys["params"], i), name, (size,))
            for i, (name, size) in enumerate(offsets.items())}
    values = []
    for index, ((_, variable), plan) in enumerate(zip(flat, plans)):
      shape, dtype = tuple(variable.shape), variable.dtype
      if plan[0] == "key":
        values.append(jax.random.fold_in(keys[plan[1]], index))
      elif plan[0] == "const":
        values.append(jnp.full(shape, plan[1], dtype))
      else:
        _, name, offset, multiplier = plan
        chunk = unit[name][offset:offset + math.prod(shape)]
        values.append((chunk.reshape(shape) * multiplier).astype(dtype))
    return values

  values = draw(base_keys)
  state = nnx.from_flat_state([(path, variable.replace(value))
                               for (path, variable), value in zip(flat, values)])
  return nnx.merge(graphdef, state)


# Keras's initialisers (efficientnet.py CONV_KERNEL_INITIALIZER / DENSE_KERNEL_INITIALIZER; the thesis
# head's Dense layers used Keras's default, glorot_uniform).
CONV_INIT = VarianceScaling(2.0, "fan_out", "truncated_normal")
DEPTHWISE_INIT = VarianceScaling(2.0, "fan_out", "truncated_normal", in_axis=-1, out_axis=-2)
DENSE_INIT = VarianceScaling(1.0 / 3.0, "fan_out", "uniform")
GLOROT_UNIFORM = VarianceScaling(1.0, "fan_avg", "uniform")
ZEROS = Constant(0.0)
ONES = Constant(1.0)


@dataclasses.dataclass(frozen=True)
class StageSpec:
  kernel_size: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  stride: int


# Keras's DEFAULT_BLOCKS_ARGS (the B0 stages); all use SE ratio 0.25 except in Lite.
BASE_STAGES = (
    StageSpec(3, 1, 32, 16, 1, 1),
    StageSpec(3, 2, 16, 24, 6, 2),
    StageSpec(5, 2, 24, 40, 6, 2),
    StageSpec(3, 3, 40, 80, 6, 2),
    StageSpec(5, 3, 80, 112, 6, 1),
    StageSpec(5, 4, 112, 192, 6, 2),
    StageSpec(3, 1, 192, 320, 6, 1),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class Variant:
  width: float
  depth: float
  resolution: int  # Native input size (informational; any size works).
  dropout: float
  lite: bool = False


VARIANTS: dict[str, Variant] = {
    "efficientnet_b0": Variant(1.0, 1.0, 224, 0.2),
    "efficientnet_b1": Variant(1.0, 1.1, 240, 0.2),
    "efficientnet_b2": Variant(1.1, 1.2, 260, 0.3),
    "efficientnet_b3": Variant(1.2, 1.4, 300, 0.3),
    "efficientnet_b4": Variant(1.4, 1.8, 380, 0.4),
    "efficientnet_b5": Variant(1.6, 2.2, 456, 0.4),
    "efficientnet_b6": Variant(1.8, 2.6, 528, 0.5),
    "efficientnet_b7": Variant(2.0, 3.1, 600, 0.5),
    "efficientnet_lite0": Variant(1.0, 1.0, 224, 0.2, lite=True),
    "efficientnet_lite1": Variant(1.0, 1.1, 240, 0.2, lite=True),
    "efficientnet_lite2": Variant(1.1, 1.2, 260, 0.3, lite=True),
    "efficientnet_lite3": Variant(1.2, 1.4, 280, 0.3, lite=True),
    "efficientnet_lite4": Variant(1.4, 1.8, 300, 0.3, lite=True),
    # For tests: 10 blocks, 8-56 block channels, 320 top channels; compiles in seconds at 32x32.
    "efficientnet_tiny": Variant(0.25, 0.5, 32, 0.2),
}


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
  """Keras/TF `round_filters`: nearest multiple of divisor, but never more than 10% down."""
  scaled = filters * width
  new_filters = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new_filters < 0.9 * scaled:
    new_filters += divisor
  return int(new_filters)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block after scaling. `name` is Keras's prefix, e.g. "block2b"."""
  name: str
  filters_in: int
  filters_out: int
  kernel_size: int
  stride: int
  expand_ratio: int
  use_se: bool
  drop_rate: float

  @property
  def expanded(self) -> int:
    return self.filters_in * self.expand_ratio

  @property
  def has_skip(self) -> bool:
    return self.stride == 1 and self.filters_in == self.filters_out


@dataclasses.dataclass(frozen=True)
class Architecture:
  stem_filters: int
  top_filters: int
  blocks: tuple[BlockSpec, ...]
  activation: str  # "swish" or "relu6"


def build_architecture(variant: Variant, *, width: float | None = None, depth: float | None = None,
                       drop_connect_rate: float = DEFAULT_DROP_CONNECT_RATE) -> Architecture:
  """Scaled block list for a variant; width/depth (when not None) override the variant's."""
  width = variant.width if width is None else width
  depth = variant.depth if depth is None else depth
  fixed_ends = variant.lite  # Lite: first/last stage repeats and stem/top channels unscaled.
  stem = STEM_FILTERS if fixed_ends else round_filters(STEM_FILTERS, width)
  top = TOP_FILTERS if fixed_ends else round_filters(TOP_FILTERS, width)

  stage_repeats = []
  for i, stage in enumerate(BASE_STAGES):
    keep = fixed_ends and i in (0, len(BASE_STAGES) - 1)
    stage_repeats.append(stage.repeats if keep else round_repeats(stage.repeats, depth))
  num_blocks = sum(stage_repeats)

  blocks = []
  channels = stem  # The real input channels (TF Lite's stem may differ from round_filters(32)).
  for i, (stage, repeats) in enumerate(zip(BASE_STAGES, stage_repeats)):
    filters_out = round_filters(stage.filters_out, width)
    for j in range(repeats):
      blocks.append(BlockSpec(
          name=f"block{i + 1}{chr(ord('a') + j)}",
          filters_in=channels,
          filters_out=filters_out,
          kernel_size=stage.kernel_size,
          stride=stage.stride if j == 0 else 1,
          expand_ratio=stage.expand_ratio,
          use_se=not variant.lite,
          drop_rate=drop_connect_rate * len(blocks) / num_blocks,
      ))
      channels = filters_out
  return Architecture(stem, top, tuple(blocks), "relu6" if variant.lite else "swish")


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": jax.nn.silu,
    "relu6": jax.nn.relu6,
    "identity": lambda x: x,
}


class Activation(nnx.Module):
  """An elementwise activation, by name (ACTIVATIONS); a layer so that the model lists it."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.name](x)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` that can be frozen: then it always normalises with its running statistics and
  never updates them, also in train mode (what Keras does for a BatchNormalization layer with
  trainable=False). `model.train()` / `model.eval()` leave `frozen` alone;
  `EfficientNet.set_trainable_layers` sets it."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.frozen = False

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.frozen:
      use_running_average = True
    return super().__call__(x, use_running_average, mask=mask)


class SpatialMean(nnx.Module):
  """Global average pooling of NHWC x: (B, C) in x's dtype (Keras's GlobalAveragePooling2D)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


class ScaleChannels(nnx.Module):
  """x * gate per image and channel, for NHWC x and a (B, C) gate (SE's excitation, Keras's
  `multiply`)."""

  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    return x * gate[:, None, None, :]


def _batch_norm(features: int, dtype, rngs: nnx.Rngs) -> BatchNorm:
  # param_dtype float32: scale/bias and the running statistics stay float32 under bf16 compute.
  return BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                   param_dtype=jnp.float32, scale_init=ONES, bias_init=ZEROS,
                   scale_metadata=init_metadata(ONES), bias_metadata=init_metadata(ZEROS),
                   rngs=rngs)


def _conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
          groups: int = 1, use_bias: bool = False, kernel_init: VarianceScaling = CONV_INIT,
          dtype, rngs: nnx.Rngs) -> nnx.Conv:
  # lax's "SAME" pads like TF's 'SAME', also asymmetrically for stride 2 (checked in tests).
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                  padding="SAME", feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=ZEROS,
                  kernel_metadata=init_metadata(kernel_init), bias_metadata=init_metadata(ZEROS),
                  rngs=rngs)


def _dense(in_features: int, out_features: int, kernel_init: VarianceScaling, dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=ZEROS,
                    kernel_metadata=init_metadata(kernel_init), bias_metadata=init_metadata(ZEROS),
                    rngs=rngs)


class ConvBNAct(nnx.Module):
  """The stem (3x3/2) and the top (1x1) of the base model."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, stride: int, *,
               activation: str, dtype, rngs: nnx.Rngs):
    self.conv = _conv(in_features, out_features, kernel_size, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(out_features, dtype, rngs)
    self.act = Activation(activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.bn(self.conv(x)))


class MBConv(nnx.Module):
  """Mobile inverted bottleneck block; attribute names follow Keras's layer names."""

  def __init__(self, spec: BlockSpec, *, activation: str, dtype, rngs: nnx.Rngs):
    self.spec = spec
    expanded = spec.expanded
    if spec.expand_ratio != 1:
      self.expand_conv = _conv(spec.filters_in, expanded, 1, dtype=dtype, rngs=rngs)
      self.expand_bn = _batch_norm(expanded, dtype, rngs)
      self.expand_act = Activation(activation)
    else:
      self.expand_conv = self.expand_bn = self.expand_act = None
    # Depthwise: one kxk filter per channel, kernel (k, k, 1, C).
    self.dwconv = _conv(expanded, expanded, spec.kernel_size, stride=spec.stride, groups=expanded,
                        kernel_init=DEPTHWISE_INIT, dtype=dtype, rngs=rngs)
    self.bn = _batch_norm(expanded, dtype, rngs)
    self.act = Activation(activation)
    if spec.use_se:
      squeezed = max(1, int(spec.filters_in * SE_RATIO))
      self.se_squeeze = SpatialMean()
      # 1x1 convolutions on the 1x1 squeezed map, as Keras (same parameters as Dense layers).
      self.se_reduce = _conv(expanded, squeezed, 1, use_bias=True, dtype=dtype, rngs=rngs)
      self.se_act = Activation(activation)
      self.se_expand = _conv(squeezed, expanded, 1, use_bias=True, dtype=dtype, rngs=rngs)
      self.se_excite = ScaleChannels()
    else:
      self.se_squeeze = self.se_reduce = self.se_act = self.se_expand = self.se_excite = None
    self.project_conv = _conv(expanded, spec.filters_out, 1, dtype=dtype, rngs=rngs)
    self.project_bn = _batch_norm(spec.filters_out, dtype, rngs)
    if spec.has_skip and spec.drop_rate > 0:
      # Stochastic depth = Keras's Dropout(noise_shape=(None, 1, 1, 1)): one coin per example.
      self.drop = nnx.Dropout(spec.drop_rate, broadcast_dims=(1, 2, 3), rngs=rngs)
    else:
      self.drop = None

  def __call__(self, inputs: jax.Array) -> jax.Array:
    x = inputs
    if self.expand_conv is not None:
      x = self.expand_act(self.expand_bn(self.expand_conv(x)))
    x = self.act(self.bn(self.dwconv(x)))
    if self.se_reduce is not None:
      se = self.se_squeeze(x)[:, None, None, :]
      se = self.se_act(self.se_reduce(se))
      x = self.se_excite(x, jax.nn.sigmoid(self.se_expand(se))[:, 0, 0, :])
    x = self.project_bn(self.project_conv(x))
    if self.spec.has_skip:
      if self.drop is not None:
        x = self.drop(x)
      x = x + inputs
    return x


class ThesisHead(nnx.Module):
  """The thesis's Keras head: Flatten -> Dense(128, relu) -> Dense(num_labels) (logits)."""

  def __init__(self, spatial: int, channels: int, num_labels: int, *, dtype, rngs: nnx.Rngs):
    self.spatial = spatial
    self.hidden = _dense(spatial * spatial * channels, THESIS_HIDDEN_UNITS, GLOROT_UNIFORM, dtype,
                         rngs)
    self.logits = _dense(THESIS_HIDDEN_UNITS, num_labels, GLOROT_UNIFORM, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[1:3] != (self.spatial, self.spatial):
      raise InputError(
          f"the 'thesis' head was built for a {self.spatial}x{self.spatial} feature map "
          f"(model.image_size) but got {x.shape[1]}x{x.shape[2]}: set model.image_size to the "
          "input size")
    # NHWC flatten, as Keras's Flatten in channels_last.
    x = x.reshape(x.shape[0], -1)
    return self.logits(jax.nn.relu(self.hidden(x)))


class PooledHead(nnx.Module):
  """Keras's include_top head: GlobalAveragePooling -> Dropout -> Dense(num_labels) (logits)."""

  def __init__(self, channels: int, num_labels: int, dropout_rate: float, *, dtype,
               rngs: nnx.Rngs):
    self.pool = SpatialMean()
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.logits = _dense(channels, num_labels, DENSE_INIT, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.logits(self.dropout(self.pool(x)))


def feature_map_size(image_size: int, architecture: Architecture) -> int:
  """Spatial size of the top's output: every stride-2 layer (TF 'SAME') maps n to ceil(n / 2)."""
  size = math.ceil(image_size / 2)  # Stem.
  for block in architecture.blocks:
    size = math.ceil(size / block.stride)
  return size


class EfficientNet(nnx.Module):
  """Base model (`stem`, `blocks`, `top`) plus a classifier `head`.

  `__call__(x)`: x is NHWC float32, normalised as `input_normalization` says (see the module
  docstring; None = "imagenet", to be fixed by a pretrained init); returns float32 logits
  (B, num_labels). `model.train()` / `model.eval()` switch BatchNorm (batch vs running statistics),
  dropout and stochastic depth; the module starts in train mode (NNX's default). Random masks come
  from 'dropout' streams forked into the model at construction, so they are part of its state.
  """

  def __init__(self, architecture: Architecture, *, head: str, num_labels: int,
               dropout_rate: float, image_size: int | None, dtype,
               input_normalization: str | None = None, rngs: nnx.Rngs):
    self.architecture = architecture
    self.dtype = dtype
    self.input_normalization = input_normalization  # Read by the train/eval steps.
    act = architecture.activation
    self.stem = ConvBNAct(3, architecture.stem_filters, 3, 2, activation=act, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        MBConv(spec, activation=act, dtype=dtype, rngs=rngs) for spec in architecture.blocks
    ])
    last = architecture.blocks[-1].filters_out
    self.top = ConvBNAct(last, architecture.top_filters, 1, 1, activation=act, dtype=dtype,
                         rngs=rngs)
    if head == "thesis":
      spatial = feature_map_size(image_size, architecture)
      self.head = ThesisHead(spatial, architecture.top_filters, num_labels, dtype=dtype, rngs=rngs)
    else:
      self.head = PooledHead(architecture.top_filters, num_labels, dropout_rate, dtype=dtype,
                             rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The base model's output (B, h, w, top_filters), in the compute dtype."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.top(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.features(x)).astype(jnp.float32)

  def layer_groups(self) -> list[Layer]:
    """The base model's layers, counted as Keras counts them (see `layer_groups`)."""
    return layer_groups(self)

  def set_trainable_layers(self, num_layers: int | None) -> Any:
    """Makes only the head and the base model's last `num_layers` layers trainable (None = all).

    Freezes (see `BatchNorm`) every BatchNorm layer outside those layers, so their running
    statistics stay as they are, unfreezes the others, and returns the NNX filter of the trainable
    Params (`last_layers_filter`, or `nnx.Param` for None) for `nnx.Optimizer(model, tx, wrt=...)`:
    frozen Params then get neither updates nor optimiser state.
    """
    layers = layer_groups(self)
    selected = nnx.Param if num_layers is None else last_layers_filter(self, num_layers)
    first_trainable = 0 if num_layers is None else len(layers) - num_layers
    for index, layer in enumerate(layers):
      if layer.path is None:
        continue
      module = self
      for step in layer.path:
        module = module[step] if isinstance(step, int) else getattr(module, step)
      if isinstance(module, BatchNorm):
        module.frozen = index < first_trainable
    return selected


class Layer(NamedTuple):
  """One Keras layer of the base model: its Keras name and the NNX path of its module.

  `path` is None for layers without parameters (activations, padding, pooling, add, dropout, ...).
  """
  name: str
  path: tuple[Any, ...] | None


def layer_groups(model: EfficientNet) -> list[Layer]:
  """The base model's layers in forward order, counted as Keras counts `base_model.layers`.

  The list mirrors `keras.applications.EfficientNetBx(include_top=False)` layer by layer, including
  parameterless layers, so "train the last K layers" means what it meant in the thesis:
  - 3 input layers (InputLayer, Rescaling, Normalization), kept for the count; here normalisation is
    the input pipeline's job and they hold nothing;
  - stem: stem_conv_pad, stem_conv, stem_bn, stem_activation;
  - per block: [expand_conv, expand_bn, expand_activation] if expanded, [dwconv_pad] if stride 2,
    dwconv, bn, activation, [se_squeeze, se_reshape, se_reduce, se_expand, se_excite] with SE,
    project_conv, project_bn, [drop] if residual with rate > 0, [add] if residual;
  - top_conv, top_bn, top_activation.
  For B2 this gives Keras's 339 layers (thesis Table 4.5: "the 339-layers base model"); the trainable
  parameters of the last 0/3/10/70/100/200/339 layers plus the head match that table (see tests).
  Newer Keras versions add one more Rescaling layer (the 1/sqrt(std) fix) after Normalization when
  loading ImageNet weights, i.e. 340 layers for B2; counts from the end are unchanged.
  B0 has 237 layers by this rule.
  """
  layers = [Layer("input", None), Layer("rescaling", None), Layer("normalization", None),
            Layer("stem_conv_pad", None), Layer("stem_conv", ("stem", "conv")),
            Layer("stem_bn", ("stem", "bn")), Layer("stem_activation", None)]
  for index, block in enumerate(model.blocks):
    spec = block.spec
    prefix = spec.name + "_"

    def own(attr, index=index):
      return ("blocks", index, attr)

    if spec.expand_ratio != 1:
      layers += [Layer(prefix + "expand_conv", own("expand_conv")),
                 Layer(prefix + "expand_bn", own("expand_bn")),
                 Layer(prefix + "expand_activation", None)]
    if spec.stride == 2:
      layers.append(Layer(prefix + "dwconv_pad", None))
    layers += [Layer(prefix + "dwconv", own("dwconv")), Layer(prefix + "bn", own("bn")),
               Layer(prefix + "activation", None)]
    if spec.use_se:
      layers += [Layer(prefix + "se_squeeze", None), Layer(prefix + "se_reshape", None),
                 Layer(prefix + "se_reduce", own("se_reduce")),
                 Layer(prefix + "se_expand", own("se_expand")), Layer(prefix + "se_excite", None)]
    layers += [Layer(prefix + "project_conv", own("project_conv")),
               Layer(prefix + "project_bn", own("project_bn"))]
    if spec.has_skip:
      if spec.drop_rate > 0:
        layers.append(Layer(prefix + "drop", None))
      layers.append(Layer(prefix + "add", None))
  layers += [Layer("top_conv", ("top", "conv")), Layer("top_bn", ("top", "bn")),
             Layer("top_activation", None)]
  return layers


def last_layers_filter(model: EfficientNet, num_layers: int) -> Callable[[tuple, Any], bool]:
  """An NNX filter selecting the head's Params and those of the base model's last `num_layers`.

  Use as `nnx.Optimizer(model, tx, wrt=last_layers_filter(model, k))`. BatchStats never match.
  """
  layers = layer_groups(model)
  if not 0 <= num_layers <= len(layers):
    raise InputError(f"can train the last 0..{len(layers)} layers of the base model, "
                     f"not {num_layers}")
  prefixes = [("head",)] + [layer.path for layer in layers[len(layers) - num_layers:]
                            if layer.path is not None]

  def selected(path: tuple, value: Any) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    return any(tuple(path[:len(p)]) == p for p in prefixes)

  return selected
