"""The labels table in every supported format, and its errors."""

from __future__ import annotations

import bz2
import csv
import json

import pytest

from wikitopics_jax.data import labels_table
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

URL_A = "https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg"
URL_B = "https://upload.wikimedia.org/wikipedia/commons/b/bc/B%26C.jpg"
ROWS = [{"id": 1, "title": "A.jpg", "url": URL_A, "labels": ["Art", "Culture"]},
        {"id": 2, "title": "B&C.jpg", "url": URL_B, "labels": []}]
EXPECTED = [("1", "A.jpg", URL_A, ("Art", "Culture")), ("2", "B&C.jpg", URL_B, ())]


def _summary(path):
  return [(r.image_id, r.title, r.url, r.labels) for r in labels_table.iter_rows(str(path))]


def test_json_layouts(tmp_path):
  records = tmp_path / "records.json"
  records.write_text(json.dumps(ROWS))
  assert _summary(records) == EXPECTED
  # pandas DataFrame.to_json() default ("columns") and "split" layouts.
  columns = {k: {str(i): r[k] for i, r in enumerate(ROWS)} for k in ROWS[0]}
  (tmp_path / "columns.json").write_text(json.dumps(columns))
  assert _summary(tmp_path / "columns.json") == EXPECTED
  split = {"columns": list(ROWS[0]), "data": [list(r.values()) for r in ROWS]}
  (tmp_path / "split.json").write_text(json.dumps(split))
  assert _summary(tmp_path / "split.json") == EXPECTED
  compressed = tmp_path / "labels.json.bz2"
  compressed.write_bytes(bz2.compress(json.dumps(ROWS).encode()))
  assert _summary(compressed) == EXPECTED
  lines = tmp_path / "lines.json"  # JSON Lines under a .json name.
  lines.write_text("\n".join(json.dumps(r) for r in ROWS))
  assert _summary(lines) == EXPECTED


def test_csv_label_cells(tmp_path):
  path = tmp_path / "labels.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "title", "url", "labels"])
    writer.writerow([1, "A.jpg", URL_A, "['Art', 'Culture']"])  # pandas' to_csv of a list.
    writer.writerow([2, "B&C.jpg", URL_B, ""])
    writer.writerow([3, "", URL_A, '["Maps & Flags"]'])
    writer.writerow([4, "", URL_A, "Maps & Flags|Places"])
  rows = list(labels_table.iter_rows(str(path)))
  assert [(r.image_id, r.title, r.url, r.labels) for r in rows[:2]] == EXPECTED
  assert rows[2].labels == ("Maps & Flags",) and rows[3].labels == ("Maps & Flags", "Places")
  assert rows[3].where == f"{path}:5"


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = tmp_path / "labels.parquet"
  pq.write_table(pa.Table.from_pylist(ROWS), path)
  assert _summary(path) == EXPECTED


def test_errors(tmp_path):
  with pytest.raises(InputError, match="unknown labels table format"):
    labels_table.table_format("labels.xlsx")
  with pytest.raises(InputError, match="not found"):
    list(labels_table.iter_rows(str(tmp_path / "none.csv")))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
  with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
    list(labels_table.iter_rows(str(bad)))
  no_url = tmp_path / "no_url.jsonl"
  no_url.write_text(json.dumps({"id": 1, "labels": ["Art"]}) + "\n")
  with pytest.raises(InputError, match=r"no_url.jsonl:1: a row needs a 'url'"):
    list(labels_table.iter_rows(str(no_url)))
  not_list = tmp_path / "not_list.jsonl"
  not_list.write_text(json.dumps({"url": URL_A, "labels": [1, 2]}) + "\n")
  with pytest.raises(InputError, match="must be names"):
    list(labels_table.iter_rows(str(not_list)))


def test_unknown_labels_are_listed_with_their_first_row(tmp_path):
  path = tmp_path / "labels.jsonl"
  rows = [{"url": URL_A, "labels": ["Art"]}, {"url": URL_A, "labels": ["Politcs", "Art"]},
          {"url": URL_B, "labels": ["Politcs", "Geology & Fossils"]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  tax = taxonomy_lib.load("v1.3")
  unknown = labels_table.UnknownLabels()
  list(labels_table.check_labels(labels_table.iter_rows(str(path)), tax, unknown))
  with pytest.raises(InputError) as e:
    unknown.raise_if_any(tax)
  message = str(e.value)
  assert message.startswith(f"{path}:2: unknown label 'Politcs' for taxonomy v1.3")
  assert "'Politcs' in 2 rows" in message and f"'Geology & Fossils' in 1 rows (first {path}:3)" in message
