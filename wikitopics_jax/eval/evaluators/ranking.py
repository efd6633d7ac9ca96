"""`ranking`: label-ranking metrics, as scikit-learn defines them (`coverage_error`,
`label_ranking_loss`, `label_ranking_average_precision_score`): how far down each image's ranking of
labels its true labels sit, independent of any threshold. Ties count against the model, as there.

Vectorised over (images, labels, labels) comparisons in chunks of `chunk` images.
"""

from __future__ import annotations

import numpy as np

from wikitopics_jax.eval.evaluators import EVALUATORS


def ranking_metrics(y_true: np.ndarray, scores: np.ndarray, chunk: int = 4096) -> dict[str, float]:
  y_true = np.asarray(y_true).astype(bool)
  scores = np.asarray(scores, dtype=np.float64)
  n, num_labels = y_true.shape
  coverage = np.zeros(n)
  loss = np.zeros(n)
  lrap = np.ones(n)  # scikit-learn's score for an image with no or only true labels
  for start in range(0, n, chunk):
    y, s = y_true[start:start + chunk], scores[start:start + chunk]
    positives = y.sum(1)
    # at_least[i, j, k]: label k scores at least as high as label j on image i.
    at_least = s[:, None, :] >= s[:, :, None]
    lowest_true = np.where(y, s, np.inf).min(1)
    coverage[start:start + chunk] = np.where(positives > 0, (s >= lowest_true[:, None]).sum(1), 0)
    # (true j, false k) pairs with score_j <= score_k, over positives x negatives.
    wrong = (at_least & y[:, :, None] & ~y[:, None, :]).sum((1, 2))
    pairs = positives * (num_labels - positives)
    loss[start:start + chunk] = np.where(pairs > 0, wrong / np.maximum(pairs, 1), 0.0)
    # Per true label j: true labels ranked at or above it / all labels ranked at or above it.
    ratio = (at_least & y[:, None, :]).sum(2) / at_least.sum(2)
    partial = (positives > 0) & (positives < num_labels)
    mean_ratio = (ratio * y).sum(1) / np.maximum(positives, 1)
    lrap[start:start + chunk] = np.where(partial, mean_ratio, 1.0)
  return {"coverage_error": float(coverage.mean()), "label_ranking_loss": float(loss.mean()),
          "label_ranking_ap": float(lrap.mean())}


@EVALUATORS.register("ranking")
def ranking(*, chunk: int = 4096):
  def evaluate(predictions, context):
    keep = context.kept()
    return ranking_metrics(predictions["labels"][:, keep], predictions["probs"][:, keep], chunk=chunk)
  return evaluate
