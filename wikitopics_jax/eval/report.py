"""`wikitopics report`: a static HTML page with the thesis's evaluation figures, for any training run.

`build_report(workdir)` writes `<workdir>/report/index.html` plus PNG figures (matplotlib, Agg canvas,
no display) and image thumbnails beside it, linked relatively: the folder can be copied anywhere and
opened from the file system, no server needed. It is built in a temporary folder next to the target
and renamed into place, so a reader never sees half a report.

Contents (thesis figure numbers in brackets; `metrics.evaluate_predictions` defines every number):
  metrics tables at threshold 0.5 and at the tuned per-class thresholds, overall and per label, with
  each label's threshold rule (tuned, capped or default: `thresholds.guarded_bootstrap_thresholds`);
  training curves: train loss, validation loss and validation macro AP [4.5, 4.6];
  per-class thresholds of every bootstrap subset, their median and the threshold used [4.2];
  probability histograms of positives and negatives with the thresholds [4.3];
  F1 per class before and after threshold moving [4.4];
  predicted label distribution next to the ground truth's [5.1];
  AP against the label's training frequency [5.2];
  precision-recall curves per label, AP and its ratio to a random ranking in each title [5.3];
  the images with the highest probability per label, with their ground-truth labels [5.4-5.11];
  likely missing labels: predicted labels absent from the ground truth, most confident first.

Predictions come from the evaluate job's eval/<split>_step<N>.predictions.npz; when there are none,
the checkpoint is evaluated first (which writes them). The page says whether the split's ground truth
is human annotations or the heuristic labels (`evaluate_job.ground_truth_kind`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.eval import evaluation
from wikitopics_jax.eval import evaluators
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.eval import metrics as metrics_lib
from wikitopics_jax.data import records
from wikitopics_jax.eval import thresholds as thresholds_lib
from wikitopics_jax.models import multimodal

FIGURES_DIR = "figures"
THUMBS_DIR = "thumbs"
THUMB_MAX_SIDE = 128
_DPI = 80


# ---------------------------------------------------------------------------------------------------
# Inputs


def _checkpoint_step(workdir: str, config: ml_collections.ConfigDict, which: str | int) -> int:
  ckpt = evaluate_job.open_checkpoints(workdir, config)
  try:
    return ckpt.resolve_step(which)
  finally:
    ckpt.close()


def _predictions(workdir: str, split: str, step: int, num_examples: int,
                 config_override: ml_collections.ConfigDict | None) -> dict[str, np.ndarray]:
  saved = evaluate_job.load_predictions(workdir, split, step)
  if saved is not None and saved["probs"].shape[0] == num_examples:
    return saved
  evaluator = evaluate_job.Evaluator(workdir, split=split, config_override=config_override)
  evaluator.evaluate(step)
  return evaluate_job.load_predictions(workdir, split, step)


class _Tuned:
  """thresholds.json of the reported checkpoint: values, per-label rules, per-subset optima, meta."""

  def __init__(self, saved: thresholds_lib.ThresholdFile, per_subset: np.ndarray | None):
    self.thresholds = saved.thresholds
    self.rules = saved.rules
    self.close = saved.close_predictions
    self.meta = saved.meta
    self.per_subset = per_subset


def _tuned_thresholds(workdir: str, label_names: Sequence[str], step: int) -> tuple[_Tuned | None, dict]:
  """(the tuned thresholds, meta) if thresholds.json is this step's; else (None, its meta or {})."""
  path = os.path.join(workdir, thresholds_lib.THRESHOLDS_FILE)
  if not os.path.exists(path):
    return None, {}
  with open(path) as f:
    document = json.load(f)
  meta = document.get("meta", {})
  if meta.get("checkpoint_step") != step:
    return None, meta
  saved = thresholds_lib.read_thresholds(path, label_names)
  per_subset = None
  if meta.get("per_subset"):
    # The file is in its own label order; reorder by name like read_thresholds.
    order = [document["labels"].index(name) for name in label_names]
    table = np.array([[np.nan if v is None else v for v in row] for row in meta["per_subset"]], np.float64)
    per_subset = table[:, order]
  return _Tuned(saved, per_subset), meta


def read_training_metrics(workdir: str) -> dict[str, dict[int, float]]:
  """metrics.jsonl -> {key: {step: value}}, the last row of a step winning (a resumed run rewrites)."""
  path = os.path.join(workdir, "metrics.jsonl")
  series: dict[str, dict[int, float]] = {}
  if not os.path.exists(path):
    return series
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line torn by a kill.
      step = row.get("step")
      if not isinstance(step, int):
        continue
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          series.setdefault(key, {})[step] = float(value)
  return series


class _SplitImages:
  """Random access to a split's decoded records (images and text fields) by index."""

  def __init__(self, data_dir: str, split: str, manifest: manifest_lib.Manifest):
    self.where = f"{data_dir}:{split}"
    self.source = grain.sources.ArrayRecordDataSource(
        manifest_lib.split_paths(data_dir, manifest.split(split)))
    self._cache: dict[int, dict[str, Any]] = {}

  def __getitem__(self, index: int) -> dict[str, Any]:
    if index not in self._cache:
      self._cache[index] = records.decode_record(self.source[int(index)], where=self.where)
    return self._cache[index]


