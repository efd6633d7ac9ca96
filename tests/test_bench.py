"""The benchmark runner: every suite in --tiny mode, the rows and the report; the PyTorch twin model."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from wikitopics_jax import losses
from wikitopics_jax.bench import model_suites
from wikitopics_jax.bench import runner
from wikitopics_jax.errors import InputError

# One run of every suite (tiny) serves most tests below.


# Session scope: a module fixture is torn down (and later recomputed) whenever xdist runs another
# module's test between two of this module's.
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  ctx = runner.Context(tiny=True, profile_dir=str(tmp / "profile"), log=lambda message: None)
  report = runner.run_suites(runner.SUITE_ORDER, ctx)
  path = str(tmp / "out" / "bench.json")
  runner.write_json(report, path)
  return report, path, str(tmp / "profile")


def _rows(report, suite):
  return [row for row in report["rows"] if row["suite"] == suite]


def test_every_suite_runs_and_the_json_is_written(tiny_run):
  report, path, _ = tiny_run
  assert report["failed"] == []
  assert {row["suite"] for row in report["rows"]} == set(runner.SUITE_ORDER)
  with open(path) as f:
    written = json.load(f)
  assert len(written["rows"]) == len(report["rows"])
  assert written["settings"]["tiny"] is True
  machine = written["machine"]
  assert machine["cores"] >= 1 and machine["cpu_model"] and machine["jax_devices"]
  assert written["versions"]["jax"] == jax.__version__
  assert written["date"].startswith("20")
  table = runner.markdown_table(written)
  assert "> 1 means ours is faster" in table
  assert table.count("\n| ") == len(report["rows"]) + 1  # Header + one line per row.


def test_rows_are_consistent(tiny_run):
  report, _, _ = tiny_run
  for row in report["rows"]:
    assert row["measured"] and row["ours"] and row["unit"] in (*runner.RATE_UNITS, "s", "ms"), row
    for key in ("ours_stats", "baseline_stats"):
      stats = row[key]
      if stats is None:
        continue
      assert stats["repeats"] == len(stats["samples"]) >= 1, row
      assert stats["low"] <= stats["median"] <= stats["high"], row
      assert all(math.isfinite(s) and s > 0 for s in stats["samples"]), row
    if row["baseline_stats"] is None:
      assert row["baseline"] is None and row["speedup"] is None
      continue
    ours, theirs = row["ours_stats"]["median"], row["baseline_stats"]["median"]
    expected = ours / theirs if row["higher_is_better"] else theirs / ours
    assert row["speedup"] == pytest.approx(expected), row
    assert row["higher_is_better"] == (row["unit"] in runner.RATE_UNITS)


def test_paired_rows_give_the_range_of_per_round_speedups(tiny_run):
  rate = runner.Row("s", "m", "ours", "images/s", runner.Stats.of([10.0, 20.0, 30.0], rounds=7),
                    baseline="b", baseline_stats=runner.Stats.of([5.0, 5.0, 10.0], rounds=7))
  assert rate.speedup == pytest.approx(4.0)  # 20 / 5: the medians' ratio.
  assert rate.speedup_range == pytest.approx((2.0, 4.0))  # Rounds: 10/5, 20/5, 30/10.
  time_row = runner.Row("s", "m", "ours", "s", runner.Stats.of([2.0, 1.0], rounds=8), baseline="b",
                        baseline_stats=runner.Stats.of([4.0, 4.0], rounds=8).scaled(
                            1.0, extrapolated=True))
  assert time_row.speedup_range == pytest.approx((2.0, 4.0))
  # Timed in different calls, or outside measure_alternating: no shared rounds.
  for other in (runner.Stats.of([5.0, 5.0, 10.0], rounds=6), runner.Stats.of([5.0, 5.0, 10.0])):
    assert dataclasses.replace(rate, baseline_stats=other).speedup_range is None
  calls = [runner.measure_alternating([runner.Candidate("a", lambda: None),
                                       runner.Candidate("b", lambda: None)],
                                      repeats=2, unit="s") for _ in range(2)]
  assert calls[0]["a"][0].rounds == calls[0]["b"][0].rounds != calls[1]["a"][0].rounds
  report = tiny_run[0]
  paired = [row for row in report["rows"] if row["paired"]]
  assert {row["suite"] for row in paired} >= {"train_step", "inference", "pipeline"}
  table = runner.markdown_table(report)
  for row in paired:
    low, high = row["speedup_range"]
    assert 0 < low <= high, row
    assert f"{row['speedup']:.2f}x ({low:.2f}–{high:.2f})" in table, row


def test_model_suites_measure_the_depthwise_trick_and_flops(tiny_run):
  report, _, _ = tiny_run
  for suite in ("train_step", "inference"):
    rows = _rows(report, suite)
    assert any(row["baseline"] == "NNX, depthwise native (lax grouped conv)" for row in rows)
    # Only training takes the fused BatchNorm path, so only train_step compares it with nnx's.
    unfused = [row for row in rows
               if row["baseline"] == "NNX, BatchNorm + activation by nnx.BatchNorm and autodiff"]
    assert len(unfused) == (1 if suite == "train_step" else 0)
    for row in rows:
      extra = row["extra"]
      assert extra["flops_per_step"] > 0 and extra["step_time_ms"] > 0
      assert extra["mfu"] is None  # No peak for CPUs.
      assert extra["step_time_ms"] == pytest.approx(
          1e3 * extra["batch"] / row["ours_stats"]["median"])
  skipped = {(s["suite"], s["what"]) for s in report["skipped"]}
  try:
    import torch  # noqa: F401
  except ImportError:
    # Without torch every PyTorch row is skipped at once, with the import error as the reason.
    assert ("train_step", "PyTorch baselines") in skipped
  else:
    assert ("train_step", "torch.compile") in skipped  # Off in --tiny mode, with a reason.


def test_pytorch_baselines_run_when_torch_is_installed(tiny_run):
  pytest.importorskip("torch")
  report, _, _ = tiny_run
  for suite in ("train_step", "inference"):
    baselines = {row["baseline"] for row in _rows(report, suite)}
    assert {"PyTorch eager, NCHW", "PyTorch eager, channels_last"} <= baselines


def test_numeric_baselines_agree_with_ours(tiny_run):
  report, _, _ = tiny_run
  checked = [row for row in _rows(report, "losses") if row["baseline_stats"] is not None]
  # Every registered loss on 31 labels, then MCLoss on the random DAG.
  assert len(checked) == len(losses.names()) + 1
  for row in checked:
    assert row["extra"]["loss_abs_diff"] < 1e-5 * max(1.0, abs(row["extra"]["loss"])), row["measured"]
    assert row["extra"]["grad_max_abs_diff"] < 1e-4 * row["extra"]["grad_max_abs"]
  assert "extrapolated" in checked[-1]["note"] and checked[-1]["baseline_stats"]["extrapolated"]
  ap_row, micro_row = _rows(report, "metrics")
  assert ap_row["extra"]["ap_max_abs_diff"] < 1e-9
  assert micro_row["extra"]["ap_max_abs_diff"] < 1e-9
  resampling = _rows(report, "resampling")
  assert len(resampling) == 4 and all(r["extra"]["same_result_on_subset"] for r in resampling)
  assert sum(r["baseline_stats"]["extrapolated"] for r in resampling) == 2
  pipeline = _rows(report, "pipeline")
  # Decoded, decoded with example info (device augmentation), decoded + naive host augmentation.
  assert [(r["extra"]["augmentation"], r["extra"]["worker_count"]) for r in pipeline] == [
      ("none", 0), ("none", 2), ("device", 0), ("naive", 0), ("naive", 2)]
  for row in pipeline:
    assert row["extra"]["baseline_processes"] == max(1, row["extra"]["worker_count"])
    assert row["extra"]["cores_for_100k_images_per_second"] == pytest.approx(
        100_000 / row["extra"]["ours_images_per_second_per_core"])
  ingest = _rows(report, "ingest")
  assert [r["extra"]["processes"] for r in ingest] == sorted({1, runner.core_count()})
  for row in ingest:  # Every benchmark image made it through the ingest.
    assert row["extra"]["num_images"] == 64 and row["baseline"].startswith("bare PIL")


def test_profile_has_annotated_train_steps(tiny_run):
  _, _, profile_dir = tiny_run
  assert glob.glob(os.path.join(profile_dir, "plugins", "profile", "*", "*.xplane.pb"))


def test_accelerator_mode_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError.
  ctx = runner.Context(tiny=True, mode="accelerator", log=lambda message: None)
  report = runner.run_suites(["inference"], ctx)
  assert report["failed"] == []
  (row,) = report["rows"]  # Ours alone: no native-vs-shifted row off CPU, no PyTorch.
  assert row["baseline"] is None and row["extra"]["dtype"] == "bfloat16"
  assert row["extra"]["flops_per_step"] > 0 and row["extra"]["mfu"] is None  # CPU: peak unknown.
  assert "MFU: peak unknown" in row["note"]
  assert any("PyTorch is not installed" in s["reason"] for s in report["skipped"])


def test_failing_baseline_is_skipped_with_its_reason():
  skipped = []

  def broken():
    raise RuntimeError("no compiler\nsecond line")

  stats = runner.measure_alternating(
      [runner.Candidate("ours", lambda: None, work=10), runner.Candidate("broken", broken)],
      repeats=3, unit="images/s", on_failure=lambda c, why: skipped.append((c.name, why)))
  assert list(stats) == ["ours"] and stats["ours"][0].repeats == 3
  assert skipped == [("broken", "RuntimeError: no compiler")]
  with pytest.raises(RuntimeError):  # Ours (the first) failing is an error, not a skip.
    runner.measure_alternating([runner.Candidate("broken", broken)], repeats=1, unit="s",
                               on_failure=lambda c, why: skipped.append(c.name))


def test_settling_round_runs_every_candidate_once_untimed_before_the_timed_rounds():
  calls = []

  def candidate(name):
    return runner.Candidate(name, lambda: calls.append(name), work=1,
                            warmup=lambda: calls.append(name + " warm-up"))

  stats = runner.measure_alternating([candidate("ours"), candidate("base")], repeats=2,
                                     unit="images/s", settling_round=True)
  assert calls == ["ours warm-up", "base warm-up"] + ["ours", "base"] * 3
  assert stats["ours"][0].repeats == stats["base"][0].repeats == 2


def test_unknown_suite_lists_the_valid_names():
  with pytest.raises(InputError, match="unknown benchmark suite 'nope'.*losses"):
    runner.run_suites(["nope"], runner.Context(tiny=True))


def test_peak_flops_table_and_compiled_flops():
  assert model_suites.peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert model_suites.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert model_suites.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert model_suites.peak_flops("TPU v5", "bfloat16") == 459e12
  assert model_suites.peak_flops("NVIDIA H200", "float32") is None
  assert model_suites.peak_flops("cpu", "bfloat16") is None
  x = jax.numpy.ones((64, 64))
  compiled = jax.jit(lambda a: a @ a).lower(x).compile()
  assert model_suites.compiled_flops(compiled) == pytest.approx(2 * 64**3)


def test_cli_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "wikitopics_jax.bench", "--suites=metrics,resampling", "--tiny",
       f"--out={out}"], cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| metrics |" in proc.stdout and "| resampling |" in proc.stdout
  report = json.loads(out.read_text())
  assert [row["suite"] for row in report["rows"]] == ["metrics"] * 2 + ["resampling"] * 4


# ---------------------------------------------------------------------------------------------------
# The PyTorch twin of our EfficientNet.


def test_torch_efficientnet_has_our_parameter_count_and_logits():
  torch = pytest.importorskip("torch")
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from wikitopics_jax import models  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.bench import torch_efficientnet  # pylint: disable=g-import-not-at-top

  b0 = torch_efficientnet.create("efficientnet_b0", num_labels=1000)
  assert torch_efficientnet.count_parameters(b0) == 5_288_548  # Keras's EfficientNetB0.
  cfg = models.default_model_config()
  cfg.update(name="efficientnet_b2", head="gap")
  ours = nnx.eval_shape(lambda: models.create_model(cfg, num_labels=31, rngs=nnx.Rngs(0)))
  theirs = torch_efficientnet.create("efficientnet_b2", num_labels=31)
  assert torch_efficientnet.count_parameters(theirs) == models.count_parameters(ours)

  cfg = models.default_model_config()
  cfg.update(name="efficientnet_tiny", head="gap")
  ours = models.create_model(cfg, num_labels=31, rngs=nnx.Rngs(0))
  # Non-trivial BatchNorm statistics, so that copying them is checked too.
  for _, variable in nnx.to_flat_state(nnx.state(ours, nnx.BatchStat)):
    variable[...] = variable[...] + 0.1
  theirs = torch_efficientnet.create("efficientnet_tiny", num_labels=31)
  torch_efficientnet.load_nnx_weights(theirs, ours)
  ours.eval()
  theirs.eval()
  forward = nnx.jit(lambda model, x: model(x))
  # Even sizes pad asymmetrically at stride 2 (TF 'SAME'), odd ones symmetrically.
  for size in (32, 33):
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      torch_logits = theirs(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(torch_logits, np.asarray(forward(ours, x)), atol=1e-5)


def test_keras_baseline_is_b0_with_our_trainable_parameter_count():
  """The TF-Keras baseline (optional extra bench-keras) builds B0 only and checks its parameters."""
  pytest.importorskip("tensorflow")
  from wikitopics_jax.bench import keras_baseline  # pylint: disable=g-import-not-at-top
  keras, why_not = keras_baseline.keras_or_reason(threads=1)
  assert keras is not None, why_not
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8),
           "labels": rng.integers(0, 2, (2, 31), dtype=np.int8)}
  options = dict(train=True, batch=batch, num_labels=31, learning_rate=1e-3, adam_epsilon=1e-7,
                 steps_per_run=1)
  with pytest.raises(ValueError, match="efficientnet_b0"):
    keras_baseline.KerasStep(keras, model="efficientnet_tiny", expected_params=1, **options)
  # Our B0 with a 31-label pooled head: 4,007,548 base + 1280 * 31 + 31 head parameters.
  keras_baseline.KerasStep(keras, model="efficientnet_b0", expected_params=4_047_259, **options)
  with pytest.raises(AssertionError, match="not the same architecture"):
    keras_baseline.KerasStep(keras, model="efficientnet_b0", expected_params=4_047_260, **options)


def test_loop_suite_compares_the_training_loop_with_its_bare_step(tiny_run):
  report, _, _ = tiny_run
  rows = _rows(report, "loop")
  assert [row["extra"]["trivial_step"] for row in rows] == [False, True]
  for row in rows:
    assert row["baseline"] == "the same compiled step on one pre-made device batch"
    assert row["ours_stats"]["repeats"] == row["extra"]["windows"]
    assert row["extra"]["cores_for_100k_images_per_second"] == pytest.approx(
        100_000 / row["extra"]["loop_images_per_second_per_core"])


def test_training_run_summary_leaves_out_the_compiling_window(tmp_path):
  from wikitopics_jax.bench import training_run  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, rate, mfu in ((10, 5.0, 0.01), (20, 1000.0, 0.30), (30, 1200.0, 0.36), (40, 1100.0, 0.33)):
      f.write(json.dumps({"step": step, "loss": 0.5, "images_per_second": rate, "mfu": mfu}) + "\n")
    f.write(json.dumps({"step": 40, "val_loss": 0.4}) + "\n")
  row = training_run.summarize(str(tmp_path), "b0")
  assert row == "| b0 | 3 | 1,100 (1,000-1,200) | 33.0% |\n"
