"""Suite `loop`: the whole training loop against the bare compiled step, and the input-bound loop.

Ours: `trainer.train` on a synthetic dataset with the thesis's naive augmentation on the device: the
Grain pipeline, the transfer of batches ahead of the step (`DevicePrefetch`), the jitted step
(augmentation included), metrics fetched at log steps only, and logging. Its figures are the
images/s of the trainer's own log windows (`metrics.jsonl`), the first two windows (compilation,
warm-up) left out. Baseline: the same compiled step, same augmentation, run back to back on one
pre-made device batch: the ceiling of the loop, reached when the host adds nothing. It is timed just
before and just after the loop (not interleaved: the loop's pipeline works ahead while it runs), and
both sets of runs are its samples.

The input-bound row replaces the model by a trivial step (the augmentation and a mean of the batch):
what the loop sustains when the device is never the bottleneck, per host core.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from wikitopics_jax.data import augment_device
from wikitopics_jax import configlib
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps as steps_lib
from wikitopics_jax.data import synthetic
from wikitopics_jax import task as task_lib
from wikitopics_jax import trainer
from wikitopics_jax.bench import model_suites
from wikitopics_jax.bench import runner

SUITE = "loop"
_SKIPPED_WINDOWS = 2


def _config(data_dir: str, *, model: str, batch_size: int, steps: int, log_every: int,
            image_size: int, dtype: str = "float32",
            depth_multiplier: float | None = None) -> ml_collections.ConfigDict:
  c = configlib.base_config()
  c.model.dtype = dtype
  c.model.depth_multiplier = depth_multiplier
  c.data.dir = data_dir
  c.data.generate_synthetic = False
  c.data.augment = "naive"
  c.data.augment_on = "device"
  c.model.name = model
  c.model.head = "gap"
  c.model.image_size = image_size
  c.batch_size = batch_size
  c.eval_batch_size = batch_size
  c.num_train_steps = steps
  c.eval_every_steps = steps  # one validation, after the timed windows
  c.log_every_steps = log_every
  c.thresholds.tune = False
  return c


def _loop_windows(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rates = [r["images_per_second"] for r in rows if "images_per_second" in r]
  if len(rates) <= _SKIPPED_WINDOWS:
    raise RuntimeError(f"only {len(rates)} log windows; need more than {_SKIPPED_WINDOWS}")
  return rates[_SKIPPED_WINDOWS:]


class _BareStep:
  """The trainer's compiled step on one pre-made device batch, `steps` calls per run."""

  def __init__(self, config: ml_collections.ConfigDict, steps: int, trivial: bool):
    manifest = manifest_lib.read(config.data.dir)
    mesh = sharding_lib.make_mesh(None)
    task = task_lib.build(config, manifest, total_steps=config.num_train_steps)
    placement = sharding_lib.Placement(mesh, task.state)
    augment_fn = augment_device.from_augmentations(trainer.augmentations_for(config), config.seed)
    make = _trivial_train_step if trivial else steps_lib.make_train_step
    self.step = make(task, state_sharding=placement.state, batch_sharding=placement.batch,
                     replicated_sharding=placement.replicated, augment_fn=augment_fn)
    iterator = iter(pipeline.train_dataset(
        config.data.dir, config.data.train_split, batch_size=config.batch_size, seed=config.seed,
        hierarchical=config.data.hierarchical, emit_example_info=True))
    self.batch = sharding_lib.global_batch(next(iterator), mesh)
    self.state = sharding_lib.put_replicated(task.state, placement.replicated)
    self.steps = steps

  def run(self) -> None:
    metrics = None
    for _ in range(self.steps):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready(metrics)


def _trivial_train_step(task, *, state_sharding, batch_sharding, replicated_sharding,
                        augment_fn=None, **unused):
  """(state, batch) -> (state, metrics) that only augments the batch and takes its mean."""
  del task, unused

  def step(state, batch):
    images = batch["image"]
    if augment_fn is not None:
      images = augment_fn(images, batch["index"], batch["is_duplicate"])
    loss = jnp.mean(images.astype(jnp.float32)) + 0.0 * jnp.mean(batch["labels"])
    one = jnp.ones((), jnp.float32)
    return state, {"loss": loss, "grad_norm": one, "param_norm": one, "learning_rate": one,
                   "finite": jnp.isfinite(loss)}

  return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated_sharding), donate_argnums=(0,))