# ---------------------------------------------------------------------------------------------------
# Figures. Each writes one PNG and returns its path; labels are given in display order.


def _save(fig: Figure, path: str, *, tight: bool = True) -> str:
  """tight=False for many-panel figures laid out by hand: a tight box draws the figure twice."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=_DPI, bbox_inches="tight" if tight else None)
  return path


def _panel_grid(num_panels: int, title: str, *, panel_size: tuple[float, float] = (3.0, 2.6),
                max_cols: int = 6):
  """A figure of small panels laid out by hand, `title` on top; returns (figure, flat axes)."""
  cols = min(max_cols, max(1, num_panels))
  rows = math.ceil(num_panels / cols)
  head = 1.0  # inches above the first row: the figure title and two-line panel titles
  height = panel_size[1] * rows + head
  fig = Figure(figsize=(panel_size[0] * cols, height))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  fig.subplots_adjust(left=0.04, right=0.99, bottom=0.3 / height, top=1 - head / height, wspace=0.25,
                      hspace=0.6)
  fig.text(0.01, 1 - 0.12 / height, title, ha="left", va="top", fontsize=11)
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  return fig, axes


def pr_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One label's PR curve as AP sees it: (recall, precision) at each threshold that adds a positive.

  Starts at (0, 1); recall increases. Drawn as a step that takes each point's precision over the
  recall interval ending at it (matplotlib `where="pre"`), its area is exactly the AP. Thresholds that
  only add negatives change no area and are left out (they would draw zero-width spikes).
  """
  counts = metrics_lib.ranked_counts(y_true[:, None].astype(bool), scores[:, None].astype(np.float64))
  new_positives = counts.tps - counts.previous_end(counts.tps, 0)
  keep = (counts.is_end & (new_positives > 0))[:, 0]
  positives = max(int(counts.num_positives[0]), 1)
  recall = counts.tps[keep, 0] / positives
  precision = counts.precision()[keep, 0]
  return np.concatenate([[0.0], recall]), np.concatenate([[1.0], precision])


def plot_pr_curves(y_true: np.ndarray, probs: np.ndarray, names: Sequence[str], path: str) -> str:
  """[5.3] One panel per label: the PR curve (AP's step function), the random ranking's precision."""
  fig, axes = _panel_grid(len(names), "Precision-recall curves: x recall, y precision; dashed: a random "
                          "ranking's precision (the label's positive rate)")
  ap = metrics_lib.average_precision(y_true, probs)
  baseline, _ = metrics_lib.random_baseline_ap(y_true)
  for j, (ax, name) in enumerate(zip(axes, names)):
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=7)
    if math.isnan(ap[j]):
      ax.set_title(f"{name}\nno positives in this split", fontsize=9)
      continue
    recall, precision = pr_curve(y_true[:, j], probs[:, j])
    ax.step(recall, precision, where="pre", color="tab:blue")
    ax.axhline(baseline[j], color="grey", linestyle="--", linewidth=1)
    # In the title, not a legend: it never hides the curve, and 31 legends cost seconds to lay out.
    ax.set_title(f"{name}\nAP {ap[j]:.3f} = {ap[j] / baseline[j]:.1f}x random ({baseline[j]:.3f})",
                 fontsize=9)
  return _save(fig, path, tight=False)


def plot_ap_vs_frequency(ap: np.ndarray, train_counts: np.ndarray | None, split_counts: np.ndarray,
                         names: Sequence[str], path: str) -> str:
  """[5.2] AP of each label against how many training images have it (log scale)."""
  counts, source = (train_counts, "training") if train_counts is not None else (split_counts, "evaluated")
  fig = Figure(figsize=(9, 6))
  ax = fig.subplots()
  defined = ~np.isnan(ap) & (counts > 0)
  ax.scatter(counts[defined], ap[defined], color="tab:blue")
  for j in np.flatnonzero(defined):
    ax.annotate(names[j], (counts[j], ap[j]), xytext=(3, 3), textcoords="offset points", fontsize=7)
  if defined.any():
    ax.set_xscale("log")
    ax.axhline(float(np.mean(ap[defined])), color="grey", linestyle="--", linewidth=1,
               label=f"macro AP {np.mean(ap[defined]):.3f}")
    ax.legend(fontsize=8)
  ax.set_xlabel(f"images with the label in the {source} split (log scale)")
  ax.set_ylabel("average precision")
  ax.set_ylim(0, 1.02)
  ax.grid(True, alpha=0.3)
  ax.set_title("Average precision against label frequency")
  return _save(fig, path)


def plot_label_distribution(y_true: np.ndarray, predicted: dict[str, np.ndarray], names: Sequence[str],
                            path: str) -> str:
  """[5.1] Percentage of images per label: ground truth and each prediction rule."""
  fig = Figure(figsize=(9, max(4.0, 0.32 * len(names) + 1.5)))
  ax = fig.subplots()
  series = {"ground truth": y_true, **predicted}
  height = 0.8 / len(series)
  positions = np.arange(len(names))[::-1]  # First label on top.
  for k, (label, matrix) in enumerate(series.items()):
    percent = 100.0 * np.asarray(matrix, bool).mean(axis=0) if len(matrix) else np.zeros(len(names))
    ax.barh(positions + (len(series) / 2 - k - 0.5) * height, percent, height, label=label)
  ax.set_yticks(positions, list(names), fontsize=8)
  ax.set_xlabel("% of images")
  ax.legend(fontsize=8)
  ax.grid(True, axis="x", alpha=0.3)
  ax.set_title("Label distribution of the predictions")
  return _save(fig, path)


