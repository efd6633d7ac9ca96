"""The training job: train, validate every epoch, checkpoint, then evaluate the best checkpoint on test.

Resume: if the workdir already holds checkpoints, training continues from the latest one (state, step
and the data iterator's position); the dataset's taxonomy must equal the checkpoint's.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wikitopics_jax.data import augment
from wikitopics_jax.data import augment_device
from wikitopics_jax import checkpointing
from wikitopics_jax import files
from wikitopics_jax.eval import evaluation
from wikitopics_jax.eval import evaluators
from wikitopics_jax.eval import label_stats
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax import metric_writer
from wikitopics_jax.eval import metrics as metrics_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.data import resampling
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps as steps_lib
from wikitopics_jax.data import synthetic
from wikitopics_jax.models import multimodal
from wikitopics_jax import task as task_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.eval import thresholds as thresholds_lib
from wikitopics_jax.errors import InputError

def prepare_data(config: ml_collections.ConfigDict) -> manifest_lib.Manifest:
  """Generates the embedded synthetic dataset if the config asks for it (reused when present)."""
  if config.data.generate_synthetic:
    if jax.process_index() == 0:
      synthetic.generate(config.data.dir, **config.data.synthetic.to_dict())
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("synthetic data ready")
  return manifest_lib.read(config.data.dir)


def predict(config: ml_collections.ConfigDict, eval_step, state, split: str, mesh) -> dict[str, np.ndarray]:
  """evaluation.predict_split with the config's data directory, eval batch size and label kind."""
  return evaluation.predict_split(eval_step, state, data_dir=config.data.dir, split=split,
                                  batch_size=config.eval_batch_size,
                                  hierarchical=config.data.hierarchical, mesh=mesh,
                                  text_tokenizer=multimodal.text_tokenizer(config))


def tune_thresholds(config, workdir, eval_step, state, mesh, label_names, step
                    ) -> thresholds_lib.GuardedThresholds | None:
  """Per-class thresholds on the threshold split (bootstrap F1 optima with the guards of
  `thresholds_lib.guarded_bootstrap_thresholds`), saved beside the checkpoints with each label's rule."""
  if not config.thresholds.tune or config.data.threshold_split not in manifest_lib.read(config.data.dir).splits:
    return None
  predictions = predict(config, eval_step, state, config.data.threshold_split, mesh)
  tuned = thresholds_lib.guarded_bootstrap_thresholds(
      predictions["labels"], predictions["probs"], num_subsets=config.thresholds.num_subsets,
      fraction=config.thresholds.fraction, seed=config.seed,
      min_positives=config.thresholds.get("min_positives", thresholds_lib.DEFAULT_MIN_POSITIVES),
      max_predicted_ratio=config.thresholds.get("max_predicted_ratio",
                                                thresholds_lib.DEFAULT_MAX_PREDICTED_RATIO))
  if jax.process_index() == 0:
    def nullable(values):  # NaN = the label had no positives in that subset.
      return [None if math.isnan(v) else float(v) for v in values]
    thresholds_lib.save_thresholds(
        os.path.join(workdir, thresholds_lib.THRESHOLDS_FILE), tuned.thresholds, label_names, rules=tuned.rules,
        # Closed labels are the ground truth: predictions are closed the same way.
        close_predictions=bool(config.data.hierarchical),
        meta={"checkpoint_step": int(step), "split": config.data.threshold_split,
              "num_subsets": config.thresholds.num_subsets, "fraction": config.thresholds.fraction,
              "min_positives": tuned.min_positives, "max_predicted_ratio": tuned.max_predicted_ratio,
              "fallback": tuned.fallback, "rule_descriptions": tuned.rule_descriptions(),
              "num_images": int(predictions["labels"].shape[0]), "positives": tuned.positives,
              "predicted": tuned.predicted, "bootstrap_median": tuned.bootstrap.thresholds,
              "per_subset": [nullable(row) for row in tuned.bootstrap.per_subset]})
  return tuned


