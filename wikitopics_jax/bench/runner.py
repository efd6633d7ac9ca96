"""The benchmark runner: named suites, side-by-side timing, and the report (markdown table + JSON).

A suite is a function `suite(ctx: Context) -> list[Row]` registered in `SUITES`. Each row compares one
measurement of our code with a baseline measured in the same process, interleaved with ours
(`measure_alternating`) so that load on the machine hits both alike, unless the suite says why not
(the `pipeline` suite; extrapolated baselines).

Figures are medians over `repeats` timed runs after warm-up runs (compilation, caches, worker start-up
are excluded). The spread is half the range, (max - min) / 2, as a percentage of the median. The speedup
is ours/baseline for rates (images/s) and baseline/ours for times (s), so > 1 always means ours is
faster. A baseline that cannot run (a package missing, torch.compile failing) is skipped with a
reason; it never stops the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from wikitopics_jax import registry

SUITES = registry.Registry("benchmark suite")
# The default order of a full run; each module registers the suites it defines.
SUITE_ORDER = ("train_step", "inference", "pipeline", "loop", "ingest", "losses", "metrics",
               "resampling", "labels_graph")
SUITE_MODULES = ("model_suites", "pipeline_suite", "loop_suite", "ingest_suite", "losses_suite",
                 "metrics_suite", "resampling_suite", "labels_suite")

RATE_UNITS = ("images/s", "queries/s", "pages/s")
TIME_UNITS = {"s": 1.0, "ms": 1e3}

TABLE_HEADER = (
    "Figures are medians of the repeated timed runs (warm-up excluded), ± half the range as % of "
    "the median. Speedup = ours/baseline for rates, baseline/ours for times: **> 1 means ours is "
    "faster**. In brackets: the lowest and highest speedup within one round, where ours and the "
    "baseline ran in alternating rounds.")


@dataclasses.dataclass
class Context:
  """What every suite gets: the run's mode and a place to report skipped baselines."""
  tiny: bool = False
  profile_dir: str | None = None
  # "cpu" or "accelerator"; chooses the model suites' configurations.
  mode: str = "cpu"
  torch_compile: bool = True
  log: Callable[[str], None] = print
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

  def skip(self, suite: str, what: str, reason: str) -> None:
    self.skipped.append({"suite": suite, "what": what, "reason": reason})
    self.log(f"[{suite}] skipped {what}: {reason}")


@dataclasses.dataclass
class Stats:
  """Summary of repeated measurements in a row's unit."""
  median: float
  low: float
  high: float
  repeats: int
  samples: list[float]
  extrapolated: bool = False
  # Set by `measure_alternating`, one value per call: sample i of every candidate of that call was
  # timed in round i, under the same load.
  rounds: int | None = None

  @classmethod
  def of(cls, samples: Sequence[float], *, extrapolated: bool = False,
         rounds: int | None = None) -> Stats:
    samples = [float(s) for s in samples]
    return cls(statistics.median(samples), min(samples), max(samples), len(samples), samples,
               extrapolated, rounds)

  def scaled(self, factor: float, *, extrapolated: bool) -> Stats:
    return Stats.of([s * factor for s in self.samples], extrapolated=extrapolated,
                    rounds=self.rounds)

  @property
  def spread_percent(self) -> float:
    return 100.0 * (self.high - self.low) / 2 / self.median if self.median else 0.0


@dataclasses.dataclass
class Row:
  """One comparison: what was measured, our figure and the baseline's, and the speedup."""
  suite: str
  measured: str
  ours: str
  unit: str
  ours_stats: Stats
  baseline: str | None = None
  baseline_stats: Stats | None = None
  note: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.unit not in RATE_UNITS and self.unit not in TIME_UNITS:
      raise ValueError(f"unknown unit {self.unit!r}")

  @property
  def higher_is_better(self) -> bool:
    return self.unit in RATE_UNITS

  @property
  def speedup(self) -> float | None:
    if self.baseline_stats is None:
      return None
    ours, theirs = self.ours_stats.median, self.baseline_stats.median
    return ours / theirs if self.higher_is_better else theirs / ours

  @property
  def paired(self) -> bool:
    """Whether ours and the baseline were timed in the same rounds of one `measure_alternating`."""
    return (self.baseline_stats is not None and self.ours_stats.rounds is not None
            and self.ours_stats.rounds == self.baseline_stats.rounds)

  @property
  def speedup_range(self) -> tuple[float, float] | None:
    """(lowest, highest) per-round speedup of a paired row: both sides saw the same load in a
    round, so these bound the speedup's noise. None for other rows."""
    if not self.paired:
      return None
    ours, theirs = self.ours_stats.samples, self.baseline_stats.samples
    ratios = [o / t if self.higher_is_better else t / o for o, t in zip(ours, theirs)]
    return min(ratios), max(ratios)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for key in ("ours_stats", "baseline_stats"):
      stats = getattr(self, key)
      if stats is not None:
        out[key]["spread_percent"] = stats.spread_percent
    out.update(higher_is_better=self.higher_is_better, speedup=self.speedup, paired=self.paired,
               speedup_range=self.speedup_range)
    return out


