"""Text per image: the record fields, WIT text through ingest, the synthetic text model, and the
pipeline's `emit_text`."""

from __future__ import annotations

import gzip
import json
import os

import grain
import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from tests import ingest_inputs
from wikitopics_jax.data import ingest
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.data import records
from wikitopics_jax.data import synthetic
from wikitopics_jax.data import wit


def _read_split(data_dir: str, split: str) -> list[dict]:
  m = manifest_lib.read(data_dir)
  source = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(data_dir, m.split(split)))
  return [records.decode_record(source[i]) for i in range(len(source))]


# ------------------------------------------------------------------------------------- records


def test_record_text_fields_roundtrip_and_join_order():
  image = np.zeros((2, 2, 3), np.uint8)
  labels = np.array([1, 0], np.uint8)
  data = records.encode_example(
      example_id="x", image=image, labels=labels, labels_hier=labels, page_title="P1",
      caption="C1", contexts=[("P1", "S1", "C1"), ("P2", "", "C2")],
      attribution_description="Commons text", alt_text="Alt")
  out = records.decode_record(data)
  assert out["contexts"] == [("P1", "S1", "C1"), ("P2", "", "C2")]
  assert out["attribution_description"] == "Commons text" and out["alt_text"] == "Alt"
  assert records.example_text(out) == "P1\nS1\nC1\nP2\nC2\nCommons text\nAlt"
  with pytest.raises(ValueError, match="page_title, section_title"):
    records.encode_example(example_id="x", image=image, labels=labels, labels_hier=labels,
                           contexts=[("only two", "parts")])


def test_records_without_text_or_with_legacy_text_still_read():
  image = np.zeros((2, 2, 3), np.uint8)
  labels = np.array([1, 0], np.uint8)
  bare = records.decode_record(records.encode_example(example_id="a", image=image, labels=labels,
                                                      labels_hier=labels))
  assert "contexts" not in bare and records.example_text(bare) == ""
  legacy = records.encode_example(example_id="b", image=image, labels=labels, labels_hier=labels,
                                  url="http://u", page_title="Old page", caption="Old caption")
  assert records.example_text(records.decode_record(legacy)) == "Old page\nOld caption"
  image_out, labels_out = np.empty((2, 2, 3), np.uint8), np.empty(2, np.uint8)
  assert records.decode_into(legacy, image_out, labels_out) is None
  assert records.decode_into(legacy, image_out, labels_out, text=True) == "Old page\nOld caption"


# -------------------------------------------------------------------------------------- ingest

CAP = 3