def resample_training_set(config: ml_collections.ConfigDict) -> resampling.Resampled | None:
  """config.data.resampling -> the resampled index list of the training split (None = no change)."""
  params = config.data.resampling.to_dict()
  method = params.pop("method")
  if method == "none":
    return None
  flat, hier, _ = label_stats.read_split_labels(config.data.dir, config.data.train_split)
  labels = hier if config.data.hierarchical else flat
  defaults = {"keep_fraction": 0.8, "extra_fraction": 0.2}
  accepted = set(inspect.signature(resampling.RESAMPLERS.get(method)).parameters)
  kwargs = {k: v for k, v in params.items() if k in accepted or v != defaults.get(k)}
  result = resampling.resample(method, labels, seed=config.seed, key_prefix="config.data.resampling",
                               **kwargs)
  before = label_stats.mean_ir(labels)
  after = label_stats.mean_ir(labels[result.indices])
  _log(f"resampling {method}: {len(labels)} -> {len(result.indices)} training examples "
       f"({int(result.is_duplicate.sum())} copies); meanIR {before:.1f} -> {after:.1f}")
  return result


def augmentations_for(config: ml_collections.ConfigDict) -> list:
  if config.data.augment not in ("none", "naive"):
    raise InputError(f"config.data.augment={config.data.augment!r}; valid: 'none', 'naive'")
  if config.data.augment_on not in ("device", "host"):
    raise InputError(f"config.data.augment_on={config.data.augment_on!r}; valid: 'device', 'host'")
  out = []
  if config.data.augment == "naive":
    out.append(augment.NaiveAugment())
  if config.data.augment_duplicates:
    out.append(augment.DuplicateAugment())
  return out


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient (config.nan_policy = "stop")."""


class _Preemption:
  """SIGTERM (what TPU and cluster schedulers send) -> save at the next step and exit 0.

  One process: a Python SIGTERM handler sets a flag. Several processes (`jax.distributed`): the
  coordination service's preemption sync manager, which `jax.distributed.initialize` starts with its
  own SIGTERM handler, agrees on a step at which every process stops, whichever got the signal; it
  talks to the coordinator in the background, so a step costs no collective and no device fetch.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._distributed = jax.process_count() > 1
    # Installing a Python handler under jax.distributed would replace the sync manager's.
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Called once at every step, by every process, with the same steps in the same order."""
    if not self._distributed:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Profiler:
  """Captures an XProf trace of config.profile.num_steps steps from config.profile.start_step."""

  def __init__(self, profile_cfg, workdir: str):
    self.start = int(profile_cfg.get("start_step") or 0)
    self.stop = self.start + int(profile_cfg.get("num_steps") or 0)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    if self.start and step == self.start and self.stop > self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, outputs) -> None:
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      _log(f"profile of steps {self.start}-{step} written to {self.directory}")


# Peak dense bf16 FLOP/s per chip, for the MFU estimate (vendor data sheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def _peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def _truncate_metrics(workdir: str, last_step: int) -> None:
  """After a restart, drop metric rows of steps that will be replayed (JSON lines stay unique)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  kept = []
  for line in rows:
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
    except (json.JSONDecodeError, KeyError):
      continue  # a line torn by a kill
  with files.atomic_open(path) as f:
    f.writelines(kept)


