"""Drop-in layers for XLA's CPU backend: the EfficientNet's computation, faster there.

XLA's CPU backend runs grouped (depthwise) convolutions, 3-channel convolutions, 1x1 convolutions
and reductions slowly, and its autodiff of BatchNorm makes many passes over memory. Each module here
is a subclass of one of the model's plain layers with the same Variables (names, shapes, dtypes and
metadata), so the model's state, checkpoints and pretrained weight loading are the same whichever
layers compute it; outputs and gradients are equal up to floating-point rounding (tests/test_models.py,
tests/test_batchnorm.py, tests/test_squeeze_excite.py):

  plain layer                                  replaced by (module)
  nnx.Conv, depthwise (feature_group_count=C)  DepthwiseConv (depthwise): shifted multiply-adds
  nnx.Conv, 1x1 stride 1                       PointwiseConv (pointwise): a matrix product
  nnx.Conv, <= 4 input channels (the stem)     FewChannelConv (stem_conv): broadcast multiply-adds
  BatchNorm + the Activation after it          BatchNormActivation (batchnorm): one custom-VJP op
  SpatialMean, ScaleChannels                   the same names in squeeze_excite: fused sums

Mechanism: the model is built with its plain layers, then `apply(model)` replaces submodules in
place (`models.create_model` does it when config.model.kernels resolves to "xla_cpu"); the model's
code does not know about this package. A BatchNorm attribute `<p>bn` of a module whose attribute
`<p>act` is an `Activation` is fused with it, and `<p>act` becomes the identity; that convention
holds when the module computes `self.<p>act(self.<p>bn(...))` with nothing else reading the BatchNorm's
output, as the EfficientNet does. A BatchNorm without such an activation is fused with the identity.
The replacement layers' custom VJPs support reverse-mode autodiff only (`jax.grad`, not `jax.jvp`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

from flax import nnx

from wikitopics_jax.models import efficientnet
from wikitopics_jax.models.xla_cpu import batchnorm, depthwise, pointwise, squeeze_excite, stem_conv

KINDS = ("depthwise", "pointwise", "few_channel", "batch_norm", "squeeze_excite")

_Layer = TypeVar("_Layer", bound=nnx.Module)


def recast(layer: nnx.Module, cls: type[_Layer]) -> _Layer:
  """`layer` as an instance of `cls`, a subclass of its type: the same attributes and Variables."""
  if not issubclass(cls, type(layer)):
    raise TypeError(f"{cls.__name__} is not a subclass of {type(layer).__name__}")
  new = object.__new__(cls)
  vars(new).update(vars(layer))
  return new


_SQUEEZE_EXCITE = {efficientnet.SpatialMean: squeeze_excite.SpatialMean,
                   efficientnet.ScaleChannels: squeeze_excite.ScaleChannels}


def _conv_replacement(conv: nnx.Conv, kinds: Collection[str]) -> nnx.Conv:
  # Order matters: a 1x1 conv of 3 channels is a matrix product, not the stem's multiply-adds.
  for kind, module, cls in (("pointwise", pointwise, pointwise.PointwiseConv),
                            ("depthwise", depthwise, depthwise.DepthwiseConv),
                            ("few_channel", stem_conv, stem_conv.FewChannelConv)):
    if kind in kinds and module.fits(conv):
      return recast(conv, cls)
  return conv


def apply(model: nnx.Module, *, skip: Collection[str] = ()) -> nnx.Module:
  """Replaces the model's plain layers by this package's, in place (see the module docstring).

  `skip`: kinds (of KINDS) to leave plain, e.g. to measure one replacement alone. Layers already
  replaced are left as they are, so applying twice changes nothing. Returns `model`.
  """
  unknown = set(skip) - set(KINDS)
  if unknown:
    raise ValueError(f"unknown kinds {sorted(unknown)}; valid: {list(KINDS)}")
  kinds = set(KINDS) - set(skip)
  for _, module in list(nnx.iter_modules(model)):
    for name, child in list(vars(module).items()):
      # Exact types: subclasses (ours included) may compute something else.
      child_type = type(child)
      if child_type is nnx.Conv:
        replacement = _conv_replacement(child, kinds)
      elif child_type is efficientnet.BatchNorm and "batch_norm" in kinds:
        replacement = _fused_batch_norm(module, name, child)
      elif child_type in _SQUEEZE_EXCITE and "squeeze_excite" in kinds:
        replacement = recast(child, _SQUEEZE_EXCITE[child_type])
      else:
        continue
      if replacement is not child:
        setattr(module, name, replacement)
  return model


def _fused_batch_norm(parent: nnx.Module, name: str,
                      bn: efficientnet.BatchNorm) -> batchnorm.BatchNormActivation:
  activation_name = name[:-len("bn")] + "act" if name.endswith("bn") else None
  activation = getattr(parent, activation_name, None) if activation_name else None
  fused = recast(bn, batchnorm.BatchNormActivation)
  fused.activation = "identity"
  if isinstance(activation, efficientnet.Activation) and activation.name in batchnorm.DERIVATIVES:
    fused.activation = activation.name
    setattr(parent, activation_name, efficientnet.Activation("identity"))
  return fused
