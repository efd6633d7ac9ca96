"""A training run's throughput and MFU from its `metrics.jsonl`, as a markdown table row.

  python -m wikitopics_jax.bench.training_run WORKDIR "what ran" [--append_to=FILE.md]

The trainer writes images/s (and MFU where the chip's peak FLOPs are known) for every log window;
the first window holds compilation and is left out. Used by launch/accelerator_check.sh.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

HEADER = ("| training run | log windows | images/s (median, min-max) | MFU (median) |\n"
          "|---|---|---|---|\n")


def summarize(workdir: str, what: str) -> str:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  windows = [r for r in rows if "images_per_second" in r][1:]
  if not windows:
    raise SystemExit(f"error: {path}: no log window after the first; train for more steps")
  rates = [r["images_per_second"] for r in windows]
  mfu = [r["mfu"] for r in windows if "mfu" in r]
  mfu_text = f"{statistics.median(mfu):.1%}" if mfu else "n/a (peak FLOPs of this chip unknown)"
  return (f"| {what} | {len(windows)} | {statistics.median(rates):,.0f} "
          f"({min(rates):,.0f}-{max(rates):,.0f}) | {mfu_text} |\n")


def main(argv: list[str]) -> int:
  args = [a for a in argv if not a.startswith("--append_to=")]
  if len(args) != 2:
    raise SystemExit(__doc__)
  text = HEADER + summarize(*args)
  for a in argv:
    if a.startswith("--append_to="):
      with open(a.split("=", 1)[1], "a") as f:
        f.write("\n" + text)
  print(text, end="")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