def _init_from_checkpoint(init_from: str, task: task_lib.Task, placement: sharding_lib.Placement) -> None:
  """Fine-tuning start: model variables (not optimiser state) from another run's best checkpoint."""
  directory = init_from
  if os.path.isdir(os.path.join(init_from, "checkpoints")):
    directory = os.path.join(init_from, "checkpoints")
  source = checkpointing.Checkpointer(directory, read_only=True)
  step = source.resolve_step("best" if source.best_step() is not None else "latest")
  arrays = source.restore_arrays(step)
  like = nnx.to_pure_dict(task.state)
  current = checkpointing.to_checkpoint_tree(like)
  model_keys = {k for k in current if k.startswith("0/")}
  missing = sorted(model_keys - set(arrays))
  if missing:
    raise InputError(f"config.init_from={init_from}: checkpoint step {step} lacks {missing[:5]}")
  for key in model_keys:
    if tuple(np.shape(arrays[key])) != tuple(np.shape(current[key])):
      raise InputError(f"config.init_from={init_from}: {key!r} has shape {np.shape(arrays[key])}, "
                       f"the model expects {np.shape(current[key])}")
    current[key] = arrays[key]
  nnx.replace_by_pure_dict(task.state, checkpointing.from_checkpoint_tree(current, like))
  source.close()
  _log(f"initialised model from {directory} step {step}")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains until the configured number of steps, or until preempted. Returns a summary dict."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  manifest = prepare_data(config)
  train_info = manifest.split(config.data.train_split, where=config.data.dir)
  mesh = sharding_lib.make_mesh(config.mesh.get("num_devices"))
  per_process_batch = sharding_lib.per_process_batch_size(config.batch_size, mesh)
  grad_accum_steps = int(config.get("grad_accum_steps", 1))
  sharding_lib.check_grad_accum(config.batch_size, grad_accum_steps, mesh)
  resampled = resample_training_set(config)
  num_train_examples = train_info.num_examples if resampled is None else len(resampled.indices)
  steps_per_epoch = num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise InputError(f"config.batch_size={config.batch_size} is larger than the training split "
                     f"({num_train_examples} examples)")
  total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint.every_steps or eval_every
  if config.nan_policy not in ("stop", "skip"):
    raise InputError(f"config.nan_policy={config.nan_policy!r}; valid: 'stop', 'skip'")

  task = task_lib.build(config, manifest, total_steps=total_steps)
  placement = sharding_lib.Placement(mesh, task.state)
  validation = evaluators.during_training(config.evals)
  _check_best_metric(config, validation)
  context = evaluation_context(config, manifest, task.label_names)

  def validate(step_fn, state, prefix: str = "") -> dict[str, float]:
    """The during-training evaluators' scalar metrics; each split is predicted once."""
    by_split: dict[str, dict[str, np.ndarray]] = {}
    out = {}
    for ev in validation:
      if ev.split not in by_split:
        by_split[ev.split] = predict(config, step_fn, state, ev.split, mesh)
      out.update(evaluators.scalar_metrics(ev.name, ev.evaluate(by_split[ev.split], context), prefix))
    return out
  augmentations = augmentations_for(config)
  on_device = bool(augmentations) and config.data.augment_on == "device"
  train_step = steps_lib.make_train_step(
      task, state_sharding=placement.state, batch_sharding=placement.batch,
      replicated_sharding=placement.replicated, skip_nonfinite=config.nan_policy == "skip",
      grad_accum_steps=grad_accum_steps,
      augment_fn=augment_device.from_augmentations(augmentations, config.seed) if on_device else None)
  eval_step = steps_lib.make_eval_step(task, state_sharding=placement.state,
                                       batch_sharding=placement.batch)
  ema_eval_step = (steps_lib.make_eval_step(task, state_sharding=placement.state,
                                            batch_sharding=placement.batch, use_ema=True)
                   if task.ema_decay else None)
  train_iter = iter(pipeline.train_dataset(
      config.data.dir, config.data.train_split, batch_size=per_process_batch, seed=config.seed,
      hierarchical=config.data.hierarchical, share=sharding_lib.process_share(),
      worker_count=config.data.worker_count,
      indices=None if resampled is None else resampled.indices,
      is_duplicate=None if resampled is None else resampled.is_duplicate,
      augmentations=[] if on_device else augmentations, emit_example_info=on_device,
      # A multimodal model's text, tokenised in the pipeline (ahead of the device, with the images).
      text_tokenizer=multimodal.text_tokenizer(config)))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep_latest=config.checkpoint.keep_latest,
                                    best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode)
  meta_base = {"taxonomy": manifest.taxonomy.to_json(), "config": config.to_dict(),
               "data_dir": os.path.abspath(config.data.dir)}

  # Resume order: this workdir's latest checkpoint, else config.init_from, else the model's own
  # initialisation (pretrained or random, config.init).
  start_step = 0
  if ckpt.latest_step() is not None:
    def resume(step):
      taxonomy_lib.check_saved(ckpt.restore_meta(step), manifest.taxonomy, where=f"{workdir} step {step}")
      return checkpointing.restore_state(ckpt, step, task.state, placement, data_iterator=train_iter)
    # A corrupt latest checkpoint is reported, moved aside, and training resumes from the newest
    # valid one; the steps after it are replayed exactly.
    latest, state = ckpt.restore_newest(resume, log=_log)
    start_step = latest
    _truncate_metrics(workdir, latest)
    _log(f"resumed from {ckpt.directory} at step {latest}")
  else:
    if config.init_from:
      _init_from_checkpoint(config.init_from, task, placement)
    state = sharding_lib.put_replicated(task.state, placement.replicated)
  _write_config(workdir, config)

  writer = metric_writer.MetricWriter(workdir)
  _log(f"model {config.model.name}: {task.num_params:,} parameters "
       f"({task.num_trainable_params:,} trainable); "
       f"{mesh.devices.size} devices in {jax.process_count()} processes; global batch "
       f"{config.batch_size}; {steps_per_epoch} steps/epoch; {total_steps} steps")
  preemption = _Preemption()
  profiler = _Profiler(config.profile, workdir)
  # After the resume above: the prefetcher starts from the restored position, and checkpoints save
  # the position of the last batch trained on (not of the last one prefetched).
  batches = sharding_lib.DevicePrefetch(train_iter, mesh,
                                        size=int(config.data.get("prefetch_to_device", 2)))
  compiled_step = None
  flops_per_step = None
  pending: list[tuple[int, dict[str, Any]]] = []  # step metrics not yet fetched from the devices
  t_start = time.perf_counter()
  t_window, window_steps = time.perf_counter(), 0
  stopped_at = None

  def check_pending() -> dict[str, Any] | None:
    """Fetches metrics of the steps run since the last check; raises on non-finite ones."""
    fetched = jax.device_get([m for _, m in pending])
    last = None
    for (s, _), m in zip(pending, fetched):
      if not bool(m["finite"]):
        quantity = ("loss" if not math.isfinite(float(m["loss"])) else
                    "gradient norm" if not math.isfinite(float(m["grad_norm"])) else
                    "parameter norm after the update")
        if config.nan_policy == "stop":
          raise NonFiniteError(
              f"step {s}: non-finite {quantity} (loss {float(m['loss'])}, gradient norm "
              f"{float(m['grad_norm'])}, parameter norm {float(m['param_norm'])}); training "
              f"stopped; last good checkpoint: step "
              f"{ckpt.latest_step()} in {ckpt.directory}")
        _log(f"step {s}: non-finite {quantity}; update skipped (config.nan_policy='skip')")
      last = m
    pending.clear()
    return last

  try:
    for step in range(start_step + 1, total_steps + 1):
      # Nothing comes back from the devices in the steady state: metrics are fetched only at log,
      # evaluation, checkpoint and preemption steps, below. Any other device-to-host copy is an error
      # here rather than a silent per-step synchronisation.
      with jax.transfer_guard_device_to_host("disallow_explicit"):
        batch = next(batches)
        if compiled_step is None:
          # Compile ahead of time once: the compiled program also gives the FLOPs per step.
          compiled_step = train_step.lower(state, batch).compile()
          flops_per_step = _compiled_flops(compiled_step)
          # Hosts finish compiling at different times; the first step's collectives would wait
          # for the slowest (on CPU, gloo gives up after 30 s).
          sharding_lib.wait_for_all_processes("train step compiled")
        profiler.before_step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, step_metrics = compiled_step(state, batch)
        profiler.after_step(step, step_metrics)
        pending.append((step, step_metrics))
        window_steps += 1
        is_eval = step % eval_every == 0 or step == total_steps
        is_checkpoint = is_eval or step % checkpoint_every == 0
        preempted = preemption.should_stop(step)
      if step % config.log_every_steps == 0 or step == total_steps or is_checkpoint or preempted:
        last = check_pending()
        if last is not None and (step % config.log_every_steps == 0 or step == total_steps):
          elapsed = time.perf_counter() - t_window
          steps_per_s = window_steps / elapsed
          row = {k: v for k, v in last.items() if k != "finite"}
          row.update(steps_per_second=steps_per_s, images_per_second=steps_per_s * config.batch_size,
                     epoch=step / steps_per_epoch)
          if flops_per_step:
            row["tflops_per_second"] = flops_per_step * steps_per_s / 1e12
            peak = _peak_flops(jax.devices()[0])
            if peak:
              row["mfu"] = flops_per_step * steps_per_s / (peak * jax.device_count())
          writer.write(step, row)
          eta = (total_steps - step) / max(steps_per_s, 1e-9)
          _log(f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss "
               f"{float(last['loss']):.4f} {steps_per_s * config.batch_size:.0f} img/s eta {eta:.0f}s")
          t_window, window_steps = time.perf_counter(), 0
      val_metrics = None
      if is_eval and validation:
        val_metrics = validate(eval_step, state)
        message = f"step {step}: " + _metrics_text(val_metrics)
        if ema_eval_step is not None:
          ema_metrics = validate(ema_eval_step, state, prefix="ema_")
          val_metrics.update(ema_metrics)
          message += "; EMA: " + _metrics_text(ema_metrics, strip="ema_")
        writer.write(step, val_metrics)
        _log(message)
      if is_checkpoint or preempted:
        ckpt.save(step, checkpointing.to_checkpoint_tree(nnx.to_pure_dict(state)),
                  data_iterator=batches, meta={**meta_base, "step": step}, metrics=val_metrics,
                  force=True)
        t_window, window_steps = time.perf_counter(), 0
      if preempted:
        stopped_at = step
        break
    ckpt.wait()
  finally:
    preemption.close()
    writer.flush()
  if stopped_at is not None:
    _log(f"preempted (SIGTERM): checkpoint saved at step {stopped_at}; rerun the same command to "
         f"continue")
    writer.close()
    ckpt.close()
    return {"preempted": True, "step": stopped_at}
  writer.write(total_steps, {"train_seconds": time.perf_counter() - t_start})
  writer.close()
  ckpt.close()
  return {"preempted": False, "step": total_steps}