@contextlib.contextmanager
def _trivial_steps():
  original = steps_lib.make_train_step
  steps_lib.make_train_step = _trivial_train_step
  try:
    yield
  finally:
    steps_lib.make_train_step = original


def _measure(ctx: runner.Context, tmp: str, data_dir: str, name: str, *, model: str,
             batch_size: int, log_every: int, windows: int, image_size: int, trivial: bool,
             bare_repeats: int, dtype: str) -> runner.Row:
  steps = log_every * (windows + _SKIPPED_WINDOWS)
  config = _config(data_dir, model=model, batch_size=batch_size, steps=steps, log_every=log_every,
                   image_size=image_size, dtype=dtype,
                   depth_multiplier=model_suites.TINY_DEPTH if ctx.tiny else None)
  bare = _BareStep(config, log_every, trivial)
  bare.run()  # compilation
  samples = []

  def time_bare():
    for _ in range(bare_repeats):
      start = time.perf_counter()
      bare.run()
      samples.append(log_every * batch_size / (time.perf_counter() - start))

  time_bare()
  workdir = os.path.join(tmp, name)
  ctx.log(f"[{SUITE}] {name}: {steps} steps of trainer.train")
  with _trivial_steps() if trivial else contextlib.nullcontext():
    trainer.train(config, workdir)
  loop = runner.Stats.of(_loop_windows(workdir))
  time_bare()
  baseline = runner.Stats.of(samples)
  cores = runner.core_count()
  what = "trivial step (augmentation + mean)" if trivial else f"{model} train step ({dtype})"
  return runner.Row(
      SUITE, f"training loop, {what}, batch {batch_size}, {image_size}x{image_size}, naive "
             f"augmentation on the device, log every {log_every} steps",
      "trainer.train (pipeline, transfer ahead, step, logging)", "images/s", loop,
      baseline="the same compiled step on one pre-made device batch",
      baseline_stats=baseline,
      note="baseline timed before and after the loop, not interleaved; loop figures are the "
           f"trainer's log windows after the first {_SKIPPED_WINDOWS}",
      extra={"cores": cores, "loop_images_per_second_per_core": loop.median / cores,
             "cores_for_100k_images_per_second": 100_000 / (loop.median / cores),
             "windows": windows, "log_every_steps": log_every, "trivial_step": trivial})


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  image_size = 32 if ctx.tiny else 64
  num_images = 512 if ctx.tiny else 8192 if ctx.mode == "cpu" else 40_960
  with tempfile.TemporaryDirectory(prefix="wikitopics-bench-loop-") as tmp:
    data_dir = os.path.join(tmp, "data")
    synthetic.generate(data_dir, num_images=num_images, image_size=image_size, seed=0)
    if ctx.mode == "accelerator":
      # configs/accelerator.py:b0_64's batch; the trivial step shows what the host can feed.
      settings = [("b0", "efficientnet_b0", 1024, 20, False, "bfloat16"),
                  ("input_bound", "efficientnet_tiny", 1024, 20, True, "bfloat16")]
    else:
      settings = [("tiny", "efficientnet_tiny", 32, 5 if ctx.tiny else 20, False, "float32"),
                  ("input_bound", "efficientnet_tiny", 64, 5 if ctx.tiny else 20, True, "float32")]
      if not ctx.tiny:
        settings.insert(1, ("b0", "efficientnet_b0", 64, 10, False, "float32"))
    rows = []
    for name, model, batch_size, log_every, trivial, dtype in settings:
      rows.append(_measure(ctx, tmp, data_dir, name, model=model, batch_size=batch_size,
                           log_every=log_every, windows=2 if ctx.tiny else 4,
                           image_size=image_size, trivial=trivial,
                           bare_repeats=1 if ctx.tiny else 3, dtype=dtype))
  return rows
