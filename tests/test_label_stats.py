"""label_stats.py against hand-computed values and a loop-by-loop transcription of mldr's R code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import datasets
from wikitopics_jax.eval import label_stats
from wikitopics_jax.data import resampling
from wikitopics_jax.errors import InputError

# Images x labels (A, B, C, D); D has no positives, image 4 has no labels.
#   0: A B    1: A    2: A C    3: B    4: -
SMALL = np.array([[1, 1, 0, 0],
                  [1, 0, 0, 0],
                  [1, 0, 1, 0],
                  [0, 1, 0, 0],
                  [0, 0, 0, 0]], np.uint8)


def _close(a, b) -> bool:
  return a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_hand_computed_small_matrix():
  stats = label_stats.compute(SMALL[:, :3], ["A", "B", "C"])
  # counts A=3, B=2, C=1; 6 positives over 5 images and 3 labels.
  assert stats["label_counts"] == [3, 2, 1]
  assert stats["num_images"] == 5 and stats["num_labels"] == 3
  assert _close(stats["labels_per_image"], 6 / 5)  # cardinality
  assert _close(stats["positive_label_ratio"], 6 / 5 / 3)  # density = 0.4
  assert stats["label_frequencies"] == pytest.approx([0.6, 0.4, 0.2])
  # IRLbl = max count / count = 3/3, 3/2, 3/1.
  assert stats["irlbl"] == [1.0, 1.5, 3.0]
  assert _close(stats["mean_ir"], (1 + 1.5 + 3) / 3)  # 1.8333
  assert stats["max_ir"] == 3.0 and stats["median_ir"] == 1.5
  # CVIR: squared deviations from 11/6: 25/36 + 4/36 + 49/36 = 78/36; / (3 - 1) -> sd = sqrt(39/36).
  assert _close(stats["cv_ir"], math.sqrt(39 / 36) / (11 / 6))
  # Per-image SCUMBLE = 1 - geometric mean / arithmetic mean of the image's IRLbls:
  #   0: {1, 1.5}: 1 - sqrt(1.5) / 1.25;  2: {1, 3}: 1 - sqrt(3) / 2;  1, 3 (one label), 4 (none): 0.
  s0 = 1 - math.sqrt(1.5) / 1.25  # 0.020204
  s2 = 1 - math.sqrt(3) / 2  # 0.133975
  assert _close(stats["scumble"], (s0 + s2) / 5)
  scumbles = np.array([s0, 0, s2, 0, 0])
  assert _close(stats["scumble_cv"], np.std(scumbles, ddof=1) / scumbles.mean())
  # Per label: A over images 0, 1, 2; B over 0, 3; C over image 2 only.
  assert stats["label_scumble"] == pytest.approx([(s0 + s2) / 3, s0 / 2, s2], rel=1e-12)
  # CV of {s0, 0, s2}; of {s0, 0}: sd = s0 / sqrt(2), mean = s0 / 2 -> sqrt(2); C has one image: None.
  cv_a = np.std([s0, 0, s2], ddof=1) / ((s0 + s2) / 3)
  assert stats["label_scumble_cv"][0] == pytest.approx(cv_a, rel=1e-12)
  assert stats["label_scumble_cv"][1] == pytest.approx(math.sqrt(2), rel=1e-12)
  assert stats["label_scumble_cv"][2] is None
  # Co-occurrence: A-B in image 0, A-C in image 2, diagonal = counts.
  assert stats["cooccurrence"] == [[3, 1, 1], [1, 2, 0], [1, 0, 1]]
  # Five different label vectors, each held once; one image without labels.
  assert (stats["num_labelsets"], stats["num_single_labelsets"], stats["max_labelset_frequency"]) == (5, 5, 1)
  assert stats["num_images_without_labels"] == 1
  json.dumps(stats, allow_nan=False)


def test_label_without_positives_counts_as_zero_in_ir_aggregates():
  stats = label_stats.compute(SMALL, ["A", "B", "C", "D"])
  assert stats["irlbl"] == [1.0, 1.5, 3.0, None]
  assert stats["num_labels_without_positives"] == 1
  # mldr: IRLbl(D) = 3/0 = Inf -> 0, and meanIR averages over all 4 labels.
  assert _close(stats["mean_ir"], (1 + 1.5 + 3 + 0) / 4)  # 1.375
  assert stats["median_ir"] == 1.25  # median of {0, 1, 1.5, 3}
  assert stats["max_ir"] == 3.0
  # Image SCUMBLE does not change (no image holds D); D's own SCUMBLE is 0, its CV undefined.
  assert _close(stats["scumble"], (1 - math.sqrt(1.5) / 1.25 + 1 - math.sqrt(3) / 2) / 5)
  assert stats["label_scumble"][3] == 0.0 and stats["label_scumble_cv"][3] is None
  assert _close(stats["positive_label_ratio"], 6 / 5 / 4)
  json.dumps(stats, allow_nan=False)


def test_single_label_images_have_zero_scumble():
  y = np.array([[1, 0], [1, 0], [0, 1]])
  stats = label_stats.compute(y, ["A", "B"])
  assert stats["scumble"] == 0.0
  assert stats["scumble_cv"] is None  # sd / mean = 0 / 0 (NaN in mldr)
  assert stats["label_scumble"] == [0.0, 0.0]
  # mldr: CV 0 when a label's mean SCUMBLE is 0, NA (None) with at most one image.
  assert stats["label_scumble_cv"] == [0.0, None]
  assert stats["irlbl"] == [1.0, 2.0] and stats["mean_ir"] == 1.5


def test_no_positives_and_no_images():
  stats = label_stats.compute(np.zeros((3, 2)), ["A", "B"])
  assert stats["irlbl"] == [None, None]
  assert stats["mean_ir"] is None and stats["max_ir"] is None and stats["median_ir"] is None
  assert stats["scumble"] == 0.0 and stats["labels_per_image"] == 0.0
  assert stats["num_images_without_labels"] == 3
  empty = label_stats.compute(np.zeros((0, 2)), ["A", "B"])
  assert empty["num_images"] == 0 and empty["labels_per_image"] is None and empty["scumble"] is None
  assert empty["cooccurrence"] == [[0, 0], [0, 0]]
  json.dumps(empty, allow_nan=False)


def test_bad_inputs():
  with pytest.raises(ValueError, match="only 0 and 1"):
    label_stats.compute(np.array([[2, 0]]), ["A", "B"])
  with pytest.raises(ValueError, match="label names"):
    label_stats.compute(np.zeros((2, 2)), ["A"])
  with pytest.raises(ValueError, match="matrix"):
    label_stats.compute(np.zeros(3), ["A"])


def _mldr_transcription(y: np.ndarray) -> dict:
  """mldr's measures.R, one image and one label at a time (products and all)."""
  y = y.astype(int)
  n, num_labels = y.shape
  counts = y.sum(axis=0)
  irlbl = [counts.max() / c if c else 0.0 for c in counts]
  scumble = []
  for row in y:
    irs = [irlbl[j] for j in range(num_labels) if row[j]]
    if not irs:
      scumble.append(0.0)
      continue
    scumble.append(1 - math.prod(irs) ** (1 / len(irs)) / (sum(irs) / len(irs)))
  scumble = np.array(scumble)
  label_scumble, label_cv = [], []
  for j in range(num_labels):
    values = scumble[y[:, j] == 1]
    label_scumble.append(values.mean() if values.size else 0.0)
    if values.size <= 1:
      label_cv.append(None)
    else:
      label_cv.append(0.0 if values.mean() == 0 else np.std(values, ddof=1) / values.mean())
  return {"irlbl": irlbl, "mean_ir": np.mean(irlbl), "scumble": scumble.mean(),
          "scumble_cv": np.std(scumble, ddof=1) / scumble.mean(), "label_scumble": label_scumble,
          "label_scumble_cv": label_cv, "cardinality": y.sum() / n,
          "cooccurrence": (y.T @ y).tolist(), "num_labelsets": len({tuple(r) for r in y})}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mldr_transcription_on_random_matrices(seed):
  rng = np.random.default_rng(seed)
  rates = np.array([0.6, 0.3, 0.1, 0.03, 0.01, 0.0, 0.2])
  y = (rng.random((400, rates.size)) < rates).astype(np.uint8)
  ours = label_stats.compute(y, [f"l{j}" for j in range(rates.size)])
  ref = _mldr_transcription(y)
  assert [v or 0.0 for v in ours["irlbl"]] == pytest.approx(ref["irlbl"], rel=1e-12)
  for key in ("mean_ir", "scumble", "scumble_cv"):
    assert ours[key] == pytest.approx(ref[key], rel=1e-9), key
  assert ours["labels_per_image"] == pytest.approx(ref["cardinality"], rel=1e-12)
  assert ours["label_scumble"] == pytest.approx(ref["label_scumble"], rel=1e-9)
  for a, b in zip(ours["label_scumble_cv"], ref["label_scumble_cv"]):
    assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9)
  assert ours["cooccurrence"] == ref["cooccurrence"]
  assert ours["num_labelsets"] == ref["num_labelsets"]


