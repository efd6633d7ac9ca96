"""configs/experiments.py (the thesis's rows) and launch/sweep.py (running them, tabling results)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from absl import flags
from ml_collections import config_flags

import tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relative_path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


experiments = _load("configs/experiments.py", "experiments_under_test")
sweep = _load("launch/sweep.py", "sweep_under_test")
demo = _load("configs/demo.py", "demo_config")
thesis_b2_64 = _load("configs/thesis_b2_64.py", "thesis_b2_64_config")


def _flat(config) -> dict:
  out = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f"{prefix}{k}.", v)
    else:
      out[prefix[:-1]] = value
  walk("", config.to_dict())
  return out


ABSENT = "<absent>"


def _diff(a, b, ignore: tuple[str, ...] = ()) -> dict:
  """Keys whose values differ, with a's value; only a loss's own keys may be in one config only."""
  fa, fb = _flat(a), _flat(b)
  for key in ignore:
    fa.pop(key, None)
    fb.pop(key, None)
  assert all(k.startswith("loss.") for k in fa.keys() ^ fb.keys())
  return {k: fa.get(k, ABSENT) for k in fa.keys() | fb.keys() if fa.get(k, ABSENT) != fb.get(k, ABSENT)}


def _loss(name: str, **values) -> dict:
  """The flattened keys of loss `name`'s config: what a row that switches the loss to it changes."""
  defaults = {"focal": {"gamma": 2.0, "alpha": None},
              "class_weighted_bce": {"class_weights": "auto", "positives": "auto", "num_examples": "auto"},
              "pos_weighted_bce": {"pos_weights": "auto", "positives": "auto", "num_examples": "auto"},
              "asl": {"gamma_neg": 4.0, "gamma_pos": 1.0, "clip": 0.05, "focusing_grad": False,
                      "clamp_eps": 1e-8},
              "distribution_balanced": {"positives": "auto", "num_examples": "auto", "alpha": 0.1,
                                        "beta": 10.0, "mu": 0.3, "neg_scale": 5.0, "init_bias": 0.05,
                                        "focal": True, "balance_param": 2.0, "gamma": 2.0}}
  return {"loss.name": name, **{f"loss.{k}": v for k, v in {**defaults.get(name, {}), **values}.items()}}


LITE0 = {"model.name": "efficientnet_lite0", "model.input_normalization": "lite"}
IMAGENET = {**LITE0, "init": "imagenet"}
# What each row changes relative to `baseline`, at full scale: written out here, not derived from
# the pieces, so a piece that sets a wrong or an extra key fails.
EXPECTED_CHANGES = {
    "baseline": {},
    "table4_1_flat_data": {"data.hierarchical": False},
    "table4_1_chmcnn_flat_data": {**_loss("chmcnn"), "data.hierarchical": False},
    "table4_1_chmcnn": _loss("chmcnn"),
    "table4_2_naive_augmentation": {"data.augment": "naive"},
    # keep_fraction 0.8 and extra_fraction 0.2 are also the base defaults (checked below).
    "table4_2_undersampling": {"data.resampling.method": "heuristic_under"},
    "table4_2_oversampling_augmentation": {"data.resampling.method": "heuristic_over",
                                           "data.augment_duplicates": True},
    "table4_3_focal": _loss("focal", gamma=2.0),
    "table4_3_class_weights": _loss("class_weighted_bce"),
    "table4_3_pos_weights": _loss("pos_weighted_bce"),
    "table4_4_imagenet": IMAGENET,
    "table4_4_random": LITE0,
    **{f"table4_5_layers_{k}": {**IMAGENET, "trainable_layers": k} for k in (0, 3, 10, 70, 100)},
    "table5_1_training_split": {**IMAGENET, "report_split": "train"},
    "extra_asl": _loss("asl"),
    "extra_distribution_balanced": _loss("distribution_balanced"),
    "extra_chmcnn_imagenet": {**IMAGENET, **_loss("chmcnn")},
    "extra_cosine": {"schedule.name": "cosine"},
}


