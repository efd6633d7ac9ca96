r"""Runs the thesis's experiments (configs/experiments.py) one after another and tables their results.

  python launch/sweep.py --tables=4.1,4.3 --smoke --root=workdir/sweep-smoke [--dry_run]
  python launch/sweep.py --rows=baseline,table4_3_focal --root=workdir/sweep
  python launch/sweep.py --tables=4.2 --root=/mnt/bucket/sweep --print_commands=tpu
  python launch/sweep.py --root=workdir/sweep --assemble_only      # tables.md from what is there

Per row, in order of the selected tables (a row shared by several tables runs once):
  wikitopics train --config=configs/experiments.py:<row>[:smoke] --workdir=<root>/<row> [extra args]
with its output appended to <root>/<row>/sweep.log. A row whose results are there is skipped; an
interrupted row continues from its checkpoints (the trainer resumes from its workdir). A row reported
on another split than test (Table 5.1: the training split) is then evaluated there with
`wikitopics evaluate --split=<split>` at threshold 0.5 and at the tuned thresholds, merged into
<root>/<row>/results_<split>.json. A failed row is reported and the sweep goes on to the next.

Finally each selected table (default: all) is written in the thesis's layout to <root>/tables.md
(and printed), with the commands that produced it and the thesis's published numbers beside ours.
AUC(PR) is reported as macro average precision; precision, recall and F1 are macro averages over all
labels, the 5 most frequent training labels and the rest.

--extra_args are appended to every train command (`--config.key=value` overrides, e.g. the real-data
overrides of docs/real_data.md). The first launch of a row records its scale and extra args in
<root>/<row>/sweep.json; relaunching it with different ones is an error, so smoke and full runs never
mix in one workdir.

--print_commands=local|tpu|slurm prints one training command per row (one job per config, for a TPU
pod slice via launch/tpu_pod.sh or a SLURM cluster via launch/slurm_gpu.sbatch) and runs nothing.
Once those jobs are done, rerun this script on the same --root: it skips the trained rows, runs the
training-split evaluations and writes the tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = "configs/experiments.py"
RESULTS = "results.json"
LOG = "sweep.log"
STAMP = "sweep.json"


def load_experiments():
  """configs/experiments.py as a module (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("experiments", os.path.join(REPO, CONFIG_FILE))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


EXPERIMENTS = load_experiments()


# ---------------------------------------------------------------------------------------------------
# Plan: which rows, which commands.


def select_rows(tables: Sequence[str], rows: Sequence[str]) -> list[str]:
  """Rows of the given tables (in table order, each once), then the explicitly given rows."""
  unknown = [t for t in tables if t not in EXPERIMENTS.TABLES]
  unknown += [r for r in rows if r not in EXPERIMENTS.ROWS]
  if unknown:
    raise SystemExit(f"unknown tables/rows {unknown}; tables: {', '.join(EXPERIMENTS.TABLES)}; "
                     f"rows: {', '.join(EXPERIMENTS.ROWS)}")
  selected = [row for key in tables for row in EXPERIMENTS.TABLES[key].rows] + list(rows)
  return list(dict.fromkeys(selected))


def config_arg(row: str, smoke: bool) -> str:
  return f"{CONFIG_FILE}:{row}{EXPERIMENTS.SMOKE_SUFFIX if smoke else ''}"


def report_split(row: str, smoke: bool) -> tuple[str, str]:
  """(the split the row is reported on, the config's test split)."""
  config = EXPERIMENTS.ROWS[row].build(smoke)
  return config.report_split, config.data.test_split


def results_path(workdir: str, row: str, smoke: bool) -> str:
  split, test_split = report_split(row, smoke)
  return os.path.join(workdir, RESULTS if split == test_split else f"results_{split}.json")


def train_command(row: str, workdir: str, smoke: bool, extra_args: Sequence[str]) -> list[str]:
  return ["train", f"--config={config_arg(row, smoke)}", f"--workdir={workdir}", *extra_args]


def evaluate_command(workdir: str, split: str, thresholds: str, step: int | str) -> list[str]:
  return ["evaluate", f"--workdir={workdir}", f"--split={split}", f"--thresholds={thresholds}",
          f"--checkpoint={step}"]


def row_status(workdir: str, row: str, smoke: bool) -> str:
  """"done" (results there), "evaluate" (trained, split evaluation missing), "resume", or "new"."""
  if os.path.exists(results_path(workdir, row, smoke)):
    return "done"
  if os.path.exists(os.path.join(workdir, RESULTS)):
    return "evaluate"
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    return "resume"
  return "new"


def shell(words: Sequence[str]) -> str:
  return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------------------------------------------
# Running.


class RowFailed(Exception):
  pass


def _check_stamp(workdir: str, row: str, smoke: bool, extra_args: Sequence[str]) -> None:
  """Refuses to continue a workdir that was started with another scale or other extra args."""
  stamp = {"row": row, "smoke": smoke, "extra_args": list(extra_args)}
  path = os.path.join(workdir, STAMP)
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != stamp:
      raise RowFailed(f"{workdir} was started as {before}, not {stamp}; use another --root")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(stamp, f)


def _run(prefix: Sequence[str], args: Sequence[str], log_path: str) -> None:
  with open(log_path, "a") as log:
    log.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')} "
              f"{shell(['wikitopics', *args])}\n")
    log.flush()
    rc = subprocess.call([*prefix, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if rc != 0:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-15:])
    raise RowFailed(f"`wikitopics {args[0]}` exited {rc}; last lines of {log_path}:\n{tail}")


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, data: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1)
  os.replace(tmp, path)


