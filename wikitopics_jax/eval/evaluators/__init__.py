"""Evaluators by name, configured in `config.evals` (big_vision's idea): each turns one split's
predictions into metrics, and each writes them under its own name.

    config.evals.<name> = {"type": <evaluator>, "split": <dataset split>,
                           "during_training": <bool>, <the evaluator's own keys>}

- `during_training=True`: run at every evaluation step of the training job, on the raw weights and
  (config.ema.decay > 0) the EMA; each scalar metric goes to metrics.jsonl as `<name>_<metric>` and
  `ema_<name>_<metric>` (the default `val` evaluator gives `val_loss`, which picks the best checkpoint).
- `during_training=False`: run on the best checkpoint after training (results.json), by `evaluate`
  (every checkpoint, `--watch` included; on `--split`) and by `report`. The first of them whose type is
  `multilabel` is the report: its metrics are the result's top level, once per threshold rule; every
  other one adds its metrics under `result[<name>]`.

A new evaluator is one module in this package that registers a factory with `@EVALUATORS.register`;
the factory's keyword parameters are its config keys (unknown keys are refused, naming them) and it
returns `evaluate(predictions, context) -> dict`. predictions: `probs` (N, L) float32, `labels`
(N, L) uint8 and `loss` (N,) of every example of the split in stored order.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wikitopics_jax import registry
from wikitopics_jax.errors import InputError

EVALUATORS = registry.Registry("evaluator")
REPORT_TYPE = "multilabel"
_COMMON_KEYS = ("type", "split", "during_training")


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator may read besides the predictions."""
  label_names: tuple[str, ...]
  ancestor_matrix: np.ndarray | None = None      # the taxonomy's (L, L) 0/1 ancestor relation
  train_frequencies: np.ndarray | None = None    # per label, positives / examples of the train split
  excluded_labels: tuple[str, ...] = ()          # labels the split's ground truth cannot judge
  thresholds: float | np.ndarray = 0.5           # one threshold, or one per label
  threshold_rules: tuple[str, ...] | None = None  # per label, how its threshold was chosen
  close: bool = False                            # add every predicted label's ancestors

  def with_thresholds(self, values, rules=None, close: bool = False) -> "Context":
    return dataclasses.replace(self, thresholds=values, threshold_rules=None if rules is None else tuple(rules),
                               close=close)

  def kept(self) -> np.ndarray:
    """Boolean mask of the labels the ground truth judges."""
    excluded = set(self.excluded_labels)
    return np.array([name not in excluded for name in self.label_names], dtype=bool)


EvaluateFn = Callable[[Mapping[str, np.ndarray], Context], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Configured:
  """One `config.evals` entry, built."""
  name: str
  type: str
  split: str
  during_training: bool
  evaluate: EvaluateFn


def _load_builtin() -> None:
  """Imports every module of this package once: each registers its evaluators."""
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
  _load_builtin()
  return EVALUATORS.names()


def from_config(evals_cfg: Mapping[str, Any]) -> list[Configured]:
  """config.evals -> the evaluators, in config order; one-line errors name the config key."""
  _load_builtin()
  out = []
  for name, entry in evals_cfg.items():
    key = f"config.evals.{name}"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
      raise InputError(f"{key}: an evaluator name must be letters, digits and '_' (it prefixes metric names)")
    entry = dict(entry)
    for required in ("type", "split"):
      if not entry.get(required):
        raise InputError(f"{key}.{required}: missing; an evaluator needs a type ({EVALUATORS.names()}) "
                         "and a split")
    kind, split = entry.pop("type"), entry.pop("split")
    during = entry.pop("during_training", False)
    if not isinstance(during, bool):
      raise InputError(f"{key}.during_training={during!r}: must be true or false")
    evaluate = EVALUATORS.build(kind, entry, key_prefix=key)
    out.append(Configured(name=name, type=kind, split=str(split), during_training=during,
                          evaluate=evaluate))
  return out


def during_training(evals_cfg: Mapping[str, Any]) -> list[Configured]:
  return [e for e in from_config(evals_cfg) if e.during_training]


def after_training(evals_cfg: Mapping[str, Any]) -> tuple[Configured, list[Configured]]:
  """(the report evaluator, the others) of the entries with during_training=False."""
  final = [e for e in from_config(evals_cfg) if not e.during_training]
  reports = [e for e in final if e.type == REPORT_TYPE]
  if not reports:
    raise InputError(f"config.evals: no evaluator of type {REPORT_TYPE!r} with during_training=False; "
                     "the test results, evaluate and report need one")
  return reports[0], [e for e in final if e is not reports[0]]


def scalar_metrics(name: str, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """An evaluator's scalar metrics as metrics.jsonl columns: `<prefix><name>_<metric>`."""
  return {f"{prefix}{name}_{k}": float(v) for k, v in metrics.items()
          if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


def run(report: Configured, others: Sequence[Configured], predictions: Mapping[str, np.ndarray],
        context: Context) -> dict[str, Any]:
  """The report's result with every other evaluator's metrics under its name (all on `predictions`)."""
  result = report.evaluate(predictions, context)
  for other in others:
    result[other.name] = other.evaluate(predictions, context)
  result["other_evaluators"] = [other.name for other in others]
  return result