@pytest.fixture(scope="session")
def wit_text_dataset(tmp_path_factory):
  """Image A on four distinct pages (one repeated) over two WIT files, B on one page, C on none."""
  root = str(tmp_path_factory.mktemp("text_inputs"))
  image_dir = os.path.join(root, "images")
  files, rows = {}, []
  for i, name in enumerate(("A.jpg", "B.jpg", "C.jpg")):
    file = wit.file_from_title(name)
    path = os.path.join(image_dir, file.relative_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(ingest_inputs.jpeg_bytes(i))
    files[name] = file
    rows.append({"id": name[0], "title": f"File:{name}", "url": file.url(), "labels": ["Art"]})
  labels = os.path.join(root, "labels.jsonl")
  with open(labels, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  a, b = files["A.jpg"].url(), files["B.jpg"].url()
  header = "\t".join(wit.WIT_COLUMNS)
  first = [
      header,
      ingest_inputs.wit_row(a, page_title="Page one", section_title="History",
                            caption="A on page one"),
      ingest_inputs.wit_row(a.replace("https:", "http:"), page_title="Page two", caption="",
                            attribution="A's Commons description"),
      # The same context again (another language edition's copy): not a new context.
      ingest_inputs.wit_row(a, page_title="Page one", section_title="History",
                            caption="A on page one", attribution="a later description"),
      ingest_inputs.wit_row(b, page_title="B page", caption="", section_title=""),
      ingest_inputs.wit_row(a, page_title="Page three", section_title="Gallery",
                            caption="multi\nline caption"),
  ]
  second = [header, ingest_inputs.wit_row(a, page_title="Page four", caption="over the cap",
                                          alt_text="alt of A")]
  tsvs = []
  for k, lines in enumerate((first, second)):
    tsvs.append(os.path.join(root, f"wit-{k}.tsv.gz"))
    with gzip.open(tsvs[-1], "wt", encoding="utf-8", newline="") as f:
      f.write("\n".join(lines) + "\n")
  out = os.path.join(root, "dataset")
  ingest.run_ingest(out, labels=[labels], wit_tsv=tsvs, image_dirs=[image_dir],
                    settings=ingest.IngestSettings(image_size=16, splits=(("all", 1.0),),
                                                   max_text_contexts=CAP),
                    num_workers=1, progress=False)
  return out


def test_ingest_keeps_every_page_of_an_image_up_to_the_cap(wit_text_dataset):
  by_id = {r["id"]: r for r in _read_split(wit_text_dataset, "all")}
  a, b, c = by_id["A"], by_id["B"], by_id["C"]
  assert a["contexts"] == [("Page one", "History", "A on page one"), ("Page two", "", ""),
                           ("Page three", "Gallery", "multi\nline caption")]
  # Per image, once: the first non-empty value, whichever file holds it.
  assert a["attribution_description"] == "A's Commons description"
  assert a["alt_text"] == "alt of A"
  assert a["page_title"] == "Page one" and a["caption"] == "A on page one"
  assert b["contexts"] == [("B page", "", "")]
  assert "attribution_description" not in b and "alt_text" not in b
  # Ingest always wrote (empty) page_title/caption; contexts only when there are some.
  assert "contexts" not in c and c["page_title"] == c["caption"] == ""
  assert records.example_text(c) == ""


def test_manifest_records_the_text_fields(wit_text_dataset):
  text = manifest_lib.read(wit_text_dataset).text_fields
  assert text["fields"] == ["page_title", "section_title", "reference_description",
                            "attribution_description", "alt_text"]
  assert text["examples"] == 3
  assert text["examples_with"] == {"page_title": 2, "section_title": 1,
                                   "reference_description": 1, "attribution_description": 1,
                                   "alt_text": 1, "any": 2}
  assert text["contexts"] == 4 and text["contexts_dropped"] == 1
  assert text["images_with_dropped_contexts"] == 1
  assert text["max_contexts"] == CAP


def test_a_dataset_without_text_record_loads():
  m = manifest_lib.Manifest(taxonomy=None, image_shape=(2, 2, 3), image_encoding="raw", splits={})
  assert m.text_fields == {}


def test_pipeline_emits_each_example_text_in_order(wit_text_dataset):
  expected = {"A": "Page one\nHistory\nA on page one\nPage two\nPage three\nGallery\n"
                   "multi\nline caption\nA's Commons description\nalt of A",
              "B": "B page", "C": ""}
  ids = [r["id"] for r in _read_split(wit_text_dataset, "all")]
  ds, num_batches = pipeline.eval_dataset(wit_text_dataset, "all", batch_size=2,
                                          hierarchical=False, emit_text=True)
  texts = [t for batch in ds for t, real in zip(batch["text"], batch["mask"]) if real]
  assert num_batches == 2 and texts == [expected[i] for i in ids]
  plain = next(iter(pipeline.eval_dataset(wit_text_dataset, "all", batch_size=2,
                                          hierarchical=False)[0]))
  assert "text" not in plain


# ----------------------------------------------------------------------------------- synthetic

NOISY = dict(num_images=2000, image_size=24, seed=3, label_noise=0.3, text_signal=0.6,
             text_missing_fraction=0.3)


def _all_records(data_dir: str) -> dict[str, dict]:
  m = manifest_lib.read(data_dir)
  return {r["id"]: r for name in m.splits for r in _read_split(data_dir, name)}


@pytest.fixture(scope="session")
def noisy_synthetic(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic_text") / "noisy")
  synthetic.generate(out, num_workers=2, **NOISY)
  return out


def test_synthetic_text_is_deterministic_and_leaves_images_and_labels_alone(noisy_synthetic,
                                                                            tmp_path):
  again = str(tmp_path / "again")
  synthetic.generate(again, num_workers=1, **NOISY)
  for name in sorted(os.listdir(again)):
    with open(os.path.join(again, name), "rb") as x, open(os.path.join(noisy_synthetic, name),
                                                          "rb") as y:
      assert x.read() == y.read(), name
  # Other text settings: other text, the same pixels and labels.
  no_text = str(tmp_path / "no_text")
  synthetic.generate(no_text, num_workers=2, **{**NOISY, "text_missing_fraction": 1.0})
  with_text, without = _all_records(noisy_synthetic), _all_records(no_text)
  assert with_text.keys() == without.keys()
  for i, record in with_text.items():
    np.testing.assert_array_equal(record["image"], without[i]["image"])
    np.testing.assert_array_equal(record["labels"], without[i]["labels"])
    assert records.example_text(without[i]) == ""
  other_seed = str(tmp_path / "other_seed")
  synthetic.generate(other_seed, num_workers=2, **{**NOISY, "seed": 4})
  assert ([records.example_text(r) for r in _all_records(other_seed).values()]
          != [records.example_text(r) for r in with_text.values()])


def _within_binomial(hits: int, trials: int, p: float) -> bool:
  return abs(hits - trials * p) <= 4 * np.sqrt(trials * p * (1 - p)) + 1


def test_synthetic_text_signal_and_missing_fraction_are_as_configured(noisy_synthetic):
  m = manifest_lib.read(noisy_synthetic)
  tax = m.taxonomy
  by_id = _all_records(noisy_synthetic)
  ids = sorted(by_id)
  n = len(ids)
  freqs = synthetic.target_frequencies(tax, 0.003)
  clean, noisy = synthetic._sample_labels(tax, freqs, n, synthetic._chunk_bounds(n, 24),
                                          NOISY["seed"], NOISY["label_noise"])
  np.testing.assert_array_equal(noisy, np.stack([by_id[i]["labels"] for i in ids]).astype(bool))
  vocabulary = synthetic.label_vocabulary(tax)
  label_of_word = {w: tax.index[l] for l, words in vocabulary.items() for w in words}
  has_text = np.array([bool(records.example_text(by_id[i])) for i in ids])
  assert _within_binomial(int((~has_text).sum()), n, NOISY["text_missing_fraction"])
  named = np.zeros_like(clean)
  for row, i in enumerate(ids):
    for word in records.example_text(by_id[i]).lower().split():
      if word in label_of_word:
        named[row, label_of_word[word]] = True
  true = clean & has_text[:, None]
  assert _within_binomial(int((named & true).sum()), int(true.sum()), NOISY["text_signal"])
  # Labels the heuristic (noisy) labels miss are named as often as the kept ones.
  missed = true & ~noisy
  assert missed.sum() > 100
  assert _within_binomial(int((named & missed).sum()), int(missed.sum()), NOISY["text_signal"])
  # Distractors name only wrong labels, and there are some.
  clean_hier = tax.close(clean.astype(np.uint8)).astype(bool)
  distractors = named & ~clean
  assert not (distractors & clean_hier).any()
  assert distractors.sum() > 0.1 * has_text.sum()
  assert m.text_fields["examples_with"]["page_title"] == int(has_text.sum())


def test_text_alone_is_informative_but_does_not_solve_the_task(tmp_path):
  out = str(tmp_path / "defaults")
  synthetic.generate(out, num_images=3000, image_size=24, seed=0)  # Default text settings.
  train, test = _read_split(out, "train"), _read_split(out, "test")
  vectorizer = CountVectorizer(token_pattern=r"\S+", binary=True)
  x_train = vectorizer.fit_transform([records.example_text(r) for r in train])
  x_test = vectorizer.transform([records.example_text(r) for r in test])
  y_train = np.stack([r["labels"] for r in train])
  y_test = np.stack([r["labels"] for r in test])
  aps = []
  for j in range(y_train.shape[1]):
    if y_train[:, j].sum() >= 2 and y_test[:, j].sum() >= 1:
      model = LogisticRegression(max_iter=1000).fit(x_train, y_train[:, j])
      aps.append(average_precision_score(y_test[:, j], model.predict_proba(x_test)[:, 1]))
  assert len(aps) >= 15
  assert 0.35 <= np.mean(aps) <= 0.8, np.mean(aps)


def test_pipeline_train_batches_carry_their_records_text(noisy_synthetic):
  text_of_image = {r["image"].tobytes(): records.example_text(r)
                   for r in _read_split(noisy_synthetic, "train")}
  with_text = iter(pipeline.train_dataset(noisy_synthetic, "train", batch_size=32, seed=1,
                                          hierarchical=False, emit_text=True))
  plain = iter(pipeline.train_dataset(noisy_synthetic, "train", batch_size=32, seed=1,
                                      hierarchical=False))
  for _ in range(3):
    batch, plain_batch = next(with_text), next(plain)
    assert "text" not in plain_batch
    np.testing.assert_array_equal(batch["image"], plain_batch["image"])
    np.testing.assert_array_equal(batch["labels"], plain_batch["labels"])
    assert batch["text"].shape == (32,) and batch["text"].dtype == object
    assert list(batch["text"]) == [text_of_image[image.tobytes()] for image in batch["image"]]
