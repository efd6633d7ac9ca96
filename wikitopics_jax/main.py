r"""Command line: `wikitopics <command> [flags]` (or `python -m wikitopics_jax.main <command>`).

  train     --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  evaluate  --workdir=DIR [--checkpoint=best|latest|STEP|all] [--split=test] [--thresholds=saved]
            [--watch --poll_seconds=60 --watch_timeout=0] [--ema]
  predict   --workdir=DIR (--images_dir=DIR [--text_table=T.csv] | --data_dir=DIR --split=S)
            --out=preds.parquet [--coherent] [--jsonl] [--ema]
  report    --workdir=DIR [--split=test] [--checkpoint=best] [--out=DIR]
  generate  --data_dir=DIR [--num_images=20000 --image_size=64 --seed=0 --label_noise=0]
  ingest    --data_dir=DIR --labels=TABLES [--wit_tsv=FILES] [--image_dirs=DIRS] [--kaggle_pixels=FILES]
            [--taxonomy=v1.3 --image_size=64 --splits=train:0.7,... --extensions=jpg,jpeg
            --mime_types=image/jpeg --keep_unlabelled]
  ingest    --data_dir=DIR --human_annotations=FILES --image_dirs=DIRS [--geology_and_fossils=categories]
  fetch     --out=DIR --width=120 --user_agent="name/1.0 (url; email)" (--labels=... | --wit_tsv=...)
            [--extensions=jpg,jpeg --max_workers=4 --requests_per_second=40]
  stats     --data_dir=DIR [--split=train] [--out=DIR] [--resampling=heuristic_under[:0.8]]
  categories --dump=commonswiki-...-pages-articles-multistream.xml.bz2 --out=DIR
            [--dump_index=...-multistream-index.txt.bz2] [--wit_tsv=FILES | --labels=FILES]
            [--num_workers=0]                            (docs/labels.md)
  label     --graph=DIR --files=FILES.parquet --out=labels.parquet [--taxonomy=v1.3
            --heuristics=headJ+depth --hierarchical]      (docs/labels.md)
  label     --graph=DIR --evaluate=ANNOTATED.parquet --taxonomy=v1.4 [--out=report.json]
  bench     [--suites=...] [--tiny] [--out=bench.json]      (see wikitopics_jax/bench/cli.py)

Every command also takes --verbose, --jax_cache_dir, --host_malloc and the multi-host flags
(--distributed ...); a flag of another command is an error. Comma-separated list flags take globs.
Bad input (a missing file, an unknown label, a wrong config key or value, a flag the command does
not take) prints one line `error: ...` naming it and exits 2; a non-finite loss exits 3.

Library logging (Orbax's and Grain's INFO and WARNING lines, absl INFO) is off by default: our
progress lines go to stdout and errors still show. --verbose (or absl's -v/--verbosity) brings it
back.
"""

from __future__ import annotations

import ast
import glob
import inspect
import json
import logging as logging_lib
import os
import sys
import traceback
from typing import NoReturn

from absl import app
from absl import flags
from ml_collections import config_flags

from wikitopics_jax import host_allocator
from wikitopics_jax.bench import cli as bench_cli  # defines the flags of `wikitopics bench`

_OUT = flags.DEFINE_string("out", None, "Output path: bench (the JSON report, default bench.json), "
                           "predict, report, fetch, stats, categories, label.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints, metrics, results).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest', a step, or (evaluate) 'all'.")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split (evaluate/report: default test; stats: "
                             "default train).")
_THRESHOLDS = flags.DEFINE_string(
    "thresholds", "saved", "'saved' (evaluate: 0.5 and, if tuned for the checkpoint, the tuned "
    "thresholds, each into its own eval file; predict: tuned, else 0.5), a number in (0, 1), or a "
    "thresholds JSON file.")
_EMA = flags.DEFINE_bool("ema", False, "evaluate/predict: the checkpoint's EMA of the parameters (a run "
                         "with config.ema.decay > 0); evaluate writes eval/<split>_ema_step<N>.*")
_WATCH = flags.DEFINE_bool("watch", False, "evaluate: evaluate each new checkpoint as training writes it.")
_POLL = flags.DEFINE_float("poll_seconds", 60.0, "evaluate --watch: polling interval.")
_WATCH_TIMEOUT = flags.DEFINE_float("watch_timeout", 0.0, "evaluate --watch: give up after this many "
                                    "seconds (0 = when training has finished).")
