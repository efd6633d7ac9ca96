"""`fetch`: downloads Wikimedia thumbnails of a requested width into the Commons hash layout.

Each image is saved as ``<out_dir>/<h>/<hh>/<File>`` (the original's decoded name, whatever format
Wikimedia renders the thumbnail in: an SVG's thumbnail is a PNG kept under ``Name.svg``), which is
exactly what `ingest` reads as an image directory.

Politeness (https://meta.wikimedia.org/wiki/User-Agent_policy): a descriptive User-Agent with
contact information is required (InputError if missing); concurrency is bounded (`max_workers`
threads) and an optional `requests_per_second` spaces requests out. A 429 pauses *all* workers (for
Retry-After seconds if the server sends it, else the backoff); a 503 with Retry-After does the
same. Other failures that may pass (5xx, timeouts, dropped connections) are retried per file with
exponential backoff (``backoff_s * 2**attempt`` with +-50% jitter, at most `max_backoff_s`), up to
`max_attempts` tries. 4xx other than 429 fail at once.

Thumbnail URLs follow `wit.CommonsFile.thumbnail_url`. Since 2026 Wikimedia renders only its
standard thumbnail widths (`STANDARD_WIDTHS`; phabricator T414805) and answers other widths with a
429 error page, so other widths are refused here unless `allow_nonstandard_width` (for other
servers). For a 64-px model fetch 120 px (a 2x margin for antialiased downscaling), for 128-224 px
fetch 250 or 330. Wikimedia does not upscale: an image known (from WIT's ``original_width``) to be
no wider than `width` is fetched at its original URL; with `fallback_to_original`, a thumbnail
request answered 400 or 404 is tried once at the original URL.

Resumable and crash-safe: files already on disk are skipped; each download is written to a temporary
file and renamed, so a kill never leaves a partial image under a real name (`fetch` deletes stale
temporaries at start). Final failures are appended to a JSON Lines log (one object per failure:
url, path, status, error, attempts) and counted in the returned `FetchReport`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import email.utils
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from wikitopics_jax import labels_table
from wikitopics_jax import progress as progress_lib
from wikitopics_jax import wit
from wikitopics_jax.errors import InputError

FAILURES_LOG = "fetch_failures.jsonl"
# Statuses that may succeed later. 429 and 503 also pause every worker.
RETRYABLE_STATUSES = (429, 500, 502, 503, 504)
# Thumbnail answers after which the original URL is tried (a thumbnail wider than the original).
FALLBACK_STATUSES = (400, 404)
# The only widths Wikimedia's upload servers render (phabricator T414805, 2026).
STANDARD_WIDTHS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
# A Retry-After longer than this is capped (a misconfigured server must not stall a job for days).
MAX_RETRY_AFTER_S = 600.0
_CONTACT_HINTS = ("@", "http://", "https://", "www.")


@dataclasses.dataclass(frozen=True)
class FetchSettings:
  """width: thumbnail width in pixels; user_agent: descriptive, with contact information (required);
  base_url: upload server base, ".../wikipedia" (tests point it at 127.0.0.1); max_workers:
  concurrent downloads; requests_per_second: None = only bounded by max_workers; max_attempts:
  tries per URL; backoff_s / max_backoff_s: exponential backoff; timeout_s: per request;
  max_bytes: larger responses are failures; fallback_to_original, allow_nonstandard_width: see the
  module docstring."""
  width: int
  user_agent: str
  base_url: str = wit.UPLOAD_BASE_URL
  max_workers: int = 4
  requests_per_second: float | None = None
  max_attempts: int = 6
  backoff_s: float = 1.0
  max_backoff_s: float = 120.0
  timeout_s: float = 30.0
  max_bytes: int = 50 << 20
  fallback_to_original: bool = True
  allow_nonstandard_width: bool = False

  def __post_init__(self):
    if not isinstance(self.user_agent, str) or not self.user_agent.strip():
      raise InputError("fetch: a descriptive User-Agent with contact information is required "
                       "(Wikimedia's policy), e.g. 'wikitopics-fetch/0.1 (https://example.org; "
                       "me@example.org)'")
    if not isinstance(self.width, int) or self.width < 1:
      raise InputError(f"fetch: width must be a positive integer, got {self.width!r}")
    if self.width not in STANDARD_WIDTHS and not self.allow_nonstandard_width:
      larger = [w for w in STANDARD_WIDTHS if w >= self.width]
      raise InputError(f"fetch: width {self.width} is not one of Wikimedia's thumbnail widths "
                       f"{STANDARD_WIDTHS} (others are refused with 429); use "
                       f"{larger[0] if larger else STANDARD_WIDTHS[-1]}")
    if not isinstance(self.max_workers, int) or self.max_workers < 1:
      raise InputError(f"fetch: max_workers must be a positive integer, got {self.max_workers!r}")
    if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
      raise InputError(f"fetch: max_attempts must be a positive integer, got {self.max_attempts!r}")
    if self.requests_per_second is not None and not self.requests_per_second > 0:
      raise InputError(f"fetch: requests_per_second must be positive or None, got "
                       f"{self.requests_per_second!r}")


@dataclasses.dataclass
class FetchReport:
  requested: int = 0
  downloaded: int = 0
  skipped_existing: int = 0
  failed: int = 0
  retries: int = 0
  pauses: int = 0
  originals: int = 0
  bytes: int = 0
  failures_by_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def to_json(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data["failures_by_status"] = {str(k): v for k, v in sorted(self.failures_by_status.items(),
                                                               key=lambda kv: str(kv[0]))}
    return data


@dataclasses.dataclass
class _Failure(Exception):
  status: int | str  # HTTP status, or the kind of network error.
  message: str
  retry_after_s: float | None = None

  @property
  def retryable(self) -> bool:
    return self.status in RETRYABLE_STATUSES or self.status in ("timeout", "network")


class _Pacer:
  """Shared by all workers: spaces requests (requests_per_second) and pauses everyone after a 429."""

  def __init__(self, requests_per_second: float | None):
    self._interval = 1.0 / requests_per_second if requests_per_second else 0.0
    self._lock = threading.Lock()
    self._next_slot = 0.0
    self._paused_until = 0.0

  def wait(self) -> None:
    with self._lock:
      now = time.monotonic()
      start = max(now, self._next_slot, self._paused_until)
      self._next_slot = start + self._interval
    if start > now:
      time.sleep(start - now)

  def pause(self, seconds: float) -> None:
    with self._lock:
      self._paused_until = max(self._paused_until, time.monotonic() + seconds)


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
  """An HTTP Retry-After value (seconds, or an HTTP date) -> seconds from now, capped; None if
  absent or unreadable."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return min(float(value), MAX_RETRY_AFTER_S)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  now = time.time() if now is None else now
  return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER_S)


