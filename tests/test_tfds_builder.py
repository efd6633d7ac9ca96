"""The TFDS export of an ingested dataset: prepared without TensorFlow, read by tfds.data_source and
Grain in a fresh process that never imports our builder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from tests import datasets
from wikitopics_jax.data import tfds_builder

_READER = textwrap.dedent("""
    import json, sys
    import grain
    import tensorflow_datasets as tfds
    source = tfds.data_source(sys.argv[1], data_dir=sys.argv[2], split="train")
    ds = grain.MapDataset.source(source).batch(4)
    batch = ds[0]
    info = tfds.builder(sys.argv[1], data_dir=sys.argv[2]).info
    print(json.dumps({
        "len": len(source), "image": list(batch["image"].shape), "dtype": str(batch["image"].dtype),
        "labels": list(batch["labels"].shape), "ids": sorted(source[i]["id"].decode() for i in range(len(source))),
        "sum_labels": batch["labels"].sum().item(), "label_names": info.metadata["label_names"],
        "wikitopics_imported": "wikitopics_jax.data.tfds_builder" in sys.modules}))
""")


def test_prepare_and_read_with_grain_in_a_fresh_process(tmp_path):
  source = str(tmp_path / "ingested")
  m = datasets.make_dataset(source, sizes={"train": 12, "test": 4}, image_size=16, shards=2)
  tfds_dir = str(tmp_path / "tfds")
  builder = tfds_builder.prepare(source, tfds_dir)
  assert builder.info.splits["train"].num_examples == 12
  name = f"{tfds_builder.NAME}/{m.taxonomy.version}-16px"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _READER, name, tfds_dir], cwd=root,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["len"] == 12 and result["image"] == [4, 16, 16, 3] and result["dtype"] == "uint8"
  assert result["labels"] == [4, m.taxonomy.num_labels] and result["sum_labels"] > 0
  assert result["ids"] == sorted(e["id"] for e in datasets.read_split(source, "train"))
  assert result["label_names"] == list(m.taxonomy.labels)
  assert not result["wikitopics_imported"]
  # Pixels survive the PNG round trip exactly.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  exported = {e["id"].decode(): e for e in tfds.data_source(name, data_dir=tfds_dir, split="test")}
  for example in datasets.read_split(source, "test"):
    assert np.array_equal(exported[example["id"]]["image"], example["image"])
    assert np.array_equal(exported[example["id"]]["labels_hier"], example["labels_hier"])