def plot_probability_histograms(y_true: np.ndarray, probs: np.ndarray, names: Sequence[str],
                                thresholds: np.ndarray | None, path: str) -> str:
  """[4.3] Per label, histograms of the probabilities of its positives and negatives."""
  fig, axes = _panel_grid(len(names), "Predicted probabilities of ground-truth positives and negatives "
                          "(log counts)")
  bins = np.linspace(0.0, 1.0, 41)
  for j, (ax, name) in enumerate(zip(axes, names)):
    positive = y_true[:, j].astype(bool)
    # stepfilled: one polygon per histogram instead of 40 bars.
    ax.hist(probs[~positive, j], bins=bins, color="tab:orange", alpha=0.6, histtype="stepfilled",
            label="ground-truth negatives")
    ax.hist(probs[positive, j], bins=bins, color="tab:blue", alpha=0.6, histtype="stepfilled",
            label="ground-truth positives")
    ax.axvline(0.5, color="black", linestyle=":", linewidth=1, label="threshold 0.5")
    title = name
    if thresholds is not None and math.isfinite(thresholds[j]):
      ax.axvline(thresholds[j], color="red", linestyle="--", linewidth=1.2, label="tuned threshold")
      title += f" (tuned {thresholds[j]:.2f})"
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())  # Within one decade they would all be labelled.
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="upper right", ncols=len(labels), fontsize=9)
  return _save(fig, path, tight=False)


def plot_f1_threshold_moving(f1_default: np.ndarray, f1_tuned: np.ndarray, names: Sequence[str],
                             path: str) -> str:
  """[4.4] F1 per label at threshold 0.5 and at the tuned thresholds."""
  fig = Figure(figsize=(max(8.0, 0.38 * len(names) + 2), 5))
  ax = fig.subplots()
  x = np.arange(len(names))
  ax.bar(x - 0.2, f1_default, 0.4, label=f"threshold 0.5 (macro {np.mean(f1_default):.3f})")
  ax.bar(x + 0.2, f1_tuned, 0.4, label=f"tuned thresholds (macro {np.mean(f1_tuned):.3f})")
  ax.set_xticks(x, list(names), rotation=75, ha="right", fontsize=8)
  ax.set_ylabel("F1")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  ax.set_title("F1 per label before and after threshold moving")
  return _save(fig, path)


_RULE_COLOURS = {thresholds_lib.TUNED: "tab:blue", thresholds_lib.CAPPED: "tab:orange",
                 thresholds_lib.DEFAULT: "tab:grey"}


def plot_bootstrap_thresholds(per_subset: np.ndarray, thresholds: np.ndarray, names: Sequence[str],
                              path: str, rules: Sequence[str] | None = None) -> str:
  """[4.2] The F1-optimal threshold of each bootstrap subset (dots), their median (a dash where it is
  not the threshold used) and the threshold used (bar, coloured by its rule)."""
  fig = Figure(figsize=(max(8.0, 0.38 * len(names) + 2), 5))
  ax = fig.subplots()
  x = np.arange(len(names))
  if rules is None:
    ax.bar(x, thresholds, 0.6, color="tab:blue", alpha=0.35, label="chosen threshold (median)")
  else:
    for rule, colour in _RULE_COLOURS.items():
      chosen = np.array([r == rule for r in rules])
      if chosen.any():
        ax.bar(x[chosen], np.minimum(thresholds[chosen], 1.0), 0.6, color=colour, alpha=0.35,
               label=f"threshold used: {rule}")
  rng = np.random.default_rng(0)  # Jitter only, so that equal values stay visible.
  for k, row in enumerate(per_subset):
    shown = ~np.isnan(row)
    ax.scatter(x[shown] + rng.uniform(-0.2, 0.2, shown.sum()), row[shown], s=12, color="black",
               alpha=0.7, label="one subset" if k == 0 else None)
  if rules is not None:
    has_median = ~np.all(np.isnan(per_subset), axis=0)
    median = np.full(len(names), np.nan)
    median[has_median] = np.nanmedian(per_subset[:, has_median], axis=0)
    differs = has_median & (median != thresholds)
    ax.scatter(x[differs], median[differs], marker="_", s=250, color="crimson",
               label="median, not used")
  ax.set_xticks(x, list(names), rotation=75, ha="right", fontsize=8)
  ax.set_ylabel("threshold")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  ax.set_title(f"Per-label F1-optimal thresholds over {per_subset.shape[0]} bootstrap subsets")
  return _save(fig, path)


