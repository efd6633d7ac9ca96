"""The synthetic default dataset: determinism, manifest, label statistics, signal, reuse."""

from __future__ import annotations

import os

import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.preprocessing import StandardScaler

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax.data import synthetic
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

SMALL = dict(num_images=1500, image_size=32)


def read_split(data_dir: str, split: manifest_lib.SplitInfo) -> list[dict]:
  source = ArrayRecordDataSource(manifest_lib.split_paths(data_dir, split))
  return [records.decode_record(source[i]) for i in range(len(source))]


def read_all(data_dir: str) -> dict[str, dict]:
  """Example id -> decoded record, over all splits, each with its split name added."""
  examples = {}
  for name, split in manifest_lib.read(data_dir).splits.items():
    for example in read_split(data_dir, split):
      examples[example["id"]] = {**example, "split": name}
  return examples


def shard_bytes(data_dir: str) -> dict[str, bytes]:
  files = sorted(f for f in os.listdir(data_dir) if f.endswith(".array_record"))
  return {f: open(os.path.join(data_dir, f), "rb").read() for f in files}


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("synthetic") / "small")
  synthetic.generate(out_dir, seed=0, num_workers=2, **SMALL)
  return out_dir


@pytest.fixture(scope="session")
def small(small_dir):
  examples = read_all(small_dir)
  ids = sorted(examples)
  return {
      "manifest": manifest_lib.read(small_dir),
      "examples": examples,
      "flat": np.stack([examples[i]["labels"] for i in ids]),
      "hier": np.stack([examples[i]["labels_hier"] for i in ids]),
  }


def test_same_arguments_give_identical_bytes_whatever_the_workers(small_dir, tmp_path):
  one_worker = str(tmp_path / "one_worker")
  synthetic.generate(one_worker, seed=0, num_workers=1, **SMALL)
  assert shard_bytes(one_worker) == shard_bytes(small_dir)
  with open(os.path.join(one_worker, "manifest.json")) as a, \
       open(os.path.join(small_dir, "manifest.json")) as b:
    assert a.read() == b.read()

  other_seed = str(tmp_path / "other_seed")
  synthetic.generate(other_seed, seed=1, num_workers=2, **SMALL)
  assert shard_bytes(other_seed).keys() == shard_bytes(small_dir).keys()
  for name, data in shard_bytes(other_seed).items():
    assert data != shard_bytes(small_dir)[name]


def test_layout_ids_and_split_sizes(small_dir, small):
  m = small["manifest"]
  assert m.image_shape == (32, 32, 3) and m.image_encoding == "raw"
  assert sorted(small["examples"]) == [f"synthetic-{i:06d}" for i in range(1500)]
  assert {n: s.num_examples for n, s in m.splits.items()} == {
      "train": 1050, "val": 150, "threshold": 150, "test": 150}
  assert m.splits["train"].files == ["train-00000-of-00001.array_record"]
  assert sorted(os.listdir(small_dir)) == sorted(
      ["manifest.json"] + [f for s in m.splits.values() for f in s.files])
  info = m.info
  assert info["seed"] == 0 and info["num_images"] == 1500 and info["label_noise"] == 0.0
  assert info["generator_version"] == synthetic.GENERATOR_VERSION
  assert info["target_label_frequency"]["People"] == pytest.approx(86865 / 390000)
  assert info["target_label_frequency"]["Belief"] == 0.003  # 3 / 390,000, floored.
  some = next(iter(small["examples"].values()))
  assert some["image"].shape == (32, 32, 3) and some["image"].dtype == np.uint8


def test_manifest_counts_match_the_records(small_dir, small):
  m = small["manifest"]
  for name, split in m.splits.items():
    examples = read_split(small_dir, split)
    assert len(examples) == split.num_examples
    assert np.stack([e["labels"] for e in examples]).sum(0).tolist() == split.label_counts
    assert np.stack([e["labels_hier"] for e in examples]).sum(0).tolist() == split.label_counts_hier
    ids = [e["id"] for e in examples]
    assert ids == sorted(ids)


def test_hierarchical_labels_are_the_closure_of_the_flat_ones(small):
  tax = small["manifest"].taxonomy
  np.testing.assert_array_equal(small["hier"], tax.close(small["flat"]))
  tax.check_coherent(small["hier"])
  # Leaves' parents appear in the hierarchical view: STEM is rare flat (floor) but common closed.
  stem = tax.index["STEM"]
  assert small["hier"][:, stem].sum() > 5 * small["flat"][:, stem].sum()


def test_flat_frequencies_follow_the_targets(small):
  n = len(small["flat"])
  targets = small["manifest"].info["target_label_frequency"]
  tax = small["manifest"].taxonomy
  for label, p in targets.items():
    count = small["flat"][:, tax.index[label]].sum()
    assert abs(count - n * p) <= 4 * np.sqrt(n * p * (1 - p)) + 1, (label, count, n * p)


