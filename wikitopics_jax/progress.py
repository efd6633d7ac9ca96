"""Progress lines with rate and ETA on stderr, for long jobs (ingest, fetch) that run for hours."""

from __future__ import annotations

import sys
import threading
import time

DEFAULT_INTERVAL_S = 5.0


def format_duration(seconds: float) -> str:
  """H:MM:SS (hours unbounded)."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
  """Counts finished items and prints ``<prefix>: <what>: done/total (pct), rate/s, ETA`` at most
  every `interval_s` seconds and once at the end. Thread-safe."""

  def __init__(self, prefix: str, what: str, total: int, *, enabled: bool = True,
               interval_s: float = DEFAULT_INTERVAL_S):
    self.prefix, self.what, self.total = prefix, what, total
    self.enabled = enabled and total > 0
    self.interval_s = interval_s
    self.start = self.last = time.monotonic()
    self.done = 0
    self._lock = threading.Lock()

  def advance(self, items: int = 1, note: str = "") -> None:
    with self._lock:
      self.done += items
      now = time.monotonic()
      if not self.enabled or (now - self.last < self.interval_s and self.done < self.total):
        return
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
      extra = f", {note}" if note else ""
      print(f"{self.prefix}: {self.what}: {self.done:,}/{self.total:,} "
            f"({100 * self.done / self.total:.0f}%), {rate:,.1f}/s, ETA {eta}{extra}",
            file=sys.stderr, flush=True)
