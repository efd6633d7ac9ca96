"""The evaluate job over many checkpoints (all, watch) and the HTML report, on one tiny training run."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from tests import trained_runs
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.eval import metrics
from wikitopics_jax.eval import report
from sklearn import metrics as skm

STEPS = [4, 8, 12]


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  return trained_runs.tiny_run(tmp_path_factory)


def _no_sleep(seconds):
  raise AssertionError(f"watch slept {seconds} s on a finished run")


def test_evaluate_all_writes_every_checkpoint_and_a_table(run):
  workdir, _ = run
  # On test: the report test then reuses the saved predictions of the best checkpoint.
  results = evaluate_job.evaluate(workdir, checkpoint="all", split="test")
  assert [r["checkpoint_step"] for r in results] == STEPS
  tuned_step = _tuned_step(workdir)
  for step in STEPS:
    for suffix in ("_t0.5.json", "_t0.5.md", ".predictions.npz"):
      assert os.path.exists(evaluate_job.eval_path(workdir, "test", step, suffix))
    # Tuned thresholds belong to one checkpoint: only that one has a tuned result.
    tuned_file = evaluate_job.eval_path(workdir, "test", step, "_tuned.json")
    assert os.path.exists(tuned_file) == (step == tuned_step)
    saved = evaluate_job.load_predictions(workdir, "test", step)
    assert saved["probs"].shape == (48, 31)
  assert all(r["ground_truth"] == "heuristic" for r in results)
  markdown = open(evaluate_job.eval_path(workdir, "test", 12, "_t0.5.md")).read()
  assert "heuristic labels" in markdown and "| macro AP |" in markdown
  table = json.load(open(os.path.join(workdir, "eval", "test_checkpoints.json")))
  assert [(row["step"], row["rule"]) for row in table["checkpoints"]] == sorted(
      [(step, "t0.5") for step in STEPS] + [(tuned_step, "tuned")])
  summary = open(os.path.join(workdir, "eval", "test_checkpoints.md")).read()
  assert summary.count("\n| ") == len(STEPS) + 2  # Header and one row per checkpoint and rule.
  # The metrics are those of the saved predictions.
  saved = evaluate_job.load_predictions(workdir, "test", 8)
  expected, _ = metrics.macro_average_precision(saved["labels"], saved["probs"])
  assert results[1]["macro_ap"] == pytest.approx(expected)


def _tuned_step(workdir):
  with open(os.path.join(workdir, "thresholds.json")) as f:
    return json.load(f)["meta"]["checkpoint_step"]


def test_evaluate_writes_each_rule_to_its_own_file_and_never_training_results(run, capsys):
  workdir, _ = run
  results_path = os.path.join(workdir, "results.json")
  with open(results_path, "rb") as f:
    training_bytes = f.read()
  training = json.loads(training_bytes)
  step = training["checkpoint_step"]
  assert step == _tuned_step(workdir)
  result = evaluate_job.evaluate(workdir, checkpoint=step, split="test")
  printed = capsys.readouterr().out
  at_half = json.load(open(evaluate_job.eval_path(workdir, "test", step, "_t0.5.json")))
  tuned = json.load(open(evaluate_job.eval_path(workdir, "test", step, "_tuned.json")))
  # Each file holds one rule, and the same rule gives training's numbers: the printouts agree.
  assert at_half["thresholds_source"] == "0.5" and tuned["thresholds_source"].startswith("tuned")
  for ours, theirs in ((at_half, training), (tuned, training["at_tuned_thresholds"])):
    for key in ("precision", "recall", "f1"):
      for average in ("macro", "micro"):
        assert ours[key][average] == pytest.approx(theirs[key][average], abs=1e-6)
    assert ours["labels_per_image"]["predicted"] == pytest.approx(theirs["labels_per_image"]["predicted"])
  assert result["f1"] == at_half["f1"] and result["at_tuned_thresholds"]["f1"] == tuned["f1"]
  # The tuned rule says per label how its threshold was chosen, and adds ancestors (closed labels).
  assert [row["threshold_rule"] for row in tuned["per_label"]] == \
      json.load(open(os.path.join(workdir, "thresholds.json")))["rules"]
  assert tuned["hierarchy_violation_rate"] == 0
  markdown = open(evaluate_job.eval_path(workdir, "test", step, "_tuned.md")).read()
  assert "threshold rule" in markdown and "ancestors" in markdown
  assert "thresholds 0.5 (" in printed and "thresholds tuned (" in printed
  assert "per-label rules:" in printed and "threshold 0.5 -> tuned" in printed
  # Another rule gets another file; nothing else changes.
  before = {name: open(os.path.join(workdir, "eval", name), "rb").read()
            for name in os.listdir(os.path.join(workdir, "eval")) if f"_step{step}_" in name}
  evaluate_job.evaluate(workdir, checkpoint=step, split="test", thresholds="0.3")
  assert json.load(open(evaluate_job.eval_path(workdir, "test", step, "_t0.3.json")))["thresholds_source"] \
      == "0.3"
  for name, content in before.items():
    assert open(os.path.join(workdir, "eval", name), "rb").read() == content, name
  with open(results_path, "rb") as f:
    assert f.read() == training_bytes


def test_watch_evaluates_each_checkpoint_once_and_stops_when_training_is_done(run, tmp_path):
  workdir, _ = run
  # A finished run: one pass over every checkpoint, then it stops without waiting.
  results = evaluate_job.watch(workdir, split="threshold", poll_seconds=0.01, timeout=60,
                               sleep=_no_sleep)
  assert [r["checkpoint_step"] for r in results] == STEPS
  assert evaluate_job.watch(workdir, split="threshold", timeout=60, sleep=_no_sleep) == []

  # A run still training (no results.json): it polls until results.json appears.
  live = str(tmp_path / "live")
  shutil.copytree(workdir, live, ignore=shutil.ignore_patterns("eval", "results.json", "report"))
  polls = []

  def finish_training(seconds):
    polls.append(seconds)
    with open(os.path.join(live, "results.json"), "w") as f:
      f.write("{}")

  results = evaluate_job.watch(live, split="threshold", poll_seconds=5, timeout=600, sleep=finish_training)
  assert [r["checkpoint_step"] for r in results] == STEPS and polls == [5]
  # Nothing new and training not done: the timeout ends it.
  os.remove(os.path.join(live, "results.json"))
  assert evaluate_job.watch(live, split="threshold", poll_seconds=0.01, timeout=0.05) == []


def test_human_labelled_splits_are_reported_as_such(run):
  _, data_dir = run
  manifest = manifest_lib.read(data_dir)
  assert evaluate_job.ground_truth_kind("test", manifest) == "heuristic"
  assert evaluate_job.ground_truth_kind("test_human", manifest) == "human"
  manifest.info["human_labelled_splits"] = ["annotated"]
  assert evaluate_job.ground_truth_kind("annotated", manifest) == "human"


def test_pr_curve_area_is_the_average_precision():
  rng = np.random.default_rng(0)
  y = rng.random(200) < 0.2
  scores = np.round(rng.random(200) + 0.4 * y, 2)  # Rounded: tied scores too.
  recall, precision = report.pr_curve(y, scores)
  area = np.sum(np.diff(recall) * precision[1:])
  assert area == pytest.approx(metrics.average_precision(y[:, None], scores[:, None])[0])


def test_report_has_every_figure_linked_from_index(run):
  workdir, _ = run
  index = report.build_report(workdir, split="test", images_per_label=4, num_missing=10)
  out_dir = os.path.dirname(index)
  assert out_dir == os.path.join(workdir, "report")
  page = open(index, encoding="utf-8").read()
  figures = ["training_curves", "bootstrap_thresholds", "probability_histograms", "f1_threshold_moving",
             "predicted_label_distribution", "ap_vs_frequency", "pr_curves"]
  for name in figures:
    assert f"figures/{name}.png" in page, name
  grids = os.listdir(os.path.join(out_dir, "figures", "top_predictions"))
  assert len(grids) == 31
  # Every local link of the page exists, is relative, and every written file is linked.
  links = set(re.findall(r'(?:src|href)="([^"#]+)"', page))
  assert links and all(not os.path.isabs(link) for link in links)
  for link in links:
    assert os.path.isfile(os.path.join(out_dir, link)), link
  written = {os.path.relpath(os.path.join(root, f), out_dir)
             for root, _, files in os.walk(out_dir) for f in files} - {"index.html"}
  assert written <= links
  assert any(link.startswith("thumbs/") for link in links)  # The likely-missing-labels table.
  for table in ("threshold 0.5", "tuned thresholds", "macro AP", "Likely missing labels", "threshold rule",
                "per-label rules:"):
    assert table in page
  assert "heuristic labels" in page
  # Rebuilt in place: the new report replaces the old one, no staging folder is left behind.
  report.build_report(workdir, split="test", images_per_label=4, num_missing=10)
  assert [d for d in os.listdir(workdir) if d.startswith(".report")] == []


def test_labels_a_human_split_cannot_judge_are_left_out_of_every_metric(run, tmp_path):
  """The human annotations never asked about Politics and Belief: unknown there, not negative."""
  workdir, data_dir = run
  data_copy, workdir_copy = str(tmp_path / "data"), str(tmp_path / "run")
  shutil.copytree(data_dir, data_copy)
  shutil.copytree(workdir, workdir_copy)
  path = os.path.join(data_copy, manifest_lib.MANIFEST_NAME)
  with open(path) as f:
    manifest = json.load(f)
  manifest.setdefault("info", {}).update(human_labelled_splits=["test"],
                                         labels_not_annotated=["Politics", "Belief"])
  with open(path, "w") as f:
    json.dump(manifest, f)
  config = evaluate_job.load_workdir_config(workdir_copy)
  config.data.dir = data_copy
  result = evaluate_job.evaluate(workdir_copy, checkpoint=12, split="test", config_override=config,
                                 thresholds="0.5")
  assert result["ground_truth"] == "human"
  assert result["labels_not_evaluated"] == ["Politics", "Belief"]
  names = [row["name"] for row in result["per_label"]]
  keep = np.array([n not in ("Politics", "Belief") for n in names])
  assert result["num_labels"] == keep.sum() == len(names) - 2
  for row in result["per_label"]:
    assert row.get("not_evaluated", False) == (row["name"] in ("Politics", "Belief"))
  saved = np.load(evaluate_job.eval_path(workdir_copy, "test", 12, ".predictions.npz"))
  y, p = saved["labels"][:, keep], saved["probs"][:, keep]
  with_positives = y.sum(axis=0) > 0
  expected_ap = np.mean([skm.average_precision_score(y[:, j], p[:, j])
                         for j in np.flatnonzero(with_positives)])
  assert result["macro_ap"] == pytest.approx(expected_ap, abs=1e-9)
  predicted = (p >= 0.5).astype(int)
  assert result["f1"]["micro"] == pytest.approx(
      skm.f1_score(y, predicted, average="micro", zero_division=0), abs=1e-9)
  assert result["precision"]["macro"] == pytest.approx(
      skm.precision_score(y, predicted, average="macro", zero_division=0), abs=1e-9)
  markdown = open(evaluate_job.eval_path(workdir_copy, "test", 12, "_t0.5.md")).read()
  assert "cannot judge (left out) | Politics, Belief" in markdown
