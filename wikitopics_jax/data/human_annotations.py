"""The human annotations (v1.4 labels) as an ingestible v1.3 labels table.

The only human ground truth for this task: 1,087 Commons images labelled by crowd workers, from the
thesis's repository (``annotated_{test,validation}.parquet``; columns ``title, id, url, categories,
labels``). Their labels use taxonomy v1.4; models here train on v1.3. `convert` maps each v1.4 label:

* The 27 names both versions share map to themselves.
* "Geology & Fossils" has two v1.3 counterparts: Geology (under STEM) and Fossils (under STEM >
  Nature). The annotators said only "one of the two", so the choice is made per image
  (`geology_and_fossils`):
    "categories" (default): Fossils if the file's title or one of its Commons categories names a
      fossil (`FOSSIL_PATTERN`: fossil, skeletal mount, skeleton, skull, holotype, dinosaur,
      palaeontology, ammonite, trilobite), else Geology. In the annotations this sends 24 of the 33
      rows to Fossils (dinosaur mounts, ammonites, fossil fish, ...) and 9 to Geology (craters,
      a geological map, volcanic ash, a mineral, a landscape, and two shell drawings).
    "both": Geology and Fossils; every such image then carries one label it does not show.
    "drop": neither (the image keeps its other labels); counted as unmappable.
  The hierarchical closure is taken in v1.3, so a fossil also gets Nature, as in the training data.
* v1.3 labels with no v1.4 counterpart, Politics and Belief, were never offered to the annotators:
  on these images they are unknown, not negative. `LABELS_NOT_ANNOTATED` lists them; the ingest
  records them in the manifest (``info["labels_not_annotated"]``) so that an evaluation leaves
  them out.
* Any other label name is unmappable: dropped and counted in the report.

Images that the annotators gave no label are kept (``keep_unlabelled``): "none of these topics" is an
answer, and all-negative images matter to precision. An image in several rows (3 appear in both the
test and the validation file, with differing labels) gets the union, as every ingest does.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from wikitopics_jax.data import ingest
from wikitopics_jax.data import labels_table
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

SOURCE_VERSION = "v1.4"
TARGET_VERSION = "v1.3"
GEOLOGY_AND_FOSSILS = "Geology & Fossils"
GEOLOGY_AND_FOSSILS_POLICIES = ("categories", "both", "drop")
FOSSIL_PATTERN = re.compile(
    r"fossil|skeletal mount|skeleton|skull|holotype|dinosaur|pal(a)?eontolog|ammonit|trilobit",
    re.IGNORECASE)
LABELS_NOT_ANNOTATED = ("Politics", "Belief")
SPLIT_NAME = "human"


def _shared_names() -> dict[str, tuple[str, ...]]:
  source = taxonomy_lib.load(SOURCE_VERSION)
  target = taxonomy_lib.load(TARGET_VERSION)
  return {name: (name,) for name in source.labels if name in target.index}


def map_labels(labels: Sequence[str], *, title: str, categories: Sequence[str],
               geology_and_fossils: str = "categories") -> tuple[list[str], list[str], str]:
  """v1.4 names -> (v1.3 names, unmappable names, the Geology & Fossils route taken or "")."""
  shared = _shared_names()
  mapped, unmappable, route = [], [], ""
  for name in labels:
    if name in shared:
      mapped.extend(shared[name])
    elif name == GEOLOGY_AND_FOSSILS:
      if geology_and_fossils == "both":
        route = "both"
        mapped.extend(("Geology", "Fossils"))
      elif geology_and_fossils == "drop":
        route = "drop"
        unmappable.append(name)
      else:
        is_fossil = any(FOSSIL_PATTERN.search(text) for text in (title, *categories))
        route = "Fossils" if is_fossil else "Geology"
        mapped.append(route)
    else:
      unmappable.append(name)
  return sorted(set(mapped)), unmappable, route


def _parse_categories(value: Any) -> list[str]:
  if value is None:
    return []
  if isinstance(value, str):
    try:
      return list(labels_table.parse_labels(value, where="categories"))
    except InputError:
      return [value]
  return [str(v) for v in value]


def _read_annotations(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise InputError(f"{path}: annotations file not found")
  if labels_table.table_format(path)[0] != "parquet":
    # The other formats carry no categories column through `labels_table`; read them raw.
    return [{"id": r.image_id, "title": r.title, "url": r.url, "labels": list(r.labels),
             "categories": [], "where": r.where} for r in labels_table.iter_rows(path)]
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
  table = pq.read_table(path, columns=["id", "title", "url", "categories", "labels"])
  rows = table.to_pylist()
  for number, row in enumerate(rows, 1):
    row["where"] = f"{path}: row {number}"
  return rows


def convert(annotation_files: Sequence[str], out_path: str, *,
            geology_and_fossils: str = "categories") -> dict[str, Any]:
  """Writes a v1.3 labels table (JSON Lines) from annotation files; returns the mapping report.

  The file is rewritten only if its content changes (a rerun keeps it, and the ingest that reads it,
  unchanged). The report (also written beside it as ``<out_path>.report.json``) counts rows, labels
  before and after mapping, the Geology & Fossils routes and the unmappable labels.
  """
  if geology_and_fossils not in GEOLOGY_AND_FOSSILS_POLICIES:
    raise InputError(f"geology_and_fossils {geology_and_fossils!r} is not one of "
                     f"{GEOLOGY_AND_FOSSILS_POLICIES}")
  if not annotation_files:
    raise InputError("human annotations: no annotation files given")
  source = taxonomy_lib.load(SOURCE_VERSION)
  out_rows = []
  source_counts, target_counts = collections.Counter(), collections.Counter()
  routes, unmappable = collections.Counter(), collections.Counter()
  unknown = labels_table.UnknownLabels()
  for path in annotation_files:
    for row in _read_annotations(path):
      labels = labels_table.parse_labels(row["labels"], where=row["where"])
      for name in labels:
        if name not in source.index and name != GEOLOGY_AND_FOSSILS:
          unknown.add(name, row["where"])
      source_counts.update(labels)
      mapped, dropped, route = map_labels(
          labels, title=str(row.get("title") or ""),
          categories=_parse_categories(row.get("categories")),
          geology_and_fossils=geology_and_fossils)
      target_counts.update(mapped)
      unmappable.update(dropped)
      if route:
        routes[route] += 1
      out_rows.append({"id": "" if row.get("id") is None else str(row["id"]),
                       "title": str(row.get("title") or ""), "url": str(row.get("url") or ""),
                       "labels": mapped})
  report = {
      "source_taxonomy": SOURCE_VERSION,
      "target_taxonomy": TARGET_VERSION,
      "files": [os.path.abspath(p) for p in annotation_files],
      "rows": len(out_rows),
      "rows_without_labels": sum(not r["labels"] for r in out_rows),
      "geology_and_fossils_policy": geology_and_fossils,
      "geology_and_fossils_routes": dict(sorted(routes.items())),
      "unmappable_labels": dict(sorted(unmappable.items())),
      "labels_not_in_source_taxonomy": dict(sorted(unknown.counts.items())),
      "labels_not_annotated": list(LABELS_NOT_ANNOTATED),
      "source_label_counts": dict(sorted(source_counts.items())),
      "target_label_counts": dict(sorted(target_counts.items())),
  }
  content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows)
  _write_if_changed(out_path, content)
  _write_if_changed(out_path + ".report.json", json.dumps(report, indent=1, ensure_ascii=False))
  return report


def _write_if_changed(path: str, content: str) -> None:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == content:
        return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_open(path) as f:
    f.write(content)


def ingest_settings(*, image_size: int = 64, resize: str = "squash",
                    image_encoding: str = "raw") -> ingest.IngestSettings:
  """Settings for the annotated images: one split, every format (thumbnails of SVG, TIFF or GIF
  files are PNG/JPEG renderings), images without labels kept."""
  return ingest.IngestSettings(image_size=image_size, resize=resize, image_encoding=image_encoding,
                               splits=((SPLIT_NAME, 1.0),), extensions=(), mime_types=(),
                               keep_unlabelled=True, examples_per_shard=10_000)


def extra_info(report: dict[str, Any]) -> dict[str, Any]:
  """Manifest info marking the split as human ground truth, with the labels it cannot judge."""
  return {"human_labelled_splits": [SPLIT_NAME],
          "labels_not_annotated": list(LABELS_NOT_ANNOTATED),
          "label_mapping": {k: v for k, v in report.items()
                            if k not in ("source_label_counts", "target_label_counts")}}


def run_human_ingest(data_dir: str, *, annotations: Sequence[str], image_dirs: Sequence[str],
                     labels_out: str | None = None, image_size: int = 64, resize: str = "squash",
                     image_encoding: str = "raw", geology_and_fossils: str = "categories",
                     num_workers: int | None = None, progress: bool = True
                     ) -> manifest_lib.Manifest:
  """Annotation files -> the v1.3 labels table `labels_out` (default: ``<data_dir>-labels-v1.3.jsonl``
  beside the dataset) -> a dataset with the one split "human" (images from `image_dirs`, e.g. what
  `thumbnails.fetch` downloaded for the annotation files' URLs)."""
  labels_out = labels_out or f"{os.path.abspath(data_dir).rstrip(os.sep)}-labels-{TARGET_VERSION}.jsonl"
  report = convert(annotations, labels_out, geology_and_fossils=geology_and_fossils)
  return ingest.run_ingest(
      data_dir, labels=[labels_out], image_dirs=image_dirs,
      settings=ingest_settings(image_size=image_size, resize=resize, image_encoding=image_encoding),
      extra_info=extra_info(report), num_workers=num_workers, progress=progress)