_IMAGES_DIR = flags.DEFINE_string("images_dir", None, "predict: a folder of images.")
_TEXT_TABLE = flags.DEFINE_string(
    "text_table", None, "predict: with --images_dir, for a multimodal model: a CSV/TSV table with "
    "columns file (path relative to the folder), title and caption.")
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
_WORKERS = flags.DEFINE_integer("num_workers", 0, "ingest/categories: worker processes (0 = all "
                                 "CPUs).")
# None = the command's default (ingest keeps what the thesis kept; fetch everything); empty = all.
_EXTENSIONS = flags.DEFINE_list("extensions", None, "ingest/fetch: file extensions kept (no dot; "
                                "'' = all; default: ingest jpg,jpeg as the thesis, fetch all).")
_MIME_TYPES = flags.DEFINE_list("mime_types", None, "ingest: WIT mime types kept where a WIT row "
                                "gives one ('' = all; default: image/jpeg as the thesis).")
_KEEP_UNLABELLED = flags.DEFINE_bool("keep_unlabelled", False, "ingest: keep images without any "
                                     "label (all-negative examples) instead of dropping them.")
_GEOLOGY = flags.DEFINE_enum(
    "geology_and_fossils", "categories", ["categories", "both", "drop"],
    "ingest --human_annotations: v1.4's 'Geology & Fossils' becomes Fossils when the title or "
    "categories name a fossil, else Geology ('categories'); or both labels; or is dropped.")
_WIDTH = flags.DEFINE_integer("width", 120, "fetch: thumbnail width (Wikimedia's standard widths).")
_USER_AGENT = flags.DEFINE_string("user_agent", None, "fetch: descriptive User-Agent with contact.")
_MAX_WORKERS = flags.DEFINE_integer("max_workers", 4, "fetch: concurrent downloads.")
_RATE = flags.DEFINE_float("requests_per_second", None, "fetch: request rate limit (default: only "
                           "--max_workers bounds it).")
_DEADLINE = flags.DEFINE_float("deadline_s", 120.0, "fetch: most seconds one download may take in "
                               "all (redirects, headers, body); slower ones are retried next run.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 50 << 20, "fetch: larger downloads are failures.")
_RESAMPLING = flags.DEFINE_string(
    "resampling", None, "stats: also the statistics after resampling with this method (see "
    "resampling.py), optionally with its keep/extra fraction as METHOD:FRACTION, and Figure 4.1.")
_DUMP = flags.DEFINE_string(
    "dump", None, "categories: a Commons pages-articles XML dump (.xml, .xml.bz2 or the "
    "-multistream.xml.bz2).")
_GRAPH = flags.DEFINE_string("graph", None, "label: the category graph (graph.npz, or the "
                             "directory `categories` wrote).")
_FILES = flags.DEFINE_string("files", None, "label: the files table (Parquet: file, categories).")
_HEURISTICS = flags.DEFINE_string("heuristics", "headJ+depth", "label: heuristics tried in order, "
                                  "joined with '+' (head, headJ, depth, lookahead).")
_HIERARCHICAL = flags.DEFINE_bool("hierarchical", False, "label: a label also has its descendants' "
                                  "seed categories (seed Animalia gives Animals, Nature and STEM).")
_EVALUATE = flags.DEFINE_list("evaluate", [], "label: human annotation Parquet files to score the "
                              "heuristic labels against (per-label and averaged P/R/F1).")
_DUMP_INDEX = flags.DEFINE_string(
    "dump_index", None, "categories: the multistream dump's index (parallel and resumable; "
    "without it the dump is read sequentially).")
_JAX_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "wikitopics_jax", "xla"),
    "Persistent XLA compilation cache ('' disables).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host). On Cloud TPU and SLURM the "
    "cluster is detected; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' logging (Orbax, Grain, absl "
                             "INFO and WARNING lines), which is off by default.")

COMMANDS = ("train", "evaluate", "predict", "report", "generate", "ingest", "fetch", "stats",
            "categories", "label", "bench")