def test_every_split_gets_a_share_of_rare_labels(small):
  m = small["manifest"]
  tax = m.taxonomy
  for label in ("Belief", "Food", "STEM"):  # Floor frequency: about 4.5 positives in 1,500.
    total = small["flat"][:, tax.index[label]].sum()
    train = m.splits["train"].label_counts[tax.index[label]]
    assert train >= 0.5 * total, label


def test_labels_under_one_root_cooccur(small):
  tax = small["manifest"].taxonomy
  y = small["flat"].astype(np.float64)

  def root(label):
    return root(tax.parents_of(label)[0]) if tax.parents_of(label) else label

  frequent = [l for l in tax.labels if y[:, tax.index[l]].mean() >= 0.03]
  phi = np.corrcoef(y[:, tax.indices(frequent)], rowvar=False)  # Phi = Pearson on binary labels.
  within, across = [], []
  for a in range(len(frequent)):
    for b in range(a + 1, len(frequent)):
      same_root = root(frequent[a]) == root(frequent[b])
      (within if same_root else across).append(phi[a, b])
  assert len(within) >= 5 and len(across) >= 5
  assert np.mean(within) > 0.08, within
  assert max(within) > 0.15
  assert abs(np.mean(across)) < 0.03, across


def _macro_ap(features, y, train, test, label_columns):
  scaler = StandardScaler().fit(features[train])
  x_train, x_test = scaler.transform(features[train]), scaler.transform(features[test])
  aps = []
  for j in label_columns:
    clf = LogisticRegression(max_iter=1000).fit(x_train, y[train, j])
    aps.append(average_precision_score(y[test, j], clf.decision_function(x_test)))
  return float(np.mean(aps))


def _orientation_energy(images):
  """Log power of the grayscale 2-D FFT in (radius, orientation) bins: fixed, non-linear."""
  size = images.shape[1]
  gray = images.astype(np.float32).mean(axis=3)
  power = np.abs(np.fft.fft2(gray - gray.mean(axis=(1, 2), keepdims=True))) ** 2
  freq = np.fft.fftfreq(size) * size
  radius = np.hypot(freq[:, None], freq[None, :])
  angle = np.mod(np.arctan2(freq[:, None], freq[None, :]), np.pi)
  radius_bin = np.digitize(radius, [2, 3.5, 5, 6.5, 8.5, 10, 12.5, size / 2])
  angle_bin = np.minimum((angle / np.pi * 8).astype(int), 7)
  features = [np.log1p(power[:, (radius_bin == r) & (angle_bin == a)].mean(axis=1))
              for r in range(1, 8) for a in range(8)]
  return np.stack(features, axis=1)


def test_signal_is_in_texture_not_in_mean_colour(small):
  ids = sorted(small["examples"])
  images = np.stack([small["examples"][i]["image"] for i in ids])
  y = small["flat"]
  index = np.arange(len(ids))
  train, test = index[:1000], index[1000:]
  # Labels with enough positives on both sides for a stable average precision.
  columns = [j for j in range(y.shape[1]) if y[train, j].sum() >= 15 and y[test, j].sum() >= 15]
  assert len(columns) >= 8
  positive_rate = y[np.ix_(test, columns)].mean()
  rng = np.random.default_rng(0)
  random_ap = np.mean([average_precision_score(y[test, j], rng.random(len(test)))
                       for j in columns for _ in range(20)])

  mean_colour = images.reshape(len(ids), -1, 3).mean(axis=1)
  mean_colour_ap = _macro_ap(mean_colour, y, train, test, columns)
  assert mean_colour_ap < 1.3 * random_ap, (mean_colour_ap, random_ap)

  texture_ap = _macro_ap(_orientation_energy(images), y, train, test, columns)
  assert texture_ap > 2 * positive_rate and texture_ap > 2 * random_ap, (texture_ap, positive_rate)


def test_label_noise_changes_labels_at_the_requested_rate_but_not_images(small, tmp_path):
  noisy_dir = str(tmp_path / "noisy")
  m = synthetic.generate(noisy_dir, seed=0, label_noise=0.2, **SMALL)
  assert m.info["label_noise"] == 0.2
  noisy = read_all(noisy_dir)
  ids = sorted(noisy)
  clean_flat = small["flat"].astype(bool)
  noisy_flat = np.stack([noisy[i]["labels"] for i in ids]).astype(bool)
  for i in ids[:200]:
    np.testing.assert_array_equal(noisy[i]["image"], small["examples"][i]["image"])
  positives = clean_flat.sum()
  dropped = (clean_flat & ~noisy_flat).sum() / positives
  added = (noisy_flat & ~clean_flat).sum() / positives
  tolerance = 4 * np.sqrt(0.2 * 0.8 / positives)
  assert abs(dropped - 0.2) < tolerance, dropped
  assert 0.2 - tolerance - 0.02 < added < 0.2 + tolerance, added  # A few adds coincide.
  # Added labels are wrong in the hierarchical view too.
  tax = m.taxonomy
  clean_hier = small["hier"].astype(bool)
  assert not (noisy_flat & ~clean_flat & clean_hier).any()
  np.testing.assert_array_equal(np.stack([noisy[i]["labels_hier"] for i in ids]),
                                tax.close(noisy_flat.astype(np.uint8)))