def test_every_row_is_listed_and_tabled():
  assert set(experiments.ROWS) == set(EXPECTED_CHANGES)
  tabled = {row for table in experiments.TABLES.values() for row in table.rows}
  assert tabled == set(experiments.ROWS)
  assert set(experiments.TABLES) == {"4.1", "4.2", "4.3", "4.4", "4.5", "4.6", "5.1", "extra"}


@pytest.mark.parametrize("row", sorted(EXPECTED_CHANGES))
def test_row_differs_from_baseline_in_exactly_the_intended_keys(row):
  full = experiments.get_config(row)
  assert _diff(full, experiments.get_config("baseline")) == EXPECTED_CHANGES[row]
  smoke = experiments.get_config(row + ":smoke")
  expected_smoke = dict(EXPECTED_CHANGES[row])
  if row in ("table4_4_imagenet", "table4_4_random", "table5_1_training_split",
             "extra_chmcnn_imagenet") or row.startswith("table4_5"):
    # The smoke scale's halved B0 becomes the unscaled Lite0, with fewer epochs.
    expected_smoke.update({"model.width_multiplier": None, "model.depth_multiplier": None,
                           "num_epochs": experiments.SMOKE_EPOCHS_LITE0})
  assert _diff(smoke, experiments.get_config("baseline:smoke")) == expected_smoke


def test_scales_are_the_thesis_and_demo_configs():
  full = experiments.get_config("baseline")
  assert _diff(full, thesis_b2_64.get_config(), ignore=("report_split",)) == {}
  smoke = experiments.get_config("baseline:smoke")
  assert _diff(smoke, demo.get_config(), ignore=("report_split",)) == {
      "num_epochs": experiments.SMOKE_EPOCHS}
  assert full.report_split == "test" and full.data.hierarchical and full.init == "random"
  assert (full.model.name, full.batch_size, full.num_epochs) == ("efficientnet_b2", 512, 15)
  assert experiments.get_config("table4_2_undersampling").data.resampling.keep_fraction == 0.8
  assert experiments.get_config("table4_2_oversampling_augmentation").data.resampling.extra_fraction == 0.2
  assert experiments.get_config("table4_3_focal").loss.gamma == 2.0


def test_config_flags_passes_the_smoke_suffix_through():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(["prog", f"--config={REPO}/configs/experiments.py:table4_3_focal:smoke"])
  config = flag_values.config
  assert (config.loss.name, config.num_epochs) == ("focal", experiments.SMOKE_EPOCHS)
  with pytest.raises(ValueError, match="unknown row 'nope'"):
    experiments.get_config("nope")
  with pytest.raises(ValueError, match="needs a row"):
    experiments.get_config(None)


def test_thesis_numbers_are_plausible():
  for table in experiments.TABLES.values():
    for entry in table.entries:
      assert entry.row in experiments.ROWS and entry.thresholds in ("0.5", "tuned")
      assert set(entry.thesis) <= set(experiments.METRICS)
      assert not entry.thesis or entry.source
      for key, value in entry.thesis.items():
        assert key in ("trainable_params", "labels_per_image") or 0 < value < 1, (entry, key)
  # Spot checks against the thesis's tables.
  t42 = experiments.TABLES["4.2"].entries
  assert (t42[0].thesis["ap"], t42[0].thesis["r_rest"], t42[3].thesis["p_all"]) == (0.254, 0.083, 0.198)
  t43 = {e.label: e for e in experiments.TABLES["4.3"].entries}
  assert t43["Per-class thresholds"].thresholds == "tuned"
  assert t43["Per-class thresholds"].row == "baseline"
  assert t43["Sample-weights"].thesis["ap"] == 0.263
  t45 = experiments.TABLES["4.5"].entries
  assert t45[3].thesis["trainable_params"] == 5_722_684 and t45[-1].thesis["f1_all"] == 0.262


# ---------------------------------------------------------------------------------------------------
# The sweep.


