import jax
import numpy as np
import pytest

from tests import datasets
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.data import records
from wikitopics_jax import sharding
from wikitopics_jax.errors import InputError


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("pipeline") / "data")
  datasets.make_dataset(d, sizes={"train": 96, "val": 37}, image_size=16, shards=3)
  return d


def test_record_roundtrip_raw_and_png():
  image = np.random.default_rng(0).integers(0, 256, (8, 6, 3)).astype(np.uint8)
  labels = np.array([0, 1, 0], np.uint8)
  for encoding in ("raw", "png"):
    data = records.encode_example(example_id="x", image=image, labels=labels, labels_hier=labels,
                                  image_encoding=encoding, url="http://u")
    out = records.decode_record(data)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["labels"], labels)
    assert out["url"] == "http://u"
  with pytest.raises(InputError, match="shard-3.array_record#7: undecodable"):
    records.decode_record(b"\x00garbage", where="shard-3.array_record#7")


def test_train_batches_shapes_dtypes_and_epoch_reshuffle(data_dir):
  ds = pipeline.train_dataset(data_dir, "train", batch_size=16, seed=3, hierarchical=True)
  it = iter(ds)
  batches = [next(it) for _ in range(12)]  # two epochs of 6 batches
  assert batches[0]["image"].shape == (16, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  assert batches[0]["labels"].shape == (16, 31) and batches[0]["labels"].dtype == np.uint8
  epoch1 = np.concatenate([b["image"].reshape(16, -1)[:, :8] for b in batches[:6]])
  epoch2 = np.concatenate([b["image"].reshape(16, -1)[:, :8] for b in batches[6:]])
  # Each epoch sees every example once, in a different order.
  assert len({r.tobytes() for r in epoch1}) == 96
  assert sorted(r.tobytes() for r in epoch1) == sorted(r.tobytes() for r in epoch2)
  assert not np.array_equal(epoch1, epoch2)


def test_hierarchical_switch(data_dir):
  flat = next(iter(pipeline.train_dataset(data_dir, "train", batch_size=8, seed=0, hierarchical=False)))
  hier = next(iter(pipeline.train_dataset(data_dir, "train", batch_size=8, seed=0, hierarchical=True)))
  tax = manifest_lib.read(data_dir).taxonomy
  np.testing.assert_array_equal(tax.close(flat["labels"]), hier["labels"])


def test_iterator_state_resumes_at_the_same_batch(data_dir):
  ds = pipeline.train_dataset(data_dir, "train", batch_size=8, seed=1, hierarchical=True)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["image"] for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(it2)["image"], e)


def test_process_shares_are_disjoint_and_cover(data_dir):
  ids = []
  for index in range(2):
    ds, n = pipeline.eval_dataset(data_dir, "val", batch_size=8, hierarchical=True,
                                  share=pipeline.ProcessShare(index, 2))
    batches = list(ds)
    assert len(batches) == n == 3  # ceil(ceil(37 / 2) / 8): both processes yield the same count
    ids.append([int(i) for b in batches for i, m in zip(b["index"], b["mask"]) if m])
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(37))


def test_eval_padding_and_order(data_dir):
  ds, n = pipeline.eval_dataset(data_dir, "val", batch_size=16, hierarchical=False)
  batches = list(ds)
  assert n == len(batches) == 3
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 37 and not mask[37:].any()
  index = np.concatenate([b["index"] for b in batches])[:37]
  np.testing.assert_array_equal(index, np.arange(37))
  truth = datasets.read_split(data_dir, "val")
  np.testing.assert_array_equal(batches[0]["labels"][3], truth[3]["labels"])


def test_worker_processes_give_the_same_batches(data_dir):
  plain = pipeline.train_dataset(data_dir, "train", batch_size=8, seed=2, hierarchical=True)
  workers = pipeline.train_dataset(data_dir, "train", batch_size=8, seed=2, hierarchical=True,
                                   worker_count=1)
  a, b = iter(plain), iter(workers)
  for _ in range(3):
    np.testing.assert_array_equal(next(a)["image"], next(b)["image"])


