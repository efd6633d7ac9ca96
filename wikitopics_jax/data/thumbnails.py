"""`fetch`: downloads Wikimedia thumbnails of a requested width into the Commons hash layout.

Each image is saved as ``<out_dir>/<h>/<hh>/<File>`` (the original's decoded name, whatever format
Wikimedia renders the thumbnail in: an SVG's thumbnail is a PNG kept under ``Name.svg``), which is
exactly what `ingest` reads as an image directory.

Politeness (https://meta.wikimedia.org/wiki/User-Agent_policy): a descriptive User-Agent with
contact information is required (InputError if missing); concurrency is bounded (`max_workers`
threads) and an optional `requests_per_second` spaces requests out. A 429 pauses *all* workers,
including those already waiting for their turn (for Retry-After seconds if the server sends it,
else the backoff); a 503 with Retry-After does the same. Other failures that may pass (5xx,
timeouts, dropped connections, bodies shorter than their Content-Length) are retried per file with
exponential backoff (``backoff_s * 2**attempt`` with +-50% jitter, at most `max_backoff_s`), up to
`max_attempts` tries. 4xx other than 429 fail at once.

Only the configured server is contacted: redirects are followed (at most `MAX_REDIRECTS`) only to
the same scheme, host and port as `base_url`; a redirect anywhere else is a failure
("offsite_redirect") and nothing is sent there.

A body is kept only if it is complete (as long as its Content-Length), at most `max_bytes` (refused
from the Content-Length before reading, else as soon as the stream passes it), arrived within
`deadline_s` of the request (connection, redirects, headers and body together; a server that
drips bytes cannot hold a worker longer), and decodes as an image with `image_decoding` (an HTML
error page served as image/jpeg or a truncated JPEG is a failure, fetched again on the next run).

Thumbnail URLs follow `wit.CommonsFile.thumbnail_url`. Since 2026 Wikimedia renders only its
standard thumbnail widths (`STANDARD_WIDTHS`; phabricator T414805) and answers other widths with a
429 error page, so other widths are refused here unless `allow_nonstandard_width` (for other
servers). For a 64-px model fetch 120 px (a 2x margin for antialiased downscaling), for 128-224 px
fetch 250 or 330. Wikimedia does not upscale: an image known (from WIT's ``original_width``) to be
no wider than `width` is fetched at its original URL; with `fallback_to_original`, a thumbnail
request answered 400 or 404 is tried once at the original URL.

Resumable and crash-safe: files already on disk are skipped; each download is written to a temporary
file and renamed, so a kill never leaves a partial image under a real name (`fetch` deletes stale
temporaries at start). Failures are kept in a JSON Lines log, one object per file for its latest
failure (url, path, file, status, error, attempts: how many runs have failed on it, tries: requests
in the latest run, time); a file that later downloads is dropped from it. The log is rewritten
(temporary file and rename) at the end of each run; the failures are also counted in the returned
`FetchReport`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import email.utils
import functools
import http.client
import io
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from wikitopics_jax.data import image_decoding
from wikitopics_jax.data import labels_table
from wikitopics_jax import progress as progress_lib
from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError

FAILURES_LOG = "fetch_failures.jsonl"
# Statuses that may succeed later. 429 and 503 also pause every worker.
RETRYABLE_STATUSES = (429, 500, 502, 503, 504, "timeout", "network", "deadline", "incomplete")
# Thumbnail answers after which the original URL is tried (a thumbnail wider than the original).
FALLBACK_STATUSES = (400, 404)
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# The only widths Wikimedia's upload servers render (phabricator T414805, 2026).
STANDARD_WIDTHS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
# A Retry-After longer than this is capped (a misconfigured server must not stall a job for days).
MAX_RETRY_AFTER_S = 600.0
_CONTACT_HINTS = ("@", "http://", "https://", "www.")
_READ_CHUNK = 64 << 10
# Small output: the check only needs the bytes to decode (JPEGs are then decoded at 1/8 scale,
# which still reads all of their data, so truncation is caught).
_CHECK_DECODE = image_decoding.DecodeSettings(size=8)
# Rejections of complete, well-formed images that the ingest counts under its own reasons: fetching
# them again would give the same bytes.
_KEPT_REJECTIONS = ("too_many_pixels", "too_small", "unsupported_mode")


@dataclasses.dataclass(frozen=True)
class FetchSettings:
  """width: thumbnail width in pixels; user_agent: descriptive, with contact information (required);
  base_url: upload server base, ".../wikipedia" (tests point it at 127.0.0.1), the only origin
  requests and redirects go to; max_workers: concurrent downloads; requests_per_second: None =
  only bounded by max_workers; max_attempts: tries per URL; backoff_s / max_backoff_s: exponential
  backoff; timeout_s: longest wait for the connection or any read; deadline_s: longest one try may
  take in all (redirects, headers and body); max_bytes: larger bodies are failures;
  fallback_to_original, allow_nonstandard_width: see the module docstring."""
  width: int
  user_agent: str
  base_url: str = wit.UPLOAD_BASE_URL
  max_workers: int = 4
  requests_per_second: float | None = None
  max_attempts: int = 6
  backoff_s: float = 1.0
  max_backoff_s: float = 120.0
  timeout_s: float = 30.0
  deadline_s: float = 120.0
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
    for name in ("timeout_s", "deadline_s"):
      if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
        raise InputError(f"fetch: {name} must be a positive number, got {getattr(self, name)!r}")
    if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
      raise InputError(f"fetch: max_bytes must be a positive integer, got {self.max_bytes!r}")
    if _origin(self.base_url) is None:
      raise InputError(f"fetch: base_url must be an http(s) URL, got {self.base_url!r}")


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
  status: int | str  # HTTP status, or the kind of failure ("timeout", "too_large", ...).
  message: str
  retry_after_s: float | None = None
  tries: int = 1

  @property
  def retryable(self) -> bool:
    return self.status in RETRYABLE_STATUSES


class _Pacer:
  """Shared by all workers: spaces requests (requests_per_second) and pauses everyone after a 429."""

  def __init__(self, requests_per_second: float | None):
    self._interval = 1.0 / requests_per_second if requests_per_second else 0.0
    self._lock = threading.Lock()
    self._next_slot = 0.0
    self._paused_until = 0.0

  def wait(self) -> float:
    """Blocks until a request may go; the seconds waited."""
    began = time.monotonic()
    while True:
      with self._lock:
        now = time.monotonic()
        start = max(self._next_slot, self._paused_until)
        if start <= now:
          self._next_slot = now + self._interval
          return now - began
      # No slot is held while sleeping: the check is redone on waking, so a pause announced
      # meanwhile (a 429) holds back requests that were already waiting for their turn.
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


def _origin(url: str) -> tuple[str, str, int] | None:
  """(scheme, host, port) of an http(s) URL; None for anything else or an unreadable port."""
  try:
    parts = urllib.parse.urlsplit(url)
    port = parts.port
  except ValueError:
    return None
  scheme = parts.scheme.lower()
  if scheme not in ("http", "https") or not parts.hostname:
    return None
  return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


class _DeadlineReader(io.RawIOBase):
  """A response's socket reader whose every read waits at most until the request's deadline."""

  def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float):
    super().__init__()
    self._raw, self._sock, self._deadline = raw, sock, deadline
    self._timeout = sock.gettimeout()

  def readable(self) -> bool:
    return True

  def fileno(self) -> int:
    return self._raw.fileno()

  def readinto(self, buffer) -> int:
    remaining = self._deadline - time.monotonic()
    if remaining <= 0:
      raise TimeoutError("deadline passed")
    self._sock.settimeout(remaining if self._timeout is None else min(self._timeout, remaining))
    return self._raw.readinto(buffer)

  def close(self) -> None:
    if not self.closed:
      self._raw.close()  # Releases the socket, as http.client's own reader would.
    super().close()


class _DeadlineResponse(http.client.HTTPResponse):

  def __init__(self, sock, *args, deadline: float, **kwargs):
    super().__init__(sock, *args, **kwargs)
    # Nothing has been read yet, so the buffered reader can be swapped for one over the same socket.
    self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _Request(urllib.request.Request):

  def __init__(self, url: str, deadline: float):
    super().__init__(url)
    self.deadline = deadline


def _connection(connection_class, request, host, **kwargs):
  connection = connection_class(host, **kwargs)
  deadline = getattr(request, "deadline", None)
  if deadline is not None:
    connection.response_class = functools.partial(_DeadlineResponse, deadline=deadline)
  return connection


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):

  def http_open(self, req):
    return self.do_open(functools.partial(_connection, http.client.HTTPConnection, req), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):

  def https_open(self, req):
    # No context: HTTPSConnection builds the default one (certificates and host names checked).
    return self.do_open(functools.partial(_connection, http.client.HTTPSConnection, req), req)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
  """Redirects come back as HTTPErrors: `_Fetcher._get` decides where they may go."""

  def http_error_302(self, req, fp, code, msg, headers):  # pylint: disable=unused-argument
    return None

  http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _Fetcher:
  def __init__(self, settings: FetchSettings, out_dir: str, report: FetchReport,
               failures: dict[str, dict[str, Any]]):
    self.settings, self.out_dir, self.report = settings, out_dir, report
    self.pacer = _Pacer(settings.requests_per_second)
    self.lock = threading.Lock()
    self.failures = failures  # file -> its latest failure, from earlier runs and this one.
    self.origin = _origin(settings.base_url)
    self.opener = urllib.request.build_opener(_DeadlineHTTPHandler(), _DeadlineHTTPSHandler(),
                                              _NoRedirects())
    self.opener.addheaders = [("User-Agent", settings.user_agent)]

  def _count(self, **increments: int) -> None:
    with self.lock:
      for name, value in increments.items():
        setattr(self.report, name, getattr(self.report, name) + value)

  def _get(self, url: str) -> bytes:
    """One try (following same-origin redirects): a complete image's bytes, or a _Failure."""
    s = self.settings
    deadline = None
    for _ in range(MAX_REDIRECTS + 1):
      waited = self.pacer.wait()
      # Time spent waiting for a turn (pauses, pacing) is not the server's.
      deadline = time.monotonic() + s.deadline_s if deadline is None else deadline + waited
      location = self._open(url, deadline)
      if isinstance(location, bytes):
        return location
      try:
        # http.client reads headers as Latin-1: a raw UTF-8 Location is percent-encoded back into
        # its bytes (a non-ASCII URL would make http.client raise outside the failure handling).
        target = urllib.parse.quote(urllib.parse.urljoin(url, location).encode("latin-1"),
                                    safe="%/:=&?~#+!$,;'@()*[]")
      except ValueError:
        raise _Failure("bad_redirect", f"unreadable Location {location!r}") from None
      if _origin(target) != self.origin:
        raise _Failure("offsite_redirect", f"redirect to {target} refused: only "
                       f"{s.base_url} is fetched from")
      url = target
    raise _Failure("too_many_redirects", f"more than {MAX_REDIRECTS} redirects")

  def _open(self, url: str, deadline: float) -> bytes | str:
    """One request: the body, a redirect's Location, or a _Failure."""
    s = self.settings
    timeout = max(1e-3, min(s.timeout_s, deadline - time.monotonic()))
    try:
      with self.opener.open(_Request(url, deadline), timeout=timeout) as response:
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/"):
          raise _Failure("not_an_image", f"Content-Type {content_type!r}")
        expected = response.length  # None when chunked or not given.
        if expected is not None and expected > s.max_bytes:
          raise _Failure("too_large", f"Content-Length {expected} > {s.max_bytes} bytes")
        body = self._read_body(response)
    except urllib.error.HTTPError as e:
      headers = e.headers or {}
      retry_after = retry_after_seconds(headers.get("Retry-After"))
      location = headers.get("Location")
      e.close()
      if e.code in REDIRECT_STATUSES and location:
        return location
      raise _Failure(e.code, f"HTTP {e.code} {e.reason}", retry_after) from None
    except http.client.IncompleteRead as e:
      raise _Failure("incomplete", f"IncompleteRead: {e}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      # URLError, timeouts, resets, TLS errors: all OSErrors or HTTPExceptions, all maybe passing.
      reason = getattr(e, "reason", e)
      kind = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else "network"
      if time.monotonic() >= deadline - 1e-3:  # The socket timeout was cut to the deadline.
        kind = "deadline"
        reason = f"not done within {s.deadline_s} s ({reason})"
      raise _Failure(kind, f"{type(e).__name__}: {reason}") from None
    if expected is not None and len(body) != expected:
      raise _Failure("incomplete", f"{len(body)} of {expected} bytes (Content-Length)")
    decoded = image_decoding.decode_image(body, _CHECK_DECODE)
    if (isinstance(decoded, image_decoding.Rejection)
        and decoded.reason not in _KEPT_REJECTIONS):
      raise _Failure("not_an_image", f"Content-Type {content_type!r}, {decoded}")
    return body

  def _read_body(self, response) -> bytes:
    cap = self.settings.max_bytes
    chunks, total = [], 0
    while True:
      # Asks for at most one byte past the cap: a larger body is refused without reading it all.
      chunk = response.read(min(_READ_CHUNK, cap + 1 - total))
      if not chunk:
        return b"".join(chunks)
      chunks.append(chunk)
      total += len(chunk)
      if total > cap:
        raise _Failure("too_large", f"more than {cap} bytes")

  def _get_with_retries(self, url: str) -> tuple[bytes, int]:
    """(body, tries) or the last _Failure (its `tries` set)."""
    s = self.settings
    for attempt in range(s.max_attempts):
      try:
        return self._get(url), attempt + 1
      except _Failure as failure:
        if not failure.retryable or attempt + 1 == s.max_attempts:
          raise dataclasses.replace(failure, tries=attempt + 1) from None
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
      with self.lock:
        self.report.skipped_existing += 1
        self.failures.pop(file.relative_path, None)
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
        try:
          body, _ = self._get_with_retries(url)
        except _Failure as second:
          raise dataclasses.replace(second, tries=failure.tries + second.tries) from None
    except _Failure as failure:
      self._fail(file, url, path, failure)
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_atomically(path, body)
    with self.lock:
      self.report.downloaded += 1
      self.report.bytes += len(body)
      self.report.originals += int(use_original)
      self.failures.pop(file.relative_path, None)

  def _fail(self, file: wit.CommonsFile, url: str, path: str, failure: _Failure) -> None:
    with self.lock:
      self.report.failed += 1
      self.report.failures_by_status[failure.status] += 1
      previous = self.failures.pop(file.relative_path, None)  # Re-added last: latest at the end.
      self.failures[file.relative_path] = {
          "url": url, "path": path, "file": file.relative_path, "status": failure.status,
          "error": failure.message, "attempts": (previous or {}).get("attempts", 0) + 1,
          "tries": failure.tries,
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _write_atomically(path: str, data: bytes) -> None:
  """Writes to a temporary name, then renames: a kill leaves the old file or the new, whole."""
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_failures(path: str) -> dict[str, dict[str, Any]]:
  """A failures log as {file: its latest entry}; {} if there is none. Lines of logs from before
  one-line-per-file (appended, without "attempts") count as one failed run each."""
  failures: dict[str, dict[str, Any]] = {}
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return failures
  for line in lines:
    try:
      entry = json.loads(line)
    except json.JSONDecodeError:
      continue  # A torn line from an old appending writer.
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
      continue
    attempts = entry.get("attempts")
    attempts = attempts if isinstance(attempts, int) and attempts > 0 else 1
    previous = failures.pop(entry["file"], None)
    failures[entry["file"]] = {**entry, "attempts": attempts + (previous or {}).get("attempts", 0)}
  return failures


def _write_failures(path: str, failures: dict[str, dict[str, Any]]) -> None:
  text = "".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in failures.values())
  _write_atomically(path, text.encode("utf-8"))


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
  failures_log = failures_log or os.path.join(out_dir, FAILURES_LOG)
  fetcher = _Fetcher(settings, out_dir, report, read_failures(failures_log))
  bar = progress_lib.Progress("fetch", "images", len(files), enabled=progress)
  try:
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
  finally:
    # Also after an interruption: what this run learnt about failures is kept.
    with fetcher.lock:
      _write_failures(failures_log, fetcher.failures)
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
              timeout_s: float = 30.0, deadline_s: float = 120.0, max_bytes: int = 50 << 20,
              failures_log: str | None = None, allow_nonstandard_width: bool = False,
              progress: bool = True) -> FetchReport:
  """The `fetch` command: thumbnails of every image in the labels tables and/or WIT files."""
  settings = FetchSettings(width=width, user_agent=user_agent, base_url=base_url,
                           max_workers=max_workers, requests_per_second=requests_per_second,
                           max_attempts=max_attempts, timeout_s=timeout_s,
                           deadline_s=deadline_s, max_bytes=max_bytes,
                           allow_nonstandard_width=allow_nonstandard_width)
  if not labels and not wit_tsv:
    raise InputError("fetch: give labels tables and/or WIT TSV files to take image URLs from")
  files = files_to_fetch(labels=labels, wit_tsv=wit_tsv, extensions=extensions)
  return fetch(files, out_dir, settings, failures_log=failures_log, progress=progress)