class _Fetcher:
  def __init__(self, settings: FetchSettings, out_dir: str, report: FetchReport,
               failures_log: str):
    self.settings, self.out_dir, self.report = settings, out_dir, report
    self.pacer = _Pacer(settings.requests_per_second)
    self.lock = threading.Lock()
    self.failures_log = failures_log
    self.opener = urllib.request.build_opener()
    self.opener.addheaders = [("User-Agent", settings.user_agent)]

  def _count(self, **increments: int) -> None:
    with self.lock:
      for name, value in increments.items():
        setattr(self.report, name, getattr(self.report, name) + value)

  def _get(self, url: str) -> bytes:
    """One request: the body, or a _Failure."""
    self.pacer.wait()
    try:
      with self.opener.open(url, timeout=self.settings.timeout_s) as response:
        body = response.read(self.settings.max_bytes + 1)
        content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
      retry_after = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
      e.close()
      raise _Failure(e.code, f"HTTP {e.code} {e.reason}", retry_after) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      # URLError, timeouts, resets, TLS errors: all OSErrors or HTTPExceptions, all maybe passing.
      reason = getattr(e, "reason", e)
      kind = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else "network"
      raise _Failure(kind, f"{type(e).__name__}: {reason}") from None
    if len(body) > self.settings.max_bytes:
      raise _Failure("too_large", f"more than {self.settings.max_bytes} bytes")
    if content_type.startswith("text/"):
      raise _Failure("not_an_image", f"Content-Type {content_type!r}")
    return body

  def _get_with_retries(self, url: str) -> tuple[bytes, int]:
    """(body, attempts) or the last _Failure."""
    s = self.settings
    for attempt in range(s.max_attempts):
      try:
        return self._get(url), attempt + 1
      except _Failure as failure:
        if not failure.retryable or attempt + 1 == s.max_attempts:
          raise dataclasses.replace(failure, message=f"{failure.message} (after {attempt + 1} "
                                    f"attempts)") from None
        backoff = min(s.max_backoff_s, s.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
        if failure.status == 429 or (failure.status == 503 and failure.retry_after_s is not None):
          # Rate limited: everyone waits, as long as the server asks.
          wait = failure.retry_after_s if failure.retry_after_s is not None else backoff
          self.pacer.pause(wait)
          self._count(retries=1, pauses=1)
        else:
          self._count(retries=1)
          time.sleep(backoff)
    raise AssertionError("unreachable")

  def fetch_one(self, file: wit.CommonsFile, original_width: int | None) -> None:
    path = os.path.join(self.out_dir, file.relative_path)
    if os.path.exists(path):
      self._count(skipped_existing=1)
      return
    s = self.settings
    use_original = original_width is not None and original_width <= s.width
    url = file.url(s.base_url) if use_original else file.thumbnail_url(s.width, s.base_url)
    try:
      try:
        body, _ = self._get_with_retries(url)
      except _Failure as failure:
        if use_original or not s.fallback_to_original or failure.status not in FALLBACK_STATUSES:
          raise
        # Wikimedia will not scale an image up: a too-small original fails as a thumbnail.
        url = file.url(s.base_url)
        use_original = True
        body, _ = self._get_with_retries(url)
    except _Failure as failure:
      self._fail(file, url, path, failure)
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
      f.write(body)
    os.replace(tmp, path)
    self._count(downloaded=1, bytes=len(body), originals=int(use_original))

  def _fail(self, file: wit.CommonsFile, url: str, path: str, failure: _Failure) -> None:
    entry = {"url": url, "path": path, "file": file.relative_path, "status": failure.status,
             "error": failure.message}
    with self.lock:
      self.report.failed += 1
      self.report.failures_by_status[failure.status] += 1
      with open(self.failures_log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _remove_temporaries(directory: str) -> None:
  for root, _, files in os.walk(directory):
    for name in files:
      if ".tmp-" in name:
        os.remove(os.path.join(root, name))


def fetch(files: Sequence[tuple[wit.CommonsFile, int | None]], out_dir: str,
          settings: FetchSettings, *, failures_log: str | None = None,
          progress: bool = True) -> FetchReport:
  """Downloads thumbnails of `files` ((file, original width or None) pairs) into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  _remove_temporaries(out_dir)
  if not any(hint in settings.user_agent for hint in _CONTACT_HINTS):
    print(f"fetch: warning: User-Agent {settings.user_agent!r} has no contact information (an "
          f"e-mail address or URL); Wikimedia may block it", file=sys.stderr)
  report = FetchReport(requested=len(files))
  fetcher = _Fetcher(settings, out_dir, report, failures_log or os.path.join(out_dir, FAILURES_LOG))
  bar = progress_lib.Progress("fetch", "images", len(files), enabled=progress)
  # Bounded look-ahead: millions of files never become millions of pending futures.
  with concurrent.futures.ThreadPoolExecutor(settings.max_workers) as pool:
    pending: set[concurrent.futures.Future] = set()
    for file, width in files:
      if len(pending) >= 4 * settings.max_workers:
        done, pending = concurrent.futures.wait(pending,
                                                return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          future.result()
          bar.advance(note=f"{report.failed} failed")
      pending.add(pool.submit(fetcher.fetch_one, file, width))
    for future in concurrent.futures.as_completed(pending):
      future.result()
      bar.advance(note=f"{report.failed} failed")
  print(f"fetch: {out_dir}: {report.downloaded:,} downloaded ({report.bytes / 1e6:,.1f} MB, "
        f"{report.originals:,} originals), {report.skipped_existing:,} already there, "
        f"{report.failed:,} failed {dict(report.failures_by_status)}, {report.retries:,} retries",
        file=sys.stderr, flush=True)
  return report


def files_to_fetch(*, labels: Iterable[str] = (), wit_tsv: Iterable[str] = (),
                   extensions: Sequence[str] = ()) -> list[tuple[wit.CommonsFile, int | None]]:
  """The distinct images of labels tables and WIT files (in first-seen order), with WIT's
  original width where known; `extensions` (lower case, no dot) keeps only those file types."""
  wanted = {e.lower().lstrip(".") for e in extensions}
  widths: dict[str, int | None] = {}
  files: dict[str, wit.CommonsFile] = {}

  def add(file: wit.CommonsFile, width: int | None) -> None:
    if wanted and file.extension not in wanted:
      return
    if file.relative_path not in files:
      files[file.relative_path] = file
      widths[file.relative_path] = width
    elif widths[file.relative_path] is None:
      widths[file.relative_path] = width

  for path in labels:
    for row in labels_table.iter_rows(path):
      try:
        add(wit.parse_image_url(row.url) if row.url else wit.file_from_title(row.title), None)
      except InputError as e:
        print(f"fetch: skipped: {row.where}: {e}", file=sys.stderr)
  for path in wit_tsv:
    stats = wit.ReadStats()
    for row in wit.iter_rows(path, stats):
      try:
        file = wit.parse_image_url(row.image_url)
      except InputError:
        continue
      width = row.get("original_width")
      add(file, int(width) if width.isdigit() else None)
    for message in stats.messages[:10]:
      print(f"fetch: malformed WIT row: {message}", file=sys.stderr)
  return [(files[key], widths[key]) for key in files]


def run_fetch(out_dir: str, *, width: int, user_agent: str, labels: Sequence[str] = (),
              wit_tsv: Sequence[str] = (), extensions: Sequence[str] = (),
              base_url: str = wit.UPLOAD_BASE_URL, max_workers: int = 4,
              requests_per_second: float | None = None, max_attempts: int = 6,
              timeout_s: float = 30.0, failures_log: str | None = None,
              allow_nonstandard_width: bool = False, progress: bool = True) -> FetchReport:
  """The `fetch` command: thumbnails of every image in the labels tables and/or WIT files."""
  settings = FetchSettings(width=width, user_agent=user_agent, base_url=base_url,
                           max_workers=max_workers, requests_per_second=requests_per_second,
                           max_attempts=max_attempts, timeout_s=timeout_s,
                           allow_nonstandard_width=allow_nonstandard_width)
  if not labels and not wit_tsv:
    raise InputError("fetch: give labels tables and/or WIT TSV files to take image URLs from")
  files = files_to_fetch(labels=labels, wit_tsv=wit_tsv, extensions=extensions)
  return fetch(files, out_dir, settings, failures_log=failures_log, progress=progress)