def plot_training_curves(series: dict[str, dict[int, float]], path: str, *, marked_step: int | None = None,
                         split_ap: dict[int, float] | None = None, split: str = "") -> str:
  """[4.5, 4.6] Train loss, validation loss and validation macro AP against epochs (or steps)."""
  epochs = series.get("epoch", {})
  steps_per_epoch = next((s / e for s, e in epochs.items() if e > 0), None)

  def x_of(steps):
    steps = np.asarray(steps, np.float64)
    return steps / steps_per_epoch if steps_per_epoch else steps

  fig = Figure(figsize=(12, 4.5))
  loss_ax, ap_ax = fig.subplots(1, 2)
  for key, style, label in (("loss", {"alpha": 0.6}, "train loss"),
                            ("val_loss", {"marker": "o"}, "validation loss")):
    if series.get(key):
      steps = sorted(series[key])
      loss_ax.plot(x_of(steps), [series[key][s] for s in steps], label=label, **style)
  if series.get("val_macro_ap"):
    steps = sorted(series["val_macro_ap"])
    ap_ax.plot(x_of(steps), [series["val_macro_ap"][s] for s in steps], marker="o",
               label="validation macro AP")
  if split_ap:
    steps = sorted(split_ap)
    ap_ax.plot(x_of(steps), [split_ap[s] for s in steps], marker="s", linestyle="--",
               label=f"{split} macro AP (evaluated checkpoints)")
  for ax, title in ((loss_ax, "Loss"), (ap_ax, "Macro average precision")):
    if marked_step is not None:
      ax.axvline(float(x_of([marked_step])[0]), color="grey", linestyle=":",
                 label=f"reported checkpoint (step {marked_step})")
    ax.set_xlabel("epoch" if steps_per_epoch else "step")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax.transAxes)
  return _save(fig, path)


def _most_specific(names: Sequence[str], taxonomy) -> list[str]:
  """Drops labels that are ancestors of another label in the set (Plants implies Nature, STEM)."""
  chosen = set(names)
  matrix = taxonomy.ancestor_matrix
  keep = []
  for name in names:
    i = taxonomy.index[name]
    if not any(matrix[i, taxonomy.index[other]] and other != name for other in chosen):
      keep.append(name)
  return keep


def plot_top_predictions(label: str, rows: list[dict[str, Any]], path: str, *, cols: int = 3,
                         cell: int = 200) -> str:
  """[5.4-5.11] The highest-scored images for `label`; red captions: label absent from the ground truth.

  Composed with Pillow rather than matplotlib: one grid per label, and matplotlib axes cost ~50 ms each.

  rows: {"image": HWC uint8, "prob": float, "in_truth": bool, "truth": [most specific names]}.
  """
  font = ImageFont.load_default(size=12)
  title_font = ImageFont.load_default(size=15)
  line_height, caption_lines, pad, head = 15, 4, 8, 30
  cell_h = cell + caption_lines * line_height + pad
  grid_rows = max(1, math.ceil(len(rows) / cols))
  canvas = Image.new("RGB", (cols * cell, head + grid_rows * cell_h), "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((pad, 7), f"Images the model scores highest for {label}", fill="black", font=title_font)
  side = cell - 2 * pad
  for k, row in enumerate(rows):
    r, c = divmod(k, cols)
    x, y = c * cell + pad, head + r * cell_h
    image = Image.fromarray(row["image"])
    scale = side / max(image.size)
    # Small dataset images are enlarged without smoothing (their pixels stay visible), big ones shrunk.
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    canvas.paste(image, (x + (side - image.width) // 2, y + (side - image.height) // 2))
    colour = "black" if row["in_truth"] else "crimson"
    if not row["in_truth"]:
      draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), outline=colour, width=3)
    note = "" if row["in_truth"] else "   NOT in GT"
    truth = ", ".join(row["truth"]) or "(none)"
    lines = [f"p={row['prob']:.3f}{note}", *textwrap.wrap(f"GT: {truth}", 30)][:caption_lines]
    for n, line in enumerate(lines):
      draw.text((x, y + side + 3 + n * line_height), line, fill=colour, font=font)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  canvas.save(path)
  return path


# ---------------------------------------------------------------------------------------------------
# HTML


_CSS = """
body { font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.name, th.name { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.banner { padding: 0.6em 1em; margin: 1em 0; border-left: 5px solid; }
.heuristic { background: #fff4e0; border-color: #e69500; }
.human { background: #e8f6e8; border-color: #2e8b57; }
img.thumb { width: 96px; height: 96px; image-rendering: pixelated; object-fit: contain; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; } .grid figure { width: 420px; margin: 0; }
nav a { margin-right: 1em; }
"""


def _cell(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return html.escape(str(value))


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], *, name_columns: int = 1,
           raw_columns: Sequence[int] = ()) -> str:
  """An HTML table (no header row if `header` is None); cells of `raw_columns` are already HTML."""
  def cells(row, tag):
    out = []
    for k, value in enumerate(row):
      css = ' class="name"' if k < name_columns else ""
      text = value if k in raw_columns else _cell(value)
      out.append(f"<{tag}{css}>{text}</{tag}>")
    return "".join(out)
  head = "" if header is None else f"<tr>{cells(header, 'th')}</tr>\n"
  body = "\n".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
  return f"<table>\n{head}{body}\n</table>"


