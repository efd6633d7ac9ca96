"""The labels table: which topics each image has, as the thesis kept it (``id, title, url, labels``).

One row per image (duplicates are allowed; `ingest` unions their labels). Columns:
  id      optional; the Commons page id (any string); kept as the example's id.
  title   optional; the file's title ("File:Name.jpg" or "Name.jpg"), used when there is no url.
  url     the image's upload URL (also accepted under the name ``image_url``).
  labels  label names of one taxonomy version.

Formats, by file name (optionally compressed: ``.bz2`` or ``.gz``):
  .json     an array of row objects; or pandas' ``to_json`` layouts "columns" ({column: {index:
            value}}) and "split" ({"columns": [...], "data": [[...]]}); or JSON Lines.
  .jsonl    JSON Lines: one row object per line (streamed; the format for tables of millions).
  .csv      a header row; ``labels`` as a JSON list (``["Art", "History"]``), a Python list as
            pandas writes it (``['Art', 'History']``), or names separated by ``|``.
  .parquet  a list<string> (or string, as in CSV) ``labels`` column; needs pyarrow.

Rows are reported as ``file:line`` (CSV, JSON Lines) or ``file: row N`` (1-based data rows of JSON
arrays and Parquet), the style of InputError messages.
"""

from __future__ import annotations

import ast
import bz2
import collections
import csv
import dataclasses
import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

FORMATS = ("json", "jsonl", "csv", "parquet")
LABEL_SEPARATOR = "|"
# At most this many unknown labels are listed in one error message.
_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class LabelRow:
  where: str
  image_id: str
  title: str
  url: str
  labels: tuple[str, ...]


def table_format(path: str) -> tuple[str, str]:
  """(format, compression) of a labels table from its name; compression is "", "bz2" or "gz"."""
  name = os.path.basename(path).lower()
  compression = ""
  for suffix in ("bz2", "gz"):
    if name.endswith("." + suffix):
      compression, name = suffix, name[:-len(suffix) - 1]
  fmt = name.rpartition(".")[2]
  if fmt == "ndjson":
    fmt = "jsonl"
  if fmt not in FORMATS:
    raise InputError(f"{path}: unknown labels table format; name it *.json, *.jsonl, *.csv or "
                     f"*.parquet (optionally .bz2/.gz compressed)")
  if fmt == "parquet" and compression:
    raise InputError(f"{path}: Parquet files compress internally; do not wrap them in {compression}")
  return fmt, compression


