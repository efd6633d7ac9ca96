"""Multilabel losses on logits, a registry of them, and the `Objective` the trainer builds from the config.

Conventions (all losses):

* Inputs are logits z (B, L) and labels y (B, L) in {0, 1} (soft labels work for the flat losses). Both are
  cast to float32 first (bf16 logits included) and every log-probability is a log-sigmoid form:
  log p = log_sigmoid(z), log(1 - p) = log_sigmoid(-z). The one floor is `asl`'s `clamp_eps`, which
  reproduces its authors' log(max(p, eps)) as max(log_sigmoid(z), log eps). Values and gradients are
  finite at logits of +-100.
* Published losses follow their authors' released code in its default configuration; a deliberate
  variant is a named parameter (docs/losses.md maps our keys to the authors' config keys).
* Reduction: the per-example loss is the MEAN over the L labels of the per-label loss (the Keras
  `binary_crossentropy` convention the thesis code used; thesis eq. 2.1 writes a sum, a constant factor L
  apart), and the batch loss is the mean over examples (thesis eq. 2.3). `get_per_example_loss` /
  `Objective.per_example` return the (B,) vector for weighting and masking.

Adding a loss: one factory function and one registration line::

    @register("my_loss")
    def my_loss(*, sharpness: float = 1.0) -> PerLabelFn:
      sharpness = _number(sharpness, "sharpness", low=0.0)   # errors name `loss.sharpness`
      def per_label(z, y):                                  # float32 (B, L) -> (B, L)
        return -(y * jax.nn.log_sigmoid(sharpness * z) + (1 - y) * jax.nn.log_sigmoid(-sharpness * z))
      return per_label

Its keyword-only parameters (with defaults) are its config keys, and only its: `config("my_loss")` is
`{"name": "my_loss", "sharpness": 1.0}` (`--config=configs/demo.py:loss=my_loss
--config.loss.sharpness=2`), and `from_config` refuses a key the loss does not take. Two losses may use
one name with different defaults. Parameters named `positives` / `num_examples` default to "auto" and are
filled by `from_config` from the training split's manifest.
A factory may return `LossFns` instead of a function to also define the prediction probabilities.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from wikitopics_jax import hierarchy
from wikitopics_jax import registry
from wikitopics_jax.errors import InputError

AUTO = "auto"
# Class statistics that "auto" takes from the training split's manifest.
STAT_PARAMS = ("positives", "num_examples")
# Supplied by the trainer from the dataset manifest, never by the config.
CONTEXT_PARAMS = ("ancestor_matrix",)

PerLabelFn = Callable[[jax.Array, jax.Array], jax.Array]

LOSSES = registry.Registry("loss")
register = LOSSES.register


def _sigmoid_probabilities(logits: jax.Array) -> jax.Array:
  return jax.nn.sigmoid(logits)


@dataclasses.dataclass(frozen=True)
class LossFns:
  """What a loss factory may return when a plain per-label function is not enough.

  per_label: float32 (B, L) logits and labels -> float32 (B, L) loss.
  probabilities: float32 logits -> the probabilities to predict with (default: sigmoid).
  hierarchical: the loss expects hierarchy-closed labels (`Taxonomy.close`).
  """
  per_label: PerLabelFn
  probabilities: Callable[[jax.Array], jax.Array] = _sigmoid_probabilities
  hierarchical: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
  """A configured loss: pure, vectorised, jit-able methods; hashable by identity (usable as a static arg)."""
  name: str
  params: Mapping[str, Any]
  fns: LossFns

  @property
  def hierarchical(self) -> bool:
    return self.fns.hierarchical

  def per_label(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits, labels = _as_float32(logits, labels)
    return self.fns.per_label(logits, labels)

  def per_example(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(B,): mean over labels of the per-label loss."""
    return jnp.mean(self.per_label(logits, labels), axis=-1)

  def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Scalar: mean over the batch of `per_example` (thesis eq. 2.3)."""
    return jnp.mean(self.per_example(logits, labels))

  def probabilities(self, logits: jax.Array) -> jax.Array:
    """Prediction probabilities, float32: sigmoid, or MCM(sigmoid) for `chmcnn`."""
    return self.fns.probabilities(jnp.asarray(logits).astype(jnp.float32))


def _as_float32(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.shape != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} differ in shape")
  return logits.astype(jnp.float32), labels.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Public constructors.


def build(name: str, **kwargs) -> Objective:
  """The Objective of loss `name`; kwargs are its parameters (errors name them as `loss.<key>`)."""
  LOSSES.check_keys(name, kwargs, key_prefix="loss")
  for key, default in LOSSES.parameters(name).items():
    if default is inspect.Parameter.empty and key not in kwargs:
      source = " (the trainer passes it from the dataset manifest)" if key in CONTEXT_PARAMS else ""
      raise InputError(f"loss {name!r} needs {key}{source}")
  fns = LOSSES.get(name)(**kwargs)
  if not isinstance(fns, LossFns):
    fns = LossFns(per_label=fns)
  shown = {k: v for k, v in kwargs.items() if k not in CONTEXT_PARAMS}
  return Objective(name=name, params=shown, fns=fns)


def get_loss(name: str, **kwargs) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """fn(logits, labels) -> scalar: batch mean of the per-example loss (itself the mean over labels)."""
  return build(name, **kwargs).__call__


def get_per_example_loss(name: str, **kwargs) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """fn(logits, labels) -> (B,) per-example loss (mean over labels), for weighting and masking."""
  return build(name, **kwargs).per_example


def config(name: str = "bce", **overrides: Any) -> ml_collections.ConfigDict:
  """`config.loss` for loss `name`: `name` and that loss's own parameters, defaults updated by `overrides`.

  Config files write `c.loss = losses.config("focal", gamma=3.0)`; the command line picks a loss with the
  config file's argument (`--config=configs/demo.py:loss=focal`, see `configlib.loss_argument`), after
  which `--config.loss.gamma=3` overrides a key, since the key is there. Not type-safe, so a config file
  may replace "auto" by a list; on the command line a list is given as a string, e.g.
  `--config.loss.positives='[120, 7, 33]'`.
  """
  _check_keys(name, overrides)
  cfg = ml_collections.ConfigDict({"name": name}, type_safe=False)
  for key, default in sorted(LOSSES.parameters(name, exclude=CONTEXT_PARAMS).items()):
    value = overrides.get(key, default)
    # None means "off" (focal's alpha): a typed placeholder lets `--config.loss.alpha=0.25` parse.
    cfg[key] = config_dict.placeholder(float) if value is None else value
  return cfg


def check_config(loss_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
  """The loss name of `config.loss` after checking that it names a loss and holds only that loss's keys.

  Raises a one-line InputError naming `config.loss.<key>` and listing the loss's valid keys.
  """
  cfg = _as_dict(loss_cfg)
  name = cfg.pop("name", None)
  if not name:
    raise InputError(f"config.loss.name is missing; valid names: {LOSSES.names()}")
  _check_keys(name, cfg)
  return name


def from_config(loss_cfg: ml_collections.ConfigDict | Mapping[str, Any], *,
                positives: np.ndarray | None, num_examples: int | None,
                ancestor_matrix: np.ndarray) -> Objective:
  """The trainer's entry point: `loss_cfg.name` picks the loss, its other keys are the parameters.

  Args:
    loss_cfg: e.g. `config()` after command-line overrides. Every key but `name` must be a parameter of
      that loss (`check_config`); parameters it lacks take their defaults.
    positives: per-label positive counts of the training split (its manifest), used where a class
      statistic is "auto"; give the hierarchical counts when training on closed labels.
    num_examples: number of training examples, likewise.
    ancestor_matrix: R of the dataset manifest's taxonomy; fixes L and feeds `chmcnn`.
  """
  name = check_config(loss_cfg)
  kwargs = {k: v for k, v in _as_dict(loss_cfg).items() if k != "name"}
  params = LOSSES.parameters(name)
  stats = {"positives": positives, "num_examples": num_examples}
  for key in STAT_PARAMS:
    # Left as "auto" when no statistics were given: the loss errors only if it really needs them.
    if key in params and _is_auto(kwargs.get(key, params[key])) and stats[key] is not None:
      kwargs[key] = stats[key]
  if "ancestor_matrix" in params:
    kwargs["ancestor_matrix"] = ancestor_matrix
  objective = build(name, **kwargs)
  # Tracing on abstract shapes runs every per-label shape check (list lengths vs L) now, not at step 1.
  num_labels = np.shape(ancestor_matrix)[0]
  dummy = jax.ShapeDtypeStruct((1, num_labels), jnp.float32)
  jax.eval_shape(objective.per_example, dummy, dummy)
  return objective


def names() -> list[str]:
  return LOSSES.names()


def _as_dict(loss_cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  return loss_cfg.to_dict() if isinstance(loss_cfg, ml_collections.ConfigDict) else dict(loss_cfg)


def _check_keys(name: str, keys: Mapping[str, Any]) -> None:
  for key in keys:
    if key in CONTEXT_PARAMS:
      raise InputError(f"config.loss.{key} cannot be set in the config: it comes from the dataset manifest")
  LOSSES.check_keys(name, keys, key_prefix="config.loss", exclude=CONTEXT_PARAMS,
                    owner_hint="; to switch losses, append :loss=<name> to --config (docs/losses.md)")


# distribution_balanced's keys before each loss had its own config, when all losses shared one namespace
# and a `db_` prefix kept them apart from focal's `alpha` and `gamma`.
_PREFIXED_DB_KEYS = {f"db_{key}": key for key in ("alpha", "beta", "mu", "neg_scale", "init_bias", "focal",
                                                  "balance_param", "gamma")}
# Retired before that (db_kappa: the paper's shift, which cannot express the authors' init_bias;
# db_lambda: now neg_scale); a run trained with them cannot be rebuilt with today's loss.
_RETIRED_DB_KEYS = ("db_kappa", "db_lambda")


def upgrade_saved_config(loss_dict: Mapping[str, Any], *, where: str) -> dict[str, Any]:
  """A saved `config.loss` (a workdir's config.json) in today's form: `name` and that loss's own keys.

  Earlier versions saved every registered loss's keys in one namespace, distribution_balanced's with a
  `db_` prefix. This keeps the keys of the saved loss (renaming distribution_balanced's `db_*` keys, and
  then ignoring the unprefixed `alpha`/`gamma`, which were focal's) and drops the others; a config already
  in today's form comes back unchanged.

  Args:
    loss_dict: the saved `loss` section.
    where: what errors name, e.g. the config.json path.

  Raises:
    InputError: a missing or unknown loss name, or a distribution_balanced run trained with the retired
      `db_kappa`/`db_lambda` (today's loss cannot reproduce it).
  """
  saved = dict(loss_dict)
  name = saved.get("name")
  if name not in LOSSES:
    raise InputError(f"{where}: loss.name={name!r} is not a registered loss; valid names: {LOSSES.names()}")
  if name == "distribution_balanced":
    retired = sorted(k for k in _RETIRED_DB_KEYS if k in saved)
    if retired:
      raise InputError(f"{where}: trained with the earlier distribution_balanced parameters {retired}, "
                       "which the loss no longer has; give --config with today's keys (docs/losses.md)")
    if any(old in saved for old in _PREFIXED_DB_KEYS):
      saved = {**{k: saved[k] for k in STAT_PARAMS if k in saved},
               **{new: saved[old] for old, new in _PREFIXED_DB_KEYS.items() if old in saved}}
  own = LOSSES.parameters(name, exclude=CONTEXT_PARAMS)
  return {"name": name, **{k: v for k, v in saved.items() if k in own}}


def _is_auto(value: Any) -> bool:
  return isinstance(value, str) and value == AUTO


# ---------------------------------------------------------------------------------------------------
# Parameter parsing: every error names the config key.


def _number(value: Any, key: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
  if isinstance(value, bool):
    raise InputError(f"loss.{key} must be a number, got {value!r}")
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise InputError(f"loss.{key} must be a number, got {value!r}") from None
  if not np.isfinite(x):
    raise InputError(f"loss.{key} must be finite, got {value!r}")
  if low is not None and (x < low or (low_open and x == low)):
    raise InputError(f"loss.{key} must be {'>' if low_open else '>='} {low}, got {x}")
  if high is not None and x > high:
    raise InputError(f"loss.{key} must be <= {high}, got {x}")
  return x


def _flag(value: Any, key: str) -> bool:
  # The command line may deliver a bool as its string form.
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  raise InputError(f"loss.{key} must be True or False, got {value!r}")


def _vector(value: Any, key: str) -> np.ndarray:
  """A per-label list: a sequence or array, or its string form from the command line ("[1, 2]", "1,2")."""
  if _is_auto(value):
    raise InputError(f"loss.{key}='auto' needs the training split's statistics: build the loss with "
                     "losses.from_config(..., positives=..., num_examples=...) or give an explicit list")
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise InputError(f"loss.{key} must be 'auto' or a list of numbers, got {value!r}") from None
  try:
    v = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    raise InputError(f"loss.{key} must be a list of numbers, got {value!r}") from None
  if v.ndim != 1 or v.size == 0:
    raise InputError(f"loss.{key} must be a non-empty flat list of per-label numbers, got shape {v.shape}")
  if not np.all(np.isfinite(v)) or np.any(v < 0):
    raise InputError(f"loss.{key} must hold finite non-negative numbers")
  return v


def _class_stats(positives: Any, num_examples: Any) -> tuple[np.ndarray, float]:
  pos = _vector(positives, "positives")
  if _is_auto(num_examples):
    _vector(num_examples, "num_examples")  # Raises the "auto needs statistics" error.
  n = _number(num_examples, "num_examples", low=0, low_open=True)
  if np.any(pos > n):
    j = int(np.argmax(pos > n))
    raise InputError(f"loss.positives[{j}] = {pos[j]:g} exceeds loss.num_examples = {n:g}")
  return pos, n


def _check_num_labels(z: jax.Array, vector: np.ndarray, key: str) -> None:
  # Shapes are static, so this runs once at trace time.
  if z.shape[-1] != vector.shape[0]:
    raise InputError(f"loss.{key} has {vector.shape[0]} entries but the model has {z.shape[-1]} labels")


# ---------------------------------------------------------------------------------------------------
# The losses. Each factory returns per_label(z, y) on float32 (B, L) arrays.


@register("bce")
def bce() -> PerLabelFn:
  """Binary cross-entropy, thesis eq. 2.1: -[y log p + (1 - y) log(1 - p)]."""
  def per_label(z, y):
    return -(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
  return per_label


@register("focal")
def focal(*, gamma: float = 2.0, alpha: float | None = None) -> PerLabelFn:
  """Binary focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), thesis eq. 2.2:

      -[a y (1 - p)^gamma log p + (1 - a)(1 - y) p^gamma log(1 - p)]

  with a = alpha when given (Lin et al.'s alpha-balanced form; 0.25 with gamma 2 in the paper), and without
  the a factors when alpha is None (the thesis: gamma = 2, no alpha). Modulating factors are computed as
  exp(gamma * log_sigmoid(-+z)), so gamma = 0 gives BCE exactly.
  """
  gamma = _number(gamma, "gamma", low=0.0)
  alpha = None if alpha is None else _number(alpha, "alpha", low=0.0, high=1.0)

  def per_label(z, y):
    log_p, log_q = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    pos = jnp.exp(gamma * log_q) * log_p
    neg = jnp.exp(gamma * log_p) * log_q
    if alpha is not None:
      pos, neg = alpha * pos, (1.0 - alpha) * neg
    return -(y * pos + (1.0 - y) * neg)
  return per_label


@register("class_weighted_bce")
def class_weighted_bce(*, class_weights: Any = AUTO, positives: Any = AUTO,
                       num_examples: Any = AUTO) -> PerLabelFn:
  """BCE with per-label weights, thesis eqs. 2.6-2.7: -w_j [y log p + (1 - y) log(1 - p)], where

      w_j = N / (n_j * K)   (N training images, n_j images with label j, K labels)

  i.e. inverse class frequency, 1 for a label present in 1/K of the images. A label with n_j = 0 is
  counted as n_j = 1 (finite weight; no positive term of it occurs in that training split). Explicit
  `class_weights` (a list of K numbers) override the formula; all ones gives BCE.
  """
  if _is_auto(class_weights):
    pos, n = _class_stats(positives, num_examples)
    weights = n / (np.maximum(pos, 1.0) * pos.size)
  else:
    weights = _vector(class_weights, "class_weights")
  w = weights.astype(np.float32)

  def per_label(z, y):
    _check_num_labels(z, w, "class_weights" if not _is_auto(class_weights) else "positives")
    return -w * (y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
  return per_label


@register("pos_weighted_bce")
def pos_weighted_bce(*, pos_weights: Any = AUTO, positives: Any = AUTO,
                     num_examples: Any = AUTO) -> PerLabelFn:
  """BCE with a weight on the positive term, thesis eqs. 2.8-2.9 (its "sample weights"):

      -[alpha_j y log p + (1 - y) log(1 - p)],   alpha_j = negatives_j / positives_j = (N - n_j) / n_j

  (PyTorch's `pos_weight`). n_j = 0 is counted as 1 (alpha_j = N, finite; no positive of label j occurs in
  that split anyway). Explicit `pos_weights` (K numbers) override the formula; all ones gives BCE.
  """
  if _is_auto(pos_weights):
    pos, n = _class_stats(positives, num_examples)
    weights = (n - pos) / np.maximum(pos, 1.0)
  else:
    weights = _vector(pos_weights, "pos_weights")
  a = weights.astype(np.float32)

  def per_label(z, y):
    _check_num_labels(z, a, "pos_weights" if not _is_auto(pos_weights) else "positives")
    return -(a * y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))
  return per_label


@register("asl")
def asl(*, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, focusing_grad: bool = False,
        clamp_eps: float = 1e-8) -> PerLabelFn:
  """Asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021) as the
  authors' default multilabel class computes it (`AsymmetricLoss` in Alibaba-MIIL/ASL,
  src/loss_functions/losses.py):

      L+ = (1 - p)^gamma_pos log(max(p, eps)),   L- = p_m^gamma_neg log(max(1 - p_m, eps)),
      p_m = max(p - clip, 0),   loss = -[y L+ + (1 - y) L-]

  Defaults are that class's: gamma_neg 4, gamma_pos 1, clip 0.05, eps = clamp_eps = 1e-8, and the focusing
  weights (1 - p)^gamma_pos and p_m^gamma_neg are constants for the gradient (its
  `disable_torch_grad_focal_loss=True`), so the gradient is not the derivative of the value. Variants:

  * focusing_grad=True also differentiates the focusing weights: the paper's loss, and the default of the
    authors' `AsymmetricLossOptimized`.
  * clamp_eps=0 drops the floor (the paper's formula). The floor caps a term at -log(eps) = 18.4 and
    zeroes its log's gradient where the probability is below eps (|z| > 18.4 on the wrong side).

  With both gammas 0, clip 0 and clamp_eps 0 it is BCE. The authors sum over labels and examples; this
  module keeps its mean, so per-label values are theirs and the batch loss is theirs / (B L). Stable forms:
  log p = log_sigmoid(z); for clip > 0, 1 - p_m = min(sigmoid(-z) + clip, 1) >= clip; for clip = 0,
  log_sigmoid(-z); the floor is max(log x, log eps), equal to log(max(x, eps)) without rounding 1 - p to 0.
  """
  gamma_neg = _number(gamma_neg, "gamma_neg", low=0.0)
  gamma_pos = _number(gamma_pos, "gamma_pos", low=0.0)
  clip = _number(clip, "clip", low=0.0, high=1.0)
  focusing_grad = _flag(focusing_grad, "focusing_grad")
  clamp_eps = _number(clamp_eps, "clamp_eps", low=0.0, high=1.0)
  log_eps = float(np.log(clamp_eps)) if clamp_eps > 0 else None

  def per_label(z, y):
    log_p, log_q = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    pos_weight = jnp.exp(gamma_pos * log_q)
    if clip > 0:
      log_q_shifted = jnp.log(jnp.minimum(jnp.exp(log_q) + clip, 1.0))
      p_shifted = jnp.maximum(jax.nn.sigmoid(z) - clip, 0.0)
      if gamma_neg > 0:
        # p_m^gamma is 0 where p_m = 0; keep log(0) out of the graph so gradients stay finite.
        nonzero = p_shifted > 0
        safe_log = jnp.log(jnp.where(nonzero, p_shifted, 1.0))
        neg_weight = jnp.where(nonzero, jnp.exp(gamma_neg * safe_log), 0.0)
      else:
        neg_weight = jnp.ones_like(z)
    else:
      log_q_shifted = log_q
      neg_weight = jnp.exp(gamma_neg * log_p)
    if not focusing_grad:
      # The authors compute the weights under torch.set_grad_enabled(False).
      pos_weight, neg_weight = jax.lax.stop_gradient(pos_weight), jax.lax.stop_gradient(neg_weight)
    if log_eps is not None:
      # After the weights: the authors clamp only inside the logs.
      log_p = jnp.maximum(log_p, log_eps)
      log_q_shifted = jnp.maximum(log_q_shifted, log_eps)
    return -(y * pos_weight * log_p + (1.0 - y) * neg_weight * log_q_shifted)
  return per_label


# The authors' released DB-Focal configs (wutong16/DistributionBalancedLoss,
# configs/{voc,coco}/LT_resnet50_pfc_DB.py) in our keys; VOC-MLT is the default. In a config file:
# `c.loss = losses.config("distribution_balanced", **losses.DB_SETTINGS["coco_mlt"])`.
DB_SETTINGS = {
    "voc_mlt": {"alpha": 0.1, "beta": 10.0, "mu": 0.3, "neg_scale": 5.0, "init_bias": 0.05, "focal": True,
                "balance_param": 2.0, "gamma": 2.0},
}
DB_SETTINGS["coco_mlt"] = {**DB_SETTINGS["voc_mlt"], "mu": 0.2, "neg_scale": 2.0}


@register("distribution_balanced")
# `focal` is the authors' key; it hides the focal loss's factory, which this one does not call.
def distribution_balanced(  # pylint: disable=redefined-outer-name
    *, positives: Any = AUTO, num_examples: Any = AUTO, alpha: float = 0.1, beta: float = 10.0,
    mu: float = 0.3, neg_scale: float = 5.0, init_bias: float = 0.05, focal: bool = True,
    balance_param: float = 2.0, gamma: float = 2.0) -> PerLabelFn:
  """Distribution-Balanced loss (Wu et al., "Distribution-Balanced Loss for Multi-Label Classification in
  Long-Tailed Datasets", ECCV 2020) as the authors' `ResampleLoss` computes it
  (wutong16/DistributionBalancedLoss, mllt/models/losses/resample_loss.py) with use_sigmoid=True,
  reweight_func='rebalance', weight_norm=None, loss_weight=1 and, by default, their VOC-MLT config
  (`DB_SETTINGS`). n_i = positives of label i, N = num_examples.

  Re-balanced weight (paper eqs. 3-5; their `rebalance_weight`, map_param alpha, beta, gamma = alpha,
  beta, mu), for instance k::

      r^k_i = (1/n_i) / sum_{j: y^k_j = 1} 1/n_j,   r_hat^k_i = alpha + sigmoid(beta (r^k_i - mu))

  An instance with no positive label has r = inf, so r_hat = alpha + 1, as theirs.

  Logit regularisation (their `logit_reg_functions`; init_bias, λ = neg_scale)::

      b_i = -log(N / n_i - 1)   (the logit of the prior n_i / N),   s = z + init_bias * b_i / λ
      loss_i = r_hat_i [ y_i CE(s_i) + (1/λ) (1 - y_i) CE(-λ s_i) ],   CE(x) = -log sigmoid(x)

  Focal term (their focal=dict(focal, balance_param, gamma); on in both their configs, the paper's
  DB-Focal): each CE is multiplied by balance_param (1 - p_t)^gamma with p_t = exp(-CE), i.e. from the
  regularised logit, and the factor is differentiated. With focal=False there is no balance_param.

  The paper's eqs. 7-8 shift by -ν = -κ b_i in both terms; that is init_bias = -κ λ (docs/losses.md).
  n_i is clipped to [1, N - 1] (theirs would divide by zero). Their reduction is the mean over examples
  and labels, as ours. Labels are meant to be binary (soft labels interpolate the two terms linearly).
  Predictions use sigmoid(z), without the shift.
  """
  pos, n = _class_stats(positives, num_examples)
  if n < 2:
    raise InputError(f"loss.num_examples must be >= 2 for distribution_balanced, got {n:g}")
  alpha = _number(alpha, "alpha", low=0.0)
  beta = _number(beta, "beta", low=0.0)
  mu = _number(mu, "mu")
  lam = _number(neg_scale, "neg_scale", low=0.0, low_open=True)
  init_bias = _number(init_bias, "init_bias")
  focal_on = _flag(focal, "focal")
  balance = _number(balance_param, "balance_param", low=0.0)
  gamma = _number(gamma, "gamma", low=0.0)
  counts = np.clip(pos, 1.0, n - 1.0)
  freq_inv = (1.0 / counts).astype(np.float32)
  shift = (-np.log(n / counts - 1.0) * init_bias / lam).astype(np.float32)

  def per_label(z, y):
    _check_num_labels(z, freq_inv, "positives")
    instance_rate = jnp.sum(y * freq_inv, axis=-1, keepdims=True)
    has_positive = instance_rate > 0
    r = freq_inv / jnp.where(has_positive, instance_rate, 1.0)
    r_hat = jnp.where(has_positive, alpha + jax.nn.sigmoid(beta * (r - mu)), alpha + 1.0)
    s = z + shift
    pos_term = -jax.nn.log_sigmoid(s)
    neg_term = -jax.nn.log_sigmoid(-lam * s) / lam
    if focal_on:
      # 1 - p_t in log-sigmoid form: sigmoid(-s) for a positive, sigmoid(λ s) for a negative.
      pos_term = balance * jnp.exp(gamma * jax.nn.log_sigmoid(-s)) * pos_term
      neg_term = balance * jnp.exp(gamma * jax.nn.log_sigmoid(lam * s)) * neg_term
    return r_hat * (y * pos_term + (1.0 - y) * neg_term)
  return per_label


@register("chmcnn")
def chmcnn(*, ancestor_matrix: np.ndarray) -> LossFns:
  """C-HMCNN (Giunchiglia & Lukasiewicz, "Coherent Hierarchical Multi-Label Classification Networks",
  NeurIPS 2020): trains with MCLoss, predicts with the max-constraint module MCM(sigmoid(z)).

  MCLoss is the one loss the paper defines on probabilities: BCE(y * MCM(y * h) + (1 - y) * MCM(h), y)
  with h = sigmoid(z). It is computed in the exact log-space form sigmoid(max z) = max sigmoid(z)
  (see `hierarchy`), so it is finite and stable like the others. Labels must be binary and
  hierarchy-closed. R comes from the dataset manifest's taxonomy (`Taxonomy.ancestor_matrix`).
  """
  index = hierarchy.descendant_index(ancestor_matrix)

  def per_label(z, y):
    if z.shape[-1] != index.num_labels:
      raise InputError(f"chmcnn: the model has {z.shape[-1]} labels but the taxonomy's R has "
                       f"{index.num_labels}")
    return hierarchy.mcloss_per_label(z, y, index)

  def probabilities(z):
    return jax.nn.sigmoid(hierarchy.max_constraint(z, index))

  return LossFns(per_label=per_label, probabilities=probabilities, hierarchical=True)