# The flags each command takes. absl flags are global, so without this a flag of another command
# would be silently ignored; `config` stands for --config and all its --config.* overrides.
COMMAND_FLAGS = {
    "train": ("config", "workdir"),
    "evaluate": ("workdir", "checkpoint", "split", "thresholds", "ema", "watch", "poll_seconds",
                 "watch_timeout", "config"),
    "predict": ("workdir", "images_dir", "text_table", "data_dir", "split", "out", "checkpoint",
                "thresholds", "coherent", "jsonl", "resize", "ema", "config"),
    "report": ("workdir", "split", "checkpoint", "out", "config"),
    "generate": ("data_dir", "num_images", "image_size", "seed", "label_noise"),
    "ingest": ("data_dir", "labels", "wit_tsv", "image_dirs", "kaggle_pixels", "taxonomy",
               "image_size", "splits", "image_encoding", "resize", "num_workers", "extensions",
               "mime_types", "keep_unlabelled", "human_annotations", "geology_and_fossils"),
    "fetch": ("out", "width", "user_agent", "labels", "wit_tsv", "extensions", "max_workers",
              "requests_per_second", "deadline_s", "max_bytes"),
    "stats": ("data_dir", "split", "out", "resampling"),
    "categories": ("dump", "dump_index", "out", "wit_tsv", "labels", "num_workers"),
    "label": ("graph", "files", "out", "taxonomy", "heuristics", "hierarchical", "evaluate"),
    "bench": (*bench_cli.FLAG_NAMES, "out"),
}
# Process set-up, taken by every command (as are absl's own flags: --flagfile, -v, --help, ...).
COMMON_FLAGS = ("verbose", "jax_cache_dir", "host_malloc", "distributed", "coordinator_address",
                "num_processes", "process_id")
# ingest has two modes: a labels table with WIT/Kaggle inputs, or the human annotations (whose
# settings are fixed: one split, every format, unlabelled images kept).
_TABLE_INGEST_ONLY = ("labels", "wit_tsv", "kaggle_pixels", "taxonomy", "splits", "extensions",
                      "mime_types", "keep_unlabelled")
_HUMAN_INGEST_ONLY = ("geology_and_fossils",)
# Checked before the command imports JAX and its modules (seconds), so a usage error is instant.
REQUIRED_FLAGS = {"train": ("config", "workdir"), "evaluate": ("workdir",),
                  "predict": ("workdir", "out"), "report": ("workdir",), "generate": ("data_dir",),
                  "ingest": ("data_dir",), "fetch": ("out", "user_agent"), "stats": ("data_dir",),
                  "categories": ("dump", "out"), "label": ("graph",),
                  "bench": ()}


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
  from wikitopics_jax.eval import evaluate_job  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=_SPLIT.value or "test", config_override=_CONFIG.value,
                thresholds=_THRESHOLDS.value, ema=_EMA.value)
  if _WATCH.value:
    evaluate_job.watch(_required(_WORKDIR, "evaluate"), poll_seconds=_POLL.value,
                       timeout=_WATCH_TIMEOUT.value or None, **kwargs)
  else:
    evaluate_job.evaluate(_required(_WORKDIR, "evaluate"), checkpoint=_CHECKPOINT.value, **kwargs)


def _predict():
  from wikitopics_jax.eval import predict  # pylint: disable=g-import-not-at-top
  run = predict.predict(
      _required(_WORKDIR, "predict"), out_path=_required(_OUT, "predict"),
      images_dir=_IMAGES_DIR.value, text_table=_TEXT_TABLE.value, data_dir=_DATA_DIR.value,
      split=(_SPLIT.value or "test") if _DATA_DIR.value else None, checkpoint=_CHECKPOINT.value,
      thresholds=_THRESHOLDS.value, coherent=_COHERENT.value, jsonl=_JSONL.value,
      resize=_RESIZE.value if _RESIZE.present else None, config_override=_CONFIG.value,
      ema=_EMA.value)
  print(f"{run.out_path}: {run.num_images} images, {len(run.failed)} unreadable")


def _report():
  from wikitopics_jax.eval import report  # pylint: disable=g-import-not-at-top
  out = _OUT.value if _OUT.present else None
  path = report.build_report(_required(_WORKDIR, "report"), split=_SPLIT.value or "test",
                             checkpoint=_CHECKPOINT.value, out_dir=out, config_override=_CONFIG.value)
  print(f"report: {path}")