def evaluate_on_split(prefix: Sequence[str], workdir: str, split: str, log_path: str) -> None:
  """results_<split>.json: the training job's best checkpoint on `split`, at 0.5 and tuned."""
  step = _read_json(os.path.join(workdir, RESULTS))["checkpoint_step"]
  # One evaluation writes each threshold rule to its own file: 0.5, and the tuned thresholds if any.
  _run(prefix, evaluate_command(workdir, split, "saved", step), log_path)
  merged = _read_json(os.path.join(workdir, "eval", f"{split}_step{step}_t0.5.json"))
  tuned_path = os.path.join(workdir, "eval", f"{split}_step{step}_tuned.json")
  if os.path.exists(tuned_path):
    merged["at_tuned_thresholds"] = _read_json(tuned_path)
  _write_json(os.path.join(workdir, f"results_{split}.json"), merged)


def run_row(prefix: Sequence[str], root: str, row: str, smoke: bool,
            extra_args: Sequence[str]) -> str:
  """Trains (or resumes) and evaluates one row; returns the status it had before."""
  workdir = os.path.join(root, row)
  status = row_status(workdir, row, smoke)
  if status == "done":
    return status
  _check_stamp(workdir, row, smoke, extra_args)
  log_path = os.path.join(workdir, LOG)
  if status in ("new", "resume"):
    _run(prefix, train_command(row, workdir, smoke, extra_args), log_path)
    if not os.path.exists(os.path.join(workdir, RESULTS)):
      # The trainer exits 0 after saving on SIGTERM.
      raise RowFailed(f"training stopped before the end (preempted?); rerun to resume ({log_path})")
  split, test_split = report_split(row, smoke)
  if split != test_split:
    evaluate_on_split(prefix, workdir, split, log_path)
  return status


# ---------------------------------------------------------------------------------------------------
# Tables.

_COLUMN_TITLES = {
    "ap": "AUC(PR) (macro AP)", "p_all": "P all", "r_all": "R all", "p_top": "P top-5",
    "r_top": "R top-5", "p_rest": "P rest", "r_rest": "R rest", "f1_all": "F1 all",
    "f1_top": "F1 top-5", "f1_rest": "F1 rest", "micro_f1": "micro F1",
    "labels_per_image": "labels/image", "trainable_params": "trainable params",
}
LAYOUT_COLUMNS = {
    "pr": ("ap", "p_all", "r_all", "p_top", "r_top", "p_rest", "r_rest", "f1_all", "micro_f1",
           "labels_per_image"),
    "f1": ("trainable_params", "labels_per_image", "f1_all", "f1_top", "f1_rest", "ap"),
}
LAYOUT_COLUMNS["grid"] = LAYOUT_COLUMNS["pr"]
_TRAINABLE = re.compile(r"parameters \(([\d,]+) trainable\)")


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
  """results.json (or its at_tuned_thresholds) -> the tables' metric keys."""
  top, rest = result["groups"]["top"], result["groups"]["rest"]
  return {"ap": result["macro_ap"], "p_all": result["precision"]["macro"],
          "r_all": result["recall"]["macro"], "p_top": top["precision"], "r_top": top["recall"],
          "p_rest": rest["precision"], "r_rest": rest["recall"], "f1_all": result["f1"]["macro"],
          "f1_top": top["f1"], "f1_rest": rest["f1"], "micro_f1": result["f1"]["micro"],
          "labels_per_image": result["labels_per_image"]["predicted"]}


def trainable_params(workdir: str) -> int | None:
  """From the training log's "N parameters (M trainable)" line (the last run's)."""
  path = os.path.join(workdir, LOG)
  if not os.path.exists(path):
    return None
  with open(path, errors="replace") as f:
    found = _TRAINABLE.findall(f.read())
  return int(found[-1].replace(",", "")) if found else None


