"""`predict` over a folder of image files and over an ingested split, against the evaluate job."""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from tests import datasets
from tests import trained_runs
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.eval import predict
from wikitopics_jax.data import records
from wikitopics_jax.errors import InputError


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  return trained_runs.tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def folder_and_split(run, tmp_path_factory):
  """A folder of PNG and JPEG files (plus a corrupt one), and a dataset split of the same files."""
  _, data_dir = run
  base = tmp_path_factory.mktemp("pictures")
  folder = base / "images"
  (folder / "sub").mkdir(parents=True)
  examples = datasets.read_split(data_dir, "test")[:7]
  files = []
  for k, example in enumerate(examples):
    fmt = "PNG" if k % 2 == 0 else "JPEG"
    name = f"{'sub/' if k == 3 else ''}img{k}.{fmt.lower()}"
    buf = io.BytesIO()
    Image.fromarray(example["image"]).save(buf, format=fmt)
    (folder / name).write_bytes(buf.getvalue())
    files.append((name, fmt.lower(), buf.getvalue(), example))
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (folder / ".hidden.png").write_bytes(b"skipped")

  # The same files as an ingested dataset split, each record keeping its encoded bytes.
  ingested = str(base / "ingested")
  os.makedirs(ingested)
  manifest = manifest_lib.read(data_dir)
  shard = "pics-00000-of-00001.array_record"
  writer = ArrayRecordWriter(os.path.join(ingested, shard), "group_size:1")
  for name, encoding, data, example in files:
    writer.write(records.encode_example(example_id=name, image=data, image_encoding=encoding,
                                        labels=example["labels"], labels_hier=example["labels_hier"],
                                        url=f"https://example.org/{name}"))
  writer.close()
  flat = np.stack([f[3]["labels"] for f in files])
  hier = np.stack([f[3]["labels_hier"] for f in files])
  manifest_lib.write(ingested, manifest_lib.Manifest(
      taxonomy=manifest.taxonomy, image_shape=manifest.image_shape, image_encoding="png",
      splits={"pics": manifest_lib.SplitInfo(files=[shard], num_examples=len(files),
                                             label_counts=flat.sum(0).tolist(),
                                             label_counts_hier=hier.sum(0).tolist())}))
  return str(folder), ingested, [f[0] for f in files]


def test_folder_predictions_equal_the_evaluate_job_on_the_same_images(run, folder_and_split, tmp_path):
  workdir, _ = run
  folder, ingested, names = folder_and_split
  out = str(tmp_path / "out" / "predictions.parquet")
  result = predict.predict(workdir, images_dir=folder, out_path=out)
  assert result.num_images == len(names)
  assert [name for name, _ in result.failed] == ["broken.jpg"]
  assert not os.path.exists(out + ".tmp")

  table = pq.read_table(out)
  labels = manifest_lib.read(ingested).taxonomy.labels
  assert table.column_names == ["id", "path", *(f"prob_{label}" for label in labels), "predicted"]
  rows = table.to_pylist()
  assert sorted(row["id"] for row in rows) == sorted(names)
  assert all(os.path.isabs(row["path"]) and os.path.exists(row["path"]) for row in rows)
  meta = json.loads(table.schema.metadata[b"wikitopics"])
  assert meta["checkpoint_step"] == result.checkpoint_step
  assert [f["file"] for f in meta["failed_files"]] == ["broken.jpg"]
  thresholds = np.array(meta["threshold_values"])
  probs = np.array([[row[f"prob_{label}"] for label in labels] for row in rows])
  # The saved thresholds were tuned on closed labels: their predictions are closed too.
  saved = json.load(open(os.path.join(workdir, "thresholds.json")))
  assert meta["closed"] == saved["close_predictions"] is True
  assert meta["threshold_rules"] == saved["rules"] and meta["thresholds"].startswith("tuned")
  taxonomy = manifest_lib.read(ingested).taxonomy
  for row, p in zip(rows, probs):
    passed = (p >= thresholds).astype(np.uint8)
    assert row["predicted"] == taxonomy.names(taxonomy.close(passed[None])[0])

  # The evaluate job on an ingested split holding the same files gives the same probabilities.
  config = evaluate_job.load_workdir_config(workdir)
  config.data.dir = ingested
  evaluate_job.evaluate(workdir, checkpoint=result.checkpoint_step, split="pics", config_override=config)
  evaluated = evaluate_job.load_predictions(workdir, "pics", result.checkpoint_step)["probs"]
  by_id = dict(zip((row["id"] for row in rows), probs))
  np.testing.assert_allclose(np.stack([by_id[name] for name in names]), evaluated, atol=1e-6)


def test_split_predictions_as_coherent_jsonl(run, folder_and_split, tmp_path):
  workdir, _ = run
  _, ingested, names = folder_and_split
  out = str(tmp_path / "predictions.jsonl")
  result = predict.predict(workdir, data_dir=ingested, split="pics", out_path=out, jsonl=True,
                           coherent=True, thresholds="0.45")
  assert result.num_images == len(names) and result.failed == []
  lines = [json.loads(line) for line in open(out)]
  assert [line["id"] for line in lines] == names
  assert lines[0]["url"] == f"https://example.org/{names[0]}"
  taxonomy = manifest_lib.read(ingested).taxonomy
  for line in lines:
    for label, parents in taxonomy.parents.items():
      for parent in parents:
        # Max constraint: a parent scores at least as high as its child; predicted sets are closed.
        assert line["probabilities"][parent] >= line["probabilities"][label]
        if label in line["predicted"]:
          assert parent in line["predicted"]
    assert line["true_labels"] and set(line["true_labels"]) <= set(taxonomy.labels)


def test_a_folder_where_nothing_decodes_is_an_error_and_writes_nothing(run, tmp_path):
  workdir, _ = run
  folder = tmp_path / "junk"
  folder.mkdir()
  (folder / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "out" / "predictions.parquet"
  with pytest.raises(InputError, match="none of its 2 files could be decoded") as error:
    predict.predict(workdir, images_dir=str(folder), out_path=str(out))
  assert "\n" not in str(error.value) and "a.jpg" in str(error.value)
  assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_bad_requests_are_clear_errors(run, tmp_path):
  workdir, _ = run
  with pytest.raises(InputError, match="either images_dir, or data_dir and split"):
    predict.predict(workdir, out_path=str(tmp_path / "x.parquet"))
  with pytest.raises(InputError, match="not a directory"):
    predict.predict(workdir, images_dir=str(tmp_path / "missing"), out_path=str(tmp_path / "x.parquet"))