def _figure(src: str, caption: str) -> str:
  return (f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
          f"</a><figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_tables(results: dict[str, dict[str, Any]]) -> str:
  """Overall metrics: one column per threshold rule."""
  rules = list(results)
  first = results[rules[0]]
  top_k = first["groups"]["top_k"]
  rows = [
      ["macro AP", *(r["macro_ap"] for r in results.values())],
      ["random baseline (macro AP)", *(r["random_baseline_ap"] for r in results.values())],
      ["macro AP / baseline", *(r["macro_ap_over_baseline"] for r in results.values())],
      ["micro AP", *(r["micro_ap"] for r in results.values())],
      ["macro PR-AUC (trapezoid, the thesis's metric)",
       *(r["macro_pr_auc_trapezoid"] for r in results.values())],
      ["macro ROC-AUC", *(r["macro_roc_auc"] for r in results.values())],
  ]
  for metric in ("precision", "recall", "f1"):
    for average in ("macro", "micro", "samples"):
      rows.append([f"{metric} ({average})", *(r[metric][average] for r in results.values())])
    rows.append([f"{metric} (top-{top_k}, macro)", *(r["groups"]["top"][metric] for r in results.values())])
    rows.append([f"{metric} (rest, macro)", *(r["groups"]["rest"][metric] for r in results.values())])
  rows.append(["labels per image: predicted (truth "
               f"{_cell(first['labels_per_image']['true'])})",
               *(r["labels_per_image"]["predicted"] for r in results.values())])
  if "hierarchy_violation_rate" in first:
    rows.append(["images violating the hierarchy",
                 *(r["hierarchy_violation_rate"] for r in results.values())])
  for name in first.get("other_evaluators", ()):  # config.evals' other evaluators, by name
    for metric, value in first[name].items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        rows.append([f"{name}: {metric}", *(r[name][metric] for r in results.values())])
  return _table(["metric", *rules], rows)


def _per_label_table(results: dict[str, dict[str, Any]], order: Sequence[int],
                     train_counts: np.ndarray | None, threshold_rules: Sequence[str] | None = None) -> str:
  rules = list(results)
  per_label = {rule: result["per_label"] for rule, result in results.items()}
  first = per_label[rules[0]]
  header = ["label", "train images", "support", "AP", "random AP", "AP / random"]
  for rule in rules:
    header += [f"P ({rule})", f"R ({rule})", f"F1 ({rule})"]
  header.append("tuned threshold" if len(rules) > 1 else "threshold")
  if threshold_rules is not None:
    header.append("threshold rule")
  rows = []
  for j in order:
    row = first[j]
    ratio = (row["ap"] / row["baseline_ap"]
             if row["ap"] is not None and row["baseline_ap"] else None)
    cells = [row["name"], None if train_counts is None else int(train_counts[j]), row["support"],
             row["ap"], row["baseline_ap"], ratio]
    for rule in rules:
      r = per_label[rule][j]
      cells += [r["precision"], r["recall"], r["f1"]]
    cells.append(per_label[rules[-1]][j]["threshold"])
    if threshold_rules is not None:
      cells.append(threshold_rules[j])
    rows.append(cells)
  return _table(header, rows)


def _slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "label"


# ---------------------------------------------------------------------------------------------------
# The report


def build_report(workdir: str, *, split: str = "test", checkpoint: str | int = "best",
                 out_dir: str | None = None, config_override: ml_collections.ConfigDict | None = None,
                 images_per_label: int = 9, num_missing: int = 50) -> str:
  """Writes the report of `checkpoint` on `split` into out_dir (default <workdir>/report).

  Args:
    workdir: a training workdir.
    split: the dataset split to report on.
    checkpoint: "best", "latest" or a step.
    out_dir: the report folder; replaced as a whole.
    config_override: the config to use instead of the workdir's config.json.
    images_per_label: images in each top-predictions grid.
    num_missing: rows of the likely-missing-labels table.

  Returns:
    The path of index.html.
  """
  workdir = os.path.abspath(workdir)
  config = config_override or evaluate_job.load_workdir_config(workdir)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, "report"))
  manifest = manifest_lib.read(config.data.dir)
  split_info = manifest.split(split, where=config.data.dir)
  step = _checkpoint_step(workdir, config, checkpoint)
  predictions = _predictions(workdir, split, step, split_info.num_examples, config_override)
  index = os.path.join(out_dir, "index.html")
  if jax.process_index() != 0:
    return index  # Every process helped evaluate; process 0 writes.
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.tmp-")
  try:
    _ReportBuilder(workdir, config, manifest, split, step, predictions, staging,
                   images_per_label=images_per_label, num_missing=num_missing).build()
    _swap_into_place(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  print(f"report of {split!r} at checkpoint step {step}: {index}", flush=True)
  return index


def _swap_into_place(staging: str, out_dir: str) -> None:
  """Two renames: readers see the old report or the new one (for an instant, none), never a mix."""
  os.chmod(staging, 0o755)  # mkdtemp makes it private.
  old = None
  if os.path.exists(out_dir):
    old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix=f".{os.path.basename(out_dir)}.old-")
    os.rmdir(old)
    os.rename(out_dir, old)
  os.rename(staging, out_dir)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


