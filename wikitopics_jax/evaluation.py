"""Running a model over a split: probabilities, losses and the metrics report."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from wikitopics_jax import metrics as metrics_lib
from wikitopics_jax import pipeline
from wikitopics_jax import sharding as sharding_lib


def predict_split(eval_step, state, *, data_dir: str, split: str, batch_size: int, hierarchical: bool,
                  mesh, worker_count: int = 0) -> dict[str, np.ndarray]:
  """All examples of a split in their stored order: probs (N, L) float32, labels (N, L) uint8, loss (N,)."""
  per_process = sharding_lib.per_process_batch_size(batch_size, mesh, key="config.eval_batch_size")
  ds, num_batches = pipeline.eval_dataset(data_dir, split, batch_size=per_process,
                                          hierarchical=hierarchical, share=sharding_lib.process_share(),
                                          worker_count=worker_count)
  chunks: dict[str, list[np.ndarray]] = {"probs": [], "loss": [], "labels": [], "index": [], "mask": []}
  iterator = iter(ds)
  for _ in range(num_batches):
    local = next(iterator)
    batch = sharding_lib.global_batch(local, mesh)
    out = eval_step(state, {"image": batch["image"], "labels": batch["labels"]})
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


def summarize(predictions: dict[str, np.ndarray], *, label_names, thresholds=0.5,
              train_frequencies=None, ancestor_matrix=None) -> dict[str, Any]:
  result = metrics_lib.evaluate_predictions(
      predictions["labels"], predictions["probs"], label_names=list(label_names), thresholds=thresholds,
      train_frequencies=train_frequencies, ancestor_matrix=ancestor_matrix)
  result["loss"] = float(np.mean(predictions["loss"]))
  result["num_examples"] = int(predictions["labels"].shape[0])
  return result


def write_json(path: str, data: dict[str, Any]) -> None:
  """Atomic: readers (and a crash) never see half a file. Process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=_json_default)
  os.replace(tmp, path)


def _json_default(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  raise TypeError(f"not JSON-serialisable: {type(value)}")