@dataclasses.dataclass
class Candidate:
  """One implementation to time: `run()` does one timed run and returns when its work is done.

  `work` is the number of items one run processes: images for images/s, or calls when a run repeats
  a short call to time it reliably (times are then per call). `warmup` replaces `run`
  for the warm-up calls when running the full workload just to warm up would waste time.
  """
  name: str
  run: Callable[[], Any]
  work: float = 1.0
  warmup: Callable[[], Any] | None = None


_CALLS = itertools.count()  # Numbers the calls of measure_alternating (Stats.rounds).


def measure_alternating(candidates: Sequence[Candidate], *, repeats: int, warmup: int = 1,
                        unit: str, on_failure: Callable[[Candidate, str], None] | None = None,
                        around_timed: Callable[[], Any] | None = None,
                        settling_round: bool = False) -> dict[str, tuple[Stats, float]]:
  """Times the candidates in turn, `repeats` rounds of one run each, after `warmup` runs each.

  With `settling_round`, one untimed round of all candidates follows the warm-ups, so that each
  candidate's first timed run comes after the others' runs, as every later one does, and not after
  their warm-ups (compilation, first allocations). In two B0 224x224 train-step runs, ours' first
  timed run after the baselines' warm-ups was about half as fast as its later runs.

  Returns name -> (stats in `unit`, seconds of the first warm-up call). The first candidate is ours
  and its errors always raise. Another candidate that raises is dropped and reported through
  `on_failure(candidate, reason)` (a baseline that cannot run); without `on_failure` it raises.
  `around_timed` is a context-manager factory wrapped around the timed rounds (the profiler).
  """
  alive, first_call = [], {}

  def fail(c: Candidate, e: Exception) -> None:
    if on_failure is None or c is candidates[0]:
      raise e
    on_failure(c, _short_error(e))

  for c in candidates:
    try:
      for i in range(warmup):
        start = time.perf_counter()
        (c.warmup or c.run)()
        if i == 0:
          first_call[c.name] = time.perf_counter() - start
      alive.append(c)
    except Exception as e:  # pylint: disable=broad-except
      fail(c, e)
  seconds: dict[str, list[float]] = {c.name: [] for c in alive}

  def rounds(count: int, timed: bool):
    for _ in range(count):
      for c in list(alive):
        start = time.perf_counter()
        try:
          c.run()
        except Exception as e:  # pylint: disable=broad-except
          fail(c, e)
          alive.remove(c)
          del seconds[c.name]
          continue
        if timed:
          seconds[c.name].append(time.perf_counter() - start)

  rounds(1 if settling_round else 0, timed=False)
  if around_timed is None:
    rounds(repeats, timed=True)
  else:
    with around_timed():
      rounds(repeats, timed=True)
  by_name = {c.name: c for c in alive}
  call = next(_CALLS)
  return {name: (Stats.of([to_unit(s, by_name[name].work, unit) for s in secs], rounds=call),
                 first_call.get(name, float("nan")))
          for name, secs in seconds.items()}


def measure_alone(loop, *, work: float, repeats: int, unit: str) -> Stats:
  """One loop with run/warmup/close, timed without a baseline alternating beside it: warm-up, then
  back-to-back timed runs, then close (its threads and processes end) even if timing fails. For
  loops that work ahead or own processes, which would distort anything timed in between."""
  try:
    return measure_alternating([Candidate("loop", loop.run, work=work, warmup=loop.warmup)],
                               repeats=repeats, unit=unit)["loop"][0]
  finally:
    loop.close()


def to_unit(seconds: float, work: float, unit: str) -> float:
  """A run's seconds -> items per second (rates) or time per item (times)."""
  if unit in RATE_UNITS:
    return work / seconds
  return seconds / work * TIME_UNITS[unit]


def _short_error(e: BaseException) -> str:
  lines = [l for l in str(e).strip().splitlines() if l.strip()]
  first = lines[0] if lines else ""
  return f"{type(e).__name__}: {first[:300]}"


