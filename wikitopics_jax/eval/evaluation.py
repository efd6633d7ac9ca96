"""Running a model over a split: probabilities, losses and the metrics report."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from wikitopics_jax.eval import metrics as metrics_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax.eval import thresholds as thresholds_lib
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

# What a closed rule's predictions change in a `metrics.evaluate_predictions` result; the rest
# (AP, ROC-AUC, ...) depends on the probabilities alone.
_PREDICTION_KEYS = ("precision", "recall", "f1", "labels_per_image", "hierarchy_violation_rate")
_PER_LABEL_PREDICTION_KEYS = ("predicted", "precision", "recall", "f1")
CLOSED_RULE = "prob >= threshold, then every predicted label's ancestors added"


MODALITIES = ("fused", "image", "text")


def predict_split(eval_step, state, *, data_dir: str, split: str, batch_size: int, hierarchical: bool,
                  mesh, worker_count: int = 0, text_tokenizer=None, modality: str = "fused",
                  text_removed_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """All examples of a split in their stored order: probs (N, L) float32, labels (N, L) uint8, loss (N,).

  text_tokenizer: a multimodal model's host tokenizer (`multimodal.text_tokenizer`): the batches
  then carry the tokenised text (`pipeline.TokenizeText`) and has_image. modality: "fused" (both),
  "image" (has_text False for every example: image only) or "text" (has_image False: text only).
  text_removed_fraction: also remove the text of this share of the examples, chosen by a fixed hash
  of the example's position in the split (the same examples every time).
  """
  if modality not in MODALITIES:
    raise InputError(f"modality={modality!r}: must be one of {list(MODALITIES)}")
  if text_tokenizer is None and (modality != "fused" or text_removed_fraction):
    raise InputError(f"modality={modality!r} / text_removed_fraction={text_removed_fraction}: the "
                     "model has no text input (config.text.tower='none')")
  per_process = sharding_lib.per_process_batch_size(batch_size, mesh, key="config.eval_batch_size")
  ds, num_batches = pipeline.eval_dataset(data_dir, split, batch_size=per_process,
                                          hierarchical=hierarchical, share=sharding_lib.process_share(),
                                          worker_count=worker_count, text_tokenizer=text_tokenizer)
  chunks: dict[str, list[np.ndarray]] = {"probs": [], "loss": [], "labels": [], "index": [], "mask": []}
  iterator = iter(ds)
  for _ in range(num_batches):
    local = next(iterator)
    inputs = {"image": local["image"], "labels": local["labels"]}
    if text_tokenizer is not None:
      inputs.update(text_inputs(local, modality, text_removed_fraction))
    batch = sharding_lib.global_batch({**inputs, "index": local["index"], "mask": local["mask"]}, mesh)
    out = eval_step(state, {k: batch[k] for k in inputs})
    gathered = multihost_utils.process_allgather(
        {"probs": out["probs"], "loss": out["loss"], "labels": batch["labels"],
         "index": batch["index"], "mask": batch["mask"]}, tiled=True)
    for k, v in gathered.items():
      chunks[k].append(np.asarray(v))
  merged = {k: np.concatenate(v) for k, v in chunks.items()}
  keep = merged["mask"]
  order = np.argsort(merged["index"][keep], kind="stable")
  return {"probs": merged["probs"][keep][order].astype(np.float32),
          "labels": merged["labels"][keep][order].astype(np.uint8),
          "loss": merged["loss"][keep][order].astype(np.float32)}


def text_inputs(local: dict[str, np.ndarray], modality: str = "fused",
                text_removed_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """A tokenised batch's model inputs, with a modality blanked: text_ids, text_mask, has_text,
  has_image (all (B, ...) NumPy)."""
  has_text = np.asarray(local["has_text"], bool).copy()
  has_image = np.ones(has_text.shape, bool)
  if modality == "image":
    has_text[:] = False
  elif modality == "text":
    has_image[:] = False
  if text_removed_fraction:
    has_text &= ~removed_by_hash(local["index"], text_removed_fraction)
  return {"text_ids": local["text_ids"], "text_mask": local["text_mask"], "has_text": has_text,
          "has_image": has_image}


def removed_by_hash(index: np.ndarray, fraction: float) -> np.ndarray:
  """(B,) bool: whether example `index` is in the removed `fraction` (Knuth's multiplicative hash of
  the position, so the choice is fixed and spread evenly over the split)."""
  hashed = (np.asarray(index, np.int64).astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
  return hashed.astype(np.float64) / 2**32 < fraction


def summarize(predictions: dict[str, np.ndarray], *, label_names, thresholds=0.5,
              train_frequencies=None, ancestor_matrix=None,
              excluded_labels: Sequence[str] = (), close: bool = False,
              rules: Sequence[str] | None = None) -> dict[str, Any]:
  """Metrics of a split's predictions (metrics.evaluate_predictions), plus the mean loss.

  excluded_labels: labels the ground truth cannot judge (the human annotations never asked about
  Politics and Belief: unknown, not negative). Their columns are left out of every metric, the
  hierarchy check included; `labels_not_evaluated` lists them.
  close: predictions are `thresholds_lib.apply_thresholds` with the hierarchy (every predicted label's
  ancestors added; needs ancestor_matrix), as thresholds tuned on hierarchical labels are applied.
  rules: per label, how its threshold was chosen (thresholds.json "rules"): each per-label row gets
  "threshold_rule", and the result "threshold_rules" counts them.
  """
  label_names = predictions_label_names = list(label_names)
  unknown = sorted(set(excluded_labels) - set(label_names))
  if unknown:
    raise InputError(f"labels to leave out of the evaluation {unknown} are not model labels; valid: "
                     f"{label_names}")
  if close and ancestor_matrix is None:
    raise ValueError("close=True needs the ancestor matrix")
  if rules is not None and len(rules) != len(label_names):
    raise ValueError(f"{len(rules)} threshold rules for {len(label_names)} labels")
  keep = np.array([name not in set(excluded_labels) for name in label_names])
  labels, probs = predictions["labels"], predictions["probs"]
  # Closed over the whole hierarchy before any column is left out.
  closed = (thresholds_lib.apply_thresholds(probs, thresholds, ancestor_matrix) if close else None)
  if not keep.all():
    labels, probs = labels[:, keep], probs[:, keep]
    closed = None if closed is None else closed[:, keep]
    label_names = [n for n, k in zip(label_names, keep) if k]
    if np.ndim(thresholds):
      thresholds = np.asarray(thresholds)[keep]
    if train_frequencies is not None:
      train_frequencies = np.asarray(train_frequencies)[keep]
    if ancestor_matrix is not None:
      ancestor_matrix = np.asarray(ancestor_matrix)[np.ix_(keep, keep)]
  result = metrics_lib.evaluate_predictions(
      labels, probs, label_names=label_names, thresholds=thresholds,
      train_frequencies=train_frequencies, ancestor_matrix=ancestor_matrix)
  if closed is not None:
    # evaluate_predictions thresholds probabilities itself; given the closed 0/1 predictions as
    # scores and threshold 0.5, its thresholded metrics are those of the closed predictions.
    hard = metrics_lib.evaluate_predictions(
        labels, closed.astype(np.float32), label_names=label_names, thresholds=0.5,
        train_frequencies=train_frequencies, ancestor_matrix=ancestor_matrix)
    _take_predictions(result, hard)
    result["threshold_rule"] = CLOSED_RULE
  if not keep.all():
    # Per-label rows stay aligned with the model's labels: the excluded ones say so.
    evaluated = iter(result["per_label"])
    result["per_label"] = [
        next(evaluated) if k else
        {"name": name, "not_evaluated": True, "support": None, "predicted": None, "ap": None,
         "baseline_ap": None, "pr_auc_trapezoid": None, "roc_auc": None, "precision": None,
         "recall": None, "f1": None, "threshold": None}
        for name, k in zip(predictions_label_names, keep)]
  if rules is not None:
    for row, rule in zip(result["per_label"], rules):
      row["threshold_rule"] = rule
    result["threshold_rules"] = {rule: [name for name, r in zip(predictions_label_names, rules) if r == rule]
                                 for rule in dict.fromkeys(rules)}
  result["labels_not_evaluated"] = list(excluded_labels)
  # The model's loss, over all its labels.
  result["loss"] = float(np.mean(predictions["loss"]))
  result["num_examples"] = int(predictions["labels"].shape[0])
  return result


def _take_predictions(result: dict[str, Any], hard: dict[str, Any]) -> None:
  """Copies the prediction-dependent metrics of `hard` into `result` (same labels, same images)."""
  for key in _PREDICTION_KEYS:
    if key in hard:
      result[key] = hard[key]
  for group in ("top", "rest"):
    for key in ("precision", "recall", "f1"):
      result["groups"][group][key] = hard["groups"][group][key]
  for row, hard_row in zip(result["per_label"], hard["per_label"]):
    for key in _PER_LABEL_PREDICTION_KEYS:
      row[key] = hard_row[key]


def labels_without_ground_truth(manifest, split: str) -> list[str]:
  """The labels a human-labelled split cannot judge (manifest info.labels_not_annotated)."""
  if split not in (manifest.info.get("human_labelled_splits") or ()):
    return []
  return list(manifest.info.get("labels_not_annotated") or ())


def violation_rate_text(result: dict[str, Any]) -> str:
  """A result's hierarchy-violation rate as printed ("0.25%"), "n/a" without a hierarchy."""
  rate = result.get("hierarchy_violation_rate")
  return "n/a" if rate is None else f"{100 * rate:.2f}%"


def write_json(path: str, data: dict[str, Any]) -> None:
  """Atomic: readers (and a crash) never see half a file. Process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with files.atomic_open(path) as f:
    json.dump(data, f, indent=1, default=_json_default)


def _json_default(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f"not JSON-serialisable: {type(value)}")
