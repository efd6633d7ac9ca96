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
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise InputError(f"{path}: missing; is {workdir!r} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def evaluate(workdir: str, *, checkpoint: str | int = "best", split: str = "test",
             config_override: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
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
  result = evaluation.summarize(predictions, label_names=task.label_names,
                                train_frequencies=train_frequencies,
                                ancestor_matrix=manifest.taxonomy.ancestor_matrix)
  result.update(split=split, checkpoint_step=step)
  report = metrics_lib.format_report(result)
  base = os.path.join(workdir, "eval", f"{split}_step{step}")
  evaluation.write_json(base + ".json", result)
  if jax.process_index() == 0:
    tmp = base + ".md.tmp"
    with open(tmp, "w") as f:
      f.write(f"# {split}, checkpoint step {step}\n\n```\n{report}\n```\n")
    os.replace(tmp, base + ".md")
    print(f"Split {split!r}, checkpoint step {step}:\n{report}", flush=True)
  ckpt.close()
  return result