def _generate():
  from wikitopics_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  out = _required(_DATA_DIR, "generate")
  manifest = synthetic.generate(out, num_images=_NUM_IMAGES.value, image_size=_IMAGE_SIZE.value,
                                seed=_SEED.value, label_noise=_LABEL_NOISE.value)
  print(f"{out}: " + ", ".join(f"{k} {v.num_examples}" for k, v in manifest.splits.items()))


def _ingest():
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  data_dir = _required(_DATA_DIR, "ingest")
  workers = _WORKERS.value or None
  human = bool(_HUMAN.value)
  # A flag of the other mode would be silently ignored.
  for name in _TABLE_INGEST_ONLY if human else _HUMAN_INGEST_ONLY:
    if flags.FLAGS[name].present:
      raise InputError(f"ingest: --{name} does not apply "
                       f"{'with' if human else 'without'} --human_annotations")
  if not human:
    _required(_LABELS, "ingest")
  from wikitopics_jax.data import human_annotations, ingest  # pylint: disable=g-import-not-at-top
  if human:
    manifest = human_annotations.run_human_ingest(
        data_dir, annotations=_files(_HUMAN.value), image_dirs=_IMAGE_DIRS.value,
        image_size=_IMAGE_SIZE.value, resize=_RESIZE.value, image_encoding=_ENCODING.value,
        geology_and_fossils=_GEOLOGY.value, num_workers=workers)
  else:
    settings = ingest.IngestSettings(
        taxonomy=_TAXONOMY.value, image_size=_IMAGE_SIZE.value, resize=_RESIZE.value,
        image_encoding=_ENCODING.value, splits=ingest.parse_splits(_SPLITS.value),
        extensions=(ingest.DEFAULT_EXTENSIONS if _EXTENSIONS.value is None
                    else tuple(_EXTENSIONS.value)),
        mime_types=(ingest.DEFAULT_MIME_TYPES if _MIME_TYPES.value is None
                    else tuple(_MIME_TYPES.value)),
        keep_unlabelled=_KEEP_UNLABELLED.value)
    manifest = ingest.run_ingest(data_dir, labels=_files(_required(_LABELS, "ingest")),
                                 wit_tsv=_files(_WIT_TSV.value), image_dirs=_IMAGE_DIRS.value,
                                 kaggle_pixels=_files(_KAGGLE.value), settings=settings,
                                 num_workers=workers)
  print(f"{data_dir}: " + ", ".join(f"{k} {v.num_examples}" for k, v in manifest.splits.items()))


def _fetch():
  from wikitopics_jax.data import thumbnails  # pylint: disable=g-import-not-at-top
  report = thumbnails.run_fetch(_required(_OUT, "fetch"), width=_WIDTH.value,
                                user_agent=_required(_USER_AGENT, "fetch"),
                                labels=_files(_LABELS.value), wit_tsv=_files(_WIT_TSV.value),
                                extensions=_EXTENSIONS.value or (), max_workers=_MAX_WORKERS.value,
                                requests_per_second=_RATE.value, deadline_s=_DEADLINE.value,
                                max_bytes=_MAX_BYTES.value)
  print(report)


def _stats():
  from wikitopics_jax.eval import label_stats  # pylint: disable=g-import-not-at-top
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
  if _OUT.present:
    out = _OUT.value
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
  from wikitopics_jax.data import resampling  # pylint: disable=g-import-not-at-top
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
  from wikitopics_jax.eval import label_stats  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.data import resampling  # pylint: disable=g-import-not-at-top
  flat, hier, manifest = label_stats.read_split_labels(data_dir, split)
  names = list(manifest.taxonomy.labels)
  # Each label kind is resampled on its own labels, as training on that kind would.
  return {kind: resampling.stats_after(y, names, method, key_prefix="--resampling", **params)
          for kind, y in (("flat", flat), ("hierarchical", hier))}


