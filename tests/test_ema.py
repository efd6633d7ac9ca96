"""EMA of the parameters: the optax transform against the textbook formula, and a training run whose
checkpointed EMA equals the formula applied to the raw parameters of every step's checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import datasets
from tests import toy_config
from wikitopics_jax import checkpointing
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax import optimizers
from wikitopics_jax.eval import predict
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError



def debiased_ema(trajectory, decay):
  """sum_i (1-d) d^(t-i) p_i / (1 - d^t) over the parameters after updates 1..t."""
  t = len(trajectory)
  weights = np.array([(1 - decay) * decay ** (t - i) for i in range(1, t + 1)])
  return np.tensordot(weights, np.stack(trajectory), axes=1) / (1 - decay ** t)


def test_params_ema_is_the_debiased_moving_average_of_the_updated_parameters():
  decay = 0.8
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), optimizers.params_ema(decay))
  params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
  state = tx.init(params)
  np.testing.assert_array_equal(optimizers.ema_params(state, params, decay)["w"], params["w"])
  trajectory = {"w": [], "b": []}
  for step in range(6):
    grads = jax.tree.map(lambda p: 2 * p + step, params)  # any gradient will do
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in params:
      trajectory[k].append(np.asarray(params[k]))
  ema = optimizers.ema_params(state, params, decay)
  for k in params:
    np.testing.assert_allclose(ema[k], debiased_ema(trajectory[k], decay), rtol=1e-6, atol=1e-7)


def test_ema_decay_outside_the_open_unit_interval_is_a_config_error():
  with pytest.raises(InputError, match="config.ema.decay"):
    optimizers.params_ema(1.0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ema") / "data")
  datasets.make_dataset(d, sizes={"train": 64, "val": 32, "test": 32}, image_size=32)
  return d


def test_training_checkpoints_the_ema_and_evaluates_it_next_to_the_raw_parameters(tmp_path, data_dir):
  decay = 0.6
  config = toy_config.get_config(data_dir)
  config.update_from_flattened_dict({"ema.decay": decay, "checkpoint.every_steps": 1,
                                     "checkpoint.keep_latest": 8, "num_epochs": 2,
                                     "thresholds.tune": False})
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  steps = ckpt.all_steps()
  assert steps == [1, 2, 3, 4]
  arrays = [ckpt.restore_arrays(s) for s in steps]
  ema_keys = sorted(k for k in arrays[-1] if "/ema/" in k)
  assert ema_keys, sorted(arrays[-1])[:20]
  (ema_prefix,) = {k.split("/ema/")[0] for k in ema_keys}
  assert int(arrays[-1][ema_prefix + "/count"]) == 4
  checked = 0
  for key in ema_keys:
    raw_key = "0/" + key.split("/ema/", 1)[1]  # the model's own copy of that Param
    trajectory = [np.asarray(a[raw_key], np.float64) for a in arrays]
    expected = debiased_ema(trajectory, decay) * (1 - decay ** 4)  # stored undebiased
    np.testing.assert_allclose(arrays[-1][key], expected, rtol=2e-5, atol=1e-6, err_msg=key)
    checked += 1
  assert checked == len(ema_keys) > 10

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "val_loss" in line]
  assert rows and all(np.isfinite(r["ema_val_loss"]) and "ema_val_macro_ap" in r for r in rows)
  assert result["ema"]["decay"] == decay
  assert 0.0 <= result["ema"]["macro_ap"] <= 1.0
  # A different set of weights gives different predictions.
  assert result["ema"]["macro_ap"] != result["macro_ap"] or rows[-1]["ema_val_loss"] != rows[-1]["val_loss"]

  # The evaluate job gives the same EMA metrics, into files of its own beside the raw weights' ones.
  best = result["checkpoint_step"]
  raw_path = os.path.join(workdir, "results.json")
  with open(raw_path) as f:
    raw_before = f.read()
  evaluated = evaluate_job.evaluate(workdir, checkpoint="best", split="test", thresholds="0.5", ema=True)
  assert evaluated["macro_ap"] == pytest.approx(result["ema"]["macro_ap"], abs=1e-6)
  assert evaluated["f1"]["macro"] == pytest.approx(result["ema"]["f1"]["macro"], abs=1e-6)
  assert evaluated["weights"].startswith("EMA") and "0.6" in evaluated["weights"]
  assert os.path.exists(os.path.join(workdir, "eval", f"test_ema_step{best}_t0.5.json"))
  with open(raw_path) as f:
    assert f.read() == raw_before
  no_ema = toy_config.get_config(data_dir)
  no_ema.thresholds.tune = False
  with pytest.raises(InputError, match="--ema needs a run trained with config.ema.decay > 0"):
    evaluate_job.evaluate(workdir, ema=True, config_override=no_ema)

  # predict --ema on the same split gives the evaluate job's EMA probabilities, example by example.
  def predicted_probs(ema):
    out = str(tmp_path / f"predictions_ema{ema}.jsonl")
    predict.predict(workdir, out_path=out, data_dir=data_dir, split="test", ema=ema, jsonl=True)
    with open(out) as f:
      lines = [json.loads(line) for line in f]
    return np.array([list(line["probabilities"].values()) for line in lines])

  ema_saved = evaluate_job.load_predictions(workdir, "test_ema", best)["probs"]
  np.testing.assert_allclose(predicted_probs(True), ema_saved, atol=1e-6)
  assert not np.allclose(predicted_probs(False), ema_saved, atol=1e-6)
