"""Human annotations (v1.4) -> a v1.3 labels table -> an ingested human-labelled split."""

from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

pytest.importorskip("pyarrow")

from wikitopics_jax.data import human_annotations  # pylint: disable=g-import-not-at-top,wrong-import-position
from wikitopics_jax.data import labels_table  # pylint: disable=wrong-import-position
from wikitopics_jax.data import manifest as manifest_lib  # pylint: disable=wrong-import-position
from wikitopics_jax.data import wit  # pylint: disable=wrong-import-position

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "human_annotations")
FILES = [os.path.join(FIXTURES, "annotated_test_sample.parquet"),
         os.path.join(FIXTURES, "annotated_validation_sample.parquet")]


def _rows_by_title(path):
  return {r.title: r for r in labels_table.iter_rows(path)}


def test_convert_maps_v14_to_v13(tmp_path):
  out = str(tmp_path / "human_v13.jsonl")
  report = human_annotations.convert(FILES, out)
  assert report["rows"] == 12 and report["rows_without_labels"] == 2
  assert report["geology_and_fossils_routes"] == {"Fossils": 1, "Geology": 1}
  assert report["unmappable_labels"] == {}
  assert report["labels_not_annotated"] == ["Politics", "Belief"]
  rows = _rows_by_title(out)
  assert rows["Trewavasia carinata.JPG"].labels == ("Fossils", "Nature", "STEM")
  assert rows["Clavius Crater.jpg"].labels == ("Geology", "Landscapes", "Places", "STEM", "Space")
  assert rows["Homemade minestrone.jpg"].labels == ("Culture", "Food")
  assert json.load(open(out + ".report.json"))["rows"] == 12
  # A rerun with the same inputs leaves the file untouched (the ingest's resume check sees it).
  before = os.stat(out).st_mtime_ns
  human_annotations.convert(FILES, out)
  assert os.stat(out).st_mtime_ns == before


@pytest.mark.parametrize("policy,expected", [("both", ("Fossils", "Geology", "Nature", "STEM")),
                                             ("drop", ("Nature", "STEM"))])
def test_geology_and_fossils_policies(tmp_path, policy, expected):
  out = str(tmp_path / "t.jsonl")
  report = human_annotations.convert(FILES, out, geology_and_fossils=policy)
  assert _rows_by_title(out)["Trewavasia carinata.JPG"].labels == expected
  if policy == "drop":
    assert report["unmappable_labels"] == {"Geology & Fossils": 2}


def test_ingest_of_annotations_with_fetched_images(tmp_path):
  table = str(tmp_path / "human16-labels-v1.3.jsonl")
  human_annotations.convert(FILES, table)
  # Stand-ins for what `fetch` puts on disk: one image per URL at its Commons path (an SVG's
  # thumbnail is a PNG rendering kept under the SVG's name).
  image_dir = tmp_path / "thumbs"
  urls = sorted({r.url for r in labels_table.iter_rows(table)})
  for i, url in enumerate(urls):
    path = image_dir / wit.commons_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (i * 20, 50, 90)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
  out = str(tmp_path / "human16")
  m = human_annotations.run_human_ingest(out, annotations=FILES, image_dirs=[str(image_dir)],
                                         image_size=16, num_workers=1, progress=False)
  # The labels table lies beside the dataset; a rerun returns the finished dataset.
  assert os.path.exists(table)
  again = human_annotations.run_human_ingest(out, annotations=FILES, image_dirs=[str(image_dir)],
                                             image_size=16, num_workers=1, progress=False)
  assert again.to_json() == m.to_json()
  assert list(m.splits) == ["human"]
  assert m.splits["human"].num_examples == len(urls) == 11  # 12 rows, one image twice.
  assert m.info["counts"]["filtered"] == {}
  assert m.info["human_labelled_splits"] == ["human"]
  assert m.info["labels_not_annotated"] == ["Politics", "Belief"]
  assert m.info["label_mapping"]["geology_and_fossils_routes"] == {"Fossils": 1, "Geology": 1}
  counts = dict(zip(m.taxonomy.labels, m.splits["human"].label_counts))
  assert counts["Politics"] == counts["Belief"] == 0 and counts["Fossils"] == 1
  import grain  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.data import records  # pylint: disable=g-import-not-at-top
  source = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(out, m.splits["human"]))
  examples = {e["id"]: e for e in (records.decode_record(source[i]) for i in range(len(source)))}
  # The image annotated in both files: the union of both annotations.
  assert m.taxonomy.names(examples["343759"]["labels"]) == ["Culture", "People", "Society"]
  assert sum(not e["labels"].any() for e in examples.values()) == 2