def _open_text(path: str, compression: str) -> io.TextIOBase:
  if compression == "bz2":
    return bz2.open(path, "rt", encoding="utf-8", newline="")
  if compression == "gz":
    return gzip.open(path, "rt", encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def iter_rows(path: str) -> Iterator[LabelRow]:
  """The rows of one labels table, label names as written (not yet checked against a taxonomy)."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: labels table not found")
  fmt, compression = table_format(path)
  try:
    if fmt == "csv":
      yield from _csv_rows(path, compression)
    elif fmt == "jsonl":
      yield from _jsonl_rows(path, compression)
    elif fmt == "json":
      yield from _json_rows(path, compression)
    else:
      yield from _parquet_rows(path)
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: unreadable labels table ({type(e).__name__}: {e})") from None


def _row(where: str, values: Mapping[str, Any]) -> LabelRow:
  url = values.get("url")
  if url is None or url == "":
    url = values.get("image_url")
  title = values.get("title")
  if not url and not title:
    raise InputError(f"{where}: a row needs a 'url' (or 'title'); columns here: {sorted(values)}")
  if "labels" not in values:
    raise InputError(f"{where}: no 'labels' column; columns here: {sorted(values)}")
  image_id = values.get("id")
  return LabelRow(where=where, image_id="" if image_id is None else str(image_id),
                  title="" if title is None else str(title), url="" if url is None else str(url),
                  labels=parse_labels(values["labels"], where=where))


def parse_labels(value: Any, *, where: str) -> tuple[str, ...]:
  """A labels cell (list, JSON/Python list text, or "a|b") -> label names."""
  if value is None:
    return ()
  if isinstance(value, float) and value != value:  # NaN: pandas' empty cell.
    return ()
  if isinstance(value, str):
    text = value.strip()
    if not text:
      return ()
    if text.startswith("["):
      try:
        value = json.loads(text)
      except json.JSONDecodeError:
        try:
          value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
          raise InputError(f"{where}: labels {text[:80]!r} are not a list") from None
    else:
      value = [name.strip() for name in text.split(LABEL_SEPARATOR)]
  if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
    raise InputError(f"{where}: labels must be a list of names, got {type(value).__name__}")
  names = value.tolist() if hasattr(value, "tolist") else list(value)
  bad = [n for n in names if not isinstance(n, str)]
  if bad:
    raise InputError(f"{where}: labels must be names (strings), got {bad[:3]!r}")
  return tuple(n for n in names if n)


def _csv_rows(path: str, compression: str) -> Iterator[LabelRow]:
  with _open_text(path, compression) as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
      raise InputError(f"{path}: empty CSV (no header row)")
    last_line = 1
    for values in reader:
      where = f"{path}:{last_line + 1}"
      last_line = reader.line_num
      if None in values:
        raise InputError(f"{where}: more fields than the header has ({len(reader.fieldnames)})")
      yield _row(where, values)


def _jsonl_rows(path: str, compression: str) -> Iterator[LabelRow]:
  with _open_text(path, compression) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        values = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(values, dict):
        raise InputError(f"{where}: a JSON Lines row must be an object")
      yield _row(where, values)


def _json_rows(path: str, compression: str) -> Iterator[LabelRow]:
  with _open_text(path, compression) as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # Several documents: JSON Lines under a .json name.
      yield from _jsonl_rows(path, compression)
      return
    raise InputError(f"{path}: not valid JSON ({e})") from None
  if isinstance(data, list):
    rows: Iterable[Any] = data
  elif isinstance(data, dict) and "columns" in data and "data" in data:
    rows = (dict(zip(data["columns"], values)) for values in data["data"])
  elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
    index = list(next(iter(data.values())))
    rows = ({column: data[column].get(i) for column in data} for i in index)
  else:
    raise InputError(f"{path}: expected an array of row objects (or pandas' 'columns'/'split' "
                     f"layout)")
  for number, values in enumerate(rows, 1):
    where = f"{path}: row {number}"
    if not isinstance(values, dict):
      raise InputError(f"{where}: a row must be an object")
    yield _row(where, values)


def _parquet_rows(path: str) -> Iterator[LabelRow]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the "
                     f"table to JSON Lines or CSV") from None
  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    # pyarrow raises its own error types for files that are not Parquet.
    raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
  wanted = [c for c in ("id", "title", "url", "image_url", "labels")
            if c in parquet.schema_arrow.names]
  number = 0
  for batch in parquet.iter_batches(columns=wanted, batch_size=65536):
    for values in batch.to_pylist():
      number += 1
      yield _row(f"{path}: row {number}", values)


@dataclasses.dataclass
class UnknownLabels:
  """Label names a taxonomy lacks: how many rows use each, and the first such row."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  first_row: dict[str, str] = dataclasses.field(default_factory=dict)

  def add(self, name: str, where: str) -> None:
    self.counts[name] += 1
    self.first_row.setdefault(name, where)

  def raise_if_any(self, tax: taxonomy_lib.Taxonomy) -> None:
    if not self.counts:
      return
    ranked = self.counts.most_common()
    first_name = ranked[0][0]
    listed = "; ".join(f"{name!r} in {count} rows (first {self.first_row[name]})"
                       for name, count in ranked[:_MAX_LISTED])
    more = f" and {len(ranked) - _MAX_LISTED} more" if len(ranked) > _MAX_LISTED else ""
    raise InputError(f"{self.first_row[first_name]}: unknown label {first_name!r} for taxonomy "
                     f"{tax.version}; {len(ranked)} unknown labels: {listed}{more}. Valid labels: "
                     f"{list(tax.labels)}")


def check_labels(rows: Iterable[LabelRow], tax: taxonomy_lib.Taxonomy,
                 unknown: UnknownLabels) -> Iterator[LabelRow]:
  """Passes rows through, noting the label names `tax` lacks in `unknown`."""
  for row in rows:
    for name in row.labels:
      if name not in tax.index:
        unknown.add(name, row.where)
    yield row


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes a labels table as JSON Lines (``id, title, url, labels``), atomically."""
  with files.atomic_open(path) as f:
    for row in rows:
      f.write(json.dumps({k: row[k] for k in ("id", "title", "url", "labels") if k in row},
                         ensure_ascii=False) + "\n")
