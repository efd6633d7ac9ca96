"""Reading the WIT (Wikipedia-based Image Text) TSV files, and Wikimedia Commons URLs.

Formats read (header row required; plain or gzip, by the ".gz" suffix):

* WIT: 17 tab-separated columns (`WIT_COLUMNS`), files ``wit_v1.{train,val,test}.all-*.tsv.gz``.
* The Kaggle competition's samples: the same plus ``caption_title_and_reference_description`` (18
  columns); its test samples have only ``id, image_url``. Any header with an ``image_url`` column is
  accepted; rows are read by column name.
* The Kaggle pixel files ``*_image_pixels_part-*.csv[.gz]``: no header, rows
  ``image_url \\t base64(image bytes) \\t metadata_url`` (`iter_kaggle_pixels`).

Text fields may be quoted and span lines (CSV quoting, `"` doubled inside). A bad row never stops the
reading: it is counted in `ReadStats` and described as ``file:line: reason`` (the InputError message
style), and reading goes on with the next row. Malformations handled: a wrong number of fields, an
unterminated quoted field (a runaway quote is caught at the end of the file, or by the field size
limit, which is far above any real WIT text), bytes that are not UTF-8, a truncated gzip stream (the
rest of that file is lost and reported once).

Commons URLs: ``https://upload.wikimedia.org/wikipedia/commons/<h>/<hh>/<File>`` where ``<hh>`` are
the first two hex digits of md5(<File>) (the name with underscores for spaces, UTF-8) and ``<File>`` is
percent-encoded in the URL. `CommonsFile` is the parsed form; its `relative_path` ``<h>/<hh>/<File>``
(decoded name) is the local layout used for image directories, and the key that identifies one image
across WIT rows, labels tables and URL spellings (http/https, percent-encoding, thumbnails).
"""

from __future__ import annotations

import base64
import binascii
import collections
import csv
import dataclasses
import gzip
import hashlib
import io
import urllib.parse
import zlib
from collections.abc import Iterator, Mapping

from wikitopics_jax.errors import InputError

WIT_COLUMNS = (
    "language", "page_url", "image_url", "page_title", "section_title",
    "hierarchical_section_title", "caption_reference_description",
    "caption_attribution_description", "caption_alt_text_description", "mime_type",
    "original_height", "original_width", "is_main_image", "attribution_passes_lang_id",
    "page_changed_recently", "context_page_description", "context_section_description",
)
KAGGLE_EXTRA_COLUMN = "caption_title_and_reference_description"

# Captions in order of preference: the caption shown on the page, else the Commons description, else
# the alt text (the first that is not empty).
CAPTION_COLUMNS = ("caption_reference_description", "caption_attribution_description",
                   "caption_alt_text_description")

UPLOAD_BASE_URL = "https://upload.wikimedia.org/wikipedia"

# Larger than any real WIT text field (the longest context descriptions are a few KB) and small enough
# that a runaway quote swallowing the rest of a 2.5 GB file is stopped early.
MAX_TEXT_FIELD_CHARS = 4 << 20
# A base64 image in the Kaggle pixel files.
MAX_PIXEL_FIELD_CHARS = 256 << 20
# How many malformed-row messages a ReadStats keeps (all are counted).
MAX_KEPT_MESSAGES = 100
# Wikimedia abbreviates thumbnail names of files whose name is longer than this many bytes to
# "<W>px-thumbnail.<ext>" (its file repository's `abbrvThreshold`).
THUMB_NAME_ABBREVIATION_BYTES = 160


