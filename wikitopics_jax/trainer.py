"""The training job: train, validate every epoch, checkpoint, then evaluate the best checkpoint on test.

Resume: if the workdir already holds checkpoints, training continues from the latest one (state, step
and the data iterator's position); the dataset's taxonomy must equal the checkpoint's.
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wikitopics_jax import checkpointing
from wikitopics_jax import evaluation
from wikitopics_jax import manifest as manifest_lib
from wikitopics_jax import metric_writer
from wikitopics_jax import metrics as metrics_lib
from wikitopics_jax import pipeline
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps as steps_lib
from wikitopics_jax import synthetic
from wikitopics_jax import task as task_lib
from wikitopics_jax import thresholds as thresholds_lib
from wikitopics_jax.errors import InputError

THRESHOLDS_FILE = "thresholds.json"


def prepare_data(config: ml_collections.ConfigDict) -> manifest_lib.Manifest:
  """Generates the embedded synthetic dataset if the config asks for it (reused when present)."""
  if config.data.get("synthetic"):
    if jax.process_index() == 0:
      synthetic.generate(config.data.dir, **config.data.synthetic.to_dict())
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("synthetic data ready")
  return manifest_lib.read(config.data.dir)


def check_taxonomy(meta: dict[str, Any], manifest: manifest_lib.Manifest, where: str) -> None:
  saved = meta.get("taxonomy")
  current = manifest.taxonomy.to_json()
  if saved is not None and saved != current:
    if saved.get("labels") != current["labels"]:
      raise InputError(f"{where}: checkpoint taxonomy {saved.get('version')!r} has labels "
                       f"{saved.get('labels')} but the dataset's ({current['version']!r}) are "
                       f"{current['labels']}")
    raise InputError(f"{where}: checkpoint taxonomy {saved.get('version')!r} differs from the "
                     f"dataset's {current['version']!r} in its parent relations")


class Placement:
  """Shardings of one job's state and batches on the mesh."""

  def __init__(self, mesh, state):
    self.mesh = mesh
    self.replicated = sharding_lib.replicated(mesh)
    self.batch = sharding_lib.batch_sharded(mesh)
    self.state = jax.tree.map(lambda _: self.replicated, state)


def restore_state(ckpt: checkpointing.Checkpointer, step: int, task: task_lib.Task,
                  placement: Placement, *, data_iterator=None) -> Any:
  """Checkpoint `step` -> the task's state placed on the mesh (and the data iterator, if given)."""
  like = nnx.to_pure_dict(task.state)
  flat, _ = ckpt.restore(step, checkpointing.abstract_checkpoint_tree(like, placement.replicated),
                         data_iterator=data_iterator)
  nnx.replace_by_pure_dict(task.state, checkpointing.from_checkpoint_tree(flat, like))
  return jax.device_put(task.state, placement.state)