@pytest.mark.parametrize("num_labels", [5, 31, 70])  # 70: more than 8 packed bytes per row
def test_label_sets_group_rows(num_labels):
  rng = np.random.default_rng(num_labels)
  y = rng.random((300, num_labels)) < 0.05
  y[:40] = y[0]  # a repeated vector
  groups = label_stats.label_sets(y)
  assert np.array_equal(groups.sets[groups.inverse], y)
  assert groups.multiplicity.sum() == 300
  assert len({tuple(r) for r in groups.sets}) == groups.num_sets == len({tuple(r) for r in y})
  assert np.array_equal(np.bincount(groups.inverse, minlength=groups.num_sets), groups.multiplicity)


def test_format_table_follows_table_3_1():
  flat = label_stats.compute(SMALL, list("ABCD"))
  hier = label_stats.compute(np.maximum(SMALL, SMALL[:, [0]]), list("ABCD"))
  table = label_stats.format_table(flat, hier)
  lines = table.splitlines()
  headers = [c.strip() for c in lines[0].strip("|").split("|")]
  assert headers == ["Type", "# images", "# labels", "SCUMBLE", "Labels per image", "Positive labels ratio",
                     "meanIR", "max IRLbl", "median IRLbl"]
  flat_row = [c.strip() for c in lines[2].strip("|").split("|")]
  assert flat_row == ["Flat", "5", "4", "0.0308", "1.20", "30.00%", "1.4", "3.0", "1.2"]
  assert lines[3].startswith("| Hierarchical")
  assert len(label_stats.format_table(flat, None).splitlines()) == 3