@dataclasses.dataclass
class ReadStats:
  """What reading one or more files found: good rows, and malformed ones with reasons."""
  rows: int = 0
  malformed: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list[str] = dataclasses.field(default_factory=list)

  def add_malformed(self, file: str, line: int, reason: str, *, kind: str) -> None:
    self.malformed += 1
    self.reasons[kind] += 1
    if len(self.messages) < MAX_KEPT_MESSAGES:
      self.messages.append(f"{file}:{line}: {reason}")

  def merge(self, other: ReadStats) -> None:
    self.rows += other.rows
    self.malformed += other.malformed
    self.reasons.update(other.reasons)
    self.messages.extend(other.messages[:max(0, MAX_KEPT_MESSAGES - len(self.messages))])

  def to_json(self) -> dict:
    return {"rows": self.rows, "malformed": self.malformed, "reasons": dict(sorted(self.reasons.items())),
            "messages": list(self.messages)}


@dataclasses.dataclass(frozen=True)
class WitRow:
  """One sample row: `fields` by column name, and where it starts (``file:line``)."""
  file: str
  line: int
  fields: Mapping[str, str]

  @property
  def where(self) -> str:
    return f"{self.file}:{self.line}"

  def get(self, column: str) -> str:
    return self.fields.get(column, "")

  @property
  def image_url(self) -> str:
    return self.get("image_url")

  @property
  def page_title(self) -> str:
    return self.get("page_title")

  @property
  def mime_type(self) -> str:
    return self.get("mime_type")

  @property
  def section_title(self) -> str:
    return self.get("section_title")

  @property
  def reference_description(self) -> str:
    """The caption shown under the image on this page."""
    return self.get("caption_reference_description")

  @property
  def attribution_description(self) -> str:
    """The image's description on Commons (the same on every page showing it)."""
    return self.get("caption_attribution_description")

  @property
  def alt_text(self) -> str:
    return self.get("caption_alt_text_description")

  @property
  def caption(self) -> str:
    for column in CAPTION_COLUMNS:
      if self.get(column):
        return self.get(column)
    return ""


def _open_text(path: str) -> io.TextIOBase:
  # surrogateescape: undecodable bytes survive as lone surrogates and are reported per row instead
  # of failing the whole file.
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="")
  return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _is_valid_utf8(fields: list[str]) -> bool:
  try:
    for field in fields:
      field.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _iter_records(path: str, stats: ReadStats, *, max_field_chars: int
                  ) -> Iterator[tuple[int, list[str]]]:
  """(start line, fields) of each CSV record; parse errors are counted and skipped."""
  # Process-wide in the csv module; readers of both kinds of file run in separate processes.
  csv.field_size_limit(max_field_chars)
  with _open_text(path) as f:
    # strict: an unterminated quote at the end of the file is an error, not a silently short row.
    reader = csv.reader(f, delimiter="\t", quotechar='"', strict=True)
    last_line = 0
    while True:
      start = last_line + 1
      try:
        fields = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        message = str(e)
        if "end of data" in message:
          stats.add_malformed(path, start, "unterminated quoted field (the file ends inside it)",
                              kind="unterminated_quote")
        elif "field larger than field limit" in message:
          stats.add_malformed(path, start, f"a field longer than {max_field_chars} characters "
                              f"(a runaway quote?), up to line {reader.line_num}",
                              kind="field_too_long")
        else:
          stats.add_malformed(path, start, f"unparsable row ({message})", kind="unparsable")
        last_line = reader.line_num
        continue
      except (EOFError, OSError, zlib.error) as e:
        # A truncated or corrupt gzip stream: nothing after this point can be read.
        stats.add_malformed(path, start, f"unreadable from here on ({type(e).__name__}: {e})",
                            kind="unreadable_stream")
        return
      last_line = reader.line_num
      if fields:
        yield start, fields


def read_header(path: str) -> tuple[str, ...]:
  """The column names of a WIT-style TSV file (InputError if it has no header row)."""
  stats = ReadStats()
  for _, fields in _iter_records(path, stats, max_field_chars=MAX_TEXT_FIELD_CHARS):
    if "image_url" not in fields:
      raise InputError(f"{path}:1: no header row with an 'image_url' column (expected the WIT "
                       f"columns {', '.join(WIT_COLUMNS)})")
    return tuple(fields)
  raise InputError(f"{path}: empty file (no header row)")