def _categories():
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import dump  # pylint: disable=g-import-not-at-top
  if _WIT_TSV.value and _LABELS.value:
    raise InputError("categories: give --wit_tsv or --labels, not both")
  if _WORKERS.value < 0:
    raise InputError(f"--num_workers={_WORKERS.value}: must be >= 0 (0 = all CPUs)")
  out = _required(_OUT, "categories")
  summary = dump.run_categories(_required(_DUMP, "categories"), out, index=_DUMP_INDEX.value,
                                wit_tsv=_files(_WIT_TSV.value), labels=_files(_LABELS.value),
                                num_workers=_WORKERS.value)
  print(f"{out}: {summary.line()}")


def _label():
  from wikitopics_jax import taxonomy as taxonomy_lib  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import heuristics  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import human_eval  # pylint: disable=g-import-not-at-top
  if bool(_FILES.value) == bool(_EVALUATE.value):
    raise InputError("label: give --files (write a labels table) or --evaluate (score against "
                     "human annotations), one of the two")
  tax = taxonomy_lib.load(_TAXONOMY.value)
  specs = heuristics.parse_heuristics(_HEURISTICS.value)  # A bad name fails before the graph loads.
  labeller = heuristics.Labeller(heuristics.load_graph(_GRAPH.value), tax, specs,
                                 hierarchical=_HIERARCHICAL.value)
  if labeller.missing_seeds:
    print(f"warning: seed categories not in the graph: {labeller.missing_seeds}")
  if _EVALUATE.value:
    rep = human_eval.evaluate(labeller, _files(_EVALUATE.value))
    print(f"{rep['images']} annotated images, heuristics {rep['heuristics']}, taxonomy {tax.version}")
    print(human_eval.format_report(rep, tax.labels))
    if _OUT.value:
      with open(_OUT.value, "w", encoding="utf-8") as f:
        f.write(human_eval.to_json(rep))
    return
  out = _required(_OUT, "label")
  counts = heuristics.write_labels_table(labeller, _FILES.value, out)
  print(f"{out}: {counts['files']} files, {counts['labelled']} with labels; "
        f"{labeller.stats()}")


def _bench():
  report = bench_cli.run_from_flags(_OUT.value)
  if report.get("failed"):
    sys.exit(1)


_RUNNERS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "report": _report,
            "generate": _generate, "ingest": _ingest, "fetch": _fetch, "stats": _stats,
            "categories": _categories, "label": _label, "bench": _bench}


