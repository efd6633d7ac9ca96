"""`fetch` against a local HTTP server (127.0.0.1 only) that misbehaves like a busy upload server."""

from __future__ import annotations

import collections
import email.utils
import http.server
import io
import json
import os
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from wikitopics_jax import image_decoding
from wikitopics_jax import thumbnails
from wikitopics_jax import wit
from wikitopics_jax.errors import InputError

USER_AGENT = "wikitopics-tests/0.1 (https://example.org/wikitopics; tests@example.org)"


class _Server:
  """Serves PNGs of the requested width; some file names trigger failures (see `_respond`)."""

  def __init__(self):
    self.requests: list[tuple[float, str, str]] = []  # (time, path, user agent)
    self.counts: collections.Counter = collections.Counter()
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # pylint: disable=invalid-name
        with server.lock:
          server.in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server.in_flight)
          server.requests.append((time.monotonic(), self.path, self.headers.get("User-Agent")))
        try:
          server.respond(self)
        except (BrokenPipeError, ConnectionResetError):
          pass  # The client gave up (a timeout test).
        finally:
          with server.lock:
            server.in_flight -= 1

      def log_message(self, *args):  # Quiet.
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/wikipedia"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def respond(self, handler):
    path = urllib.parse.unquote(handler.path)
    parts = path.split("/")
    is_thumb = "/thumb/" in path
    name = parts[-2] if is_thumb else parts[-1]
    with self.lock:
      self.counts[name] += 1
      count = self.counts[name]
    time.sleep(0.02)  # Lets concurrent requests overlap.
    if name == "Rate_limited.jpg" and count == 1:
      return self.send(handler, 429, b"slow down", "text/plain", {"Retry-After": "1"})
    if name == "Busy.jpg" and count <= 2:
      return self.send(handler, 503, b"busy", "text/plain")
    if name == "Gone.jpg":
      return self.send(handler, 404, b"not found", "text/html")
    if name == "Slow.jpg" and count == 1:
      time.sleep(1.0)
    if name == "Error_page.jpg":
      return self.send(handler, 200, b"<html>oops</html>", "text/html; charset=utf-8")
    if name == "Small.png" and is_thumb:  # Wikimedia refuses to upscale.
      return self.send(handler, 400, b"bigger than source", "text/html")
    width = int(parts[-1].split("px-")[0]) if is_thumb else 8
    buf = io.BytesIO()
    Image.new("RGB", (width, width // 2), (10, 200, 30)).save(buf, format="PNG")
    return self.send(handler, 200, buf.getvalue(), "image/png")

  @staticmethod
  def send(handler, status, body, content_type, headers=None):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
      handler.send_header(key, value)
    handler.end_headers()
    handler.wfile.write(body)

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)  # Never route the test traffic anywhere else.
  s = _Server()
  yield s
  s.close()


def _settings(server, **overrides):
  values = dict(width=40, user_agent=USER_AGENT, base_url=server.base_url, max_workers=3,
                backoff_s=0.05, max_backoff_s=0.2, timeout_s=0.5, max_attempts=4)
  values.update(overrides)
  return thumbnails.FetchSettings(**values)


NAMES = [f"Photo_{i}.jpg" for i in range(12)] + [
    "Rate_limited.jpg", "Busy.jpg", "Gone.jpg", "Slow.jpg", "Error_page.jpg", "Small.png",
    "Tiny_known.jpg", "Caf%C3%A9_ok.jpg"]


def test_fetch_downloads_retries_and_logs_failures(server, tmp_path):
  files = [(wit.file_from_title(urllib.parse.unquote(n)), 10 if n == "Tiny_known.jpg" else None)
           for n in NAMES]
  out = tmp_path / "thumbs"
  present = files[0][0]  # Already on disk: not requested again.
  (out / present.hash_dir).mkdir(parents=True)
  (out / present.relative_path).write_bytes(b"old")
  report = thumbnails.fetch(files, str(out), _settings(server), progress=False)

  assert report.requested == len(NAMES) and report.skipped_existing == 1
  assert report.failed == 2 and report.downloaded == len(NAMES) - 3
  assert dict(report.failures_by_status) == {404: 1, "not_an_image": 1}
  assert report.originals == 2  # Tiny_known (known to be small) and Small (400 -> original).
  assert report.retries >= 4 and report.pauses >= 1
  # Every image is decodable and where ingest looks for it.
  for file, _ in files[1:]:
    if file.name in ("Gone.jpg", "Error_page.jpg"):
      assert not (out / file.relative_path).exists()
      continue
    data = (out / file.relative_path).read_bytes()
    assert not isinstance(image_decoding.decode_image(data), image_decoding.Rejection)
  assert (out / present.relative_path).read_bytes() == b"old"
  paths = [p for _, p, _ in server.requests]
  assert not any(present.name in p for p in paths)
  # The User-Agent went with every request; concurrency stayed bounded.
  assert {ua for _, _, ua in server.requests} == {USER_AGENT}
  assert 1 < server.max_in_flight <= 3
  # Retry-After: 1 was honoured.
  limited = [t for t, p, _ in server.requests if "Rate_limited" in p]
  assert len(limited) == 2 and limited[1] - limited[0] >= 0.95
  assert server.counts["Busy.jpg"] == 3
  assert server.counts["Gone.jpg"] == 2  # The thumbnail's 404, then the original's.
  assert server.counts["Slow.jpg"] == 2  # Timed out once, then fetched.
  # Thumbnail URLs at the requested width; originals for the small ones.
  assert any(p.endswith("/40px-Photo_1.jpg") and "/thumb/" in p for p in paths)
  assert any(p.endswith("/Tiny_known.jpg") and "/thumb/" not in p for p in paths)
  # Failures log: one JSON object per failed image.
  log = [json.loads(l) for l in (out / thumbnails.FAILURES_LOG).read_text().splitlines()]
  assert sorted((e["file"].rsplit("/", 1)[1], e["status"]) for e in log) == [
      ("Error_page.jpg", "not_an_image"), ("Gone.jpg", 404)]
  assert not [n for _, _, fs in os.walk(out) for n in fs if ".tmp-" in n]

  # A rerun only retries the failures.
  server.requests.clear()
  again = thumbnails.fetch(files, str(out), _settings(server), progress=False)
  assert again.skipped_existing == len(NAMES) - 2 and again.failed == 2 and again.retries == 0
  assert len(server.requests) == 3  # Gone.jpg (thumbnail, original) and Error_page.jpg.


def test_user_agent_is_required_and_widths_are_wikimedias():
  for agent in ("", "   ", None):
    with pytest.raises(InputError, match="User-Agent"):
      thumbnails.FetchSettings(width=120, user_agent=agent)
  with pytest.raises(InputError, match="use 120"):
    thumbnails.FetchSettings(width=64, user_agent=USER_AGENT)
  assert thumbnails.FetchSettings(width=64, user_agent=USER_AGENT, allow_nonstandard_width=True)


def test_retry_after_values():
  assert thumbnails.retry_after_seconds("7") == 7.0
  assert thumbnails.retry_after_seconds(None) is None
  assert thumbnails.retry_after_seconds("soon") is None
  now = 1_700_000_000.0
  date = email.utils.formatdate(now + 30, usegmt=True)
  assert thumbnails.retry_after_seconds(date, now=now) == pytest.approx(30, abs=1)
  assert thumbnails.retry_after_seconds("999999") == thumbnails.MAX_RETRY_AFTER_S


def test_run_fetch_takes_urls_from_tables_and_wit(server, tmp_path):
  table = tmp_path / "labels.jsonl"
  rows = [{"url": wit.file_from_title("A.jpg").url(), "labels": ["Art"]},
          {"url": wit.file_from_title("B.svg").url(), "labels": ["Art"]}]
  table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  wit_file = os.path.join(os.path.dirname(__file__), "fixtures", "wit_sample",
                          "train-00000-of-00009.tsv")
  out = tmp_path / "thumbs"
  report = thumbnails.run_fetch(str(out), width=40, user_agent=USER_AGENT, labels=[str(table)],
                                wit_tsv=[wit_file], extensions=("jpg",), base_url=server.base_url,
                                progress=False)
  # A.jpg, and the 3 WIT images (MGS_logo.JPG counts as jpg); not the SVG.
  assert report.requested == 4 and report.downloaded == 4
  assert (out / "0/07/Noctilio_albiventris.jpg").exists()


def test_requests_per_second_spaces_requests(server, tmp_path):
  files = [(wit.file_from_title(f"Paced_{i}.jpg"), None) for i in range(6)]
  thumbnails.fetch(files, str(tmp_path / "t"), _settings(server, requests_per_second=10.0),
                   progress=False)
  times = sorted(t for t, _, _ in server.requests)
  assert len(times) == 6 and times[-1] - times[0] >= 0.45
