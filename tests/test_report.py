"""The evaluate job over many checkpoints (all, watch) and the HTML report, on one tiny training run."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from tests import trained_runs
from wikitopics_jax import evaluate_job
from wikitopics_jax import manifest as manifest_lib
from wikitopics_jax import metrics
from wikitopics_jax import report
from sklearn import metrics as skm

STEPS = [4, 8, 12]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return trained_runs.tiny_run(tmp_path_factory)


def _no_sleep(seconds):
  raise AssertionError(f"watch slept {seconds} s on a finished run")


def test_evaluate_all_writes_every_checkpoint_and_a_table(run):
  workdir, _ = run
  # On test: the report test then reuses the saved predictions of the best checkpoint.
  results = evaluate_job.evaluate(workdir, checkpoint="all", split="test")
  assert [r["checkpoint_step"] for r in results] == STEPS
  for step in STEPS:
    for suffix in (".json", ".md", ".predictions.npz"):
      assert os.path.exists(evaluate_job.eval_path(workdir, "test", step, suffix))
    saved = evaluate_job.load_predictions(workdir, "test", step)
    assert saved["probs"].shape == (48, 31)
  assert all(r["ground_truth"] == "heuristic" for r in results)
  markdown = open(evaluate_job.eval_path(workdir, "test", 12, ".md")).read()
  assert "heuristic labels" in markdown and "| macro AP |" in markdown
  table = json.load(open(os.path.join(workdir, "eval", "test_checkpoints.json")))
  assert [row["step"] for row in table["checkpoints"]] == STEPS
  summary = open(os.path.join(workdir, "eval", "test_checkpoints.md")).read()
  assert summary.count("\n| ") == len(STEPS) + 1  # Header and one row per checkpoint.
  # The metrics are those of the saved predictions.
  saved = evaluate_job.load_predictions(workdir, "test", 8)
  expected, _ = metrics.macro_average_precision(saved["labels"], saved["probs"])
  assert results[1]["macro_ap"] == pytest.approx(expected)


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
  for table in ("threshold 0.5", "tuned thresholds", "macro AP", "Likely missing labels"):
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
  markdown = open(evaluate_job.eval_path(workdir_copy, "test", 12, ".md")).read()
  assert "cannot judge (left out) | Politics, Belief" in markdown
