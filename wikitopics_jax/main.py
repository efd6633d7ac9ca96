r"""Command line: `wikitopics <command> [flags]` (or `python -m wikitopics_jax.main <command>`).

  train     --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  evaluate  --workdir=DIR [--checkpoint=best|latest|STEP|all] [--split=test] [--thresholds=saved]
            [--watch --poll_seconds=60 --watch_timeout=0] [--ema]
  predict   --workdir=DIR (--images_dir=DIR | --data_dir=DIR --split=S) --out=preds.parquet
            [--coherent] [--jsonl] [--ema]
  report    --workdir=DIR [--split=test] [--checkpoint=best] [--out=DIR]
  generate  --data_dir=DIR [--num_images=20000 --image_size=64 --seed=0 --label_noise=0]
  ingest    --data_dir=DIR --labels=TABLES [--wit_tsv=FILES] [--image_dirs=DIRS] [--kaggle_pixels=FILES]
            [--taxonomy=v1.3 --image_size=64 --splits=train:0.7,...] | --human_annotations=FILES ...
  fetch     --out=DIR --width=120 --user_agent="name/1.0 (url; email)" (--labels=... | --wit_tsv=...)
  stats     --data_dir=DIR [--split=train] [--out=DIR] [--resampling=heuristic_under[:0.8]]
  bench     [--suites=...] [--tiny] [--out=bench.json]      (see wikitopics_jax/bench/cli.py)

Comma-separated list flags take globs. Bad input (a missing file, an unknown label, a wrong config
key) prints one line naming it and exits 2; a non-finite loss exits 3.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from wikitopics_jax import host_allocator
from wikitopics_jax.bench import cli as bench_cli  # defines the bench flags (--suites, --tiny, --out)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints, metrics, results).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest', a step, or (evaluate) 'all'.")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (evaluate/report: default test; stats: "
                             "default train).")
_THRESHOLDS = flags.DEFINE_string(
    "thresholds", "saved", "'saved' (tuned thresholds of this checkpoint, else 0.5), a number in "
    "(0, 1), or a thresholds JSON file.")
_EMA = flags.DEFINE_bool("ema", False, "evaluate/predict: the checkpoint's EMA of the parameters (a run "
                         "with config.ema.decay > 0); evaluate writes eval/<split>_ema_step<N>.*")
_WATCH = flags.DEFINE_bool("watch", False, "evaluate: evaluate each new checkpoint as training writes it.")
_POLL = flags.DEFINE_float("poll_seconds", 60.0, "evaluate --watch: polling interval.")
_WATCH_TIMEOUT = flags.DEFINE_float("watch_timeout", 0.0, "evaluate --watch: give up after this many "
                                    "seconds (0 = when training has finished).")
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "predict: a folder of images.")
_COHERENT = flags.DEFINE_bool("coherent", False, "predict: make predictions hierarchy-coherent.")
_JSONL = flags.DEFINE_bool("jsonl", False, "predict: JSON lines instead of Parquet.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset directory (generate/ingest: output).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 20000, "generate: number of images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "generate/ingest: image side in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: random seed.")
_LABEL_NOISE = flags.DEFINE_float("label_noise", 0.0, "generate: label noise rate.")
_LABELS = flags.DEFINE_list("labels", [], "ingest/fetch: labels tables (id,title,url,labels).")
_WIT_TSV = flags.DEFINE_list("wit_tsv", [], "ingest/fetch: WIT TSV files (.tsv or .tsv.gz).")
_IMAGE_DIRS = flags.DEFINE_list("image_dirs", [], "ingest: image folders in the Commons layout.")
_KAGGLE = flags.DEFINE_list("kaggle_pixels", [], "ingest: Kaggle base64 pixel files.")
_HUMAN = flags.DEFINE_list("human_annotations", [], "ingest: human-annotation parquet files (v1.4).")
_TAXONOMY = flags.DEFINE_string("taxonomy", "v1.3", "ingest: taxonomy version or JSON file.")
_SPLITS = flags.DEFINE_string("splits", "train:0.7,val:0.075,threshold:0.075,test:0.15",
                              "ingest: split fractions.")
_ENCODING = flags.DEFINE_enum("image_encoding", "raw", ["raw", "png", "jpeg"], "ingest: stored encoding.")
_RESIZE = flags.DEFINE_enum("resize", "squash", ["squash", "center_crop"], "ingest/predict: resizing.")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "ingest: worker processes (0 = all CPUs).")
_WIDTH = flags.DEFINE_integer("width", 120, "fetch: thumbnail width (Wikimedia's standard widths).")
_USER_AGENT = flags.DEFINE_string("user_agent", None, "fetch: descriptive User-Agent with contact.")
_RESAMPLING = flags.DEFINE_string(
    "resampling", None, "stats: also the statistics after resampling with this method (see "
    "resampling.py), optionally with its keep/extra fraction as METHOD:FRACTION, and Figure 4.1.")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "wikitopics_jax", "xla"),
    "Persistent XLA compilation cache ('' disables).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). On Cloud TPU and SLURM the "
    "cluster is detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")

COMMANDS = ("train", "evaluate", "predict", "report", "generate", "ingest", "fetch", "stats", "bench")


def _required(flag, command: str):
  if flag.value in (None, "", []):
    raise app.UsageError(f"{command} needs --{flag.name}")
  return flag.value


def _files(patterns: list[str]) -> list[str]:
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  out = []
  for pattern in patterns:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise InputError(f"{pattern}: no files match")
    out.extend(matches)
  return out


def _train():
  from wikitopics_jax import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(_required(_CONFIG, "train"), _required(_WORKDIR, "train"))


def _evaluate():
  from wikitopics_jax import evaluate_job  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=_SPLIT.value or "test", config_override=_CONFIG.value,
                thresholds=_THRESHOLDS.value, ema=_EMA.value)
  if _WATCH.value:
    evaluate_job.watch(_required(_WORKDIR, "evaluate"), poll_seconds=_POLL.value,
                       timeout=_WATCH_TIMEOUT.value or None, **kwargs)
  else:
    evaluate_job.evaluate(_required(_WORKDIR, "evaluate"), checkpoint=_CHECKPOINT.value, **kwargs)


def _predict():
  from wikitopics_jax import predict  # pylint: disable=g-import-not-at-top
  run = predict.predict(
      _required(_WORKDIR, "predict"), out_path=_required(bench_cli.OUT_FLAG, "predict"),
      images_dir=_IMAGES_DIR.value, data_dir=_DATA_DIR.value,
      split=(_SPLIT.value or "test") if _DATA_DIR.value else None, checkpoint=_CHECKPOINT.value,
      thresholds=_THRESHOLDS.value, coherent=_COHERENT.value, jsonl=_JSONL.value,
      resize=_RESIZE.value if _RESIZE.present else None, config_override=_CONFIG.value,
      ema=_EMA.value)
  print(f"{run.out_path}: {run.num_images} images, {len(run.failed)} unreadable")


def _report():
  from wikitopics_jax import report  # pylint: disable=g-import-not-at-top
  out = bench_cli.OUT_FLAG.value if bench_cli.OUT_FLAG.present else None
  path = report.build_report(_required(_WORKDIR, "report"), split=_SPLIT.value or "test",
                             checkpoint=_CHECKPOINT.value, out_dir=out, config_override=_CONFIG.value)
  print(f"report: {path}")


def _generate():
  from wikitopics_jax import synthetic  # pylint: disable=g-import-not-at-top
  out = _required(_DATA_DIR, "generate")
  manifest = synthetic.generate(out, num_images=_NUM_IMAGES.value, image_size=_IMAGE_SIZE.value,
                                seed=_SEED.value, label_noise=_LABEL_NOISE.value)
  print(f"{out}: " + ", ".join(f"{k} {v.num_examples}" for k, v in manifest.splits.items()))


def _ingest():
  from wikitopics_jax import human_annotations, ingest  # pylint: disable=g-import-not-at-top
  data_dir = _required(_DATA_DIR, "ingest")
  workers = _WORKERS.value or None
  if _HUMAN.value:
    manifest = human_annotations.run_human_ingest(
        data_dir, annotations=_files(_HUMAN.value), image_dirs=_IMAGE_DIRS.value,
        image_size=_IMAGE_SIZE.value, resize=_RESIZE.value, image_encoding=_ENCODING.value,
        num_workers=workers)
  else:
    settings = ingest.IngestSettings(taxonomy=_TAXONOMY.value, image_size=_IMAGE_SIZE.value,
                                     resize=_RESIZE.value, image_encoding=_ENCODING.value,
                                     splits=ingest.parse_splits(_SPLITS.value))
    manifest = ingest.run_ingest(data_dir, labels=_files(_required(_LABELS, "ingest")),
                                 wit_tsv=_files(_WIT_TSV.value), image_dirs=_IMAGE_DIRS.value,
                                 kaggle_pixels=_files(_KAGGLE.value), settings=settings,
                                 num_workers=workers)
  print(f"{data_dir}: " + ", ".join(f"{k} {v.num_examples}" for k, v in manifest.splits.items()))


def _fetch():
  from wikitopics_jax import thumbnails  # pylint: disable=g-import-not-at-top
  report = thumbnails.run_fetch(_required(bench_cli.OUT_FLAG, "fetch"), width=_WIDTH.value,
                                user_agent=_required(_USER_AGENT, "fetch"),
                                labels=_files(_LABELS.value), wit_tsv=_files(_WIT_TSV.value))
  print(report)


def _stats():
  from wikitopics_jax import label_stats  # pylint: disable=g-import-not-at-top
  data_dir = _required(_DATA_DIR, "stats")
  split = _SPLIT.value or "train"
  method, params = _resampling_spec(_RESAMPLING.value) if _RESAMPLING.value else (None, {})
  stats = label_stats.dataset_stats(data_dir, split)
  print(label_stats.format_table(stats["flat"], stats["hierarchical"]))
  if method:
    after = _resampled_stats(data_dir, split, method, params)
    stats["resampled"] = {"method": method, **params, **after}
    print(label_stats.format_table(after["flat"], after["hierarchical"],
                                   kinds=(f"Flat, {method}", f"Hierarchical, {method}")))
  if bench_cli.OUT_FLAG.present:
    out = bench_cli.OUT_FLAG.value
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"stats_{split}.json"), "w") as f:
      json.dump(stats, f, indent=1)
    names = stats["flat"]["label_names"]
    label_stats.plot_label_distribution(stats["hierarchical"]["label_counts"], names,
                                        os.path.join(out, f"label_distribution_{split}.png"))
    label_stats.plot_cooccurrence(stats["hierarchical"]["cooccurrence"], names,
                                  os.path.join(out, f"cooccurrence_{split}.png"))
    if method:
      for kind in ("flat", "hierarchical"):
        label_stats.plot_imbalance_ratios(
            stats[kind]["irlbl"], stats["resampled"][kind]["irlbl"], names,
            os.path.join(out, f"imbalance_ratios_{split}_{method}_{kind}.png"),
            labels=("Original", method), title=f"IRLbl per label, {kind} labels, {split} split")
    print(f"wrote {out}/stats_{split}.json and plots")


def _resampling_spec(spec: str) -> tuple[str, dict]:
  """--resampling=METHOD[:FRACTION] -> (METHOD, its keep/extra fraction parameter), checked."""
  from wikitopics_jax import resampling  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  method, _, fraction = spec.partition(":")
  resampler = resampling.RESAMPLERS.get(method)  # Unknown names fail here, listing the valid ones.
  if not fraction:
    return method, {}
  try:
    value = float(fraction)
  except ValueError:
    raise InputError(f"--resampling={spec}: the fraction after ':' must be a number") from None
  # The fraction is whichever of the two the method takes (its registered signature says which).
  (key,) = {"keep_fraction", "extra_fraction"} & set(inspect.signature(resampler).parameters)
  return method, {key: value}


def _resampled_stats(data_dir: str, split: str, method: str, params: dict) -> dict:
  """{"flat": stats, "hierarchical": stats} of the split after resampling."""
  from wikitopics_jax import label_stats  # pylint: disable=g-import-not-at-top
  from wikitopics_jax import resampling  # pylint: disable=g-import-not-at-top
  flat, hier, manifest = label_stats.read_split_labels(data_dir, split)
  names = list(manifest.taxonomy.labels)
  # Each label kind is resampled on its own labels, as training on that kind would.
  return {kind: resampling.stats_after(y, names, method, key_prefix="--resampling", **params)
          for kind, y in (("flat", flat), ("hierarchical", hier))}


def _bench():
  report = bench_cli.run_from_flags()
  if report.get("failed"):
    sys.exit(1)


_RUNNERS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "report": _report,
            "generate": _generate, "ingest": _ingest, "fetch": _fetch, "stats": _stats,
            "bench": _bench}


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: wikitopics {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    # Orbax and Grain log every save and read at INFO; our progress lines go to stdout.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if _JAX_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  _RUNNERS[argv[1]]()


def main(argv: list[str]) -> None:
  host_allocator.apply_flag()  # Before JAX starts its threads.
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  try:
    _main(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # trainer.NonFiniteError: the message names step and quantity
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
