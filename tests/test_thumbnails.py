"""`fetch` against local HTTP servers (loopback only: 127.0.0.1, and 127.0.0.2 as "another host")
that misbehave like a busy upload server or a hostile one."""

from __future__ import annotations

import collections
import email.utils
import http.server
import io
import json
import os
import socketserver
import threading
import time
import urllib.parse

import pytest
from PIL import Image

from wikitopics_jax.data import image_decoding
from wikitopics_jax.data import thumbnails
from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError

USER_AGENT = "wikitopics-tests/0.1 (https://example.org/wikitopics; tests@example.org)"


class _HTTPServer(http.server.ThreadingHTTPServer):

  def server_bind(self):
    # Skips HTTPServer's reverse lookup of the address (a DNS query for 127.0.0.2 on some hosts).
    socketserver.TCPServer.server_bind(self)
    self.server_name, self.server_port = self.server_address[:2]


class _Server:
  """Serves PNGs of the requested width; some file names trigger failures (see `respond`), and
  `custom[name](handler, count)` answers requests for `name` instead."""

  def __init__(self, host="127.0.0.1"):
    self.requests: list[tuple[float, str, str]] = []  # (time, path, user agent)
    self.custom = {}
    self.events: dict[str, float] = {}  # What a custom responder did when (server clock).
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

    self.httpd = _HTTPServer((host, 0), Handler)
    self.origin = f"http://{host}:{self.httpd.server_address[1]}"
    self.base_url = f"{self.origin}/wikipedia"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def respond(self, handler):
    path = urllib.parse.unquote(handler.path)
    parts = path.split("/")
    is_thumb = "/thumb/" in path
    name = parts[-2] if is_thumb else parts[-1]
    with self.lock:
      self.counts[name] += 1
      count = self.counts[name]
    if name in self.custom:
      return self.custom[name](handler, count)
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


def _png(width=40, height=20):
  buf = io.BytesIO()
  Image.new("RGB", (width, height), (200, 30, 10)).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg():
  buf = io.BytesIO()
  Image.effect_noise((120, 80), 60).convert("RGB").save(buf, format="JPEG")
  return buf.getvalue()


