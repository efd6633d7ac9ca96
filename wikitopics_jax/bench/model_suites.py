"""Suites `train_step` and `inference`: EfficientNet images/s, ours (NNX, jitted) vs PyTorch.

Ours is the trainer's real code path: `task.build` (model, Adam, BCE on the 31 labels of taxonomy v1.3)
and `steps.make_train_step` / `steps.make_eval_step`, compiled ahead of time with
`jitted.lower(state, batch).compile()` so that compilation is outside the timed runs and the compiled
program's FLOPs are known (`cost_analysis()["flops"]`). Inputs are uint8 images, normalised inside the
step, on one device (images/s are per chip).

CPU mode (`jax.default_backend() == "cpu"`): B0 at 64x64 batch 64 and at 224x224 batch 32, float32,
against the same architecture in plain PyTorch (`torch_efficientnet`): eager NCHW, eager channels_last
and `torch.compile` (channels_last; skipped with the error when it fails), with
`torch.set_num_threads(cores)` (XLA's CPU backend uses every core). Another row measures the depthwise
trick: our model (kernels "xla_cpu") against the same model with the depthwise convolution left plain
(`nnx.Conv` with `feature_group_count`; `models/xla_cpu/depthwise.py`); in `train_step`, one more the
fused BatchNorm, against the same model with nnx.BatchNorm and autodiff
(`models/xla_cpu/batchnorm.py`). Rows record our step's page faults (`host_allocator.py`;
`--host_malloc=system` to compare).

Accelerator mode: B0 and B2 at 64x64 and B0 at 224x224, bfloat16 compute, batch 256, kernels "auto"
(the plain "xla" layers). Rows give images/s per chip, step time, FLOPs per step and the model FLOPs utilisation
(MFU = FLOPs per step / step time / the chip's peak, `PEAK_BF16_FLOPS`). PyTorch on CUDA (eager,
channels_last, bf16 autocast) is the baseline when torch sees a GPU.

`--profile_dir`: the timed runs of `train_step` run inside `jax.profiler.trace`, one
`StepTraceAnnotation` per step (view with XProf / TensorBoard; see docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from wikitopics_jax import configlib
from wikitopics_jax import host_allocator
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.models import xla_cpu
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.bench import keras_baseline
from wikitopics_jax.bench import runner

TRAIN, INFERENCE = "train_step", "inference"
TAXONOMY = "v1.3"
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-7  # Keras's, as optimizers.py.
KERAS_LABEL = "TF-Keras (keras.applications), graph mode"
TINY_DEPTH = 0.1  # One block per stage: --tiny checks the machinery, its figures mean nothing.

# Dense (no sparsity) bfloat16 peak FLOP/s per chip, from the vendors' datasheets, keyed by a
# substring of `jax.devices()[0].device_kind`; the longest matching key wins. Other chips and
# float32: "unknown" (no MFU).
PEAK_BF16_FLOPS = {
    "H200": 989e12,        # H200 SXM
    "H100": 989e12,        # H100 SXM
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,       # v5p
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


@dataclasses.dataclass(frozen=True)
class Setting:
  model: str
  image_size: int
  batch: int
  dtype: str = "float32"
  steps_per_run: int = 1  # Steps per timed run (one figure).
  repeats: int = 3
  depth_multiplier: float | None = None  # Fewer blocks for --tiny (faster compiles).

  def describe(self) -> str:
    depth = "" if self.depth_multiplier is None else f" (depth x{self.depth_multiplier})"
    return (f"{self.model}{depth} {self.image_size}x{self.image_size}, batch {self.batch}, "
            f"{self.dtype}")


def settings_for(suite: str, ctx: runner.Context) -> list[Setting]:
  inference = suite == INFERENCE
  if ctx.mode == "accelerator":
    if ctx.tiny:
      return [Setting("efficientnet_tiny", 32, 8, "bfloat16", steps_per_run=2, repeats=2,
                      depth_multiplier=TINY_DEPTH)]
    steps_per_run = 20 if inference else 10
    return [Setting("efficientnet_b0", 64, 256, "bfloat16", steps_per_run, 5),
            Setting("efficientnet_b2", 64, 256, "bfloat16", steps_per_run, 5),
            Setting("efficientnet_b0", 224, 256, "bfloat16", steps_per_run // 2, 5)]
  if ctx.tiny:
    return [Setting("efficientnet_tiny", 32, 8, steps_per_run=2 if inference else 1, repeats=2,
                    depth_multiplier=TINY_DEPTH)]
  # 5 rounds at 224x224 too: one-step runs there spread by up to +-37% (3 rounds gave medians that
  # one slow round could move).
  return [Setting("efficientnet_b0", 64, 64, steps_per_run=4 if inference else 2, repeats=5),
          Setting("efficientnet_b0", 224, 32, steps_per_run=2 if inference else 1, repeats=5)]


def peak_flops(device_kind: str, dtype: str) -> float | None:
  if dtype != "bfloat16":
    return None
  matches = [key for key in PEAK_BF16_FLOPS if key in device_kind]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (None if unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per device program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def random_batch(setting: Setting, num_labels: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (setting.batch, setting.image_size, setting.image_size, 3)
  return {"image": rng.integers(0, 256, shape, dtype=np.uint8),
          "labels": (rng.random((setting.batch, num_labels)) < 0.1).astype(np.uint8)}


def build_task(setting: Setting, skip: tuple[str, ...] = ()) -> task_lib.Task:
  """The trainer's Task for a dataset of `setting.image_size` images with taxonomy v1.3 (no files).

  Kernels "auto"; `skip` (kinds of `xla_cpu.KINDS`): the xla_cpu layers except those, to measure
  one replacement alone.
  """
  config = configlib.base_config()
  config.model.name = setting.model
  config.model.head = "gap"
  config.model.image_size = setting.image_size
  config.model.dtype = setting.dtype
  config.model.kernels = "xla" if skip else "auto"
  config.model.depth_multiplier = setting.depth_multiplier
  config.data.hierarchical = False
  config.optimizer.learning_rate = LEARNING_RATE
  size = setting.image_size
  manifest = manifest_lib.Manifest(taxonomy=taxonomy_lib.load(TAXONOMY), image_shape=(size, size, 3),
                                   image_encoding="raw", splits={})
  task = task_lib.build(config, manifest, total_steps=1000)
  if not skip:
    return task
  # The plain model's layers replaced in place as `models.create_model` does; the state is the same.
  model, optimizer = nnx.merge(task.train_graphdef, task.state)
  xla_cpu.apply(model, skip=skip)
  model.eval()
  eval_graphdef, _ = nnx.split((model, optimizer))
  model.train()
  train_graphdef, state = nnx.split((model, optimizer))
  return dataclasses.replace(task, train_graphdef=train_graphdef, eval_graphdef=eval_graphdef,
                             state=state)


class OurStep:
  """Our compiled train or eval step on one device; `run()` does `steps_per_run` steps."""

  def __init__(self, suite: str, setting: Setting, batch: dict[str, np.ndarray], annotate: bool,
               skip: tuple[str, ...] = ()):
    self.task = build_task(setting, skip)
    mesh = sharding_lib.make_mesh(1)
    replicated = sharding_lib.replicated(mesh)
    batch_sharding = sharding_lib.batch_sharded(mesh)
    state_sharding = jax.tree.map(lambda _: replicated, self.task.state)
    self.state = jax.device_put(self.task.state, state_sharding)
    self.batch = jax.device_put(batch, batch_sharding)
    self.train = suite == TRAIN
    if self.train:
      jitted = steps.make_train_step(self.task, state_sharding=state_sharding,
                                     batch_sharding=batch_sharding, replicated_sharding=replicated)
    else:
      jitted = steps.make_eval_step(self.task, state_sharding=state_sharding,
                                    batch_sharding=batch_sharding)
    start = time.perf_counter()
    self.compiled = jitted.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = compiled_flops(self.compiled)
    self.steps_per_run = setting.steps_per_run
    self.annotate = annotate
    self.step_number = itertools.count()

  def run(self) -> None:
    for _ in range(self.steps_per_run):
      with self._annotation():
        if self.train:
          self.state, out = self.compiled(self.state, self.batch)
        else:
          out = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, out))

  def _annotation(self):
    if not self.annotate:
      return contextlib.nullcontext()
    return jax.profiler.StepTraceAnnotation("train" if self.train else "eval",
                                            step_num=next(self.step_number))


def _torch_or_reason():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return None, f"PyTorch is not installed ({e}); `pip install -e .[bench]`"
  return torch, None


class TorchStep:
  """The same model and step in plain PyTorch: normalise uint8 input, forward, BCE, (Adam step)."""

  def __init__(self, suite: str, setting: Setting, batch: dict[str, np.ndarray], *,
               channels_last: bool, compile_model: bool, device: str, num_labels: int,
               expected_params: int):
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn import functional as F  # pylint: disable=g-import-not-at-top
    from wikitopics_jax.bench import torch_efficientnet  # pylint: disable=g-import-not-at-top
    self.torch, self.F = torch, F
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = torch_efficientnet.create(setting.model, num_labels=num_labels,
                                      depth_multiplier=setting.depth_multiplier)
    params = torch_efficientnet.count_parameters(model)
    if params != expected_params:
      raise AssertionError(f"PyTorch {setting.model} has {params:,} parameters, ours "
                           f"{expected_params:,}: not the same architecture")
    self.model = model.to(device=device, memory_format=memory_format)
    self.forward = torch.compile(self.model) if compile_model else self.model
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)  # NHWC data -> NCHW view
    self.images = images.to(device).contiguous(memory_format=memory_format)
    self.labels = torch.from_numpy(batch["labels"]).float().to(device)
    self.mean = torch.tensor(pipeline.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    self.std = torch.tensor(pipeline.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    self.train = suite == TRAIN
    if self.train:
      self.model.train()
      self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE, eps=ADAM_EPS)
    else:
      self.model.eval()
    self.device = device
    self.autocast_dtype = torch.bfloat16 if setting.dtype == "bfloat16" else None
    self.steps_per_run = setting.steps_per_run

  def _logits(self):
    x = (self.images.float() / 255.0 - self.mean) / self.std
    if self.autocast_dtype is None:
      return self.forward(x)
    with self.torch.autocast(self.device, dtype=self.autocast_dtype):
      return self.forward(x).float()

  def _step(self) -> None:
    if self.train:
      loss = self.F.binary_cross_entropy_with_logits(self._logits(), self.labels)
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      self.optimizer.step()
      return
    with self.torch.inference_mode():
      logits = self._logits()
      self.torch.sigmoid(logits)
      self.F.binary_cross_entropy_with_logits(logits, self.labels, reduction="none").mean(dim=1)

  def run(self) -> None:
    for _ in range(self.steps_per_run):
      self._step()
    if self.device == "cuda":
      self.torch.cuda.synchronize()


def _torch_variants(ctx: runner.Context, suite: str, torch) -> list[tuple[str, dict[str, Any]]]:
  """(label, TorchStep options) of the PyTorch baselines this mode runs."""
  if ctx.mode == "accelerator":
    if not torch.cuda.is_available():
      ctx.skip(suite, "PyTorch baselines", "torch sees no CUDA device (CPU-only build?)")
      return []
    return [("PyTorch eager CUDA, channels_last, bf16 autocast",
             {"channels_last": True, "compile_model": False, "device": "cuda"})]
  variants = [("PyTorch eager, NCHW", {"channels_last": False, "compile_model": False}),
              ("PyTorch eager, channels_last", {"channels_last": True, "compile_model": False})]
  if ctx.tiny:
    ctx.skip(suite, "torch.compile", "off in --tiny mode (slow to compile)")
  elif not ctx.torch_compile:
    ctx.skip(suite, "torch.compile", "--notorch_compile")
  else:
    variants.append(("torch.compile, channels_last", {"channels_last": True, "compile_model": True}))
  return [(label, {**options, "device": "cpu"}) for label, options in variants]


def _run_suite(suite: str, ctx: runner.Context) -> list[runner.Row]:
  # --tiny may run on a busy machine, where PyTorch threads spinning against other processes make a
  # step tens of times slower; one thread keeps the check quick.
  torch_threads = 1 if ctx.tiny else runner.core_count()
  torch, why_not = _torch_or_reason()
  if torch is None:
    ctx.skip(suite, "PyTorch baselines", why_not)
    torch_variants = []
  else:
    torch.set_num_threads(torch_threads)
    torch_variants = _torch_variants(ctx, suite, torch)
  keras = None
  if ctx.mode == "accelerator":
    ctx.skip(suite, "TF-Keras baseline", "CPU mode only (the thesis prototype's stack on CPU)")
  else:
    keras, why_not = keras_baseline.keras_or_reason(torch_threads)
    if keras is None:
      ctx.skip(suite, "TF-Keras baseline", why_not)
  rows = []
  for setting in settings_for(suite, ctx):
    # One setting at a time: its models and compiled programs are freed before the next is built.
    rows += _measure_setting(suite, setting, ctx, torch_variants, torch_threads, keras)
  return rows


def _measure_setting(suite: str, setting: Setting, ctx: runner.Context,
                     torch_variants: list[tuple[str, dict[str, Any]]],
                     torch_threads: int, keras) -> list[runner.Row]:
  accelerator = ctx.mode == "accelerator"
  profile = suite == TRAIN and ctx.profile_dir is not None
  num_labels = taxonomy_lib.load(TAXONOMY).num_labels
  work = setting.batch * setting.steps_per_run
  ctx.log(f"[{suite}] {setting.describe()}: compiling")
  batch = random_batch(setting, num_labels)
  ours = OurStep(suite, setting, batch, annotate=profile)
  candidates = [runner.Candidate("ours", ours.run, work=work)]
  labels = {}
  compile_seconds = {"ours": ours.compile_seconds}
  if not accelerator:
    native = OurStep(suite, setting, batch, annotate=False, skip=("depthwise",))
    compile_seconds["native"] = native.compile_seconds
    candidates.append(runner.Candidate("native", native.run, work=work))
    labels["native"] = "NNX, depthwise native (lax grouped conv)"
    if suite == TRAIN:  # Evaluation never takes the fused BatchNorm path.
      unfused = OurStep(suite, setting, batch, annotate=False, skip=("batch_norm",))
      compile_seconds["nnx_batch_norm"] = unfused.compile_seconds
      candidates.append(runner.Candidate("nnx_batch_norm", unfused.run, work=work))
      labels["nnx_batch_norm"] = "NNX, BatchNorm + activation by nnx.BatchNorm and autodiff"
  for label, options in torch_variants:
    try:
      step = TorchStep(suite, setting, batch, num_labels=num_labels,
                       expected_params=ours.task.num_params, **options)
    except Exception as e:  # pylint: disable=broad-except
      ctx.skip(suite, f"{label} ({setting.describe()})", f"{type(e).__name__}: {e}")
      continue
    candidates.append(runner.Candidate(label, step.run, work=work))
    labels[label] = label
  if keras is not None:
    try:
      step = keras_baseline.KerasStep(
          keras, model=setting.model, train=suite == TRAIN, batch=batch, num_labels=num_labels,
          expected_params=ours.task.num_params, learning_rate=LEARNING_RATE, adam_epsilon=ADAM_EPS,
          steps_per_run=setting.steps_per_run)
    except Exception as e:  # pylint: disable=broad-except
      ctx.skip(suite, f"{KERAS_LABEL} ({setting.describe()})", f"{type(e).__name__}: {e}")
    else:
      candidates.append(runner.Candidate(KERAS_LABEL, step.run, work=work))
      labels[KERAS_LABEL] = KERAS_LABEL

  def around_timed():
    return jax.profiler.trace(ctx.profile_dir) if profile else contextlib.nullcontext()

  ctx.log(f"[{suite}] {setting.describe()}: timing {len(candidates)} implementations")
  stats = runner.measure_alternating(
      candidates, repeats=setting.repeats, unit="images/s", around_timed=around_timed,
      on_failure=lambda c, why: ctx.skip(suite, f"{c.name} ({setting.describe()})", why),
      settling_round=True)
  ours_stats = stats["ours"][0]
  faults = _page_faults_per_step(ours)
  step_seconds = setting.batch / ours_stats.median
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind, setting.dtype)
  extra = {
      "model": setting.model, "image_size": setting.image_size, "batch": setting.batch,
      "dtype": setting.dtype, "steps_per_run": setting.steps_per_run,
      "params": ours.task.num_params, "device_kind": device_kind,
      "step_time_ms": step_seconds * 1e3, "flops_per_step": ours.flops,
      "achieved_flops_per_s": ours.flops / step_seconds if ours.flops else None,
      "peak_flops_per_s": peak,
      "mfu": ours.flops / step_seconds / peak if ours.flops and peak else None,
      "compile_s": compile_seconds,
      "first_call_s": {name: first_call for name, (_, first_call) in stats.items()},
      "cores": runner.core_count(), "torch_threads": torch_threads if torch_variants else None,
      "profiled": profile,
      "page_faults_per_step": faults,
      "host_malloc": "keep" if host_allocator.is_keeping() else "system",
  }
  note = _figures_note(extra)
  what = f"{'train step' if suite == TRAIN else 'inference'}, {setting.describe()}"
  our_label = ("NNX jit, " + ("train step (Adam, BCE)" if suite == TRAIN else "eval step")
               + f", depthwise {'auto' if accelerator else 'shifted'}")
  if len(stats) == 1:
    return [runner.Row(suite, what, our_label, "images/s", ours_stats, note=note, extra=extra)]
  rows = []
  for name, (baseline_stats, _) in stats.items():
    if name == "ours":
      continue
    row_note = note
    if name == "native":
      row_note = "the depthwise trick: speedup of 'shifted' over 'native'; " + note
    elif name == "nnx_batch_norm":
      row_note = "the fused BatchNorm: speedup of 'fused' over 'nnx' (batchnorm.py); " + note
    rows.append(runner.Row(suite, what, our_label, "images/s", ours_stats, baseline=labels[name],
                           baseline_stats=baseline_stats, note=row_note, extra=dict(extra)))
  return rows


def _page_faults_per_step(ours: OurStep) -> float:
  """Minor page faults per step of ours, after a settling run (see host_allocator.py)."""
  ours.run()
  before = host_allocator.minor_page_faults()
  ours.run()
  return (host_allocator.minor_page_faults() - before) / ours.steps_per_run


def _figures_note(extra: dict[str, Any]) -> str:
  parts = [f"step {extra['step_time_ms']:.1f} ms"]
  parts.append(f"{extra['page_faults_per_step']:,.0f} page faults/step "
               f"(host_malloc {extra['host_malloc']})")
  if extra["flops_per_step"]:
    parts.append(f"{extra['flops_per_step'] / 1e9:.3g} GFLOP/step (XLA cost analysis)")
  if extra["mfu"] is not None:
    parts.append(f"MFU {100 * extra['mfu']:.1f}% of {extra['peak_flops_per_s'] / 1e12:.0f} "
                 "TFLOP/s bf16 peak")
  elif extra["dtype"] == "bfloat16":
    parts.append(f"MFU: peak unknown for {extra['device_kind']!r}")
  return ", ".join(parts)


@runner.SUITES.register(TRAIN)
def run_train_step(ctx: runner.Context) -> list[runner.Row]:
  return _run_suite(TRAIN, ctx)


@runner.SUITES.register(INFERENCE)
def run_inference(ctx: runner.Context) -> list[runner.Row]:
  return _run_suite(INFERENCE, ctx)
