"""Augmentation transforms: geometry is right, duplicates only, deterministic given the seed."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from wikitopics_jax import augment


def _image(size=9, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _dataset(n=6, size=16, duplicates=None):
  duplicates = duplicates if duplicates is not None else [i % 2 == 1 for i in range(n)]
  return grain.MapDataset.range(n).map(
      lambda i: {"image": _image(size, seed=i), "labels": np.array([i, 1], np.uint8),
                 "is_duplicate": np.bool_(duplicates[i])})


def test_affine_quarter_turns_shifts_and_identity():
  image = _image()
  assert np.array_equal(augment.affine(image), image)
  assert np.array_equal(augment.affine(image, rotation_deg=90), np.rot90(image))
  assert np.array_equal(augment.affine(image, rotation_deg=-90), np.rot90(image, -1))
  shifted = augment.affine(image, shift=(0, 2 / 9), border="constant")
  assert np.array_equal(shifted[:, 2:], image[:, :-2]) and not shifted[:, :2].any()
  # Zoom 2x: the centre pixel stays, the image grows around it.
  zoomed = augment.affine(image, scale=2.0)
  assert np.array_equal(zoomed[4, 4], image[4, 4])
  # Reflect-101 borders mirror without repeating the edge pixel.
  reflected = augment.affine(image, shift=(0, 2 / 9), border="reflect")
  assert np.array_equal(reflected[:, 0], image[:, 2]) and np.array_equal(reflected[:, 1], image[:, 1])


def test_naive_augment_is_deterministic_and_keeps_labels():
  ds = _dataset().random_map(augment.NaiveAugment(), seed=7)
  first = [ds[i] for i in range(len(ds))]
  again = _dataset().random_map(augment.NaiveAugment(), seed=7)
  other = _dataset().random_map(augment.NaiveAugment(), seed=8)
  for i, element in enumerate(first):
    assert element["image"].shape == (16, 16, 3) and element["image"].dtype == np.uint8
    assert np.array_equal(element["image"], again[i]["image"])
    assert np.array_equal(element["labels"], [i, 1])
  assert any(not np.array_equal(first[i]["image"], other[i]["image"]) for i in range(len(ds)))
  assert any(not np.array_equal(first[i]["image"], _image(16, seed=i)) for i in range(len(ds)))
  # Order of reading does not matter (per-index generators), nor do worker threads.
  assert np.array_equal(ds[3]["image"], first[3]["image"])


def test_naive_augment_with_only_flip():
  flips_only = augment.NaiveAugment(rotation_deg=0, zoom=0, shift=0)
  ds = _dataset(n=20).random_map(flips_only, seed=0)
  flipped = 0
  for i in range(20):
    out, original = ds[i]["image"], _image(16, seed=i)
    assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])
    flipped += np.array_equal(out, original[:, ::-1])
  assert 3 <= flipped <= 17


def test_duplicate_augment_touches_only_duplicates():
  ds = _dataset(n=8).random_map(augment.DuplicateAugment(), seed=1)
  changed = [not np.array_equal(ds[i]["image"], _image(16, seed=i)) for i in range(8)]
  assert not any(changed[0::2])  # Originals untouched.
  assert any(changed[1::2])
  for i in range(8):
    assert ds[i]["image"].shape == (16, 16, 3) and ds[i]["image"].dtype == np.uint8


@pytest.mark.parametrize("op,expected", [
    ("p_transpose", lambda x: np.swapaxes(x, 0, 1)),
    ("p_horizontal_flip", lambda x: x[:, ::-1]),
    ("p_vertical_flip", lambda x: x[::-1]),
])
def test_duplicate_augment_single_operations(op, expected):
  off = dict(p_transpose=0.0, p_horizontal_flip=0.0, p_vertical_flip=0.0,
             p_shift_scale_rotate=0.0, p_coarse_dropout=0.0)
  transform = augment.DuplicateAugment(**{**off, op: 1.0})
  element = {"image": _image(), "is_duplicate": True}
  out = transform.random_map(element, np.random.default_rng(0))
  assert np.array_equal(out["image"], expected(element["image"]))


def test_coarse_dropout_blanks_holes():
  image = np.full((64, 64, 3), 200, np.uint8)
  transform = augment.DuplicateAugment(p_transpose=0, p_horizontal_flip=0, p_vertical_flip=0,
                                       p_shift_scale_rotate=0, p_coarse_dropout=1.0)
  out = transform.random_map({"image": image, "is_duplicate": True}, np.random.default_rng(3))
  blank = (out["image"] == 0).all(axis=-1)
  assert 1 <= blank.sum() <= 8 * 8 * 8
  assert set(np.unique(out["image"])) <= {0, 200}