def _drip(handler, data, pieces, interval):
  """Writes `data` in `pieces` parts, `interval` s apart (stops when the client hangs up)."""
  step = max(1, -(-len(data) // pieces))
  for start in range(0, len(data), step):
    handler.wfile.write(data[start:start + step])
    handler.wfile.flush()
    time.sleep(interval)


def _run(server, tmp_path, names, **overrides):
  files = [(wit.file_from_title(n), None) for n in names]
  out = tmp_path / "thumbs"
  began = time.monotonic()
  report = thumbnails.fetch(files, str(out), _settings(server, **overrides), progress=False)
  log = thumbnails.read_failures(str(out / thumbnails.FAILURES_LOG))
  statuses = {e["file"].rsplit("/", 1)[1]: e["status"] for e in log.values()}
  return report, statuses, log, out, time.monotonic() - began


def _entry(log, name):
  return next(e for e in log.values() if e["file"].endswith("/" + name))


def _saved(out):
  return sorted(n for _, _, fs in os.walk(out) for n in fs if n != thumbnails.FAILURES_LOG)


@pytest.fixture
def other_host(server):  # pylint: disable=unused-argument  (`server` clears the proxy variables)
  try:
    s = _Server("127.0.0.2")  # The whole of 127/8 is loopback on Linux.
  except OSError as e:
    pytest.skip(f"127.0.0.2 is not a local address here: {e}")
  yield s
  s.close()


def test_redirects_stay_on_the_configured_server(server, other_host, tmp_path):
  other_port = _Server()  # Same host, another port: another origin too.
  try:
    def redirect(location, status=302):
      return lambda handler, count: _Server.send(handler, status, b"", "text/html",
                                                 {"Location": location(handler)})
    elsewhere = lambda origin: lambda h: origin + h.path
    server.custom["Offsite_host.jpg"] = redirect(elsewhere(other_host.origin))
    server.custom["Offsite_port.jpg"] = redirect(elsewhere(other_port.origin), 301)
    server.custom["Offsite_scheme.jpg"] = redirect(elsewhere(server.origin.replace("http:",
                                                                                  "https:")))
    # Relative, as servers usually send it; followed, and the target's bytes are saved.
    server.custom["Moved.jpg"] = redirect(lambda h: h.path.replace("Moved.jpg", "Target.jpg"), 307)
    server.custom["Loop.jpg"] = redirect(lambda h: h.path)
    names = ["Offsite_host.jpg", "Offsite_port.jpg", "Offsite_scheme.jpg", "Moved.jpg", "Loop.jpg"]
    report, statuses, _, out, _ = _run(server, tmp_path, names)
  finally:
    other_port.close()

  assert other_host.requests == [] and other_port.requests == []
  assert statuses == {"Offsite_host.jpg": "offsite_redirect",
                      "Offsite_port.jpg": "offsite_redirect",
                      "Offsite_scheme.jpg": "offsite_redirect", "Loop.jpg": "too_many_redirects"}
  assert report.downloaded == 1 and _saved(out) == ["Moved.jpg"]
  assert server.counts["Offsite_host.jpg"] == 1 and server.counts["Offsite_scheme.jpg"] == 1
  assert server.counts["Loop.jpg"] == thumbnails.MAX_REDIRECTS + 1  # Bounded, not retried.
  assert server.counts["Target.jpg"] == 1
  assert {ua for _, _, ua in server.requests} == {USER_AGENT}
  moved = next(out.rglob("Moved.jpg")).read_bytes()
  assert image_decoding.decode_image(moved).shape == (64, 64, 3)


def test_incomplete_or_broken_bodies_are_failures_and_fetched_again(server, tmp_path):
  jpeg, png = _jpeg(), _png()
  broken = {"on": True}

  def serve(bad):
    def respond(handler, count):  # pylint: disable=unused-argument
      if not broken["on"]:
        return _Server.send(handler, 200, png, "image/png")
      return bad(handler)
    return respond

  server.custom["Html.jpg"] = serve(lambda h: _Server.send(
      h, 200, b"<!DOCTYPE html><html><body>Error</body></html>", "image/jpeg"))
  server.custom["Truncated.jpg"] = serve(lambda h: _Server.send(
      h, 200, jpeg[:len(jpeg) // 2], "image/jpeg"))

  def short(handler):  # Promises the whole JPEG, sends half, hangs up.
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(len(jpeg)))
    handler.end_headers()
    handler.wfile.write(jpeg[:len(jpeg) // 2])
  server.custom["Short.jpg"] = serve(short)
  names = ["Html.jpg", "Truncated.jpg", "Short.jpg", "Fine.jpg"]

  report, statuses, log, out, _ = _run(server, tmp_path, names, max_attempts=2)
  assert statuses == {"Html.jpg": "not_an_image", "Truncated.jpg": "not_an_image",
                      "Short.jpg": "incomplete"}
  assert "html" in _entry(log, "Html.jpg")["error"]
  assert "truncated" in _entry(log, "Truncated.jpg")["error"]
  # A short body may be a dropped connection: retried at once; the others are what the server has.
  assert server.counts["Short.jpg"] == 2 and server.counts["Html.jpg"] == 1
  assert report.downloaded == 1 and _saved(out) == ["Fine.jpg"]  # No partial or temporary file.

  broken["on"] = False  # The next run fetches the failures again, and keeps them now.
  again, statuses, log, out, _ = _run(server, tmp_path, names)
  assert again.skipped_existing == 1 and again.downloaded == 3 and again.failed == 0
  assert statuses == {} and log == {}
  assert _saved(out) == sorted(names)


def test_size_cap_from_content_length_and_while_streaming(server, tmp_path):
  cap = 4000
  big = _png(400, 400)
  assert len(big) < cap < 2 * len(_jpeg())

  def declared(handler, count):  # pylint: disable=unused-argument
    # Announces 10 MB and sends slowly: reading it would take far longer than the test allows.
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.send_header("Content-Length", str(10 << 20))
    handler.end_headers()
    _drip(handler, b"\xff" * 6000, 60, 0.05)

  def streamed(handler, count):  # pylint: disable=unused-argument
    # No Content-Length: a body up to the end of the connection, over the cap, then a trickle.
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    handler.wfile.write(_jpeg() + _jpeg())
    _drip(handler, b"\x00" * 6000, 60, 0.05)

  server.custom["Declared_big.jpg"] = declared
  server.custom["Streamed_big.jpg"] = streamed
  server.custom["Under_cap.png"] = lambda h, c: _Server.send(h, 200, big, "image/png")
  report, statuses, _, out, seconds = _run(
      server, tmp_path, ["Declared_big.jpg", "Streamed_big.jpg", "Under_cap.png"], max_bytes=cap,
      timeout_s=1.5, deadline_s=5.0)
  assert statuses == {"Declared_big.jpg": "too_large", "Streamed_big.jpg": "too_large"}
  # Refused at once, not after the 3-s trickle (or the 1.5-s timeout, or the deadline).
  assert seconds < 2.0
  assert report.downloaded == 1 and _saved(out) == ["Under_cap.png"]


def test_deadline_bounds_a_dripping_server(server, tmp_path):
  png = _png()

  def slow_body(handler, count):  # pylint: disable=unused-argument
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(png)))
    handler.end_headers()
    _drip(handler, png, 30, 0.1)  # 3 s for the body; every read gets bytes within timeout_s.

  def slow_headers(handler, count):  # pylint: disable=unused-argument
    head = (f"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n"
            f"X-Padding: {'x' * 60}\r\n\r\n").encode()
    _drip(handler, head + png, 30, 0.1)

  server.custom["Drip_body.png"] = slow_body
  server.custom["Drip_headers.png"] = slow_headers
  report, statuses, _, out, seconds = _run(
      server, tmp_path, ["Drip_body.png", "Drip_headers.png"], deadline_s=1.0, timeout_s=0.5,
      max_attempts=1)
  assert statuses == {"Drip_body.png": "deadline", "Drip_headers.png": "deadline"}
  assert 0.9 < seconds < 2.0
  assert report.failed == 2 and _saved(out) == []


def test_429_pauses_requests_already_waiting_for_their_turn(server, tmp_path):
  def limited(handler, count):
    if count > 1:
      return _Server.send(handler, 200, _png(), "image/png")
    _Server.send(handler, 429, b"slow down", "text/plain", {"Retry-After": "1"})
    server.events["429 sent"] = time.monotonic()
    return None

  server.custom["Limited.jpg"] = limited
  names = ["Limited.jpg"] + [f"Queued_{i}.jpg" for i in range(6)]
  # 5 requests/s: when the 429 comes, the other workers are asleep until their turn.
  report, statuses, _, _, _ = _run(server, tmp_path, names, max_workers=4,
                                   requests_per_second=5.0)
  assert statuses == {} and report.downloaded == len(names) and report.pauses == 1
  sent = server.events["429 sent"]
  later = [t for t, _, _ in server.requests if t > sent]
  assert len(later) >= 3  # The retry and at least the two files never started before the 429.
  assert min(later) >= sent + 0.95  # Nothing went out during the Retry-After pause.


def test_failures_log_keeps_one_line_per_file_with_attempts(server, tmp_path):
  server.custom["Flaky.jpg"] = lambda h, count: (
      _Server.send(h, 403, b"no", "text/html") if count == 1 else
      _Server.send(h, 200, _png(), "image/png"))
  names = ["Gone.jpg", "Flaky.jpg", "Photo.jpg"]

  _, statuses, log, out, _ = _run(server, tmp_path, names)
  assert statuses == {"Gone.jpg": 404, "Flaky.jpg": 403}
  assert [e["attempts"] for e in log.values()] == [1, 1]
  gone = _entry(log, "Gone.jpg")
  assert gone["tries"] == 2 and gone["url"].endswith("/Gone.jpg") and "/thumb/" not in gone["url"]

  _, statuses, log, out, _ = _run(server, tmp_path, names)
  lines = (out / thumbnails.FAILURES_LOG).read_text().splitlines()
  assert len(lines) == 1 and statuses == {"Gone.jpg": 404}  # Flaky came, and left the log.
  entry = json.loads(lines[0])
  assert entry["attempts"] == 2 and entry["status"] == 404 and entry["file"].endswith("Gone.jpg")
  assert set(entry) >= {"url", "path", "file", "status", "error", "attempts", "tries", "time"}
  assert server.counts["Gone.jpg"] == 4 and _saved(out) == ["Flaky.jpg", "Photo.jpg"]


def test_read_failures_collapses_appended_logs(tmp_path):
  log = tmp_path / "fetch_failures.jsonl"
  old = [{"file": "a/ab/A.jpg", "status": 404}, {"file": "b/bc/B.jpg", "status": 503},
         {"file": "a/ab/A.jpg", "status": 404}]
  log.write_text("".join(json.dumps(e) + "\n" for e in old) + '{"file": "torn\n')
  failures = thumbnails.read_failures(str(log))
  assert list(failures) == ["b/bc/B.jpg", "a/ab/A.jpg"]
  assert failures["a/ab/A.jpg"]["attempts"] == 2 and failures["b/bc/B.jpg"]["attempts"] == 1
  assert thumbnails.read_failures(str(tmp_path / "none.jsonl")) == {}