def test_reuse_does_not_rewrite(tmp_path):
  out_dir = str(tmp_path / "reused")
  args = dict(num_images=300, image_size=24, seed=3)
  first = synthetic.generate(out_dir, **args)
  mtimes = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in os.listdir(out_dir)}
  second = synthetic.generate(out_dir, num_workers=1, **args)
  assert {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in os.listdir(out_dir)} == mtimes
  assert second.to_json() == first.to_json()
  assert [f for f in os.listdir(tmp_path) if f != "reused"] == []  # No temporary leftovers.


@pytest.mark.parametrize("changed, mentioned", [
    (dict(seed=4), "seed"),
    (dict(label_noise=0.1), "label_noise"),
    (dict(taxonomy="v1.4"), "taxonomy"),
    (dict(num_shards_per_split=2), "num_shards_per_split"),
])
def test_other_settings_on_an_existing_dataset_are_refused(tmp_path, changed, mentioned):
  out_dir = str(tmp_path / "data")
  args = dict(num_images=300, image_size=24, seed=3)
  synthetic.generate(out_dir, **args)
  with pytest.raises(InputError, match=f"other settings.*{mentioned}"):
    synthetic.generate(out_dir, **{**args, **changed})


def test_refuses_a_non_empty_directory_without_dataset_but_fills_an_empty_one(tmp_path):
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  with pytest.raises(InputError, match="no finished dataset"):
    synthetic.generate(str(foreign), num_images=300, image_size=24)
  assert os.listdir(foreign) == ["notes.txt"]
  empty = tmp_path / "empty"
  empty.mkdir()
  m = synthetic.generate(str(empty), num_images=300, image_size=24)
  assert m.splits["test"].num_examples == 30


def test_a_crash_leaves_no_dataset_behind(tmp_path, monkeypatch):
  calls = []

  def failing_encode(**kwargs):
    calls.append(1)
    if len(calls) > 100:
      raise RuntimeError("disk on fire")
    return records.encode_example(**kwargs)

  monkeypatch.setattr(synthetic.records, "encode_example", failing_encode)
  with pytest.raises(RuntimeError, match="disk on fire"):
    synthetic.generate(str(tmp_path / "data"), num_images=300, image_size=24, num_workers=1)
  assert os.listdir(tmp_path) == []


def test_shards_and_other_taxonomies(tmp_path):
  out_dir = str(tmp_path / "v14")
  m = synthetic.generate(out_dir, num_images=400, image_size=24, taxonomy="v1.4",
                         num_shards_per_split=3)
  assert m.taxonomy.version == "v1.4"
  assert m.splits["train"].files == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
  counts = [len(ArrayRecordDataSource([os.path.join(out_dir, f)])) for f in m.splits["train"].files]
  assert sum(counts) == 280 and max(counts) - min(counts) <= 1
  # "Geology & Fossils" is not in the WIT table: it gets the floor.
  assert m.info["target_label_frequency"]["Geology & Fossils"] == 0.003


def test_every_label_gets_a_distinct_signature():
  for version in taxonomy_lib.shipped_versions():
    tax = taxonomy_lib.load(version)
    signatures = synthetic.label_signatures(tax)
    assert len(set(signatures.values())) == tax.num_labels
  too_many = taxonomy_lib.Taxonomy(version="huge", labels=tuple(f"l{i}" for i in range(100)),
                                   parents={})
  with pytest.raises(InputError, match="at most"):
    synthetic.label_signatures(too_many)


@pytest.mark.parametrize("bad, message", [
    (dict(split_fractions=(("train", 0.5), ("test", 0.4))), "sum to 1"),
    (dict(split_fractions=(("train", 0.5), ("train", 0.5))), "distinct"),
    (dict(split_fractions=(("tr/ain", 0.5), ("test", 0.5))), "split names"),
    (dict(label_noise=1.0), "label_noise"),
    (dict(min_label_freq=0.0), "min_label_freq"),
    (dict(image_size=16), "image_size"),
    (dict(num_images=3), "gets no images"),
    (dict(num_shards_per_split=0), "num_shards_per_split"),
])
def test_bad_arguments_are_input_errors(tmp_path, bad, message):
  with pytest.raises(InputError, match=message):
    synthetic.generate(str(tmp_path / "data"), **{"num_images": 300, "image_size": 24, **bad})
  assert not os.path.exists(tmp_path / "data")