def iter_rows(path: str, stats: ReadStats | None = None) -> Iterator[WitRow]:
  """The sample rows of one WIT TSV file (17 columns, 18 for Kaggle, any header with image_url).

  Malformed rows are skipped and recorded in `stats`; InputError only if the file has no header.
  """
  stats = stats if stats is not None else ReadStats()
  records = _iter_records(path, stats, max_field_chars=MAX_TEXT_FIELD_CHARS)
  header: tuple[str, ...] | None = None
  for line, fields in records:
    if header is None:
      if "image_url" not in fields:
        raise InputError(f"{path}:{line}: no header row with an 'image_url' column (expected the "
                         f"WIT columns {', '.join(WIT_COLUMNS)})")
      header = tuple(fields)
      continue
    if len(fields) != len(header):
      stats.add_malformed(path, line, f"expected {len(header)} tab-separated fields, got "
                          f"{len(fields)}", kind="wrong_field_count")
      continue
    if not _is_valid_utf8(fields):
      stats.add_malformed(path, line, "bytes that are not valid UTF-8", kind="invalid_utf8")
      continue
    stats.rows += 1
    yield WitRow(file=path, line=line, fields=dict(zip(header, fields)))
  if header is None:
    raise InputError(f"{path}: empty file (no header row)")


def iter_kaggle_pixels(path: str, stats: ReadStats | None = None
                       ) -> Iterator[tuple[int, str, bytes]]:
  """(line, image_url, image bytes) of a Kaggle pixel file; bad rows are recorded in `stats`."""
  stats = stats if stats is not None else ReadStats()
  for line, fields in _iter_records(path, stats, max_field_chars=MAX_PIXEL_FIELD_CHARS):
    if len(fields) != 3:
      stats.add_malformed(path, line, f"expected 3 tab-separated fields (image_url, base64 bytes, "
                          f"metadata_url), got {len(fields)}", kind="wrong_field_count")
      continue
    image_url, encoded, _ = fields
    if not image_url:
      stats.add_malformed(path, line, "empty image_url", kind="no_image_url")
      continue
    try:
      image = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
      stats.add_malformed(path, line, "image bytes are not valid base64", kind="invalid_base64")
      continue
    stats.rows += 1
    yield line, image_url, image


@dataclasses.dataclass(frozen=True)
class CommonsFile:
  """An uploaded file of a Wikimedia project: ``project`` ("commons", or a language wiki such as
  "en" for its local files), ``hash_dir`` ("c/c5") and ``name`` (decoded, with underscores)."""
  project: str
  hash_dir: str
  name: str

  @property
  def relative_path(self) -> str:
    """``<h>/<hh>/<File>`` for Commons, ``<project>/<h>/<hh>/<File>`` for other wikis."""
    path = f"{self.hash_dir}/{self.name}"
    return path if self.project == "commons" else f"{self.project}/{path}"

  @property
  def extension(self) -> str:
    """Lower case, without the dot ("" if none)."""
    stem, dot, ext = self.name.rpartition(".")
    return ext.lower() if dot and stem else ""

  def url(self, base_url: str = UPLOAD_BASE_URL) -> str:
    return f"{base_url.rstrip('/')}/{self.project}/{self.hash_dir}/{_quote(self.name)}"

  def thumbnail_url(self, width: int, base_url: str = UPLOAD_BASE_URL) -> str:
    """Wikimedia's scaled rendering, ``.../thumb/<h>/<hh>/<File>/<W>px-<File>``.

    Formats Wikimedia renders to another type get its suffix: SVG -> ``...px-<File>.png``, TIFF ->
    ``lossy-page1-<W>px-<File>.jpg``, PDF/DjVu -> ``page1-<W>px-<File>.jpg``. A name longer than 160
    bytes becomes ``<W>px-thumbnail.<ext>``. Wikimedia refuses to upscale: ask for the original
    (`url`) when the image is not wider than `width`.
    """
    if not isinstance(width, int) or width < 1:
      raise InputError(f"thumbnail width must be a positive integer, got {width!r}")
    ext = self.extension
    if ext == "svg":
      prefix, suffix = f"{width}px-", ".png"
    elif ext in ("tif", "tiff"):
      prefix, suffix = f"lossy-page1-{width}px-", ".jpg"
    elif ext in ("pdf", "djvu"):
      prefix, suffix = f"page1-{width}px-", ".jpg"
    else:
      prefix, suffix = f"{width}px-", ""
    thumb_name = self.name
    if len(self.name.encode("utf-8")) > THUMB_NAME_ABBREVIATION_BYTES:
      thumb_name = f"thumbnail.{ext}" if ext else "thumbnail"
    return (f"{base_url.rstrip('/')}/{self.project}/thumb/{self.hash_dir}/{_quote(self.name)}/"
            f"{prefix}{_quote(thumb_name)}{suffix}")


