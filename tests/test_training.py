"""End-to-end training on a tiny dataset and a tiny model, on 8 fake CPU devices."""

import functools
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tests import datasets
from tests import toy_config
from wikitopics_jax import checkpointing
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(data_dir: str, *, config_file=tiny, **overrides) -> ml_collections.ConfigDict:
  c = config_file.get_config(data_dir)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("train") / "data")
  datasets.make_dataset(d, sizes={"train": 128, "val": 32, "threshold": 32, "test": 48}, image_size=32)
  return d


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return [r["loss"] for r in rows if "loss" in r]


def test_train_evaluate_and_keep_the_best_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir, num_epochs=3)
  result = trainer.train_and_evaluate(config, workdir)
  losses = _losses(workdir)
  assert len(losses) == 12  # 3 epochs x 4 steps
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  # Outputs: results, per-checkpoint eval, metrics, TensorBoard events, config.
  assert os.path.exists(os.path.join(workdir, "results.json"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  best = json.load(open(os.path.join(workdir, "checkpoints", "best.json")))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    val = [json.loads(l) for l in f if "val_loss" in l]
  assert best["step"] == min(val, key=lambda r: r["val_loss"])["step"]
  assert result["checkpoint_step"] == best["step"]

  # The printed/JSON metrics equal scikit-learn on the model's own predictions (evaluate job).
  again = evaluate_job.evaluate(workdir, checkpoint="best", split="test")
  assert again["macro_ap"] == pytest.approx(result["macro_ap"], abs=1e-6)

  # Exact resume after SIGKILL, SIGTERM and torn writes: tests/test_resilience.py.


def test_metrics_in_results_match_sklearn(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(data_dir, num_epochs=1), workdir)
  from wikitopics_jax import steps, task as task_lib, sharding
  from wikitopics_jax.data import manifest as manifest_lib
  from wikitopics_jax.eval import evaluation
  config = evaluate_job.load_workdir_config(workdir)
  manifest = manifest_lib.read(data_dir)
  task = task_lib.build(config, manifest, total_steps=4)
  mesh = sharding.make_mesh()
  placement = sharding.Placement(mesh, task.state)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state = checkpointing.restore_state(ckpt, ckpt.best_step(), task.state, placement)
  eval_step = steps.make_eval_step(task, state_sharding=placement.state, batch_sharding=placement.batch)
  pred = evaluation.predict_split(eval_step, state, data_dir=data_dir, split="test", batch_size=32,
                                  hierarchical=True, mesh=mesh)
  truth = np.stack([r["labels_hier"] for r in datasets.read_split(data_dir, "test")])
  np.testing.assert_array_equal(pred["labels"], truth)
  present = truth.sum(0) > 0
  expected = average_precision_score(truth[:, present], pred["probs"][:, present], average="macro")
  result = json.load(open(os.path.join(workdir, "results.json")))
  assert result["macro_ap"] == pytest.approx(expected, abs=1e-6)


def test_taxonomy_mismatch_and_bad_batch_are_clear_errors(tmp_path, data_dir):
  # The checks are the trainer's, whatever the model: the toy model compiles in seconds.
  toy = functools.partial(tiny_config, config_file=toy_config)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(toy(data_dir, num_epochs=1), workdir)
  other = str(tmp_path / "v14")
  datasets.make_dataset(other, sizes={"train": 64, "val": 32, "test": 32}, taxonomy="v1.4")
  with pytest.raises(InputError, match="checkpoint taxonomy 'v1.3' has labels"):
    trainer.train_and_evaluate(toy(other, num_epochs=2), workdir)
  with pytest.raises(InputError, match="config.batch_size=36 is not divisible by the 8 devices"):
    trainer.train_and_evaluate(toy(data_dir, batch_size=36), str(tmp_path / "x"))