def tune_thresholds(config, workdir, eval_step, state, mesh, label_names, step) -> np.ndarray | None:
  """Bootstrap F1-optimal per-class thresholds on the threshold split, saved beside the checkpoints."""
  if not config.thresholds.tune or config.data.threshold_split not in manifest_lib.read(config.data.dir).splits:
    return None
  predictions = evaluation.predict_split(eval_step, state, data_dir=config.data.dir,
                                         split=config.data.threshold_split,
                                         batch_size=config.eval_batch_size,
                                         hierarchical=config.data.hierarchical, mesh=mesh)
  tuned = thresholds_lib.bootstrap_thresholds(predictions["labels"], predictions["probs"],
                                              num_subsets=config.thresholds.num_subsets,
                                              fraction=config.thresholds.fraction, seed=config.seed)
  if jax.process_index() == 0:
    thresholds_lib.save_thresholds(
        os.path.join(workdir, THRESHOLDS_FILE), tuned.thresholds, label_names,
        meta={"checkpoint_step": int(step), "split": config.data.threshold_split,
              "num_subsets": config.thresholds.num_subsets, "fraction": config.thresholds.fraction,
              # NaN = the label had no positives in that subset.
              "per_subset": [[None if math.isnan(v) else float(v) for v in row]
                             for row in tuned.per_subset]})
  return tuned.thresholds


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  manifest = prepare_data(config)
  train_info = manifest.split(config.data.train_split, where=config.data.dir)
  mesh = sharding_lib.make_mesh(config.mesh.get("num_devices"))
  per_process_batch = sharding_lib.per_process_batch_size(config.batch_size, mesh)
  steps_per_epoch = train_info.num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise InputError(f"config.batch_size={config.batch_size} is larger than the training split "
                     f"({train_info.num_examples} examples)")
  total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  eval_every = config.get("eval_every_steps") or steps_per_epoch

  task = task_lib.build(config, manifest, total_steps=total_steps)
  placement = Placement(mesh, task.state)
  state = jax.device_put(task.state, placement.state)
  train_step = steps_lib.make_train_step(task, state_sharding=placement.state,
                                         batch_sharding=placement.batch,
                                         replicated_sharding=placement.replicated)
  eval_step = steps_lib.make_eval_step(task, state_sharding=placement.state,
                                       batch_sharding=placement.batch)

  train_ds = pipeline.train_dataset(config.data.dir, config.data.train_split, batch_size=per_process_batch,
                                    seed=config.seed, hierarchical=config.data.hierarchical,
                                    share=sharding_lib.process_share(),
                                    worker_count=config.data.worker_count)
  train_iter = iter(train_ds)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep_latest=config.checkpoint.keep_latest,
                                    best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode)
  meta_base = {"taxonomy": manifest.taxonomy.to_json(), "config": config.to_dict(),
               "data_dir": os.path.abspath(config.data.dir)}
  start_step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    check_taxonomy(ckpt.restore_meta(latest), manifest, where=f"{workdir} step {latest}")
    state = restore_state(ckpt, latest, task, placement, data_iterator=train_iter)
    start_step = latest
    logging.info("Resumed from %s at step %d", ckpt.directory, latest)
  _write_config(workdir, config)

  writer = metric_writer.MetricWriter(workdir)
  _log(f"model {config.model.name}: {task.num_params:,} parameters; {jax.device_count()} devices; "
       f"global batch {config.batch_size}; {steps_per_epoch} steps/epoch; {total_steps} steps")
  train_frequencies = train_info.positives(config.data.hierarchical) / train_info.num_examples
  t_start = time.perf_counter()
  t_window, window_steps = time.perf_counter(), 0
  for step in range(start_step + 1, total_steps + 1):
    batch = sharding_lib.global_batch(next(train_iter), mesh)
    state, step_metrics = train_step(state, batch)
    window_steps += 1
    if step % config.log_every_steps == 0 or step == total_steps:
      step_metrics = jax.device_get(step_metrics)
      loss = float(step_metrics["loss"])
      if not math.isfinite(loss) or not math.isfinite(float(step_metrics["grad_norm"])):
        raise FloatingPointError(f"step {step}: non-finite loss {loss} or gradient norm "
                                 f"{float(step_metrics['grad_norm'])}; last good checkpoint: "
                                 f"{ckpt.latest_step()}")
      elapsed = time.perf_counter() - t_window
      steps_per_s = window_steps / elapsed
      step_metrics.update(steps_per_second=steps_per_s, images_per_second=steps_per_s * config.batch_size,
                          epoch=step / steps_per_epoch)
      writer.write(step, step_metrics)
      eta = (total_steps - step) / max(steps_per_s, 1e-9)
      _log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {loss:.4f} "
           f"{steps_per_s * config.batch_size:.0f} img/s eta {eta:.0f}s")
      t_window, window_steps = time.perf_counter(), 0
    if step % eval_every == 0 or step == total_steps:
      val = evaluation.predict_split(eval_step, state, data_dir=config.data.dir,
                                     split=config.data.val_split, batch_size=config.eval_batch_size,
                                     hierarchical=config.data.hierarchical, mesh=mesh)
      val_ap, _ = metrics_lib.macro_average_precision(val["labels"], val["probs"])
      val_metrics = {"val_loss": float(val["loss"].mean()), "val_macro_ap": float(val_ap)}
      writer.write(step, val_metrics)
      _log(f"step {step}: val_loss {val_metrics['val_loss']:.4f} val_macro_ap {val_ap:.4f}")
      ckpt.save(step, checkpointing.to_checkpoint_tree(nnx.to_pure_dict(state)),
                data_iterator=train_iter, meta={**meta_base, "step": step}, metrics=val_metrics)
      t_window, window_steps = time.perf_counter(), 0
  ckpt.wait()
  writer.write(total_steps, {"train_seconds": time.perf_counter() - t_start})

  # The thesis keeps the weights of the epoch with the lowest validation loss (section 3.2.1).
  best_step = ckpt.best_step() or ckpt.latest_step()
  state = restore_state(ckpt, best_step, task, placement)
  thresholds = tune_thresholds(config, workdir, eval_step, state, mesh, task.label_names, best_step)
  test = evaluation.predict_split(eval_step, state, data_dir=config.data.dir,
                                  split=config.data.test_split, batch_size=config.eval_batch_size,
                                  hierarchical=config.data.hierarchical, mesh=mesh)
  summarize = functools.partial(evaluation.summarize, test, label_names=task.label_names,
                                train_frequencies=train_frequencies,
                                ancestor_matrix=manifest.taxonomy.ancestor_matrix)
  result = summarize(thresholds=0.5)
  result.update(split=config.data.test_split, checkpoint_step=best_step)
  if thresholds is not None:
    result["at_tuned_thresholds"] = summarize(thresholds=thresholds)
  evaluation.write_json(os.path.join(workdir, "eval", f"{config.data.test_split}_step{best_step}.json"),
                        result)
  evaluation.write_json(os.path.join(workdir, "results.json"), result)
  writer.write(total_steps, {f"test_{k}": v for k, v in result.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
  writer.close()
  ckpt.close()
  if jax.process_index() == 0:
    print(f"\nTest split {config.data.test_split!r}, best checkpoint (step {best_step}, "
          f"{config.checkpoint.best_mode} {config.checkpoint.best_metric}), threshold 0.5:\n"
          + metrics_lib.format_report(result), flush=True)
    if thresholds is not None:
      tuned = result["at_tuned_thresholds"]
      print(f"With per-class thresholds tuned on {config.data.threshold_split!r} "
            f"({os.path.join(workdir, THRESHOLDS_FILE)}): macro F1 {result['f1']['macro']:.4f} -> "
            f"{tuned['f1']['macro']:.4f}, micro F1 {result['f1']['micro']:.4f} -> "
            f"{tuned['f1']['micro']:.4f}, macro precision {tuned['precision']['macro']:.4f}, "
            f"macro recall {tuned['recall']['macro']:.4f}", flush=True)
  return result


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))


def _log(message: str) -> None:
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)
