"""Our EfficientNet in plain `torch.nn`, the PyTorch baseline of the model benchmarks.

Built from the same `Architecture` as the NNX model (`models.efficientnet.build_architecture`), so both
have the same layers: MBConv blocks with squeeze-and-excitation, swish (ReLU6 for Lite), BatchNorm with
Keras's epsilon 1e-3 and momentum 0.99 (PyTorch's momentum = 1 - 0.99), TF 'SAME' padding (asymmetric
for stride 2, via an explicit pad), per-example stochastic depth, and the pooled ("gap") head. The
parameter count equals the NNX model's, and `load_nnx_weights` copies an NNX model's weights so that
both give the same logits (checked in tests). timm / torchvision are not used: torchvision's compiled ops
do not match the torch build this project pins (torch 2.13.0, CPU), and timm needs torchvision.

Importing this module imports torch; callers import it only when torch is installed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wikitopics_jax.models import efficientnet as nnx_efficientnet

BN_MOMENTUM = 1.0 - nnx_efficientnet.BN_MOMENTUM  # PyTorch weighs the new batch statistics.


def _tf_same_pads(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  out_size = math.ceil(size / stride)
  total = max((out_size - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
  """Conv2d with TF 'SAME' padding: symmetric padding when it is symmetric, else an explicit F.pad."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
               groups: int = 1, bias: bool = False):
    super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias)
    self._kernel = kernel_size
    self._stride = stride

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    top, bottom = _tf_same_pads(x.shape[-2], self._kernel, self._stride)
    left, right = _tf_same_pads(x.shape[-1], self._kernel, self._stride)
    if top == bottom and left == right:
      return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=nnx_efficientnet.BN_EPSILON, momentum=BN_MOMENTUM)


def _activation(name: str) -> nn.Module:
  return {"swish": nn.SiLU, "relu6": nn.ReLU6}[name]()


class StochasticDepth(nn.Module):
  """Keras's Dropout(noise_shape=(None, 1, 1, 1)): drops whole examples of the residual branch."""

  def __init__(self, rate: float):
    super().__init__()
    self.rate = rate

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.training or self.rate == 0:
      return x
    keep = 1.0 - self.rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class ConvBNAct(nn.Module):

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
               activation: str):
    super().__init__()
    self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride=stride)
    self.bn = _batch_norm(out_channels)
    self.act = _activation(activation)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
  """The NNX `MBConv` (same attribute names)."""

  def __init__(self, spec: nnx_efficientnet.BlockSpec, activation: str):
    super().__init__()
    self.spec = spec
    expanded = spec.expanded
    self.act = _activation(activation)
    if spec.expand_ratio != 1:
      self.expand_conv = Conv2dSame(spec.filters_in, expanded, 1)
      self.expand_bn = _batch_norm(expanded)
    else:
      self.expand_conv = self.expand_bn = None
    self.dwconv = Conv2dSame(expanded, expanded, spec.kernel_size, stride=spec.stride,
                             groups=expanded)
    self.bn = _batch_norm(expanded)
    if spec.use_se:
      squeezed = max(1, int(spec.filters_in * nnx_efficientnet.SE_RATIO))
      self.se_reduce = nn.Conv2d(expanded, squeezed, 1, bias=True)
      self.se_expand = nn.Conv2d(squeezed, expanded, 1, bias=True)
    else:
      self.se_reduce = self.se_expand = None
    self.project_conv = Conv2dSame(expanded, spec.filters_out, 1)
    self.project_bn = _batch_norm(spec.filters_out)
    self.drop = StochasticDepth(spec.drop_rate) if spec.has_skip and spec.drop_rate > 0 else None

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    x = inputs
    if self.expand_conv is not None:
      x = self.act(self.expand_bn(self.expand_conv(x)))
    x = self.act(self.bn(self.dwconv(x)))
    if self.se_reduce is not None:
      se = x.mean(dim=(2, 3), keepdim=True)
      se = self.act(self.se_reduce(se))
      x = x * torch.sigmoid(self.se_expand(se))
    x = self.project_bn(self.project_conv(x))
    if self.spec.has_skip:
      if self.drop is not None:
        x = self.drop(x)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """Base model + pooled head (global average pool -> dropout -> Linear); NCHW float32 input."""

  def __init__(self, architecture: nnx_efficientnet.Architecture, *, num_labels: int,
               dropout_rate: float):
    super().__init__()
    act = architecture.activation
    self.stem = ConvBNAct(3, architecture.stem_filters, 3, 2, act)
    self.blocks = nn.ModuleList([MBConv(spec, act) for spec in architecture.blocks])
    self.top = ConvBNAct(architecture.blocks[-1].filters_out, architecture.top_filters, 1, 1, act)
    self.dropout = nn.Dropout(dropout_rate)
    self.logits = nn.Linear(architecture.top_filters, num_labels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    x = self.top(x)
    return self.logits(self.dropout(x.mean(dim=(2, 3))))


def create(name: str, *, num_labels: int, dropout_rate: float | None = None,
           drop_connect_rate: float | None = None, width_multiplier: float | None = None,
           depth_multiplier: float | None = None) -> EfficientNet:
  """The torch twin of `models.create_model` with head "gap" (or "imagenet" for 1000 labels)."""
  variant = nnx_efficientnet.VARIANTS[name]
  rate = nnx_efficientnet.DEFAULT_DROP_CONNECT_RATE if drop_connect_rate is None else drop_connect_rate
  architecture = nnx_efficientnet.build_architecture(variant, width=width_multiplier,
                                                     depth=depth_multiplier, drop_connect_rate=rate)
  dropout = variant.dropout if dropout_rate is None else dropout_rate
  return EfficientNet(architecture, num_labels=num_labels, dropout_rate=dropout)


def count_parameters(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_nnx_weights(model: EfficientNet, nnx_model) -> None:
  """Copies the weights and BatchNorm statistics of an NNX EfficientNet with a pooled head."""

  def array(variable) -> torch.Tensor:
    return torch.from_numpy(np.array(variable[...], np.float32))

  def conv(target: nn.Conv2d, source) -> None:
    # NNX kernels are (k, k, in / groups, out); torch's (out, in / groups, k, k).
    target.weight.data.copy_(array(source.kernel).permute(3, 2, 0, 1))
    if target.bias is not None:
      target.bias.data.copy_(array(source.bias))

  def batch_norm(target: nn.BatchNorm2d, source) -> None:
    target.weight.data.copy_(array(source.scale))
    target.bias.data.copy_(array(source.bias))
    target.running_mean.copy_(array(source.mean))
    target.running_var.copy_(array(source.var))

  with torch.no_grad():
    for ours, theirs in ((model.stem, nnx_model.stem), (model.top, nnx_model.top)):
      conv(ours.conv, theirs.conv)
      batch_norm(ours.bn, theirs.bn)
    for ours, theirs in zip(model.blocks, nnx_model.blocks, strict=True):
      for conv_name, bn_name in (("expand_conv", "expand_bn"), ("dwconv", "bn"),
                                 ("project_conv", "project_bn")):
        if getattr(ours, conv_name) is not None:
          conv(getattr(ours, conv_name), getattr(theirs, conv_name))
          batch_norm(getattr(ours, bn_name), getattr(theirs, bn_name))
      if ours.se_reduce is not None:
        conv(ours.se_reduce, theirs.se_reduce)
        conv(ours.se_expand, theirs.se_expand)
    model.logits.weight.data.copy_(array(nnx_model.head.logits.kernel).T)
    model.logits.bias.data.copy_(array(nnx_model.head.logits.bias))