def _result(base: float, *, tuned: float | None = None) -> dict:
  """A results.json whose metrics are base + small offsets, easy to find in the tables."""
  def metrics(v):
    return {"macro_ap": v, "precision": {"macro": v + 0.01, "micro": 0.9, "samples": 0.9},
            "recall": {"macro": v + 0.02, "micro": 0.9, "samples": 0.9},
            "f1": {"macro": v + 0.03, "micro": v + 0.04, "samples": 0.9},
            "groups": {"top_k": 5, "top": {"precision": v + 0.05, "recall": v + 0.06, "f1": v + 0.07},
                       "rest": {"precision": v + 0.08, "recall": v + 0.09, "f1": v + 0.1}},
            "labels_per_image": {"true": 2.3, "predicted": 1.5}, "checkpoint_step": 7}
  out = metrics(base)
  if tuned is not None:
    out["at_tuned_thresholds"] = metrics(tuned)
  return out


def _write(path: str, data) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(data if isinstance(data, str) else json.dumps(data))


def test_tables_from_fake_results(tmp_path):
  root = str(tmp_path)
  _write(f"{root}/baseline/results.json", _result(0.5, tuned=0.2))
  _write(f"{root}/baseline/sweep.log", "model efficientnet_b0: 743,167 parameters (743,167 trainable)")
  _write(f"{root}/table4_3_focal/results.json", _result(0.3))
  _write(f"{root}/table4_1_chmcnn/results.json", _result(0.4))
  _write(f"{root}/table5_1_training_split/results.json", _result(0.1))
  _write(f"{root}/table5_1_training_split/results_train.json", _result(0.7, tuned=0.6))
  text = sweep.assemble(["4.1", "4.3", "4.5", "5.1"], root, smoke=True, extra_args=["--config.x=1"])
  t41, t43, t45, t51 = text.split("## Table ")[1:]
  # 4.1: the AUC(PR) grid (ours with the thesis's in parentheses), then the detail table.
  assert "| hierarchical data | 0.500 (thesis 0.303) | 0.400 (thesis 0.210) |" in t41
  assert "| flat data | not run (thesis 0.271) | not run (thesis 0.179) |" in t41
  # 4.3: baseline at 0.5 and the same run at its tuned thresholds; P/R for all, top-5 and rest.
  assert ("| Baseline | `baseline` | 0.5 | 0.500 | 0.510 | 0.520 | 0.550 | 0.560 | 0.580 | 0.590 | "
          "0.530 | 0.540 | 1.500 |") in t43
  assert ("| Per-class thresholds | `baseline` | tuned | 0.200 | 0.210 | 0.220 | 0.250 | 0.260 | "
          "0.280 | 0.290 | 0.230 | 0.240 | 1.500 |") in t43
  assert "| Focal loss | `table4_3_focal` | 0.5 | 0.300 |" in t43
  assert "| Class-weights | `table4_3_class_weights` | 0.5 | not run |  |" in t43
  assert ("| Sample-weights | 0.5 | 0.263 | 0.420 | 0.156 | 0.674 | 0.517 | 0.371 | 0.087 | 0.195 | "
          "0.544 | — |") in t43
  assert "| Per-class thresholds | tuned | 0.254 |" in t43 and "| 10.322 |" in t43
  assert ("wikitopics train --config=configs/experiments.py:table4_3_focal:smoke "
          f"--workdir={root}/table4_3_focal --config.x=1") in t43
  # 4.5: F1 layout; 5.1: the training-split results, at 0.5 and tuned, and its evaluate commands.
  assert "| trainable params | labels/image | F1 all | F1 top-5 | F1 rest |" in t45
  assert "| Flat | `table5_1_training_split` | 0.5 | 0.700 |" in t51
  assert "| Flat (per-class thresh) | `table5_1_training_split` | tuned | 0.600 |" in t51
  assert f"--workdir={root}/table5_1_training_split --split=train --thresholds=0.5" in t51
  assert sweep.trainable_params(f"{root}/baseline") == 743167
  assert "smoke scale" in text.split("\n")[0]