def entry_metrics(root: str, entry, smoke: bool) -> dict[str, float] | str:
  """An Entry's measured metrics, or why there are none ("not run", "no tuned thresholds")."""
  workdir = os.path.join(root, entry.row)
  path = results_path(workdir, entry.row, smoke)
  if not os.path.exists(path):
    return f"unfinished (see {entry.row}/{LOG})" if os.path.isdir(workdir) else "not run"
  result = _read_json(path)
  if entry.thresholds == "tuned":
    result = result.get("at_tuned_thresholds")
    if result is None:
      return "no tuned thresholds"
  values = metrics_of(result)
  values["trainable_params"] = trainable_params(workdir)
  return values


def _cell(key: str, value: Any) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  if key == "trainable_params":
    return f"{int(value):,}"
  return f"{value:.3f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def _measured_rows(measured, table, columns) -> list[list[str]]:
  out = []
  for entry, values in zip(table.entries, measured):
    cells = ([values] + [""] * (len(columns) - 1) if isinstance(values, str) else
             [_cell(k, values.get(k)) for k in columns])
    out.append([entry.label, f"`{entry.row}`", entry.thresholds, *cells])
  return out


def _thesis_rows(table, columns) -> list[list[str]]:
  return [[e.label, e.thresholds, *(_cell(k, e.thesis[k]) if k in e.thesis else "—" for k in columns),
           e.source or "—"] for e in table.entries if e.thesis]


def _grid(table, measured) -> str:
  columns = list(dict.fromkeys(e.cell[1] for e in table.entries))
  grid_rows = list(dict.fromkeys(e.cell[0] for e in table.entries))
  cells = {}
  for entry, values in zip(table.entries, measured):
    ours = values if isinstance(values, str) else _cell("ap", values["ap"])
    thesis = f" (thesis {entry.thesis['ap']:.3f})" if "ap" in entry.thesis else ""
    cells[entry.cell] = ours + thesis
  return _md_table(["data \\ model", *columns],
                   [[r, *(cells.get((r, c), "—") for c in columns)] for r in grid_rows])


def table_markdown(table, root: str, smoke: bool, commands: dict[str, list[str]]) -> str:
  measured = [entry_metrics(root, entry, smoke) for entry in table.entries]
  columns = LAYOUT_COLUMNS[table.layout]
  titles = [_COLUMN_TITLES[k] for k in columns]
  parts = [f"## Table {table.key}: {table.title}" if table.key[0].isdigit() else f"## {table.title}"]
  if table.notes:
    parts.append(table.notes)
  if table.layout == "grid":
    parts.append("AUC(PR) as macro average precision (the thesis's value in parentheses):\n\n"
                 + _grid(table, measured))
  parts.append(_md_table(["", "row", "thresholds", *titles], _measured_rows(measured, table, columns)))
  thesis = _thesis_rows(table, columns)
  if thesis:
    thesis_titles = ["AUC(PR)" if k == "ap" else _COLUMN_TITLES[k] for k in columns]
    parts.append("Thesis (WIT; its AUC(PR) is Keras's PR-AUC, not average precision), for "
                 "orientation:\n\n" + _md_table(["", "thresholds", *thesis_titles, "source"], thesis))
  parts.append("Commands:\n\n```bash\n" + "\n".join(
      line for row in table.rows for line in commands[row]) + "\n```")
  return "\n\n".join(parts)


def row_commands(row: str, root: str, smoke: bool, extra_args: Sequence[str], *,
                 train: bool = True) -> list[str]:
  """The shell commands that produce a row's results (for the tables and --dry_run)."""
  workdir = os.path.join(root, row)
  out = [shell(["wikitopics", *train_command(row, workdir, smoke, extra_args)])] if train else []
  split, test_split = report_split(row, smoke)
  if split != test_split:
    out += [shell(["wikitopics", *evaluate_command(workdir, split, thresholds, "best")])
            for thresholds in ("0.5", "saved")]
  return out


def assemble(tables: Sequence[str], root: str, smoke: bool, extra_args: Sequence[str]) -> str:
  rows = select_rows(tables, [])
  commands = {row: row_commands(row, root, smoke, extra_args) for row in rows}
  header = (f"# Thesis experiments, {'smoke' if smoke else 'full'} scale\n\n"
            f"Results under `{root}`, tabled {datetime.datetime.now().isoformat(timespec='minutes')}. "
            "AUC(PR) is macro average precision (scikit-learn's definition); precision, recall and F1 "
            "are macro averages over all labels, the 5 most frequent training labels (top-5) and the "
            "others (rest); thresholds 0.5, or per-class thresholds tuned on the threshold split "
            "where the line says tuned. The heuristic labels are the ground truth.")
  if smoke:
    header += (" Smoke scale: synthetic 32x32 data, a halved B0 (Lite0 for ImageNet rows), "
               "a few epochs; a check that the rows run, not a reproduction.")
  return "\n\n".join([header, *(table_markdown(EXPERIMENTS.TABLES[t], root, smoke, commands)
                                for t in tables)]) + "\n"


