"""`wikitopics evaluate`: evaluate checkpoints of a training workdir on any split of its dataset.

Which checkpoints: "best", "latest", a step number, or "all" (every checkpoint on disk, in step order).
`watch` runs next to a training job, as a second process, and evaluates each checkpoint as it appears.

Per checkpoint, in `<workdir>/eval/`, one pair of files per threshold rule:
  <split>_step<N>_<rule>.json       metrics (`metrics.evaluate_predictions`) plus where they came from
  <split>_step<N>_<rule>.md         the same as markdown tables
  <split>_step<N>.predictions.npz   probs (N, L) float32, labels (N, L) uint8, loss (N,) per example in
                                    the split's stored order; `report` reads them instead of rerunning
and, over all checkpoints evaluated on a split, <split>_checkpoints.{json,md}: one row per step and rule.
A multimodal model (config.text.tower != "none") is also run with every text removed, with every image
removed and with half of the texts removed: the first rule's result gets "modalities" ({"fused",
"image_only", "text_only", "fused_half_text"}: macro/micro AP, macro F1 at 0.5 and per-label AP).
<rule> is "t0.5" (or "t<value>" for --thresholds=<value>), "tuned" (the saved thresholds.json of that
checkpoint) or "file-<name>" (--thresholds=<file>). The default, --thresholds=saved, writes both t0.5
and, when thresholds were tuned for the checkpoint, tuned: the same rule always lands in the same
file, so no evaluation replaces another rule's numbers. The training job's own summary is
<workdir>/results.json, which this job never writes.

Ground truth: a split whose name contains "human", or that the dataset manifest lists in
`info["human_labelled_splits"]`, is scored against human annotations; any other split against the
heuristic labels, which are noisy (they reach only ~0.46 macro-F1 against the 1,087 human
annotations in the thesis code's evaluation). Every result says which in `ground_truth`, and the titles say it too, so the
two are never read as one number.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from wikitopics_jax import checkpointing
from wikitopics_jax import losses
from wikitopics_jax import models
from wikitopics_jax.models import multimodal
from wikitopics_jax.eval import evaluation
from wikitopics_jax.eval import evaluators
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.eval import metrics as metrics_lib
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps as steps_lib
from wikitopics_jax import task as task_lib
from wikitopics_jax.eval import thresholds as thresholds_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

HUMAN = "human"
HEURISTIC = "heuristic"
GROUND_TRUTH_DESCRIPTIONS = {
    HUMAN: "human annotations",
    HEURISTIC: "heuristic labels (noisy: not human ground truth)",
}
RESULTS_FILE = "results.json"  # Written by the training job when it is done.


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{path}: missing; is {workdir!r} a training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with config.unlocked():
    # Earlier versions saved every loss's keys in one namespace (docs/losses.md).
    config.loss = losses.config(**losses.upgrade_saved_config(config.get("loss", {}), where=path))
  if "model" in config:
    # Earlier versions chose the CPU kernels with two other keys (models.upgrade_saved_config).
    with config.unlocked():
      config.model = ml_collections.ConfigDict(models.upgrade_saved_config(config.model.to_dict()))
  if "evals" not in config:
    # Saved before config.evals existed: the evaluators those runs computed, on their splits.
    from wikitopics_jax import configlib  # pylint: disable=g-import-not-at-top
    defaults = configlib.base_config()
    with defaults.data.unlocked():
      defaults.data.val_split = config.data.val_split
      defaults.data.test_split = config.data.test_split
    with config.unlocked():
      config.evals = ml_collections.ConfigDict(defaults.evals.to_dict())
  return config



@dataclasses.dataclass(frozen=True)
class ThresholdRule:
  """One way of turning probabilities into labels, as evaluate, predict and report apply it."""
  tag: str                                # in file names: "t0.5", "tuned", "file-<name>"
  values: float | np.ndarray              # one threshold, or one per label
  source: str                             # where they come from, for results and printouts
  rules: tuple[str, ...] | None = None    # per label, how its threshold was chosen (thresholds.json)
  close: bool = False                     # add every predicted label's ancestors

  def describe(self) -> str:
    """The source, the per-label rules counted, and the closure: one printable phrase."""
    parts = [self.source]
    if self.rules is not None:
      parts.append("per-label rules: " + thresholds_lib.count_rules(self.rules))
    if self.close:
      parts.append("ancestors of predicted labels added")
    return "; ".join(parts)


def _file_rule(path: str, label_names, tag: str, source: str) -> ThresholdRule:
  saved = thresholds_lib.read_thresholds(path, label_names)
  return ThresholdRule(tag, saved.thresholds, source, saved.rules, saved.close_predictions)


def resolve_thresholds(workdir: str, which: str | None, label_names, step: int) -> ThresholdRule:
  """None/"saved": the tuned thresholds saved for this checkpoint, else 0.5; a number; or a file."""
  if which in (None, "", "saved"):
    path = os.path.join(workdir, thresholds_lib.THRESHOLDS_FILE)
    if not os.path.exists(path):
      return ThresholdRule("t0.5", 0.5, "0.5 (no tuned thresholds saved)")
    with open(path) as f:
      saved_step = json.load(f).get("meta", {}).get("checkpoint_step")
    if saved_step != step:
      return ThresholdRule("t0.5", 0.5, f"0.5 (saved thresholds belong to step {saved_step}, not {step})")
    return _file_rule(path, label_names, "tuned", f"tuned ({path})")
  try:
    value = float(which)
  except ValueError:
    return _file_rule(which, label_names, _rule_tag(which), f"from {which}")
  if not 0.0 < value < 1.0:
    raise InputError(f"--thresholds={which}: a single threshold must be in (0, 1)")
  return ThresholdRule(_rule_tag(which), value, str(value))


def threshold_rules(workdir: str, which: str | None, label_names, step: int) -> list[ThresholdRule]:
  """The rules `evaluate` reports: "saved" gives 0.5 and, if tuned for this step, the tuned ones."""
  if which not in (None, "", "saved"):
    return [resolve_thresholds(workdir, which, label_names, step)]
  saved = resolve_thresholds(workdir, which, label_names, step)
  if saved.tag == "t0.5":
    return [saved]
  return [ThresholdRule("t0.5", 0.5, "0.5"), saved]


def _rule_tag(which: str | None) -> str:
  """The file-name part of a --thresholds value; "saved" files its first rule, 0.5, as "t0.5"."""
  if which in (None, "", "saved"):
    return "t0.5"
  try:
    return f"t{float(which):g}"
  except ValueError:
    stem = os.path.splitext(os.path.basename(which))[0]
    return "file-" + (re.sub(r"[^A-Za-z0-9.-]+", "-", stem).strip("-") or "thresholds")


def ground_truth_kind(split: str, manifest: manifest_lib.Manifest) -> str:
  """HUMAN if the split is human-labelled (by its name or the manifest), else HEURISTIC."""
  marked = manifest.info.get("human_labelled_splits") or ()
  return HUMAN if HUMAN in split.lower() or split in marked else HEURISTIC


def eval_path(workdir: str, split: str, step: int, suffix: str) -> str:
  """<workdir>/eval/<split>_step<step><suffix>, e.g. suffix ".json" or ".predictions.npz"."""
  return os.path.join(workdir, "eval", f"{split}_step{step}{suffix}")


def load_predictions(workdir: str, split: str, step: int) -> dict[str, np.ndarray] | None:
  """The per-example predictions an evaluation saved, or None if there are none."""
  path = eval_path(workdir, split, step, ".predictions.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    return {k: data[k] for k in ("probs", "labels", "loss")}


def save_predictions(path: str, predictions: dict[str, np.ndarray]) -> None:
  """Atomic; process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_open(path, "wb") as f:  # A file object: np.savez would append ".npz" to a name.
    np.savez(f, **{k: predictions[k] for k in ("probs", "labels", "loss")})


