"""Models by name: `create_model(model_cfg, num_labels=..., rngs=...)`.

model_cfg keys (all present in `default_model_config()`):
  name               a registered model: efficientnet_b0..b7, efficientnet_lite0..lite4,
                     efficientnet_tiny (for tests).
  head               "thesis": Flatten -> Dense(128, relu) -> Dense(num_labels), the thesis's head
                     (its Flatten size depends on image_size);
                     "gap": global average pool -> dropout -> Dense(num_labels);
                     "imagenet": "gap" with 1000 classes (num_labels must be 1000), for pretrained checks.
  image_size         input height = width; only the "thesis" head uses it (and checks it at call time).
  dropout_rate       dropout before the pooled heads' Dense; None = the variant's (0.2 for B0 ... 0.5
                     for B7). The thesis head has no dropout.
  drop_connect_rate  stochastic depth rate of the last block (block b gets rate * b / num_blocks);
                     None = 0.2.
  dtype              compute dtype, "float32" or "bfloat16". Params and BatchNorm statistics are
                     float32 always; logits are float32.
  kernels            "auto" (the default: "xla_cpu" on the CPU backend, "xla" elsewhere), "xla" (the
                     plain layers, which XLA compiles well for GPU/TPU) or "xla_cpu" (drop-in layers
                     with the same parameters that XLA's CPU backend runs faster; reverse-mode
                     autodiff only; see `xla_cpu`). Resolved once, when the model is built.
  width_multiplier   when not None, overrides the variant's width (e.g. a reduced B0 for demos).
  depth_multiplier   when not None, overrides the variant's depth.
  input_normalization  how the input pipeline normalises pixels for this model (`model.input_normalization`,
                     read by `pipeline.normalize_images`): "imagenet" (scale to [0, 1], then ImageNet's
                     mean/std, `IMAGENET_MEAN`, `IMAGENET_STD`), "lite" ((pixel - 127) / 128, what the
                     EfficientNet-Lite ImageNet weights expect), or None = "imagenet" for a random init
                     and whatever the weights expect for a pretrained init (`pretrained.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wikitopics_jax.errors import InputError
from wikitopics_jax.models import multimodal
from wikitopics_jax.models import xla_cpu
from wikitopics_jax.models.efficientnet import (
    DEFAULT_DROP_CONNECT_RATE,
    HEADS,
    IMAGENET_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INPUT_NORMALIZATIONS,
    VARIANTS,
    EfficientNet,
    Layer,
    build_architecture,
    initialise,
    last_layers_filter,
    layer_groups,
)
from wikitopics_jax.registry import Registry

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "INPUT_NORMALIZATIONS", "MODELS", "EfficientNet", "Layer",
    "KERNELS", "count_parameters", "create_model", "default_model_config", "last_layers_filter",
    "layer_groups", "resolve_kernels", "upgrade_saved_config",
]

MODELS = Registry("model")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KERNELS = ("auto", "xla", "xla_cpu")


def default_model_config() -> ml_collections.ConfigDict:
  """Every model key with its default: the thesis model (B2, thesis head, 64x64).

  The None defaults are typed references, so that `--config.model.<key>=...` can set them."""
  optional = lambda kind: ml_collections.FieldReference(None, kind)
  return ml_collections.ConfigDict({
      "name": "efficientnet_b2",
      "head": "thesis",
      "image_size": 64,
      "dropout_rate": optional(float),
      "drop_connect_rate": optional(float),
      "dtype": "float32",
      "kernels": "auto",
      "width_multiplier": optional(float),
      "depth_multiplier": optional(float),
      "input_normalization": optional(str),
  })


def _build_efficientnet(variant_name: str, cfg: ml_collections.ConfigDict, *, num_labels: int,
                        rngs: nnx.Rngs) -> EfficientNet:
  variant = VARIANTS[variant_name]
  drop_connect = DEFAULT_DROP_CONNECT_RATE if cfg.drop_connect_rate is None else cfg.drop_connect_rate
  architecture = build_architecture(variant, width=cfg.width_multiplier,
                                    depth=cfg.depth_multiplier, drop_connect_rate=drop_connect)
  dropout = variant.dropout if cfg.dropout_rate is None else cfg.dropout_rate
  return initialise(
      lambda init_rngs: EfficientNet(
          architecture, head=cfg.head, num_labels=num_labels, dropout_rate=dropout,
          image_size=cfg.image_size, dtype=_DTYPES[cfg.dtype],
          input_normalization=cfg.input_normalization, rngs=init_rngs),
      rngs)


for _name in VARIANTS:
  MODELS.register(_name)(functools.partial(_build_efficientnet, _name))


def _checked(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """model_cfg over the defaults, with every key and value validated (errors name `model.<key>`)."""
  cfg = default_model_config()
  unknown = sorted(set(model_cfg.keys()) - set(cfg.keys()))
  if unknown:
    raise InputError(f"unknown config key model.{unknown[0]}; valid keys: {sorted(cfg.keys())}")
  for key, value in model_cfg.items():
    try:
      cfg[key] = value  # ConfigDict is typed by its defaults; None-valued keys accept any type.
    except TypeError as e:
      raise InputError(f"model.{key}={value!r}: {e}") from None

  def fail(key: str, why: str):
    raise InputError(f"model.{key}={cfg[key]!r}: {why}")

  MODELS.get(cfg.name)  # Lists the valid names on a miss.
  if cfg.head not in HEADS:
    fail("head", f"must be one of {list(HEADS)}")
  if cfg.dtype not in _DTYPES:
    fail("dtype", f"must be one of {list(_DTYPES)}")
  resolve_kernels(cfg.kernels)  # Fails on an unknown value.
  if cfg.input_normalization is not None and cfg.input_normalization not in INPUT_NORMALIZATIONS:
    fail("input_normalization", f"must be None or one of {list(INPUT_NORMALIZATIONS)}")
  for key in ("dropout_rate", "drop_connect_rate"):
    if cfg[key] is not None and not (isinstance(cfg[key], (int, float)) and 0 <= cfg[key] < 1):
      fail(key, "must be None or in [0, 1)")
  for key in ("width_multiplier", "depth_multiplier"):
    if cfg[key] is not None and not (isinstance(cfg[key], (int, float)) and cfg[key] > 0):
      fail(key, "must be None or a positive number")
  if cfg.head == "thesis" and not (isinstance(cfg.image_size, int) and cfg.image_size > 0):
    fail("image_size", "the 'thesis' head needs the input size (a positive int)")
  return cfg


def create_model(model_cfg: ml_collections.ConfigDict, *, num_labels: int,
                 rngs: nnx.Rngs, text_cfg: ml_collections.ConfigDict | None = None) -> nnx.Module:
  """Builds the model named by model_cfg.name (see the module docstring for the keys).

  `rngs` needs a 'params' stream (or 'default') for initialisation and a 'dropout' stream (or
  'default') for dropout and stochastic depth; the latter is forked into the model.
  `text_cfg` (config.text) with a tower other than "none" builds the multimodal classifier
  (`multimodal.py`) around that image model's backbone; the CPU kernels apply to the backbone only.
  """
  if text_cfg is not None and text_cfg.get("tower", "none") != "none":
    text = multimodal.checked_text_config(text_cfg)
    return multimodal.create_multimodal(
        lambda: create_model(model_cfg, num_labels=num_labels, rngs=rngs), text,
        num_labels=num_labels, rngs=rngs)
  cfg = _checked(model_cfg)
  if cfg.head == "imagenet" and num_labels != IMAGENET_CLASSES:
    raise InputError(f"model.head='imagenet' has {IMAGENET_CLASSES} classes, "
                     f"but num_labels={num_labels}")
  if num_labels < 1:
    raise InputError(f"num_labels must be positive, got {num_labels}")
  model = MODELS.get(cfg.name)(cfg, num_labels=num_labels, rngs=rngs)
  if resolve_kernels(cfg.kernels) == "xla_cpu":
    xla_cpu.apply(model)
  return model


def resolve_kernels(kernels: str) -> str:
  """config.model.kernels as "xla" or "xla_cpu" ("auto": "xla_cpu" on the CPU backend)."""
  if kernels not in KERNELS:
    raise InputError(f"config.model.kernels={kernels!r}: must be one of {list(KERNELS)}")
  if kernels == "auto":
    return "xla_cpu" if jax.default_backend() == "cpu" else "xla"
  return kernels


def upgrade_saved_config(model_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A saved `config.model` (a workdir's config.json) in today's form.

  Before `kernels`, runs saved `depthwise_impl` ("shifted" for the CPU kernel, "native" for the plain
  grouped convolution) and `batch_norm_impl` ("fused" or "nnx"). Both CPU kernels map to "xla_cpu",
  both plain layers to "xla", any other pair to "auto"; the results agree up to rounding either way.
  A config already in today's form comes back unchanged.
  """
  saved = dict(model_dict)
  if "depthwise_impl" not in saved and "batch_norm_impl" not in saved:
    return saved
  old = (saved.pop("depthwise_impl", "auto"), saved.pop("batch_norm_impl", "auto"))
  saved["kernels"] = {("shifted", "fused"): "xla_cpu", ("native", "nnx"): "xla"}.get(old, "auto")
  return saved


def count_parameters(model: nnx.Module, wrt=nnx.Param) -> int:
  """Number of scalars in the model's variables of kind `wrt` (works on abstract models too)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, wrt)))
