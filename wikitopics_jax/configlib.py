"""The base config every experiment config starts from (configs/*.py call `base_config()`),
`loss_argument`, which lets every config file's argument pick the loss, and `check`, the early check of
its registry names, loss keys and text keys."""

from __future__ import annotations

import functools
from collections.abc import Callable

import ml_collections

from wikitopics_jax import losses
from wikitopics_jax import models
from wikitopics_jax.models import multimodal
from wikitopics_jax.errors import InputError


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.dir = "data/synthetic-64px"
  # generate_synthetic: generate the embedded synthetic dataset into data.dir first (reused if
  # present), with data.synthetic's keys as the arguments of wikitopics_jax.data.synthetic.generate.
  # False (real data): data.dir must already hold a dataset (`wikitopics ingest`).
  c.data.generate_synthetic = True
  c.data.synthetic = ml_collections.ConfigDict({"num_images": 20000, "image_size": 64, "seed": 0})
  c.data.hierarchical = True          # train on closed (ancestor-added) labels, the thesis's default
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.threshold_split = "threshold"
  c.data.test_split = "test"
  c.data.worker_count = 0             # Grain worker processes (0 = in the training process)
  # Resampling of the training split as an index transformation (wikitopics_jax/data/resampling.py):
  # method "none", "heuristic_under" (keep_fraction), "heuristic_over" (extra_fraction), "ml_rus",
  # "ml_ros"; computed on the labels the model trains on (flat or hierarchical).
  c.data.resampling = ml_collections.ConfigDict(
      {"method": "none", "keep_fraction": 0.8, "extra_fraction": 0.2})
  # "none" or "naive" (the thesis's zoom/rotation/shift/flip on every training image);
  # augment_duplicates: the label-dependent augmentation on oversampled copies.
  c.data.augment = "none"
  c.data.augment_duplicates = False
  # Where augmentation runs: "device" (in the train step, on the uint8 batch, keyed by each example's
  # global position: augment_device.py) or "host" (NumPy per image in the input pipeline: augment.py).
  c.data.augment_on = "device"
  # Batches made global and copied to the devices ahead of the step that uses them (>= 1; 2 = the
  # next batch is transferred while the current step runs).
  c.data.prefetch_to_device = 2

  c.model = models.default_model_config()
  c.model.name = "efficientnet_b0"
  c.model.head = "thesis"
  # None = the dataset's image size (from its manifest); set it to check that they agree.
  c.model.image_size = ml_collections.FieldReference(None, int)
  # Text next to the image (models/multimodal.py, docs/multimodal.md): tower "none" is the image-only
  # model above, unchanged; "bag" or "minilm" adds that text tower and config.text.fusion's head.
  c.text = multimodal.default_text_config()
  # Initial weights of the base model: "random", or "imagenet" (EfficientNet-Lite0/1/2 only, from
  # the `pretrained` extra's packages; see docs/pretrained.md). The head always starts random.
  c.init = "random"
  # Fine-tuning depth (thesis Table 4.5): train the head and the base model's last K layers, counted
  # as Keras counts them (B2 has 339); the other Params get no updates and no optimiser state, and
  # their BatchNorm statistics stay fixed. None = train everything.
  c.trainable_layers = ml_collections.FieldReference(None, int)

  # Only the chosen loss's own keys (losses.config); `loss_argument` switches the loss.
  c.loss = losses.config("bce")
  c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
  # warmup_steps: a linear warm-up, which every schedule takes (optimizers.py; 0 = none).
  c.schedule = ml_collections.ConfigDict({"name": "constant", "warmup_steps": 0})
  # Exponential moving average of the trainable parameters (0 = off), kept in the optimiser state
  # (so it is checkpointed) and evaluated next to the raw parameters: ema_val_* metrics every
  # evaluation, and an "ema" section in the test results.
  c.ema = ml_collections.ConfigDict({"decay": 0.0})

  c.mesh = ml_collections.ConfigDict({"num_devices": ml_collections.FieldReference(None, int)})
  c.batch_size = 512
  # Gradient accumulation: k > 1 splits each batch of batch_size into k micro-batches run one after
  # the other in the train step (activation memory of batch_size / k), float32 gradient sum, one
  # update. batch_size must divide by k x the device count. Equal to the full batch up to rounding for
  # a model without batch statistics; BatchNorm normalises each micro-batch by its own statistics
  # and updates its running statistics once per micro-batch (steps.make_train_step).
  c.grad_accum_steps = 1
  c.eval_batch_size = 512
  c.num_epochs = 15
  c.num_train_steps = 0               # > 0 overrides num_epochs
  c.eval_every_steps = 0              # 0 = once per epoch
  # Evaluators (wikitopics_jax/eval/evaluators/): name -> {type, split, during_training, own keys}.
  # during_training: at every evaluation step, into metrics.jsonl as <name>_<metric> (val_loss picks
  # the best checkpoint). The others run on the best checkpoint (results.json), in `evaluate` and
  # `report`; the first "multilabel" one is the report, the others add their metrics under their name.
  c.evals = ml_collections.ConfigDict({
      "val": {"type": "loss_ap", "split": c.data.get_ref("val_split"), "during_training": True},
      "test": {"type": "multilabel", "split": c.data.get_ref("test_split"), "during_training": False},
      "ranking": {"type": "ranking", "split": c.data.get_ref("test_split"), "during_training": False},
  })
  c.log_every_steps = 50

  # Per-class thresholds tuned on data.threshold_split after training (thesis section 3.2.1):
  # num_subsets bootstrap subsets of `fraction` of the split, F1-optimal per class, median.
  # Guards (thresholds.py): fewer positives than min_positives keeps 0.5; a threshold that
  # predicts a label for more than max_predicted_ratio x its positives is raised.
  c.thresholds = ml_collections.ConfigDict({"tune": True, "num_subsets": 7, "fraction": 0.2,
                                            "min_positives": 20, "max_predicted_ratio": 2.0})

  # every_steps: 0 = checkpoint at every evaluation (once per epoch by default).
  c.checkpoint = ml_collections.ConfigDict(
      {"keep_latest": 2, "best_metric": "val_loss", "best_mode": "min", "every_steps": 0})
  # Fine-tune from another run (its workdir or checkpoint directory; its best checkpoint's model
  # variables). Ignored when this workdir already has checkpoints (then training resumes).
  c.init_from = ""
  # A non-finite loss or gradient: "stop" (error naming the step; last good checkpoint kept) or
  # "skip" (the update is dropped and training goes on).
  c.nan_policy = "stop"
  # XProf trace of num_steps steps from start_step (0 = off), written to workdir/profile.
  c.profile = ml_collections.ConfigDict({"start_step": 0, "num_steps": 5})
  return c