def test_global_batch_is_sharded_over_8_fake_devices(data_dir):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  local = next(iter(pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=True)))
  batch = sharding.global_batch(local, mesh)
  assert batch["image"].shape == (16, 16, 16, 3)
  assert len(batch["image"].addressable_shards) == 8
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 16, 16, 3)}
  np.testing.assert_array_equal(np.asarray(batch["labels"]), local["labels"])
  with pytest.raises(InputError, match="config.batch_size=12 is not divisible by the 8 devices"):
    sharding.per_process_batch_size(12, mesh)


def test_missing_manifest_and_split_errors(tmp_path, data_dir):
  with pytest.raises(InputError, match="no dataset manifest"):
    pipeline.train_dataset(str(tmp_path), "train", batch_size=8, seed=0, hierarchical=True)
  with pytest.raises(InputError, match="no split 'test'"):
    pipeline.train_dataset(data_dir, "test", batch_size=8, seed=0, hierarchical=True)


def test_train_rows_of_two_processes_form_the_single_process_global_batch(data_dir):
  single = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, seed=5, hierarchical=True))
  halves = [iter(pipeline.train_dataset(data_dir, "train", batch_size=8, seed=5, hierarchical=True,
                                        share=pipeline.ProcessShare(i, 2))) for i in range(2)]
  seen = [set(), set()]
  for _ in range(6):  # one epoch
    whole = next(single)["image"]
    parts = [next(h)["image"] for h in halves]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for i, part in enumerate(parts):
      seen[i] |= {r.tobytes() for r in part}
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 96


def test_resampled_index_list_and_duplicate_augmentation(data_dir):
  from wikitopics_jax.data import augment  # pylint: disable=g-import-not-at-top
  truth = datasets.read_split(data_dir, "train")
  indices = np.concatenate([np.arange(0, 96, 2), [1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15]])
  is_duplicate = np.zeros(len(indices), bool)
  is_duplicate[48:] = True  # the 16 copies: 64 examples -> 4 batches of 16 per epoch
  plain = pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=False,
                                 indices=indices, is_duplicate=is_duplicate)
  it = iter(plain)
  epoch = np.concatenate([next(it)["image"] for _ in range(4)])
  expected = sorted(truth[i]["image"].tobytes() for i in indices)
  assert sorted(r.tobytes() for r in epoch) == expected
  augmented = pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=False,
                                     indices=indices, is_duplicate=is_duplicate,
                                     augmentations=[augment.DuplicateAugment(p_transpose=1.0)])
  it = iter(augmented)
  epoch_aug = np.concatenate([next(it)["image"] for _ in range(4)])
  originals = {truth[i]["image"].tobytes() for i in indices}
  changed = sum(r.tobytes() not in originals for r in epoch_aug)
  assert changed == 16  # exactly the copies were transformed (transpose always applies)
  again = np.concatenate([next(iter(augmented))["image"]])
  np.testing.assert_array_equal(again, epoch_aug[:16])  # deterministic given the seed


@pytest.mark.parametrize("num_examples", [1, 5, 96, 8191, 70000])
def test_shuffled_order_is_grains_shuffle_over_epochs(num_examples):
  import grain  # pylint: disable=g-import-not-at-top
  reference = grain.MapDataset.range(num_examples).shuffle(seed=2**32 - 3).repeat(None)
  rng = np.random.default_rng(num_examples)
  # Across epochs, including ones whose per-epoch seed wraps past 2**32.
  positions = np.concatenate([np.arange(min(num_examples, 300)),
                              rng.integers(0, 6 * num_examples, 300)])
  expected = [reference[int(p)] % num_examples for p in positions]
  for cache_limit in (0, num_examples):  # per-batch permutation, then whole cached epochs
    order = pipeline.ShuffledOrder(num_examples, 2**32 - 3, epoch_cache_limit=cache_limit)
    np.testing.assert_array_equal(order(positions), expected)


