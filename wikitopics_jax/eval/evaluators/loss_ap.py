"""`loss_ap`: mean loss and macro average precision, the validation metrics of the training job
(`val_loss` picks the best checkpoint, as in the thesis)."""

from __future__ import annotations

import numpy as np

from wikitopics_jax.eval import metrics as metrics_lib
from wikitopics_jax.eval.evaluators import EVALUATORS


@EVALUATORS.register("loss_ap")
def loss_ap():
  def evaluate(predictions, context):
    keep = context.kept()
    # Labels the ground truth cannot judge are left out of AP; the loss is the model's, over all.
    ap, _ = metrics_lib.macro_average_precision(predictions["labels"][:, keep],
                                                predictions["probs"][:, keep])
    return {"loss": float(np.mean(predictions["loss"])), "macro_ap": float(ap)}
  return evaluate