def _fail(message: str, code: int = 2) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _config_argument(argv: list[str]) -> str | None:
  """The --config value on a command line (None when absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _parse_error(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while absl parsed the command line (config files load then)."""
  config = _config_argument(argv)
  where = f"--config={config}" if config is not None else "--config"
  frames = [frame.filename for frame in traceback.extract_tb(error.__traceback__)]
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if a.lstrip("-").startswith("config.")]
  in_overrides = any(f.endswith("config_path.py") for f in frames)
  if isinstance(error, (KeyError, AttributeError)) and in_overrides:
    # An override naming a key the config lacks. ml_collections' message is the key's repr, then
    # maybe a "Did you mean" line; an AttributeError holds the KeyError's repr of that message.
    text = str(error.args[0]) if error.args else str(error)
    if isinstance(error, AttributeError) and text[:1] in "'\"":
      try:
        text = str(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        pass
    key, _, hint = text.partition("\n")
    key = key.strip().strip("'\"")
    named = [o for o in overrides if key in o.split(".")[1:]] or overrides
    flag = f"--{named[0]}" if named else where
    hint = f"; {_one_line(hint)}" if hint else ""
    if flag.startswith("--config.loss."):
      # Each loss owns its keys: another loss's key exists only once that loss is chosen.
      hint += "; a key of another loss needs that loss: append :loss=<name> to --config (docs/losses.md)"
    return f"{flag}: the config ({where}) has no key {key!r}{hint}"
  message = str(error).strip()
  if (isinstance(error, flags.UnrecognizedFlagError) and error.flagname.startswith("config.")
      and config is None):
    return f"--{error.flagname}: overrides of the config need a config file (--config=FILE)"
  if isinstance(error, flags.Error) and "Error whilst parsing config file" not in message:
    return _one_line(message)
  if isinstance(error, OSError):
    # ml_collections lists the paths it tried; the last line says why the last one failed.
    return f"{where}: {message.splitlines()[-1].strip()}"
  # An error of the config file itself. ml_collections puts its traceback into the message
  # ("Error whilst parsing config file: ..."); the last line is the exception.
  last = message.splitlines()[-1].strip() if message else ""
  if not last or last == message:
    last = f"{type(error).__name__}: {_one_line(message)}"
  return f"{where}: {last}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every error one line and exit 2 (app.run's `flags_parser`).

  --config files are loaded while the flags are parsed, so their errors (a missing file, an unknown
  override key, a value of the wrong type) arise here, before `main` could report them.
  """
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, OSError, KeyError, AttributeError, ValueError, TypeError,
          SyntaxError) as e:
    _fail(_parse_error(e, argv))
  if _CONFIG.value is not None:
    try:
      _CONFIG.value.keys()  # A file that failed to load only raises when the config is first read.
    except OSError as e:
      _fail(_parse_error(e, argv))
  return rest


def _check_command_flags(command: str) -> None:
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  allowed = set(COMMAND_FLAGS[command]) | set(COMMON_FLAGS)
  ours = {name for names in COMMAND_FLAGS.values() for name in names}
  for name in flags.FLAGS:
    base = name.split(".", 1)[0]  # --config.loss.name is --config's
    if base in ours and base not in allowed and flags.FLAGS[name].present:
      valid = " ".join(f"--{n}" for n in COMMAND_FLAGS[command])
      raise InputError(f"--{name} is not a flag of `wikitopics {command}`; its flags: {valid} "
                       "(and --verbose, --jax_cache_dir, --host_malloc, the multi-host flags)")


# Libraries whose routine INFO/WARNING lines are noise here (a read-only checkpoint manager per
# evaluation, every save and restore, every data loader). Orbax and Grain log through absl's logger,
# so their records are told apart by the file they come from.
_NOISY_LIBRARIES = ("orbax", "grain")


class _LibraryNoise(logging_lib.Filter):
  """Drops records below ERROR that come from the noisy libraries' code."""

  def filter(self, record: logging_lib.LogRecord) -> bool:
    if record.levelno >= logging_lib.ERROR:
      return True
    path = record.pathname.replace(os.sep, "/")
    return not any(f"/{name}/" in path or record.name.split(".")[0] == name
                   for name in _NOISY_LIBRARIES)


def quiet_library_logging() -> None:
  """Silences the libraries' routine logging (see the module docstring); errors still show."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)  # absl INFO: Orbax and Grain log every save and read.
  for name in _NOISY_LIBRARIES:
    logging_lib.getLogger(name).setLevel(logging_lib.ERROR)  # Their own Python loggers.
  # absl's logger and the root logger (a library's bare `logging.warning`) filter by source file.
  for logger in (logging_lib.getLogger("absl"), logging_lib.getLogger()):
    if not any(isinstance(f, _LibraryNoise) for f in logger.filters):
      logger.addFilter(_LibraryNoise())


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: wikitopics {{{','.join(COMMANDS)}}} [flags]; got {argv[1:]}")
  command = argv[1]
  _check_command_flags(command)
  for name in REQUIRED_FLAGS[command]:
    _required(flags.FLAGS[name], command)
  if _VERBOSE.value or flags.FLAGS["verbosity"].present:
    # absl's INFO (or the verbosity asked for), and Orbax's records, which checkpointing drops.
    from wikitopics_jax import checkpointing  # pylint: disable=g-import-not-at-top
    checkpointing.show_orbax_logs(True)
  else:
    quiet_library_logging()
  if _CONFIG.value is not None and command in ("train", "evaluate", "predict", "report"):
    from wikitopics_jax import configlib  # pylint: disable=g-import-not-at-top
    configlib.check(_CONFIG.value)  # Names that would only fail deep in the job, after data prep.
  import jax  # pylint: disable=g-import-not-at-top
  if _JAX_CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  _RUNNERS[command]()


def main(argv: list[str]) -> None:
  host_allocator.apply_flag()  # Before JAX starts its threads.
  from wikitopics_jax.errors import InputError  # pylint: disable=g-import-not-at-top
  try:
    _main(argv)
  except (InputError, app.UsageError) as e:
    _fail(_one_line(e))
  except FloatingPointError as e:  # trainer.NonFiniteError: the message names step and quantity
    _fail(str(e), code=3)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