def open_checkpoints(workdir: str, config: ml_collections.ConfigDict) -> checkpointing.Checkpointer:
  """A read-only Checkpointer of <workdir>/checkpoints, as the training job configured it."""
  return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                    best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode)


class RestoredModel:
  """A training workdir's model, ready to restore any of its checkpoints and run the eval step.

  Built once (model, mesh, compiled eval step) and reused across checkpoints: evaluating every
  checkpoint then costs one compilation, not one per checkpoint.
  """

  def __init__(self, workdir: str, *, config_override: ml_collections.ConfigDict | None = None,
               ema: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.config = config_override or load_workdir_config(self.workdir)
    self.ema = ema
    self.checkpoint_dir = os.path.join(self.workdir, "checkpoints")
    self.manifest = manifest_lib.read(self.config.data.dir)
    self.mesh = sharding_lib.make_mesh(self.config.mesh.get("num_devices"))
    # total_steps only shapes the learning-rate schedule, not the state's structure.
    self.task = task_lib.build(self.config, self.manifest, total_steps=1)
    self.placement = sharding_lib.Placement(self.mesh, self.task.state)
    if ema and not self.task.ema_decay:
      raise InputError(f"{self.workdir}: --ema needs a run trained with config.ema.decay > 0; this "
                       f"one has ema.decay = {self.config.get('ema', {}).get('decay', 0.0)}")
    self.eval_step = steps_lib.make_eval_step(self.task, state_sharding=self.placement.state,
                                              batch_sharding=self.placement.batch, use_ema=ema)
    # A multimodal model's host tokenizer (None: an image-only model).
    self.text_tokenizer = multimodal.text_tokenizer(self.config)
    self._restored = None  # (step, state) that resolve_step("latest") restored to verify it

  @property
  def label_names(self) -> tuple[str, ...]:
    return self.task.label_names

  def checkpointer(self) -> checkpointing.Checkpointer:
    """A fresh read-only view of the checkpoint directory (it sees checkpoints written since)."""
    return open_checkpoints(self.workdir, self.config)

  def steps(self) -> list[int]:
    if not os.path.isdir(self.checkpoint_dir):
      return []
    ckpt = self.checkpointer()
    try:
      return ckpt.all_steps()
    finally:
      ckpt.close()

  def resolve_step(self, which: str | int) -> int:
    """"best", "latest" or a step -> a step. "latest" is the newest checkpoint that restores and
    verifies: corrupt newer ones are reported in one line each and skipped (never moved: read-only)."""
    ckpt = self.checkpointer()
    try:
      step = ckpt.resolve_step(which)
      if which != "latest":
        return step
      step, state = ckpt.restore_newest(self.restore, log=_log)
      self._restored = (step, state)
      _log(f"checkpoint 'latest': step {step}")
      return step
    finally:
      ckpt.close()

  def restore(self, step: int) -> Any:
    """The state of checkpoint `step` on the mesh; CheckpointVanished if it was deleted meanwhile."""
    if self._restored is not None and self._restored[0] == step:
      state, self._restored = self._restored[1], None  # verified by resolve_step a moment ago
      return state
    ckpt = self.checkpointer()
    try:
      taxonomy_lib.check_saved(ckpt.restore_meta(step), self.manifest.taxonomy,
                             where=f"{self.workdir} step {step}")
      return checkpointing.restore_state(ckpt, step, self.task.state, self.placement)
    except Exception:
      # A running training job deletes old checkpoints (config.checkpoint.keep_latest).
      if step not in self.steps():
        raise CheckpointVanished(f"{self.checkpoint_dir}: checkpoint {step} was deleted before it "
                                 "could be evaluated") from None
      raise
    finally:
      ckpt.close()


class CheckpointVanished(Exception):
  """A checkpoint listed a moment ago is gone (deleted by the training job's retention policy)."""


class Evaluator:
  """Evaluates checkpoints of one workdir on one split, writing eval/ files per checkpoint."""

  def __init__(self, workdir: str, *, split: str = "test",
               config_override: ml_collections.ConfigDict | None = None,
               thresholds: str | None = None, model: RestoredModel | None = None, ema: bool = False):
    self.model = model or RestoredModel(workdir, config_override=config_override, ema=ema)
    self.workdir = self.model.workdir
    self.split = split
    # The EMA's files sit beside the raw weights' ones, never over them.
    self.tag = f"{split}_ema" if self.model.ema else split
    self.thresholds = thresholds
    config, manifest = self.model.config, self.model.manifest
    manifest.split(split, where=config.data.dir)
    self.ground_truth = ground_truth_kind(split, manifest)
    train_info = manifest.splits.get(config.data.train_split)
    # The configured evaluators, run here on this job's split.
    self.report, self.others = evaluators.after_training(config.evals)
    self.context = evaluators.Context(
        label_names=tuple(self.model.label_names), ancestor_matrix=manifest.taxonomy.ancestor_matrix,
        train_frequencies=(None if train_info is None else
                           train_info.positives(config.data.hierarchical) / train_info.num_examples),
        excluded_labels=tuple(evaluation.labels_without_ground_truth(manifest, split)))

  def predictions(self, step: int, state: Any = None, **modality) -> dict[str, np.ndarray]:
    """probs, labels and loss of every example of the split, in stored order, for checkpoint `step`
    (`state`: already restored). `modality`: predict_split's modality / text_removed_fraction."""
    config = self.model.config
    state = self.model.restore(step) if state is None else state
    return evaluation.predict_split(self.model.eval_step, state, data_dir=config.data.dir,
                                    split=self.split, batch_size=config.eval_batch_size,
                                    hierarchical=config.data.hierarchical, mesh=self.model.mesh,
                                    text_tokenizer=self.model.text_tokenizer, **modality)

  def modalities(self, step: int, state: Any, fused: dict[str, np.ndarray]) -> dict[str, Any]:
    """A multimodal model's fused, image-only (text removed), text-only (image removed) and
    half-text (the text of half of the examples removed) results at threshold 0.5: macro/micro AP,
    macro F1 and the AP of each label."""
    out = {}
    for name, kwargs in MODALITY_RUNS:
      predictions = fused if not kwargs else self.predictions(step, state, **kwargs)
      result = evaluators.run(self.report, [], predictions, self.context)
      out[name] = {"macro_ap": result["macro_ap"], "micro_ap": result["micro_ap"],
                   "macro_f1": result["f1"]["macro"], "removed": MODALITY_DESCRIPTIONS[name],
                   "per_label_ap": {row["name"]: row["ap"] for row in result["per_label"]}}
    return out

  def evaluate(self, step: int) -> dict[str, Any]:
    """Metrics of checkpoint `step`, one result per threshold rule (`threshold_rules`).

    Writes eval/<split>_step<step>.predictions.npz and eval/<split>_step<step>_<rule>.{json,md}.
    Returns the first rule's result; with "saved" thresholds tuned for this step, that is threshold
    0.5's, and the tuned result is under "at_tuned_thresholds" (as in the training job's results.json).
    """
    state = self.model.restore(step)
    predictions = self.predictions(step, state)
    label_names = self.model.label_names
    rules = threshold_rules(self.workdir, self.thresholds, label_names, step)
    save_predictions(eval_path(self.workdir, self.tag, step, ".predictions.npz"), predictions)
    modalities = (self.modalities(step, state, predictions)
                  if self.model.text_tokenizer is not None else None)
    results = []
    for rule in rules:
      result = evaluators.run(self.report, self.others, predictions,
                              self.context.with_thresholds(rule.values, rule.rules, rule.close))
      result.update(split=self.split, evaluator=self.report.name, checkpoint_step=step,
                    thresholds_source=rule.source,
                    rule_tag=rule.tag, ground_truth=self.ground_truth,
                    data_dir=os.path.abspath(self.model.config.data.dir))
      if self.model.ema:
        result["weights"] = f"EMA of the parameters (decay {self.model.task.ema_decay})"
      if modalities is not None:
        result["modalities"] = modalities
      path = eval_path(self.workdir, self.tag, step, f"_{rule.tag}.json")
      evaluation.write_json(path, result)
      _write_text(eval_path(self.workdir, self.tag, step, f"_{rule.tag}.md"), markdown_report(result))
      if jax.process_index() == 0:
        print(f"{_title(result)}, thresholds {rule.describe()} ({path}):\n"
              f"{metrics_lib.format_report(result)}{_rules_note(result)}", flush=True)
      results.append(result)
    if len(results) > 1 and jax.process_index() == 0:
      print(_comparison(results[0], results[1]), flush=True)
    if modalities is not None and jax.process_index() == 0:
      print(f"Modalities, split {self.split!r}, step {step}, threshold 0.5:\n"
            f"{modality_table(modalities)}", flush=True)
    main = dict(results[0])
    if len(results) > 1:
      main["at_tuned_thresholds"] = results[1]
    return main

  def is_evaluated(self, step: int) -> bool:
    return os.path.exists(eval_path(self.workdir, self.tag, step, f"_{_rule_tag(self.thresholds)}.json"))


# A multimodal model is also evaluated with a modality removed (predict_split's arguments).
MODALITY_RUNS = (("fused", {}), ("image_only", {"modality": "image"}),
                 ("text_only", {"modality": "text"}), ("fused_half_text", {"text_removed_fraction": 0.5}))
MODALITY_DESCRIPTIONS = {"fused": "nothing", "image_only": "every text", "text_only": "every image",
                         "fused_half_text": "the text of half of the examples (a fixed hash of position)"}


def modality_table(modalities: dict[str, Any]) -> str:
  """The modality comparison's headline numbers as a markdown table."""
  return _md_table(["input", "removed", "macro AP", "micro AP", "macro F1"],
                   [[name, m["removed"], m["macro_ap"], m["micro_ap"], m["macro_f1"]]
                    for name, m in modalities.items()])


def modality_per_label_table(modalities: dict[str, Any]) -> str:
  """AP of each label with each modality setting (columns: fused, image_only, text_only, ...)."""
  names = list(modalities)
  labels = list(next(iter(modalities.values()))["per_label_ap"])
  return _md_table(["label", *(f"AP {n}" for n in names)],
                   [[label, *(modalities[n]["per_label_ap"].get(label) for n in names)]
                    for label in labels])


def _rules_note(result: dict[str, Any]) -> str:
  """The labels whose threshold is not their tuned one, by rule; "" without per-label rules."""
  rules = result.get("threshold_rules")
  if not rules:
    return ""
  lines = ["Threshold rules: " + ", ".join(f"{rule} {len(names)}" for rule, names in rules.items())]
  thresholds = {row["name"]: row["threshold"] for row in result["per_label"]}
  for rule, names in rules.items():
    if rule != thresholds_lib.TUNED and names:
      lines.append(f"  {rule}: " + ", ".join(f"{name} ({_md_value(thresholds.get(name), 3)})"
                                             for name in names))
  return "\n".join(lines) + "\n"


def _comparison(at_half: dict[str, Any], tuned: dict[str, Any]) -> str:
  """One line per headline number, threshold 0.5 against the tuned rule."""
  rate = evaluation.violation_rate_text
  return (f"Split {at_half['split']!r}, step {at_half['checkpoint_step']}: threshold 0.5 -> tuned: macro F1 "
          f"{_md_value(at_half['f1']['macro'])} -> {_md_value(tuned['f1']['macro'])}, micro F1 "
          f"{_md_value(at_half['f1']['micro'])} -> {_md_value(tuned['f1']['micro'])}, labels per image "
          f"{_md_value(at_half['labels_per_image']['predicted'], 3)} -> "
          f"{_md_value(tuned['labels_per_image']['predicted'], 3)} (truth "
          f"{_md_value(at_half['labels_per_image']['true'], 3)}), hierarchy violations {rate(at_half)} -> "
          f"{rate(tuned)}")


def evaluate(workdir: str, *, checkpoint: str | int = "best", split: str = "test",
             config_override: ml_collections.ConfigDict | None = None,
             thresholds: str | None = None, ema: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
  """Evaluates one checkpoint ("best", "latest", a step) -> its result; or "all" -> a list of results.

  Each threshold rule goes to its own eval/<split>_step<N>_<rule>.{json,md} (module docstring).
  With "all", every checkpoint on disk is evaluated in step order (also ones evaluated before) and
  eval/<split>_checkpoints.{json,md} table them. `ema` evaluates the checkpoint's EMA of the
  parameters (config.ema.decay > 0) instead of the raw ones, into eval/<split>_ema_step<N>.* files.
  """
  evaluator = Evaluator(workdir, split=split, config_override=config_override, thresholds=thresholds,
                        ema=ema)
  if checkpoint != "all":
    return evaluator.evaluate(evaluator.model.resolve_step(checkpoint))
  steps = evaluator.model.steps()
  if not steps:
    raise InputError(f"{evaluator.model.checkpoint_dir}: no checkpoints")
  results = [evaluator.evaluate(step) for step in steps]
  write_checkpoint_table(evaluator.workdir, evaluator.tag)
  return results


def watch(workdir: str, *, split: str = "test", poll_seconds: float = 60.0,
          timeout: float | None = None, config_override: ml_collections.ConfigDict | None = None,
          thresholds: str | None = None, ema: bool = False,
          sleep: Callable[[float], None] = time.sleep) -> list[dict[str, Any]]:
  """Evaluates each checkpoint of a (running) training job once, as it appears, in step order.

  Run it as a second process next to `train`. Checkpoints that already have the first rule's
  eval/<split>_step<N>_<rule>.json are skipped, so a restarted watcher resumes where it stopped. It
  returns after the pass in which it found the training job's results.json (written when training is
  done), or once `timeout` seconds have passed (None: no limit). A checkpoint that the training job
  deletes (config.checkpoint.keep_latest) before the watcher reaches it is reported and skipped: keep
  more checkpoints to evaluate them all.

  Returns:
    The results of the checkpoints evaluated by this call, in step order.
  """
  workdir = os.path.abspath(workdir)
  deadline = None if timeout is None else time.monotonic() + timeout
  evaluator: Evaluator | None = None
  results: list[dict[str, Any]] = []
  while True:
    # Looked at before listing: a checkpoint written just before results.json is still found.
    training_done = _agree(os.path.exists(os.path.join(workdir, RESULTS_FILE)))
    if evaluator is None and _agree(os.path.exists(os.path.join(workdir, "config.json"))):
      evaluator = Evaluator(workdir, split=split, config_override=config_override, thresholds=thresholds,
                            ema=ema)
    evaluated_any = False
    while evaluator is not None:
      step = _agree(_next_unevaluated(evaluator, skip={r["checkpoint_step"] for r in results}))
      if step < 0:
        break
      try:
        results.append(evaluator.evaluate(step))
        evaluated_any = True
      except CheckpointVanished as e:
        _log(f"skipped: {e}")
        results.append({"checkpoint_step": step, "skipped": str(e)})
    if evaluated_any:
      write_checkpoint_table(workdir, evaluator.tag)
    if training_done:
      _log(f"{workdir}: training is done ({RESULTS_FILE} exists); stopped watching")
      break
    if deadline is not None and time.monotonic() >= deadline:
      _log(f"{workdir}: watch timed out after {timeout:g} s")
      break
    sleep(poll_seconds if deadline is None else max(0.0, min(poll_seconds, deadline - time.monotonic())))
  return [r for r in results if "skipped" not in r]


def _next_unevaluated(evaluator: Evaluator, skip: set[int]) -> int:
  """The lowest checkpoint step without an evaluation on disk, or -1."""
  for step in evaluator.model.steps():
    if step not in skip and not evaluator.is_evaluated(step):
      return step
  return -1


def _agree(value: bool | int) -> Any:
  """Process 0's view of the file system, on every process (they must evaluate the same steps)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return type(value)(multihost_utils.broadcast_one_to_all(np.int64(value)))


# ---------------------------------------------------------------------------------------------------
# Markdown


def _title(result: dict[str, Any]) -> str:
  truth = GROUND_TRUTH_DESCRIPTIONS.get(result.get("ground_truth"), "unknown ground truth")
  weights = f", {result['weights']}" if "weights" in result else ""
  return f"Split {result['split']!r}, checkpoint step {result['checkpoint_step']}{weights}, against {truth}"


def _md_value(value: Any, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_md_value(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
  """An `evaluate_predictions` result (plus split/step/ground truth) as markdown tables."""
  groups = result["groups"]
  top_k = groups["top_k"]
  summary = [
      ["images", result["num_images"]],
      ["ground truth", GROUND_TRUTH_DESCRIPTIONS.get(result.get("ground_truth"), "unknown")],
      ["thresholds", result.get("thresholds_source", "n/a")],
      ["prediction rule", result["threshold_rule"]],
      ["macro AP", result["macro_ap"]],
      ["random baseline (macro AP)", result["random_baseline_ap"]],
      ["macro AP / baseline", result["macro_ap_over_baseline"]],
      ["micro AP", result["micro_ap"]],
      ["macro PR-AUC (trapezoid, the thesis's metric)", result["macro_pr_auc_trapezoid"]],
      ["macro ROC-AUC", result["macro_roc_auc"]],
      ["loss", result.get("loss")],
      ["labels per image (truth / predicted)",
       f"{_md_value(result['labels_per_image']['true'], 3)} / "
       f"{_md_value(result['labels_per_image']['predicted'], 3)}"],
  ]
  if "hierarchy_violation_rate" in result:
    summary.append(["images violating the hierarchy", result["hierarchy_violation_rate"]])
  if result.get("threshold_rules"):
    summary.append(["per-label threshold rules",
                    ", ".join(f"{rule} {len(names)}" for rule, names in result["threshold_rules"].items())])
  if result["labels_without_positives"]:
    summary.append(["labels without positives (excluded from macro AP)",
                    ", ".join(result["labels_without_positives"])])
  prf_rows = [[name, *(values[m] for m in ("precision", "recall", "f1"))] for name, values in (
      ("all (macro)", {m: result[m]["macro"] for m in ("precision", "recall", "f1")}),
      ("all (micro)", {m: result[m]["micro"] for m in ("precision", "recall", "f1")}),
      ("all (samples)", {m: result[m]["samples"] for m in ("precision", "recall", "f1")}),
      (f"top-{top_k} (macro)", groups["top"]),
      ("rest (macro)", groups["rest"]))]
  if result.get("labels_not_evaluated"):
    summary.append(["labels the ground truth cannot judge (left out)",
                    ", ".join(result["labels_not_evaluated"])])
  per_label = sorted(result["per_label"], key=metrics_lib.per_label_order)
  with_rules = bool(result.get("threshold_rules"))
  label_rows = [[row["name"], row["support"], row["predicted"], row["ap"], row["baseline_ap"],
                 row["precision"], row["recall"], row["f1"], row["threshold"],
                 *([row.get("threshold_rule")] if with_rules else [])] for row in per_label]
  modality_sections = []
  if result.get("modalities"):
    modality_sections = ["## Modalities (threshold 0.5)", modality_table(result["modalities"]),
                         modality_per_label_table(result["modalities"])]
  return "\n\n".join([
      f"# {_title(result)}",
      _md_table(["metric", "value"], summary),
      f"## Precision, recall, F1 (rule: {result['threshold_rule']})",
      _md_table(["labels", "precision", "recall", "F1"], prf_rows),
      f"Groups by {groups['source']}; top-{top_k}: {', '.join(groups['top']['labels'])}.",
      "## Per label",
      _md_table(["label", "support", "predicted", "AP", "baseline AP", "P", "R", "F1", "threshold",
                 *(["threshold rule"] if with_rules else [])], label_rows),
      *modality_sections,
  ]) + "\n"


def write_checkpoint_table(workdir: str, split: str) -> str:
  """eval/<split>_checkpoints.{json,md}: one row per evaluated checkpoint and rule; returns the .md."""
  pattern = re.compile(re.escape(split) + r"_step(\d+)_(.+)\.json")
  rows = []
  for path in glob.glob(os.path.join(glob.escape(workdir), "eval", f"{glob.escape(split)}_step*_*.json")):
    match = pattern.fullmatch(os.path.basename(path))
    if not match:
      continue
    with open(path) as f:
      result = json.load(f)
    rows.append({"step": int(match.group(1)), "rule": match.group(2), "macro_ap": result.get("macro_ap"),
                 "micro_ap": result.get("micro_ap"), "macro_f1": result.get("f1", {}).get("macro"),
                 "micro_f1": result.get("f1", {}).get("micro"), "loss": result.get("loss"),
                 "labels_per_image": result.get("labels_per_image", {}).get("predicted"),
                 "thresholds": result.get("thresholds_source", "0.5"),
                 "ground_truth": result.get("ground_truth", HEURISTIC)})
  # Threshold 0.5 first within a step.
  rows.sort(key=lambda row: (row["step"], row["rule"] != "t0.5", row["rule"]))
  best = _best_step(workdir)
  base = os.path.join(workdir, "eval", f"{split}_checkpoints")
  evaluation.write_json(base + ".json", {"split": split, "best_step": best, "checkpoints": rows})
  kinds = {row["ground_truth"] for row in rows}
  truth = " and ".join(GROUND_TRUTH_DESCRIPTIONS.get(k, k) for k in sorted(kinds))
  table = _md_table(["step", "rule", "macro AP", "micro AP", "macro F1", "micro F1", "labels/image", "loss",
                     "thresholds"],
                    [[f"{row['step']}{' (best)' if row['step'] == best else ''}", row["rule"],
                      row["macro_ap"], row["micro_ap"], row["macro_f1"], row["micro_f1"],
                      row["labels_per_image"], row["loss"], row["thresholds"]] for row in rows])
  _write_text(base + ".md", f"# Split {split!r}, every evaluated checkpoint, against {truth}\n\n{table}\n")
  return base + ".md"


def _best_step(workdir: str) -> int | None:
  path = os.path.join(workdir, "checkpoints", checkpointing.BEST_MARKER)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return int(json.load(f)["step"])


def _write_text(path: str, text: str) -> None:
  """Atomic; process 0 only."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_open(path) as f:
    f.write(text)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