def _compiled_flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0]
    flops = float(analysis.get("flops", 0.0))
    return flops if flops > 0 else None
  except Exception:  # pylint: disable=broad-except
    return None  # cost analysis is best effort: not every backend provides it


def evaluate_best(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The thesis keeps the weights of the epoch with the lowest validation loss (section 3.2.1):
  tunes per-class thresholds with them and evaluates them on the test split."""
  workdir = os.path.abspath(workdir)
  manifest = manifest_lib.read(config.data.dir)
  mesh = sharding_lib.make_mesh(config.mesh.get("num_devices"))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True,
                                    best_metric=config.checkpoint.best_metric,
                                    best_mode=config.checkpoint.best_mode)
  best_step = ckpt.best_step() or ckpt.latest_step()
  task = task_lib.build(config, manifest, total_steps=max(best_step, 1))
  placement = sharding_lib.Placement(mesh, task.state)
  eval_step = steps_lib.make_eval_step(task, state_sharding=placement.state,
                                       batch_sharding=placement.batch)
  state = checkpointing.restore_state(ckpt, best_step, task.state, placement)
  report, others = evaluators.after_training(config.evals)
  context = evaluation_context(config, manifest, task.label_names)
  thresholds = tune_thresholds(config, workdir, eval_step, state, mesh, task.label_names, best_step)
  predictions: dict[str, dict[str, np.ndarray]] = {}

  def run(step_fn, context, tag=""):
    """The report evaluator on its split, the others on theirs under their names."""
    def on(ev):
      if tag + ev.split not in predictions:
        predictions[tag + ev.split] = predict(config, step_fn, state, ev.split, mesh)
      return predictions[tag + ev.split]
    result = report.evaluate(on(report), context)
    for ev in others:
      result[ev.name] = {**ev.evaluate(on(ev), context), "split": ev.split}
    result["other_evaluators"] = [ev.name for ev in others]
    return result

  result = run(eval_step, context)
  result.update(split=report.split, evaluator=report.name, checkpoint_step=best_step,
                thresholds_source="0.5")
  thresholds_path = os.path.join(workdir, thresholds_lib.THRESHOLDS_FILE)
  if thresholds is not None:
    # Applied as evaluate and predict apply thresholds.json: closed on hierarchical labels.
    result["at_tuned_thresholds"] = run(eval_step, context.with_thresholds(
        thresholds.thresholds, thresholds.rules, close=bool(config.data.hierarchical)))
    result["at_tuned_thresholds"]["thresholds_source"] = f"tuned ({thresholds_path})"
  if task.ema_decay:
    ema_eval_step = steps_lib.make_eval_step(task, state_sharding=placement.state,
                                             batch_sharding=placement.batch, use_ema=True)
    result["ema"] = run(ema_eval_step, context, tag="ema:")
    result["ema"]["decay"] = task.ema_decay
  # Only results.json: eval/ is the evaluate job's, one file per threshold rule.
  evaluation.write_json(os.path.join(workdir, "results.json"), result)
  ckpt.close()
  if jax.process_index() == 0:
    print(f"\nTest split {report.split!r}, best checkpoint (step {best_step}, "
          f"{config.checkpoint.best_mode} {config.checkpoint.best_metric}), threshold 0.5:\n"
          + metrics_lib.format_report(result), flush=True)
    if thresholds is not None:
      tuned = result["at_tuned_thresholds"]
      violations = evaluation.violation_rate_text
      print(f"With per-class thresholds tuned on {config.data.threshold_split!r} ({thresholds_path}; "
            f"per-label rules: {thresholds_lib.count_rules(thresholds.rules)}"
            f"{'; ancestors of predicted labels added' if config.data.hierarchical else ''}): macro F1 "
            f"{result['f1']['macro']:.4f} -> {tuned['f1']['macro']:.4f}, micro F1 "
            f"{result['f1']['micro']:.4f} -> {tuned['f1']['micro']:.4f}, macro precision "
            f"{tuned['precision']['macro']:.4f}, macro recall {tuned['recall']['macro']:.4f}, labels per "
            f"image {result['labels_per_image']['predicted']:.3f} -> "
            f"{tuned['labels_per_image']['predicted']:.3f}, hierarchy violations {violations(result)} -> "
            f"{violations(tuned)}", flush=True)
      for rule in (thresholds_lib.CAPPED, thresholds_lib.DEFAULT):
        names = [f"{n} ({t:.3f})" for n, r, t in zip(task.label_names, thresholds.rules,
                                                     thresholds.thresholds) if r == rule]
        if names:
          print(f"  {rule} ({thresholds.rule_descriptions()[rule]}): {', '.join(names)}", flush=True)
    if "ema" in result:
      ema = result["ema"]
      print(f"EMA of the parameters (decay {task.ema_decay}), same checkpoint, threshold 0.5: "
            f"macro AP {ema['macro_ap']:.4f} (raw {result['macro_ap']:.4f}), macro F1 "
            f"{ema['f1']['macro']:.4f} (raw {result['f1']['macro']:.4f})", flush=True)
  return result


def evaluation_context(config: ml_collections.ConfigDict, manifest: manifest_lib.Manifest,
                       label_names) -> evaluators.Context:
  train_info = manifest.split(config.data.train_split, where=config.data.dir)
  return evaluators.Context(
      label_names=tuple(label_names), ancestor_matrix=manifest.taxonomy.ancestor_matrix,
      train_frequencies=train_info.positives(config.data.hierarchical) / train_info.num_examples)


def _check_best_metric(config: ml_collections.ConfigDict, validation) -> None:
  """The best checkpoint is chosen by a metric that a during-training evaluator writes."""
  metric = config.checkpoint.best_metric
  names = [ev.name for ev in validation]
  if not any(metric.startswith(f"{p}{n}_") for n in names for p in ("", "ema_")):
    raise InputError(f"config.checkpoint.best_metric={metric!r}: no during-training evaluator writes it "
                     f"(they are {names}; metrics are <evaluator>_<metric>, e.g. 'val_loss')")


def _metrics_text(metrics: dict[str, float], strip: str = "") -> str:
  return " ".join(f"{k[len(strip):] if strip and k.startswith(strip) else k} {v:.4f}"
                  for k, v in metrics.items())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The main job: train, then (unless preempted) evaluate the best checkpoint on the test split."""
  outcome = train(config, workdir)
  if outcome["preempted"]:
    return outcome
  return evaluate_best(config, workdir)


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))


def _log(message: str) -> None:
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)