# The part of a config file's argument that picks the loss: `--config=configs/demo.py:loss=focal`.
LOSS_ARG = "loss="


def split_loss_arg(arg: str | None) -> tuple[str | None, str | None]:
  """(the argument without its `loss=NAME` part or None if nothing is left, NAME or None).

  config_flags passes everything after the file's first colon to `get_config`; its parts are separated
  by colons, so `table4_3_focal:smoke:loss=asl` is ("table4_3_focal:smoke", "asl").
  """
  if not arg:
    return arg, None
  parts = arg.split(":")
  names = [p[len(LOSS_ARG):] for p in parts if p.startswith(LOSS_ARG)]
  if len(names) > 1:
    raise InputError(f"config argument {arg!r}: {LOSS_ARG}<name> is given {len(names)} times")
  rest = ":".join(p for p in parts if not p.startswith(LOSS_ARG))
  return rest or None, names[0] if names else None


def loss_argument(get_config: Callable[[str | None], ml_collections.ConfigDict]):
  """Decorates a config file's `get_config(arg)`: a `loss=NAME` part of the argument sets the loss.

  `--config=configs/demo.py:loss=focal` gives `config.loss = losses.config("focal")`, that loss's own
  keys with their defaults, so `--config.loss.gamma=3` can then override one (ml_collections cannot add
  a key from the command line). The loss replaces whatever loss the file chose; the rest of the
  argument reaches `get_config` as before (None if nothing is left).
  """
  @functools.wraps(get_config)
  def wrapper(arg: str | None = None) -> ml_collections.ConfigDict:
    rest, loss_name = split_loss_arg(arg)
    c = get_config(rest)
    if loss_name is not None:
      c.loss = losses.config(loss_name)
    return c
  return wrapper


def check(config: ml_collections.ConfigDict) -> None:
  """Raises InputError (one line naming the key) on a registry name that no entry has, or on a
  `config.loss` key that the chosen loss does not take.

  The jobs look these names up only after preparing the data; `wikitopics` calls this right after
  parsing the command line, so a typo fails at once. Keys absent from an older saved config are
  skipped (the jobs default them).
  """
  from wikitopics_jax import optimizers  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.data import resampling  # pylint: disable=g-import-not-at-top
  for path, names in (("model.name", models.MODELS), ("loss.name", losses.LOSSES),
                      ("optimizer.name", optimizers.OPTIMIZERS),
                      ("schedule.name", optimizers.SCHEDULES),
                      ("data.resampling.method", resampling.RESAMPLERS)):
    node = config
    for key in path.split("."):
      node = node.get(key) if hasattr(node, "get") else None
    if node is not None and node not in names:
      raise InputError(f"config.{path}={node!r}: unknown {names.kind}; valid names: {names.names()}")
  if config.get("loss") is not None:
    losses.check_config(config.loss)
  if config.get("text") is not None:
    multimodal.checked_text_config(config.text)