class _ReportBuilder:
  """Computes everything one report shows and writes it into a (staging) directory."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, manifest: manifest_lib.Manifest,
               split: str, step: int, predictions: dict[str, np.ndarray], out_dir: str, *,
               images_per_label: int, num_missing: int):
    self.workdir, self.config, self.manifest = workdir, config, manifest
    self.split, self.step, self.out_dir = split, step, out_dir
    self.images_per_label, self.num_missing = images_per_label, num_missing
    self.taxonomy = manifest.taxonomy
    self.names = list(self.taxonomy.labels)
    self.probs = predictions["probs"]
    self.labels = predictions["labels"].astype(bool)
    self.predictions = predictions
    hierarchical = bool(config.data.hierarchical)
    train = manifest.splits.get(config.data.train_split)
    self.train_counts = None if train is None else train.positives(hierarchical)
    self.ground_truth = evaluate_job.ground_truth_kind(split, manifest)
    tuned, self.threshold_meta = _tuned_thresholds(workdir, self.names, step)
    self.tuned_rule = tuned
    self.tuned = None if tuned is None else tuned.thresholds
    self.per_subset = None if tuned is None else tuned.per_subset
    # Display order: most frequent label first (by training counts, else by this split's).
    frequency = self.train_counts if self.train_counts is not None else self.labels.sum(axis=0)
    self.order = list(np.lexsort((np.arange(len(self.names)), -np.asarray(frequency))))
    self.images = _SplitImages(config.data.dir, split, manifest)

  def _ordered(self, array: np.ndarray) -> np.ndarray:
    return array[..., self.order]

  def _ordered_names(self) -> list[str]:
    return [self.names[j] for j in self.order]

  def _figure_path(self, name: str) -> str:
    return os.path.join(self.out_dir, FIGURES_DIR, name)

  def _results(self) -> dict[str, dict[str, Any]]:
    """The configured evaluators (config.evals) on this split, at 0.5 and at the tuned thresholds."""
    report, others = evaluators.after_training(self.config.evals)
    train_frequencies = (None if self.train_counts is None else
                         self.train_counts / self.manifest.splits[self.config.data.train_split].num_examples)
    context = evaluators.Context(
        label_names=tuple(self.names), ancestor_matrix=self.taxonomy.ancestor_matrix,
        train_frequencies=train_frequencies,
        excluded_labels=tuple(evaluation.labels_without_ground_truth(self.manifest, self.split)))
    results = {"threshold 0.5": evaluators.run(report, others, self.predictions, context)}
    if self.tuned_rule is not None:
      results["tuned thresholds"] = evaluators.run(
          report, others, self.predictions,
          context.with_thresholds(self.tuned, self.tuned_rule.rules, self.tuned_rule.close))
    return results

  def _predicted(self, thresholds) -> np.ndarray:
    """(N, L) bool predictions of a rule: closed under the hierarchy for tuned thresholds that say so."""
    close = (self.tuned_rule is not None and self.tuned_rule.close and thresholds is self.tuned)
    return thresholds_lib.apply_thresholds(self.probs, thresholds,
                                           self.taxonomy.ancestor_matrix if close else None)

  def build(self) -> None:
    results = self._results()
    names = self._ordered_names()
    y, p = self._ordered(self.labels), self._ordered(self.probs)
    tuned = None if self.tuned is None else self._ordered(self.tuned)
    figures: dict[str, tuple[str, str]] = {}  # key -> (relative path, caption)

    def add(key: str, path: str, caption: str) -> None:
      figures[key] = (os.path.relpath(path, self.out_dir), caption)

    series = read_training_metrics(self.workdir)
    add("training", plot_training_curves(series, self._figure_path("training_curves.png"),
                                         marked_step=self.step, split=self.split,
                                         split_ap=self._split_ap_per_checkpoint()),
        "Training curves: train loss (every logged step), validation loss and validation macro AP per "
        "evaluation (thesis Figures 4.5, 4.6). The dotted line marks the reported checkpoint.")
    if tuned is not None and self.per_subset is not None:
      rules = (None if self.tuned_rule.rules is None else
               [self.tuned_rule.rules[j] for j in self.order])
      add("bootstrap", plot_bootstrap_thresholds(self._ordered(self.per_subset), tuned, names,
                                                 self._figure_path("bootstrap_thresholds.png"), rules),
          f"Per-label thresholds: the F1-optimal threshold on each of {self.per_subset.shape[0]} bootstrap "
          f"subsets of split {self.threshold_meta.get('split')!r} (dots) and the threshold used (bars, "
          "coloured by rule: their median if tuned; raised if the median predicted the label too often "
          "(capped); 0.5 if too few positives (default)); a red dash marks a median not used (thesis "
          "Figure 4.2).")
    add("histograms", plot_probability_histograms(y, p, names, tuned,
                                                  self._figure_path("probability_histograms.png")),
        "Probabilities given to ground-truth positives (blue) and negatives (orange), with threshold 0.5 "
        "(dotted) and the tuned threshold (dashed): right of a threshold are predicted positives "
        "(thesis Figure 4.3).")
    if tuned is not None:
      def f1s(rule):  # NaN: a label the ground truth cannot judge
        return np.array([np.nan if results[rule]["per_label"][j]["f1"] is None else
                         results[rule]["per_label"][j]["f1"] for j in self.order])
      f1_default, f1_tuned = f1s("threshold 0.5"), f1s("tuned thresholds")
      add("f1", plot_f1_threshold_moving(f1_default, f1_tuned, names,
                                         self._figure_path("f1_threshold_moving.png")),
          "F1 per label at threshold 0.5 and at the tuned per-label thresholds (thesis Figure 4.4).")
    predicted = {"predicted (0.5)": metrics_lib.predict_labels(p, 0.5)}
    if tuned is not None:
      predicted["predicted (tuned)"] = self._ordered(self._predicted(self.tuned))
    add("distribution", plot_label_distribution(y, predicted, names,
                                                self._figure_path("predicted_label_distribution.png")),
        "Share of images per label in the ground truth and in the predictions (thesis Figure 5.1).")
    ap = metrics_lib.average_precision(y, p)
    add("ap_frequency", plot_ap_vs_frequency(ap, None if self.train_counts is None else
                                             self._ordered(self.train_counts), y.sum(axis=0), names,
                                             self._figure_path("ap_vs_frequency.png")),
        "Average precision of each label against its number of training images (thesis Figure 5.2).")
    add("pr", plot_pr_curves(y, p, names, self._figure_path("pr_curves.png")),
        "Precision-recall curve of each label; the legend gives its AP and the ratio to a random "
        "ranking's AP, the label's positive rate (dashed) (thesis Figure 5.3).")
    grids = self._top_prediction_grids()
    missing_table = self._missing_labels_table(self.tuned if self.tuned is not None else 0.5)
    html_text = self._html(results, figures, grids, missing_table)
    with open(os.path.join(self.out_dir, "index.html"), "w", encoding="utf-8") as f:
      f.write(html_text)

  def _modalities_html(self) -> list[str]:
    """A multimodal model's AP per label with both modalities, the image only and the text only (from
    the evaluate job's eval/<split>_step<N>_t0.5.json "modalities"); nothing for an image-only model."""
    if not multimodal.is_multimodal(self.config):
      return []
    path = evaluate_job.eval_path(self.workdir, self.split, self.step, "_t0.5.json")
    modalities = None
    if os.path.exists(path):
      with open(path) as f:
        modalities = json.load(f).get("modalities")
    if not modalities:
      return ["<h3>Modalities</h3>",
              f"<p>No modality comparison for this checkpoint: run <code>wikitopics evaluate "
              f"--workdir={html.escape(self.workdir)} --split={html.escape(self.split)}</code> "
              "first.</p>"]
    names = list(modalities)
    headline = _table(["input", "removed", "macro AP", "micro AP", "macro F1 (0.5)"],
                      [[n, m["removed"], m["macro_ap"], m["micro_ap"], m["macro_f1"]]
                       for n, m in modalities.items()])
    per_label = _table(["label", *(f"AP {n}" for n in names)],
                       [[self.names[j], *(modalities[n]["per_label_ap"].get(self.names[j])
                                          for n in names)] for j in self.order])
    return ["<h3>Modalities</h3>",
            f"<p>The same checkpoint with a modality removed ({html.escape(path)}).</p>",
            headline, per_label]

  def _rules_html(self) -> str:
    """What each per-label threshold rule means, from thresholds.json; "" without rules."""
    if self.tuned_rule is None or self.tuned_rule.rules is None:
      return ""
    descriptions = self.threshold_meta.get("rule_descriptions") or {}
    rows = []
    for rule in thresholds_lib.RULES:
      labels = [self.names[j] for j in self.order if self.tuned_rule.rules[j] == rule]
      if labels:
        rows.append([rule, descriptions.get(rule, ""), len(labels), ", ".join(labels)])
    return ("<p>Each label's tuned threshold follows one rule (thresholds.json, per label); the "
            "per-label table shows it.</p>"
            + _table(["rule", "meaning", "labels", "which"], rows, name_columns=4))

  def _split_ap_per_checkpoint(self) -> dict[int, float]:
    path = os.path.join(self.workdir, "eval", f"{self.split}_checkpoints.json")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      rows = json.load(f).get("checkpoints", [])
    return {row["step"]: row["macro_ap"] for row in rows if row.get("macro_ap") is not None}

  def _truth_names(self, index: int) -> list[str]:
    return _most_specific([self.names[j] for j in np.flatnonzero(self.labels[index])], self.taxonomy)

  def _top_prediction_grids(self) -> list[tuple[str, str]]:
    """[(label, relative path of its grid)] in display order."""
    grids = []
    k = min(self.images_per_label, self.probs.shape[0])
    for j in self.order:
      top = np.argsort(-self.probs[:, j], kind="stable")[:k]
      rows = [{"image": self.images[i]["image"], "prob": float(self.probs[i, j]),
               "in_truth": bool(self.labels[i, j]), "truth": self._truth_names(i)} for i in top]
      path = self._figure_path(os.path.join("top_predictions", f"{_slug(self.names[j])}.png"))
      plot_top_predictions(self.names[j], rows, path)
      grids.append((self.names[j], os.path.relpath(path, self.out_dir)))
    return grids

  def _thumbnail(self, index: int) -> str:
    relative = os.path.join(THUMBS_DIR, f"{index}.png")
    path = os.path.join(self.out_dir, relative)
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      image = Image.fromarray(self.images[index]["image"])
      image.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE))
      image.save(path)
    return relative

  def _missing_labels_table(self, thresholds) -> str:
    """Predicted (by the rule of `thresholds`) but absent from the ground truth, most confident first."""
    predicted = self._predicted(thresholds)
    candidates = np.argwhere(predicted & ~self.labels)
    if not len(candidates):
      return "<p>No predicted label is absent from the ground truth.</p>"
    scores = self.probs[candidates[:, 0], candidates[:, 1]]
    chosen = candidates[np.argsort(-scores, kind="stable")[:self.num_missing]]
    threshold_values = np.broadcast_to(np.asarray(thresholds, np.float64), (len(self.names),))
    rows = []
    for rank, (i, j) in enumerate(chosen, start=1):
      example = self.images[i]
      thumb = html.escape(self._thumbnail(int(i)))
      url = example.get("url")
      ident = html.escape(example["id"])
      ident_cell = f'<a href="{html.escape(url)}">{ident}</a>' if url else ident
      rows.append([rank, f'<img class="thumb" src="{thumb}" alt="{ident}">', ident_cell, self.names[j],
                   float(self.probs[i, j]), float(threshold_values[j]),
                   ", ".join(self._truth_names(int(i))) or "(none)", example.get("page_title", "")])
    return _table(["rank", "image", "id", "suggested label", "probability", "threshold", "ground truth",
                   "page"], rows, name_columns=0, raw_columns=(1, 2))

  def _html(self, results, figures, grids, missing_table) -> str:
    truth = evaluate_job.GROUND_TRUTH_DESCRIPTIONS[self.ground_truth]
    banner_note = ("Scored against human annotations." if self.ground_truth == evaluate_job.HUMAN else
                   "Scored against the heuristic labels, which are not human ground truth: they miss "
                   "labels a person would give, so precision here is a lower bound and the "
                   "'likely missing labels' below are often right.")
    thresholds_note = ("tuned per label on split "
                       f"{html.escape(str(self.threshold_meta.get('split')))!s} (thresholds.json)"
                       if self.tuned is not None else
                       "0.5 only (no tuned thresholds saved for this checkpoint)")
    if self.tuned_rule is not None and self.tuned_rule.rules is not None:
      thresholds_note += "; per-label rules: " + thresholds_lib.count_rules(self.tuned_rule.rules)
    if self.tuned_rule is not None and self.tuned_rule.close:
      thresholds_note += "; every predicted label's ancestors added"
    model = self.config.model
    figure_html = {key: _figure(src, caption) for key, (src, caption) in figures.items()}
    grid_html = "\n".join(
        f'<div id="top-{_slug(name)}">{_figure(src, f"Top {self.images_per_label} images for {name}")}</div>'
        for name, src in grids)
    sections = [
        f"<h1>Evaluation report: {html.escape(os.path.basename(self.workdir))}</h1>",
        f'<div class="banner {self.ground_truth}"><b>Ground truth: {html.escape(truth)}.</b> '
        f"{html.escape(banner_note)}</div>",
        _table(None, [
            ["workdir", self.workdir], ["split", f"{self.split} ({self.probs.shape[0]} images)"],
            ["checkpoint", f"step {self.step}"], ["dataset", os.path.abspath(self.config.data.dir)],
            ["taxonomy", f"{self.taxonomy.version} ({len(self.names)} labels)"],
            ["model", f"{model.name} ({model.get('head', '')} head)"],
            ["loss", self.config.loss.name],
            ["labels", "hierarchical (closed)" if self.config.data.hierarchical else "flat"],
            ["thresholds", thresholds_note]], name_columns=2),
        '<nav><a href="#metrics">Metrics</a><a href="#training">Training</a>'
        '<a href="#thresholds">Thresholds</a><a href="#labels">Labels</a>'
        '<a href="#top">Top predictions</a><a href="#missing">Likely missing labels</a></nav>',
        '<h2 id="metrics">Metrics</h2>',
        "<p>AP is scikit-learn's average precision; PR-AUC (trapezoid) is what the thesis reported. "
        "Predictions are probability &ge; threshold.</p>",
        _summary_tables(results),
        "<h3>Per label</h3>",
        _per_label_table(results, self.order, self.train_counts,
                         None if self.tuned_rule is None else self.tuned_rule.rules),
        *self._modalities_html(),
        '<h2 id="training">Training</h2>', figure_html["training"],
        '<h2 id="thresholds">Thresholds</h2>',
        self._rules_html(),
        *(figure_html[key] for key in ("bootstrap", "histograms", "f1") if key in figure_html),
        *([] if self.tuned is not None else
          ["<p>No tuned thresholds for this checkpoint: figures 4.2 and 4.4 are left out.</p>"]),
        '<h2 id="labels">Labels</h2>',
        *(figure_html[key] for key in ("distribution", "ap_frequency", "pr")),
        '<h2 id="top">Top predictions per label</h2>',
        "<p>The images the model scores highest for each label (thesis Figures 5.4-5.11). A red title "
        "marks an image whose ground truth lacks the label. GT lists the most specific ground-truth "
        "labels.</p>",
        '<p>' + " ".join(f'<a href="#top-{_slug(name)}">{html.escape(name)}</a>' for name, _ in grids)
        + "</p>",
        f'<div class="grid">{grid_html}</div>',
        '<h2 id="missing">Likely missing labels</h2>',
        f"<p>Labels the model predicts (probability &ge; threshold) that the ground truth lacks, most "
        f"confident first (at most {self.num_missing}).</p>",
        missing_table,
    ]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Report: {html.escape(os.path.basename(self.workdir))} ({html.escape(self.split)}, "
            f"step {self.step})</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
