"""Heuristic labels against the human annotations: per-label and averaged precision, recall, F1.

The table of the prototype's `src/evaluation/evaluate_heuristics.py` (sklearn's classification_report
with zero_division=0): per label P/R/F1/support, then the micro, macro, weighted and samples averages.
The annotations (``annotated_{test,validation}.parquet``: title, id, url, categories, labels) carry
each image's Commons categories, so only a category graph is needed; their labels are taxonomy v1.4.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from wikitopics_jax.errors import InputError
from wikitopics_jax.labels.heuristics import Labeller


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _prf(tp, fp, fn):
  p, r = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
  return p, r, _safe_div(2 * p * r, p + r)


def report(y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
  """{label: {precision, recall, f1, support}, "micro avg": ..., "macro avg": ..., "weighted avg":
  ..., "samples avg": ...} of binary (N, L) matrices; 0 where a ratio is 0/0 (as zero_division=0)."""
  t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
  tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
  support = t.sum(0)
  prec, rec, f1 = _prf(tp, fp, fn)
  out: dict[str, Any] = {
      name: {"precision": float(prec[k]), "recall": float(rec[k]), "f1": float(f1[k]),
             "support": int(support[k])} for k, name in enumerate(label_names)}
  mp, mr, mf = _prf(tp.sum(), fp.sum(), fn.sum())
  total = int(support.sum())
  out["micro avg"] = {"precision": float(mp), "recall": float(mr), "f1": float(mf), "support": total}
  out["macro avg"] = {"precision": float(prec.mean()), "recall": float(rec.mean()),
                      "f1": float(f1.mean()), "support": total}
  w = _safe_div(support, total)
  out["weighted avg"] = {"precision": float((prec * w).sum()), "recall": float((rec * w).sum()),
                         "f1": float((f1 * w).sum()), "support": total}
  sp, sr, sf = _prf((t & p).sum(1), (~t & p).sum(1), (t & ~p).sum(1))
  out["samples avg"] = {"precision": float(sp.mean()), "recall": float(sr.mean()),
                        "f1": float(sf.mean()), "support": total}
  return out


def read_annotations(paths: Sequence[str]) -> list[dict[str, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = []
  for path in paths:
    try:
      table = pq.read_table(path)
    except (OSError, Exception) as e:  # pylint: disable=broad-except
      raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    missing = {"categories", "labels"} - set(table.column_names)
    if missing:
      raise InputError(f"{path}: annotations need columns 'categories' and 'labels'; missing "
                       f"{sorted(missing)}")
    for r in table.select([c for c in ("title", "categories", "labels")
                           if c in table.column_names]).to_pylist():
      rows.append({"title": r.get("title") or "", "categories": list(r["categories"] or []),
                   "labels": list(r["labels"] or [])})
  return rows


def evaluate(labeller: Labeller, annotations: Sequence[str]) -> dict[str, Any]:
  """Labels the annotated images from their categories and scores them against the annotators."""
  tax = labeller.taxonomy
  rows = read_annotations(annotations)
  y_true = np.stack([tax.multi_hot(r["labels"], where=f"annotations, image {r['title']!r}")
                     for r in rows]) if rows else np.zeros((0, tax.num_labels), np.uint8)
  y_pred = np.zeros_like(y_true)
  for k, r in enumerate(rows):
    names, _ = labeller.label_file(r["categories"], audit=False)
    y_pred[k, tax.indices(names)] = 1
  out = report(y_true, y_pred, tax.labels)
  out["images"] = len(rows)
  out["heuristics"] = "+".join(labeller.heuristics)
  return out


def format_report(rep: dict[str, Any], label_names: Sequence[str]) -> str:
  lines = [f"{'':28s} precision  recall      f1  support"]
  for name in list(label_names) + ["micro avg", "macro avg", "weighted avg", "samples avg"]:
    m = rep[name]
    lines.append(f"{name:28s} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:7.3f} "
                 f"{m['support']:8d}")
  return "\n".join(lines)


def to_json(rep: dict[str, Any]) -> str:
  return json.dumps(rep, indent=1, ensure_ascii=False)
