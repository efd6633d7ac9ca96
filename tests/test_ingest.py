"""Ingest: filtering with counts, duplicates, splits by hash, manifest, resume after a kill."""

from __future__ import annotations

import base64
import filecmp
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest

from tests import ingest_inputs
from wikitopics_jax.data import ingest
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError

SETTINGS = ingest.IngestSettings(image_size=16, examples_per_shard=6)


def _read_all(data_dir: str) -> dict[str, list[dict]]:
  m = manifest_lib.read(data_dir)
  out = {}
  for name, split in m.splits.items():
    if not split.files:
      out[name] = []
      continue
    source = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(data_dir, split))
    out[name] = [records.decode_record(source[i]) for i in range(len(source))]
  return out


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
  return ingest_inputs.make_inputs(str(tmp_path_factory.mktemp("inputs")))


@pytest.fixture(scope="session")
def dataset(inputs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ds") / "wit16")
  ingest.run_ingest(out, labels=[inputs.labels], wit_tsv=[inputs.wit_tsv],
                    image_dirs=[inputs.image_dir], settings=SETTINGS, num_workers=1, progress=False)
  return out


def test_counts_filters_and_manifest(dataset, inputs):
  m = manifest_lib.read(dataset)
  counts = m.info["counts"]
  assert counts["filtered"] == inputs.expected_filtered
  assert counts["examples"] == inputs.expected_examples
  assert counts["duplicate_label_rows"] == 1
  assert counts["label_rows"] == len(inputs.rows)
  assert sum(s.num_examples for s in m.splits.values()) == inputs.expected_examples
  assert m.image_shape == (16, 16, 3) and m.image_encoding == "raw"
  assert m.taxonomy.version == "v1.3"
  # Every reason comes with examples naming the table row.
  assert m.info["filtered_examples"]["image_missing"][0].startswith(f"{inputs.labels}:")
  # The malformed WIT row is counted and reported with file and line.
  assert m.info["wit"]["read"]["reasons"] == {"wrong_field_count": 1}
  assert m.info["wit"]["read"]["messages"][0].startswith(f"{inputs.wit_tsv}:")
  with open(inputs.labels, "rb") as f:
    labels_sha256 = hashlib.sha256(f.read()).hexdigest()
  assert [f["sha256"] for f in m.info["inputs"]["labels"]] == [labels_sha256]
  assert len(m.info["inputs"]["wit_tsv"][0]["sha256"]) == 64
  stats = m.info["label_statistics"]
  assert stats["Animals"]["flat"] == sum(s.label_counts[m.taxonomy.index["Animals"]]
                                         for s in m.splits.values())
  assert m.info["settings"]["image_size"] == 16
  # No work files are left behind.
  assert not os.path.exists(os.path.join(dataset, ingest.WORK_DIR))


def test_records_hold_images_labels_and_texts(dataset, inputs):
  tax = taxonomy_lib.load("v1.3")
  m = manifest_lib.read(dataset)
  by_id = {}
  for split, examples in _read_all(dataset).items():
    assert len(examples) == m.splits[split].num_examples
    flat = np.sum([e["labels"] for e in examples], axis=0) if examples else 0
    assert np.array_equal(flat, m.splits[split].label_counts) or not examples
    for e in examples:
      by_id[e["id"]] = (split, e)
  assert len(by_id) == inputs.expected_examples
  split, first = by_id["1000"]
  # Image 0: labels of both table rows, hierarchical closure, first WIT row's texts.
  assert tax.names(first["labels"]) == ["Animals", "History"]
  assert tax.names(first["labels_hier"]) == ["Animals", "Culture", "History", "Nature", "STEM"]
  assert first["page_title"] == "Page 0" and first["caption"] == "Caption 0\nsecond line"
  assert first["url"] == inputs.rows[0]["url"]
  assert first["image"].shape == (16, 16, 3)
  assert np.abs(first["image"].astype(int) - ingest_inputs.colour_of(0)).max() <= 3
  # No WIT row: empty texts.
  assert by_id["1001"][1]["page_title"] == ""
  # Each image is in the split its hash says.
  for image_id, (split, e) in by_id.items():
    assert split == ingest.split_of(wit.parse_image_url(e["url"]).relative_path, SETTINGS.splits)


def test_split_of_is_stable_and_proportional():
  keys = [f"{i % 16:x}/{i % 16:x}{i % 7}/File_{i}.jpg" for i in range(20000)]
  splits = ingest.DEFAULT_SPLITS
  assigned = [ingest.split_of(k, splits) for k in keys]
  for name, fraction in splits:
    assert abs(assigned.count(name) / len(keys) - fraction) < 0.015
  # Growing the dataset or filtering others never moves an image.
  assert [ingest.split_of(k, splits) for k in keys[:100]] == assigned[:100]
  # A larger val fraction only moves images into val.
  wider = (("train", 0.6), ("val", 0.175), ("threshold", 0.075), ("test", 0.15))
  moved = {(old, ingest.split_of(k, wider)) for k, old in zip(keys, assigned)
           if ingest.split_of(k, wider) != old}
  assert moved == {("train", "val")}


def test_rerun_returns_the_finished_dataset_and_refuses_other_settings(dataset, inputs):
  before = os.path.getmtime(os.path.join(dataset, manifest_lib.MANIFEST_NAME))
  ingest.run_ingest(dataset, labels=[inputs.labels], wit_tsv=[inputs.wit_tsv],
                    image_dirs=[inputs.image_dir], settings=SETTINGS, num_workers=1, progress=False)
  assert os.path.getmtime(os.path.join(dataset, manifest_lib.MANIFEST_NAME)) == before
  with pytest.raises(InputError, match="other inputs or settings"):
    ingest.run_ingest(dataset, labels=[inputs.labels], image_dirs=[inputs.image_dir],
                      settings=SETTINGS, num_workers=1, progress=False)


def test_unknown_label_names_file_row_and_label(tmp_path):
  table = tmp_path / "labels.jsonl"
  lines = [{"url": "https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg", "labels": ["Art"]},
           {"url": "https://upload.wikimedia.org/wikipedia/commons/a/ab/B.jpg",
            "labels": ["Art", "Geology & Fossils"]}]
  table.write_text("\n".join(json.dumps(l) for l in lines) + "\n")
  with pytest.raises(InputError, match=r"labels.jsonl:2: unknown label 'Geology & Fossils' for "
                                       r"taxonomy v1.3"):
    ingest.run_ingest(str(tmp_path / "out"), labels=[str(table)], progress=False)


def test_other_encodings_and_center_crop(inputs, tmp_path):
  for encoding in ("jpeg", "png"):
    out = str(tmp_path / encoding)
    settings = ingest.IngestSettings(image_size=16, image_encoding=encoding, resize="center_crop",
                                     examples_per_shard=100, splits=(("all", 1.0),))
    m = ingest.run_ingest(out, labels=[inputs.labels], image_dirs=[inputs.image_dir],
                          settings=settings, num_workers=1, progress=False)
    assert m.image_encoding == encoding
    examples = _read_all(out)["all"]
    # No WIT file here: the mime type filter has nothing to go on, so the GIF passes.
    assert len(examples) == inputs.expected_examples + 1
    e = next(e for e in examples if e["id"] == "1004")
    assert e["image"].shape == (16, 16, 3)
    assert np.abs(e["image"].astype(int) - ingest_inputs.colour_of(4)).max() <= 6


def test_kaggle_inline_pixels(inputs, tmp_path):
  # The pixels of the first 10 images come inline; the rest are missing.
  rows = [r for r in inputs.rows[:10]]
  pixel_file = tmp_path / "train_image_pixels_part-00000.csv"
  lines = [f"{r['url']}\t{base64.b64encode(ingest_inputs.jpeg_bytes(i)).decode()}\thttp://meta"
           for i, r in enumerate(rows)]
  lines.append("https://upload.wikimedia.org/wikipedia/commons/a/ab/Unlabelled.jpg\tAAAA\tm")
  lines.append("broken row")
  pixel_file.write_text("\n".join(lines) + "\n")
  out = str(tmp_path / "kaggle")
  m = ingest.run_ingest(out, labels=[inputs.labels], kaggle_pixels=[str(pixel_file)],
                        settings=ingest.IngestSettings(image_size=16, splits=(("all", 1.0),)),
                        num_workers=1, progress=False)
  assert m.splits["all"].num_examples == 10
  assert m.info["kaggle_pixels"]["images_with_pixels"] == 10
  assert m.info["kaggle_pixels"]["read"]["reasons"] == {"wrong_field_count": 1}
  # 30 labelled JPEGs without pixels, and the 4 broken images of the fixture (no WIT file: the
  # GIF is not caught by its mime type).
  assert m.info["counts"]["filtered"]["image_missing"] == inputs.expected_examples - 10 + 4


_KILLER = textwrap.dedent("""
    import json, os, signal, sys
    from wikitopics_jax.data import ingest, records
    args = json.loads(sys.argv[1])
    original, calls = records.encode_example, [0]

    def dying(**kwargs):
      calls[0] += 1
      if calls[0] == args["die_at"]:
        os.kill(os.getpid(), signal.SIGKILL)  # A crash in the middle of a shard.
      return original(**kwargs)

    records.encode_example = dying
    ingest.run_ingest(args["out"], labels=args["labels"], wit_tsv=args["wit"],
                      image_dirs=args["images"],
                      settings=ingest.IngestSettings(image_size=16, examples_per_shard=4),
                      num_workers=1, progress=False)
""")


def test_killed_run_resumes_to_byte_identical_shards(inputs, tmp_path):
  settings = ingest.IngestSettings(image_size=16, examples_per_shard=4)
  reference = str(tmp_path / "uninterrupted")
  ingest.run_ingest(reference, labels=[inputs.labels], wit_tsv=[inputs.wit_tsv],
                    image_dirs=[inputs.image_dir], settings=settings, num_workers=1,
                    progress=False)
  out = str(tmp_path / "killed")
  args = {"out": out, "labels": [inputs.labels], "wit": [inputs.wit_tsv],
          "images": [inputs.image_dir], "die_at": 15}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(args)], cwd=root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  work = os.path.join(out, ingest.WORK_DIR)
  finished_units = [n for n in os.listdir(work) if n.endswith(".array_record.json")]
  leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
  assert finished_units and leftovers  # Killed mid-way: some units done, one half-written.
  assert not os.path.exists(os.path.join(out, manifest_lib.MANIFEST_NAME))
  # Resume, this time with worker processes: the output must not depend on either.
  ingest.run_ingest(out, labels=[inputs.labels], wit_tsv=[inputs.wit_tsv],
                    image_dirs=[inputs.image_dir], settings=settings, num_workers=2,
                    progress=False)
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  ref_manifest, new_manifest = manifest_lib.read(reference), manifest_lib.read(out)
  assert {k: v.files for k, v in ref_manifest.splits.items()} == \
      {k: v.files for k, v in new_manifest.splits.items()}
  files = [f for s in ref_manifest.splits.values() for f in s.files]
  assert len(files) > 5
  match, mismatch, errors = filecmp.cmpfiles(reference, out, files, shallow=False)
  assert not mismatch and not errors and len(match) == len(files)
  assert ref_manifest.info["counts"] == new_manifest.info["counts"]


def test_training_pipeline_reads_the_ingested_dataset(dataset):
  from wikitopics_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  m = manifest_lib.read(dataset)
  ds = pipeline.train_dataset(dataset, "train", batch_size=4, seed=0, hierarchical=True)
  batch = next(iter(ds))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["labels"].shape == (4, m.taxonomy.num_labels)
