"""`multilabel`: the full multi-label report (`evaluation.summarize`): AP, PR-AUC, ROC-AUC, precision,
recall and F1 (macro, micro, samples, top-k and rest groups, per label), labels per image and the
hierarchy-violation rate, at the context's thresholds."""

from __future__ import annotations

from wikitopics_jax.eval import evaluation
from wikitopics_jax.eval.evaluators import EVALUATORS


@EVALUATORS.register("multilabel")
def multilabel():
  def evaluate(predictions, context):
    return evaluation.summarize(
        predictions, label_names=context.label_names, thresholds=context.thresholds,
        train_frequencies=context.train_frequencies, ancestor_matrix=context.ancestor_matrix,
        excluded_labels=context.excluded_labels, close=context.close, rules=context.threshold_rules)
  return evaluate
