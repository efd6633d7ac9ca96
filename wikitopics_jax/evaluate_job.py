"""`wikitopics evaluate`: evaluate a checkpoint of a training workdir on any split of its dataset."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from wikitopics_jax import checkpointing
from wikitopics_jax import evaluation
from wikitopics_jax import manifest as manifest_lib
from wikitopics_jax import metrics as metrics_lib
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps as steps_lib
from wikitopics_jax import task as task_lib
from wikitopics_jax import thresholds as thresholds_lib
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{path}: missing; is {workdir!r} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def resolve_thresholds(workdir: str, which: str | None, label_names, step: int):
  """None/"saved": the tuned thresholds saved for this checkpoint, else 0.5; a number; or a file."""
  if which in (None, "", "saved"):
    path = os.path.join(workdir, trainer.THRESHOLDS_FILE)
    if not os.path.exists(path):
      return 0.5, "0.5 (no tuned thresholds saved)"
    with open(path) as f:
      saved_step = json.load(f).get("meta", {}).get("checkpoint_step")
    if saved_step != step:
      return 0.5, f"0.5 (saved thresholds belong to step {saved_step}, not {step})"
    return thresholds_lib.load_thresholds(path, label_names), f"tuned ({path})"
  try:
    value = float(which)
  except ValueError:
    return thresholds_lib.load_thresholds(which, label_names), f"from {which}"
  if not 0.0 < value < 1.0:
    raise InputError(f"--thresholds={which}: a single threshold must be in (0, 1)")
  return value, str(value)


def evaluate(workdir: str, *, checkpoint: str | int = "best", split: str = "test",
             config_override: ml_collections.ConfigDict | None = None,
             thresholds: str | None = None) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  config = config_override or load_workdir_config(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                    best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode)
  step = ckpt.resolve_step(checkpoint)
  manifest = manifest_lib.read(config.data.dir)
  manifest.split(split, where=config.data.dir)
  trainer.check_taxonomy(ckpt.restore_meta(step), manifest, where=f"{workdir} step {step}")
  mesh = sharding_lib.make_mesh(config.mesh.get("num_devices"))
  task = task_lib.build(config, manifest, total_steps=max(step, 1))
  placement = trainer.Placement(mesh, task.state)
  state = trainer.restore_state(ckpt, step, task, placement)
  eval_step = steps_lib.make_eval_step(task, state_sharding=placement.state,
                                       batch_sharding=placement.batch)
  predictions = evaluation.predict_split(eval_step, state, data_dir=config.data.dir, split=split,
                                         batch_size=config.eval_batch_size,
                                         hierarchical=config.data.hierarchical, mesh=mesh)
  train_info = manifest.splits.get(config.data.train_split)
  train_frequencies = (None if train_info is None else
                       train_info.positives(config.data.hierarchical) / train_info.num_examples)
  threshold_values, threshold_source = resolve_thresholds(workdir, thresholds, task.label_names, step)
  result = evaluation.summarize(predictions, label_names=task.label_names, thresholds=threshold_values,
                                train_frequencies=train_frequencies,
                                ancestor_matrix=manifest.taxonomy.ancestor_matrix)
  result.update(split=split, checkpoint_step=step, thresholds_source=threshold_source)
  report = metrics_lib.format_report(result)
  base = os.path.join(workdir, "eval", f"{split}_step{step}")
  evaluation.write_json(base + ".json", result)
  if jax.process_index() == 0:
    tmp = base + ".md.tmp"
    with open(tmp, "w") as f:
      f.write(f"# {split}, checkpoint step {step}\n\n```\n{report}\n```\n")
    os.replace(tmp, base + ".md")
    print(f"Split {split!r}, checkpoint step {step}, thresholds {threshold_source}:\n{report}",
          flush=True)
  ckpt.close()
  return result