def _quote(name: str) -> str:
  # Everything but letters, digits and "_.-~" escaped, as in the URLs of WIT and the annotations.
  return urllib.parse.quote(name, safe="")


def hash_dir_of(name: str) -> str:
  """``<h>/<hh>`` for a file name (spaces count as underscores)."""
  digest = hashlib.md5(name.replace(" ", "_").encode("utf-8")).hexdigest()
  return f"{digest[0]}/{digest[:2]}"


def file_from_title(title: str, project: str = "commons") -> CommonsFile:
  """A file from its page title ("File:Some name.jpg" or "Some name.jpg")."""
  name = title.strip()
  if name[:5].lower() == "file:":
    name = name[5:].strip()
  name = name.replace(" ", "_")
  _check_name(name, where=f"file title {title!r}")
  return CommonsFile(project=project, hash_dir=hash_dir_of(name), name=name)


def _check_name(name: str, *, where: str) -> None:
  if not name or name in (".", "..") or "/" in name or "\0" in name or "\\" in name:
    raise InputError(f"{where}: {name!r} is not a valid file name")


def parse_image_url(url: str) -> CommonsFile:
  """An upload URL (original or thumbnail, http or https, any percent-encoding) -> CommonsFile."""
  parsed = urllib.parse.urlsplit(url.strip())
  parts = parsed.path.split("/")
  # ['', 'wikipedia', <project>, ('thumb',) <h>, <hh>, <File>, (<W>px-<File>)]
  if parsed.scheme not in ("http", "https") or len(parts) < 6 or parts[1] != "wikipedia":
    raise InputError(f"image URL {url!r}: not a Wikimedia upload URL "
                     f"(.../wikipedia/<project>/<h>/<hh>/<File>)")
  project, rest = parts[2], parts[3:]
  if rest and rest[0] == "thumb":
    rest = rest[1:4]
  if len(rest) != 3:
    raise InputError(f"image URL {url!r}: expected <h>/<hh>/<File> after the project")
  h, hh, encoded_name = rest
  if len(h) != 1 or len(hh) != 2 or not hh.startswith(h) or any(c not in "0123456789abcdef"
                                                                  for c in hh):
    raise InputError(f"image URL {url!r}: {h}/{hh} is not a hash directory <h>/<hh>")
  try:
    name = urllib.parse.unquote(encoded_name, errors="strict").replace(" ", "_")
  except UnicodeDecodeError:
    raise InputError(f"image URL {url!r}: the file name is not percent-encoded UTF-8") from None
  _check_name(name, where=f"image URL {url!r}")
  return CommonsFile(project=project, hash_dir=f"{h}/{hh}", name=name)


def commons_path(image_url: str) -> str:
  """``<h>/<hh>/<File>`` of an upload URL (decoded name): where the file lies in an image directory."""
  return parse_image_url(image_url).relative_path


def thumbnail_url(image_url: str, width: int, *, base_url: str = UPLOAD_BASE_URL) -> str:
  """The URL of Wikimedia's `width`-pixel-wide rendering of the image at `image_url`."""
  return parse_image_url(image_url).thumbnail_url(width, base_url)