def test_train_batches_are_those_of_grains_per_example_shuffle(data_dir):
  import grain  # pylint: disable=g-import-not-at-top
  source = grain.sources.ArrayRecordDataSource(
      manifest_lib.split_paths(data_dir, manifest_lib.read(data_dir).split("train")))
  shuffled = grain.MapDataset.source(source).shuffle(seed=4).repeat(None)
  it = iter(pipeline.train_dataset(data_dir, "train", batch_size=20, seed=4, hierarchical=False))
  for b in range(10):  # 96 examples: batches straddle epochs
    batch = next(it)
    expected = [records.decode_record(shuffled[b * 20 + r]) for r in range(20)]
    np.testing.assert_array_equal(batch["image"], np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(batch["labels"], np.stack([e["labels"] for e in expected]))


def test_example_info_for_device_augmentation(data_dir):
  from wikitopics_jax.data import augment  # pylint: disable=g-import-not-at-top
  indices = np.concatenate([np.arange(96), np.arange(0, 32)])
  is_duplicate = np.arange(128) >= 96
  kwargs = dict(seed=6, hierarchical=False, indices=indices, is_duplicate=is_duplicate)
  plain = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, **kwargs))
  info = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, emit_example_info=True,
                                     augmentations=[augment.DuplicateAugment(p_transpose=1.0)],
                                     **kwargs))
  halves = [iter(pipeline.train_dataset(data_dir, "train", batch_size=8, emit_example_info=True,
                                        share=pipeline.ProcessShare(i, 2), **kwargs))
            for i in range(2)]
  order = pipeline.ShuffledOrder(128, 6)
  duplicates = 0
  for b in range(10):
    expected, batch = next(plain), next(info)
    assert set(expected) == {"image", "labels"}
    assert set(batch) == {"image", "labels", "index", "is_duplicate"}
    assert batch["index"].dtype == np.uint32 and batch["is_duplicate"].dtype == bool
    np.testing.assert_array_equal(batch["index"], np.arange(b * 16, b * 16 + 16))
    np.testing.assert_array_equal(batch["is_duplicate"], is_duplicate[order(batch["index"])])
    duplicates += batch["is_duplicate"].sum() if b < 8 else 0
    # The host did not augment: the copies come out untouched.
    np.testing.assert_array_equal(batch["image"], expected["image"])
    parts = [next(h) for h in halves]
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  assert duplicates == 32  # the first epoch (8 batches) holds each of the 32 copies once


def test_example_index_wraps_at_2_to_the_32(data_dir):
  it = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=False,
                                   emit_example_info=True))
  state = it.get_state()
  state["next_index"] = 2**32 // 16 - 1  # the batch holding positions 2**32 - 16 .. 2**32 - 1
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["index"], np.arange(2**32 - 16, 2**32))
  np.testing.assert_array_equal(next(it)["index"], np.arange(16))


def test_batch_decoding_of_png_records_and_a_wrong_image_shape(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (8, 6, 3)).astype(np.uint8)
  labels = np.array([0, 1, 1], np.uint8)
  png = records.encode_example(example_id="p", image=image, labels=labels, labels_hier=labels,
                               image_encoding="png")
  image_out, labels_out = np.zeros((8, 6, 3), np.uint8), np.zeros(3, np.uint8)
  records.decode_into(png, image_out, labels_out, where="s#1")
  np.testing.assert_array_equal(image_out, image)
  np.testing.assert_array_equal(labels_out, labels)
  with pytest.raises(InputError, match=r"s#1: example 'p' has image shape \(8, 6, 3\), the manifest "
                                       r"says \(6, 8, 3\)"):
    records.decode_into(png, np.zeros((6, 8, 3), np.uint8), labels_out, where="s#1")
  with pytest.raises(InputError, match="s#1: example 'p' has 3 labels, the manifest's taxonomy has 4"):
    records.decode_into(png, image_out, np.zeros(4, np.uint8), where="s#1")
  with pytest.raises(InputError, match="s#1: undecodable"):
    records.decode_into(b"\x00garbage", image_out, labels_out, where="s#1")


def test_two_worker_processes_give_the_same_train_and_eval_batches(data_dir):
  kwargs = dict(batch_size=8, seed=2, hierarchical=True, emit_example_info=True)
  plain = iter(pipeline.train_dataset(data_dir, "train", **kwargs))
  workers = iter(pipeline.train_dataset(data_dir, "train", worker_count=2, **kwargs))
  for _ in range(5):
    expected, batch = next(plain), next(workers)
    assert set(batch) == set(expected)
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])
  ds, n = pipeline.eval_dataset(data_dir, "val", batch_size=16, hierarchical=False, worker_count=2)
  ref, _ = pipeline.eval_dataset(data_dir, "val", batch_size=16, hierarchical=False)
  batches, expected = list(ds), list(ref)
  assert len(batches) == n == 3
  for batch, want in zip(batches, expected):
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key])
  assert not batches[-1]["image"][37 - 32:].any()  # padding rows are zeros