FAKE_CLI = r'''
import json, os, sys
command, args = sys.argv[1], dict(a[2:].split("=", 1) for a in sys.argv[2:] if "=" in a)
workdir = args["workdir"]
with open(os.environ["FAKE_RECORD"], "a") as f:
  f.write(" ".join(sys.argv[1:]) + "\n")
if os.path.basename(workdir) == os.environ.get("FAKE_FAIL"):
  print("boom"); sys.exit(1)
result = {"macro_ap": 0.5, "precision": {"macro": 0.5}, "recall": {"macro": 0.5},
          "f1": {"macro": 0.5, "micro": 0.5}, "labels_per_image": {"predicted": 1.0},
          "groups": {"top": {"precision": 0.5, "recall": 0.5, "f1": 0.5},
                     "rest": {"precision": 0.5, "recall": 0.5, "f1": 0.5}}, "checkpoint_step": 3}
if command == "train":
  json.dump(result, open(os.path.join(workdir, "results.json"), "w"))
else:
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  assert args["thresholds"] == "saved", args  # writes the 0.5 file and, when tuned, the tuned one
  for tag, ap in (("t0.5", 0.8), ("tuned", 0.9)):
    result.update(macro_ap=ap, thresholds_source="tuned (x)" if tag == "tuned" else "0.5")
    json.dump(result, open(os.path.join(workdir, "eval", f"{args['split']}_step3_{tag}.json"), "w"))
'''


