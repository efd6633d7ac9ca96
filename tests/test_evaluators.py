"""The evaluator registry (config.evals): config errors, the built-in evaluators against
scikit-learn, and each evaluator's metrics under its own name in the training job's outputs."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import (average_precision_score, coverage_error, label_ranking_average_precision_score,
                             label_ranking_loss)

from tests import trained_runs
from wikitopics_jax import configlib
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.eval import evaluators


def _sklearn_ranking(y, p):
  return {"coverage_error": coverage_error(y, p), "label_ranking_loss": label_ranking_loss(y, p),
          "label_ranking_ap": label_ranking_average_precision_score(y, p)}


def _context(num_labels, excluded=()):
  return evaluators.Context(label_names=tuple(f"l{j}" for j in range(num_labels)),
                            excluded_labels=tuple(excluded))


def _built(kind, **keys):
  (ev,) = evaluators.from_config({"e": {"type": kind, "split": "test", **keys}})
  return ev.evaluate


@pytest.mark.parametrize("seed", range(4))
def test_ranking_matches_sklearn_with_ties_and_degenerate_rows(seed):
  rng = np.random.default_rng(seed)
  y = (rng.random((257, 9)) < 0.25).astype(np.uint8)
  y[:4] = 0   # no true label: coverage 0, loss 0, LRAP 1 in scikit-learn
  y[4:7] = 1  # every label true
  probs = np.round(rng.random((257, 9)), 1).astype(np.float32)  # many ties
  got = _built("ranking", chunk=50)({"labels": y, "probs": probs, "loss": np.zeros(257)}, _context(9))
  want = _sklearn_ranking(y, probs)
  assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_loss_ap_matches_sklearn_and_leaves_out_labels_the_truth_cannot_judge():
  rng = np.random.default_rng(0)
  y = (rng.random((200, 6)) < 0.3).astype(np.uint8)
  y[:, 5] = 0  # no positives: left out of macro AP
  probs = rng.random((200, 6)).astype(np.float32)
  loss = rng.random(200).astype(np.float32)
  got = _built("loss_ap")({"labels": y, "probs": probs, "loss": loss}, _context(6, excluded=("l0",)))
  want = np.mean([average_precision_score(y[:, j], probs[:, j]) for j in (1, 2, 3, 4)])
  assert got["macro_ap"] == pytest.approx(want, abs=1e-9)
  assert got["loss"] == pytest.approx(float(loss.mean()), rel=1e-6)


def test_config_errors_name_the_key_and_list_the_valid_values():
  with pytest.raises(InputError, match=r"unknown evaluator 'nope'; valid names: \[.*'loss_ap'.*'multilabel'.*'ranking'"):
    evaluators.from_config({"x": {"type": "nope", "split": "val"}})
  with pytest.raises(InputError, match=r"config\.evals\.x\.colour: not a parameter of evaluator 'ranking' \(valid: \['chunk'\]\)"):
    evaluators.from_config({"x": {"type": "ranking", "split": "val", "colour": 1}})
  with pytest.raises(InputError, match=r"config\.evals\.x\.split: missing"):
    evaluators.from_config({"x": {"type": "ranking"}})
  with pytest.raises(InputError, match=r"config\.evals\.x-y: an evaluator name"):
    evaluators.from_config({"x-y": {"type": "ranking", "split": "val"}})
  with pytest.raises(InputError, match=r"config\.evals: no evaluator of type 'multilabel'"):
    evaluators.after_training({"r": {"type": "ranking", "split": "test"}})
  config = configlib.base_config()
  config.checkpoint.best_metric = "valid_loss"
  with pytest.raises(InputError, match=r"config\.checkpoint\.best_metric='valid_loss': no during-training "
                     r"evaluator writes it \(they are \['val'\]"):
    trainer._check_best_metric(config, evaluators.during_training(config.evals))


def test_default_evaluators_follow_the_data_split_keys():
  config = configlib.base_config()
  config.data.val_split, config.data.test_split = "dev", "human"
  splits = {ev.name: (ev.type, ev.split, ev.during_training) for ev in evaluators.from_config(config.evals)}
  assert splits == {"val": ("loss_ap", "dev", True), "test": ("multilabel", "human", False),
                    "ranking": ("ranking", "human", False)}


def test_each_evaluator_writes_under_its_name(tmp_path_factory):
  workdir, _ = trained_runs.tiny_run(tmp_path_factory)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  val_rows = [r for r in rows if "val_loss" in r]
  assert len(val_rows) == trained_runs.NUM_CHECKPOINTS
  # The added during-training evaluator's metrics, under its name, equal scikit-learn's on that
  # checkpoint's validation predictions.
  last = val_rows[-1]
  evaluate_job.evaluate(workdir, checkpoint=last["step"], split="val")
  val = evaluate_job.load_predictions(workdir, "val", last["step"])
  want = _sklearn_ranking(val["labels"], val["probs"])
  for metric, value in want.items():
    assert last[f"val_ranking_{metric}"] == pytest.approx(value, rel=1e-5)
  # The after-training "ranking" evaluator: under its name in results.json and in evaluate's files.
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["other_evaluators"] == ["ranking"] and results["evaluator"] == "test"
  step = results["checkpoint_step"]
  evaluated = evaluate_job.evaluate(workdir, checkpoint=step, split="test")
  test = evaluate_job.load_predictions(workdir, "test", step)
  want = _sklearn_ranking(test["labels"], test["probs"])
  assert {k: results["ranking"][k] for k in want} == pytest.approx(want, rel=1e-9)
  assert {k: evaluated["ranking"][k] for k in want} == pytest.approx(want, rel=1e-9)