# ---------------------------------------------------------------------------------------------------
# Machine and versions


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def core_count() -> int:
  """Cores this process may run on (what XLA's and PyTorch's thread pools should use)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      "cpu_model": cpu_model(),
      "cores": core_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind if devices else None,
      "load_average_at_start": _load_average(),
  }


def _load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def versions() -> dict[str, str | None]:
  out = {}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "grain", "scikit-learn", "torch",
                  "tensorflow-cpu", "keras"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      out[package] = None
  return out


# ---------------------------------------------------------------------------------------------------
# Running and reporting


def load_suites() -> None:
  """Imports the suite modules (heavy: JAX, Grain, ...), which registers their suites."""
  for module in SUITE_MODULES:
    importlib.import_module(f"wikitopics_jax.bench.{module}")


def run_suites(names: Sequence[str], ctx: Context) -> dict[str, Any]:
  """Runs the named suites in order; returns the report (what `write_json` writes)."""
  load_suites()
  for name in names:
    SUITES.get(name)  # Unknown names fail before anything runs.
  report: dict[str, Any] = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": machine_info(),
      "versions": versions(),
      "settings": {"suites": list(names), "tiny": ctx.tiny, "mode": ctx.mode,
                   "profile_dir": ctx.profile_dir, "torch_compile": ctx.torch_compile},
      "rows": [],
      "skipped": ctx.skipped,
      "failed": [],
  }
  for name in names:
    ctx.log(f"== suite {name}")
    start = time.perf_counter()
    try:
      rows = SUITES.get(name)(ctx)
    except Exception as e:  # pylint: disable=broad-except
      # One broken suite must not lose the others' figures; the failure is in the report.
      ctx.log(traceback.format_exc())
      report["failed"].append({"suite": name, "error": _short_error(e)})
      continue
    report["rows"].extend(row.to_json() for row in rows)
    ctx.log(f"== suite {name}: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
  report["machine"]["load_average_at_end"] = _load_average()
  return report


def write_json(report: dict[str, Any], path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(_json_safe(report), f, indent=1, allow_nan=False)
    f.write("\n")


def _json_safe(value: Any) -> Any:
  """numpy scalars -> Python; NaN and infinities (e.g. a failed warm-up's time) -> null."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def format_figure(stats: dict[str, Any] | None) -> str:
  if stats is None:
    return "—"
  text = f"{_significant(stats['median'])} ±{stats['spread_percent']:.0f}%"
  return text + " (extrapolated)" if stats.get("extrapolated") else text


def _significant(x: float) -> str:
  if x == 0:
    return "0"
  if abs(x) >= 100:
    return f"{x:,.0f}"
  return f"{x:.3g}"


def machine_was_busy(report: dict[str, Any]) -> bool:
  machine = report["machine"]
  loads = [machine.get("load_average_at_start"), machine.get("load_average_at_end")]
  return any(load and load[0] > machine["cores"] / 2 for load in loads)


def markdown_table(report: dict[str, Any]) -> str:
  """The report as markdown: the machine, then one table of all rows, then skips and failures."""
  machine, vers = report["machine"], report["versions"]
  lines = [
      f"Recorded {report['date']} on {machine['cpu_model']}, {machine['cores']} cores, "
      f"JAX backend {machine['jax_backend']} ({', '.join(machine['jax_devices'][:4])}"
      f"{', ...' if len(machine['jax_devices']) > 4 else ''}); load average at start "
      f"{machine.get('load_average_at_start')}, at end {machine.get('load_average_at_end')}.",
      "Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v) + ".",
      f"Mode: {report['settings']['mode']}{', tiny' if report['settings']['tiny'] else ''}.",
  ]
  if machine_was_busy(report):
    lines.append("**Warning: the machine was busy (1-minute load average above half the cores); "
                 "these figures are unreliable.**")
  lines += [
      "",
      TABLE_HEADER,
      "",
      "| Suite | Measured | Ours | Ours figure | Baseline | Baseline figure | Unit | Speedup | "
      "Repeats | Notes |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in report["rows"]:
    speedup = "—" if row["speedup"] is None else f"{row['speedup']:.2f}x"
    if row.get("speedup_range"):
      speedup += " ({:.2f}–{:.2f})".format(*row["speedup_range"])
    repeats = str(row["ours_stats"]["repeats"])
    baseline_repeats = (row["baseline_stats"] or {}).get("repeats")
    if baseline_repeats not in (None, row["ours_stats"]["repeats"]):
      repeats += f" / {baseline_repeats}"
    cells = [row["suite"], row["measured"], row["ours"], format_figure(row["ours_stats"]),
             row["baseline"] or "—", format_figure(row["baseline_stats"]), row["unit"], speedup,
             repeats, row["note"]]
    lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
  if report["skipped"]:
    lines += ["", "Skipped:"]
    lines += [f"- {s['suite']}: {s['what']}: {s['reason']}" for s in report["skipped"]]
  if report["failed"]:
    lines += ["", "Failed suites:"]
    lines += [f"- {f['suite']}: {f['error']}" for f in report["failed"]]
  return "\n".join(lines)