def test_sweep_skips_finished_rows_resumes_and_dry_run(tmp_path, monkeypatch, capsys):
  root = str(tmp_path / "sweep")
  fake = tmp_path / "fake_cli.py"
  fake.write_text(FAKE_CLI)
  record = tmp_path / "record.txt"
  monkeypatch.setenv("FAKE_RECORD", str(record))
  _write(f"{root}/baseline/results.json", _result(0.5))
  _write(f"{root}/table4_3_focal/checkpoints/10/x", "")
  argv = ["--tables=4.3,5.1", "--smoke", f"--root={root}", f"--wikitopics={sys.executable} {fake}"]

  assert sweep.main([*argv, "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert "baseline: done\n" in out and "table4_3_focal: resume\n" in out
  assert "table4_3_class_weights: new\n" in out
  assert "--split=train --thresholds=saved" in out
  assert not record.exists() and not os.path.exists(f"{root}/tables.md")
  assert not os.path.exists(f"{root}/table4_3_class_weights")

  monkeypatch.setenv("FAKE_FAIL", "table4_3_class_weights")
  assert sweep.main(argv) == 1  # one row failed; the others ran
  calls = record.read_text().splitlines()
  def row_of(call):
    return next(w for w in call.split() if w.startswith("--workdir=")).rsplit("/", 1)[1]
  assert [c.split()[0] + " " + row_of(c) for c in calls] == [
      "train table4_3_focal", "train table4_3_class_weights", "train table4_3_pos_weights",
      "train table5_1_training_split", "evaluate table5_1_training_split"]
  merged = json.load(open(f"{root}/table5_1_training_split/results_train.json"))
  assert merged["macro_ap"] == 0.8 and merged["at_tuned_thresholds"]["macro_ap"] == 0.9
  tables = open(f"{root}/tables.md").read()
  assert ("| Class-weights | `table4_3_class_weights` | 0.5 | unfinished (see "
          "table4_3_class_weights/sweep.log) |") in tables
  assert "| Flat (per-class thresh) | `table5_1_training_split` | tuned | 0.900 |" in tables
  assert "FAILED" in capsys.readouterr().out

  # Rerun: only the failed row runs again; a changed scale or extra args is refused.
  monkeypatch.delenv("FAKE_FAIL")
  record.unlink()
  assert sweep.main(argv) == 0
  assert [c.split()[0] for c in record.read_text().splitlines()] == ["train"]
  os.remove(f"{root}/table4_3_focal/results.json")  # back to "resume", now as a full-scale row
  assert sweep.main([argv[0], f"--root={root}", argv[3], "--extra_args=--config.x=1"]) == 1
  assert "use another --root" in capsys.readouterr().out


def test_print_commands(capsys):
  assert sweep.main(["--tables=4.4", "--root=/mnt/bucket/sweep", "--print_commands=tpu",
                     "--extra_args=--config.data.worker_count=8"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ("CONFIG=configs/experiments.py:table4_4_imagenet "
                      "WORKDIR=/mnt/bucket/sweep/table4_4_imagenet launch/tpu_pod.sh train "
                      "--config.data.worker_count=8")
  assert len([l for l in lines if not l.startswith("#")]) == 2
  assert sweep.main(["--tables=5.1", "--root=/s", "--smoke", "--print_commands=slurm"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ("sbatch --job-name=wt-table5_1_training_split launch/slurm_gpu.sbatch "
                      "configs/experiments.py:table5_1_training_split:smoke /s/table5_1_training_split")
  assert lines[-1] == "# python launch/sweep.py --tables=5.1 --root=/s --smoke"
  assert sweep.main(["--rows=extra_cosine", "--root=/s", "--print_commands=local"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "wikitopics train --config=configs/experiments.py:extra_cosine --workdir=/s/extra_cosine",
      "# python launch/sweep.py --rows=extra_cosine --root=/s"]


def test_one_smoke_row_end_to_end(tmp_path, monkeypatch):
  """Table 5.1's row through the real CLI (train, then evaluate on train at 0.5 and tuned), reduced
  to a tiny model on a tiny dataset by --extra_args."""
  root = str(tmp_path / "sweep")
  monkeypatch.setenv("XLA_FLAGS", tests.xla_flags(1))
  # 300 synthetic images (generated by the training job): 210 of them in the training split.
  extra = (f"--config.data.dir={tmp_path / 'data'} --config.data.synthetic.num_images=300 "
           "--config.model.name=efficientnet_tiny --config.model.depth_multiplier=0.1 "
           "--config.model.head=gap --config.init=random "
           "--config.batch_size=32 --config.eval_batch_size=32 --config.num_epochs=1 "
           "--config.checkpoint.keep_latest=1")
  assert sweep.main(["--tables=5.1", "--smoke", f"--root={root}", f"--extra_args={extra}"]) == 0
  workdir = f"{root}/table5_1_training_split"
  config = json.load(open(f"{workdir}/config.json"))
  assert config["report_split"] == "train" and config["model"]["name"] == "efficientnet_tiny"
  merged = json.load(open(f"{workdir}/results_train.json"))
  assert merged["split"] == "train" and merged["num_images"] == 210
  assert merged["at_tuned_thresholds"]["thresholds_source"].startswith("tuned")
  tables = open(f"{root}/tables.md").read()
  assert "| Flat | `table5_1_training_split` | 0.5 | not run" not in tables
  assert "| Flat (per-class thresh) | `table5_1_training_split` | tuned | 0." in tables


def test_accelerator_configs_are_valid_bf16_settings():
  from wikitopics_jax import configlib  # pylint: disable=g-import-not-at-top
  accelerator = _load("configs/accelerator.py", "accelerator_config")
  assert sorted(accelerator.SETTINGS) == ["b0_224", "b0_64", "b2_64"]
  for name, (model, image_size, batch_size, _) in accelerator.SETTINGS.items():
    c = accelerator.get_config(name)
    configlib.check(c)
    assert (c.model.name, c.model.image_size, c.data.synthetic.image_size) == (model, image_size,
                                                                             image_size)
    assert c.model.dtype == "bfloat16" and c.data.augment_on == "device"
    assert batch_size % 256 == 0  # divides over any power-of-two slice up to 256 chips
  with pytest.raises(ValueError, match="valid settings"):
    accelerator.get_config("b7_600")