# ---------------------------------------------------------------------------------------------------
# Cluster commands.


def cluster_command(kind: str, row: str, root: str, smoke: bool, extra_args: Sequence[str]) -> str:
  workdir = os.path.join(root, row)
  config = config_arg(row, smoke)
  if kind == "tpu":
    return " ".join([f"CONFIG={shlex.quote(config)}", f"WORKDIR={shlex.quote(workdir)}",
                     "launch/tpu_pod.sh", "train", *map(shlex.quote, extra_args)])
  if kind == "slurm":
    return shell(["sbatch", f"--job-name=wt-{row}", "launch/slurm_gpu.sbatch", config, workdir,
                  *extra_args])
  return shell(["wikitopics", *train_command(row, workdir, smoke, extra_args)])


# ---------------------------------------------------------------------------------------------------
# Command line.


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tables", default=None,
                      help=f"comma-separated tables ({','.join(EXPERIMENTS.TABLES)}); default: all, "
                           "or none when --rows is given")
  parser.add_argument("--rows", default="", help="comma-separated rows to run besides the tables'")
  parser.add_argument("--smoke", action="store_true", help="the rows' smoke variants")
  parser.add_argument("--root", default=None, help="workdir root (default workdir/sweep[-smoke])")
  parser.add_argument("--extra_args", default="", help="appended to every train command")
  parser.add_argument("--dry_run", action="store_true", help="print the plan; run and write nothing")
  parser.add_argument("--assemble_only", action="store_true", help="only write the tables")
  parser.add_argument("--print_commands", choices=("local", "tpu", "slurm"), default=None,
                      help="print one training command per row and exit")
  parser.add_argument("--wikitopics", default=f"{shlex.quote(sys.executable)} -m wikitopics_jax.main",
                      help="how to invoke the CLI (default: this Python's wikitopics_jax.main)")
  args = parser.parse_args(argv)
  args.rows = [r for r in args.rows.split(",") if r]
  if args.tables is None:
    args.tables = "" if args.rows else ",".join(EXPERIMENTS.TABLES)
  args.tables = [t for t in args.tables.split(",") if t]
  args.extra_args = shlex.split(args.extra_args)
  root = args.root or os.path.join("workdir", "sweep-smoke" if args.smoke else "sweep")
  args.root = os.path.abspath(root)
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  rows = select_rows(args.tables, args.rows)
  if args.print_commands:
    for row in rows:
      print(cluster_command(args.print_commands, row, args.root, args.smoke, args.extra_args))
    if any(report_split(row, args.smoke)[0] != report_split(row, args.smoke)[1] for row in rows):
      print(f"# when the jobs are done, where {args.root} is mounted (evaluates rows reported on "
            "another split, writes tables.md):")
    print("# " + shell(["python", "launch/sweep.py",
                        *([f"--tables={','.join(args.tables)}"] if args.tables else []),
                        *([f"--rows={','.join(args.rows)}"] if args.rows else []),
                        f"--root={args.root}", *(["--smoke"] if args.smoke else []),
                        *([f"--extra_args={shell(args.extra_args)}"] if args.extra_args else [])]))
    return 0
  if args.dry_run:
    for row in rows:
      status = row_status(os.path.join(args.root, row), row, args.smoke)
      print(f"{row}: {status}")
      if status != "done":
        for command in row_commands(row, args.root, args.smoke, args.extra_args,
                                    train=status != "evaluate"):
          print(f"  {command}")
    return 0
  failed = []
  if not args.assemble_only:
    prefix = shlex.split(args.wikitopics)
    for index, row in enumerate(rows, 1):
      start = time.perf_counter()
      print(f"[{index}/{len(rows)}] {row} ...", flush=True)
      try:
        status = run_row(prefix, args.root, row, args.smoke, args.extra_args)
      except RowFailed as e:
        failed.append(row)
        print(f"[{index}/{len(rows)}] {row} FAILED: {e}", flush=True)
        continue
      took = time.perf_counter() - start
      print(f"[{index}/{len(rows)}] {row}: " + (
          "already done, skipped" if status == "done" else f"{status} -> done in {took:.0f} s"),
            flush=True)
  if args.tables:
    text = assemble(args.tables, args.root, args.smoke, args.extra_args)
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "tables.md"), "w") as f:
      f.write(text)
    print(text)
    print(f"wrote {os.path.join(args.root, 'tables.md')}")
  if failed:
    print(f"failed rows: {', '.join(failed)} (logs: <root>/<row>/{LOG})", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