def test_plots_write_png_files(tmp_path):
  stats = label_stats.compute(SMALL, list("ABCD"))
  names = stats["label_names"]
  paths = [
      label_stats.plot_label_distribution(stats["label_counts"], names, tmp_path / "dist.png"),
      label_stats.plot_label_distribution(stats["label_counts"], names, tmp_path / "linear.png",
                                          log_scale=False),
      label_stats.plot_imbalance_ratios(stats["irlbl"], [1.0, 1.2, 1.5, None], names,
                                        tmp_path / "sub" / "ir.png"),
      label_stats.plot_cooccurrence(stats["cooccurrence"], names, tmp_path / "co.png"),
  ]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="label names"):
    label_stats.plot_label_distribution([1, 2], names, tmp_path / "bad.png")


def test_dataset_stats_reads_both_label_kinds(tmp_path):
  data_dir = str(tmp_path / "data")
  manifest = datasets.make_dataset(data_dir, sizes={"train": 50, "val": 9}, image_size=8, shards=2)
  examples = datasets.read_split(data_dir, "train")
  names = list(manifest.taxonomy.labels)
  stats = label_stats.dataset_stats(data_dir, "train")
  assert stats["flat"] == label_stats.compute(np.stack([e["labels"] for e in examples]), names)
  assert stats["hierarchical"] == label_stats.compute(np.stack([e["labels_hier"] for e in examples]), names)
  assert set(label_stats.dataset_stats(data_dir, "val", hierarchical=True)) == {
      "data_dir", "split", "taxonomy", "hierarchical"}
  with pytest.raises(InputError, match="no split"):
    label_stats.dataset_stats(data_dir, "nope")
  # Records that disagree with the manifest's counts are reported.
  path = os.path.join(data_dir, "manifest.json")
  with open(path) as f:
    document = json.load(f)
  document["splits"]["val"]["label_counts"][0] += 1
  with open(path, "w") as f:
    json.dump(document, f)
  with pytest.raises(InputError, match="count of"):
    label_stats.dataset_stats(data_dir, "val")


def test_stats_command_reports_the_split_after_resampling(tmp_path):
  """`wikitopics stats --resampling`: Table 3.1 after Algorithm 1 (checked against the literal
  pseudo-code's selection), the JSON and Figure 4.1 per label kind; a bad spec is one error line."""
  data_dir = str(tmp_path / "data")
  datasets.make_dataset(data_dir, sizes={"train": 60, "val": 9}, image_size=8, shards=1)
  out = str(tmp_path / "stats")
  command = [sys.executable, "-m", "wikitopics_jax.main", "stats", f"--data_dir={data_dir}",
             f"--out={out}", "--resampling=heuristic_under:0.5"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert "| Flat, heuristic_under " in done.stdout and "|       30 |" in done.stdout
  with open(os.path.join(out, "stats_train.json")) as f:
    written = json.load(f)
  flat, hier, manifest = label_stats.read_split_labels(data_dir, "train")
  names = list(manifest.taxonomy.labels)
  for kind, y in (("flat", flat), ("hierarchical", hier)):
    removed = resampling.literal_heuristic_undersample(y, keep_fraction=0.5)
    expected = label_stats.compute(np.delete(y, removed, axis=0), names)
    assert written["resampled"][kind] == json.loads(json.dumps(expected))
    with open(os.path.join(out, f"imbalance_ratios_train_heuristic_under_{kind}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert written["resampled"]["keep_fraction"] == 0.5
  bad = subprocess.run(command[:-1] + ["--resampling=heuristic_under:half"], capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: --resampling=heuristic_under:half: the fraction after ':' must be a number")
