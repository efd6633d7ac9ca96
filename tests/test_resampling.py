"""resampling.py: the fast heuristics against the literal pseudo-code, hand-made cases, ML-RUS/ML-ROS."""

from __future__ import annotations

import numpy as np
import pytest

from wikitopics_jax.eval import label_stats
from wikitopics_jax.data import resampling
from wikitopics_jax.errors import InputError

A, B, C, NONE = [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]
AB = [1, 1, 0]


def test_undersampling_by_hand():
  y = np.array([A, AB, A, B, NONE, C])
  # counts A=3, B=2, C=1; cost = sum of 1e4 / count over the image's labels:
  #   0: 3333.3  1: 3333.3 + 5000  2: 3333.3  3: 5000  4: 0  5: 10000
  # 1. image 4 (cost 0).  2. images 0 and 2 tie at 3333.3: the lowest index, 0. Now A=2 -> 5000.
  # 3. images 2 and 3 tie at 5000: 2. A=1 -> 10000; 1 costs 15000.  4. image 3 (5000). B=1 -> 10000;
  # 1 costs 20000.  5. image 5 (10000).  6. image 1.
  order = [4, 0, 2, 3, 5, 1]
  for num_kept in range(1, 7):
    keep_fraction = num_kept / 6
    for fn in (resampling.heuristic_undersample, resampling.literal_heuristic_undersample):
      assert fn(y, keep_fraction=keep_fraction).tolist() == order[:6 - num_kept]
  result = resampling.resample("heuristic_under", y, keep_fraction=0.5)
  assert result.indices.tolist() == [1, 3, 5] and not result.is_duplicate.any()


def test_oversampling_by_hand():
  y = np.array([A, AB, A, B, NONE, C])
  # rewards as the costs above. 1. image 5 (10000); C=2 -> 5000.  2. image 1 (8333.3); A=4, B=3.
  # 3. image 1 again (2500 + 3333.3 = 5833.3 > 5000); A=5, B=4.  4. image 5 (5000 > 2000 + 2500).
  # 5. image 1 (4500 > 3333.3); A=6, B=5.  6. image 1 (1666.7 + 2000 > 3333.3).  7. image 5.
  expected = [5, 1, 1, 5, 1, 1, 5]
  for fn in (resampling.heuristic_oversample, resampling.literal_heuristic_oversample):
    assert fn(y, extra_fraction=7 / 6).tolist() == expected
  result = resampling.resample("heuristic_over", y, extra_fraction=7 / 6)
  assert result.indices.tolist() == list(range(6)) + expected
  assert result.is_duplicate.tolist() == [False] * 6 + [True] * 7


def test_oversampling_ties_go_to_the_fewest_copies_then_lowest_index():
  y = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [0, 1]])
  # A=2 (5000), B=4 (2500). 1. 0 and 1 tie: 0.  A=3 (3333.3).  2. 1 (no copy yet).  A=4: everyone has
  # 2500; 0 and 1 have one copy each, 2 none: 3.  B=5 (2000).  4. A's 2500 wins: 0 (tied with 1 at one
  # copy).  A=5: all at 2000; 3 is the lowest index without copies: 5. 3.
  for fn in (resampling.heuristic_oversample, resampling.literal_heuristic_oversample):
    assert fn(y, extra_fraction=5 / 6).tolist() == [0, 1, 2, 0, 3]


def test_exact_ties_between_different_label_sets():
  # counts A=2, B=4, C=4: 1e4/2 == 1e4/4 + 1e4/4 exactly, so {A} and {B, C} cost the same.
  assert 1e4 / 2 == 1e4 / 4 + 1e4 / 4
  bc = [0, 1, 1]
  for y, first in ((np.array([bc, A, A, bc, bc, bc]), 0), (np.array([A, bc, bc, A, bc, bc]), 0),
                   (np.array([bc, bc, A, bc, A, bc]), 0), (np.array([NONE, A, bc, bc, A, bc, bc]), 0)):
    fast = resampling.heuristic_undersample(y, keep_fraction=1 / y.shape[0])
    assert fast[0] == first
    assert np.array_equal(fast, resampling.literal_heuristic_undersample(y, keep_fraction=1 / y.shape[0]))


def _random_labels(seed: int) -> np.ndarray:
  """Assorted regimes: few labels (many equal vectors), rare labels, an empty label, label-less rows."""
  rng = np.random.default_rng(seed)
  num_images = int(rng.integers(400, 1500))
  num_labels = int(rng.integers(2, 9))
  rates = rng.random(num_labels) ** 3
  y = rng.random((num_images, num_labels)) < rates
  if seed % 3 == 0:
    y[:, -1] = False  # a label without positives
  if seed % 2 == 0:
    y[rng.random(num_images) < 0.1] = False  # images without labels
  return y


@pytest.mark.parametrize("seed", range(8))
def test_fast_heuristics_equal_the_literal_pseudo_code(seed):
  y = _random_labels(seed)
  keep_fraction = [0.8, 0.5, 0.95, 0.7][seed % 4]
  extra_fraction = [0.2, 0.5, 0.05, 0.35][seed % 4]
  under = resampling.heuristic_undersample(y, keep_fraction=keep_fraction)
  assert np.array_equal(under, resampling.literal_heuristic_undersample(y, keep_fraction=keep_fraction))
  over = resampling.heuristic_oversample(y, extra_fraction=extra_fraction)
  assert np.array_equal(over, resampling.literal_heuristic_oversample(y, extra_fraction=extra_fraction))


def _wit_like_labels(num_images: int, seed: int) -> np.ndarray:
  # Flat-label rates of WIT's 390,000-image sample (`synthetic.WIT_FLAT_COUNTS`), at least 1e-5.
  counts = [823, 7877, 10470, 3, 428, 97017, 980, 20365, 34, 1102, 2081, 51362, 1635, 938, 1016, 5427, 93,
            433, 663, 2408, 53963, 86865, 142227, 4291, 20806, 1, 121500, 565, 23966, 21296, 8918]
  rates = np.maximum(np.array(counts) / 390_000, 1e-5)
  return np.random.default_rng(seed).random((num_images, rates.size)) < rates


def test_fast_heuristics_equal_the_literal_pseudo_code_on_wit_like_labels():
  y = _wit_like_labels(2500, seed=0)
  under = resampling.heuristic_undersample(y, keep_fraction=0.8)
  assert np.array_equal(under, resampling.literal_heuristic_undersample(y, keep_fraction=0.8))
  over = resampling.heuristic_oversample(y, extra_fraction=0.2)
  assert np.array_equal(over, resampling.literal_heuristic_oversample(y, extra_fraction=0.2))
  assert label_stats.mean_ir(y[np.concatenate([np.arange(y.shape[0]), over])]) < label_stats.mean_ir(y)


@pytest.mark.parametrize("method", ["none", "heuristic_under", "heuristic_over", "ml_rus", "ml_ros"])
def test_resample_output_structure(method):
  y = _wit_like_labels(1000, seed=1)
  result = resampling.resample(method, y, seed=3)
  assert result.indices.dtype == np.int64 and result.is_duplicate.dtype == bool
  assert result.indices.shape == result.is_duplicate.shape
  if method in ("heuristic_under", "ml_rus"):
    assert result.indices.size == 800  # keep_fraction 0.8 by default
    assert np.all(np.diff(result.indices) > 0) and not result.is_duplicate.any()
  else:
    num_copies = int(result.is_duplicate.sum())
    assert np.array_equal(result.indices[:1000], np.arange(1000))
    assert not result.is_duplicate[:1000].any() and result.is_duplicate[1000:].all()
    assert num_copies == {"none": 0, "heuristic_over": 200}.get(method, num_copies)
    assert num_copies <= 200


def test_resample_rejects_bad_names_and_parameters():
  y = np.array([A, B])
  with pytest.raises(InputError, match="valid names: .*heuristic_over"):
    resampling.resample("smote", y)
  with pytest.raises(InputError, match="resampling.pctg"):
    resampling.resample("heuristic_under", y, pctg=0.8)
  with pytest.raises(InputError, match="keep_fraction"):
    resampling.resample("heuristic_under", y, keep_fraction=1.5)
  with pytest.raises(InputError, match="extra_fraction"):
    resampling.resample("ml_ros", y, extra_fraction=-0.1)


def test_ml_ros_clones_minority_images_and_lowers_mean_ir():
  rng = np.random.default_rng(2)
  y = rng.random((4000, 5)) < np.array([0.5, 0.3, 0.05, 0.02, 0.01])
  irlbl = label_stats.irlbl_vector(y.sum(axis=0))
  minority = irlbl > irlbl.mean()
  result = resampling.resample("ml_ros", y, seed=7, extra_fraction=0.02)
  copies = result.indices[result.is_duplicate]
  assert copies.size == 80  # the minority labels stop only after about 110 clones
  assert np.all(y[copies][:, minority].any(axis=1))  # every clone comes from a minority bag
  assert label_stats.mean_ir(y[result.indices]) < label_stats.mean_ir(y)
  again = resampling.resample("ml_ros", y, seed=7, extra_fraction=0.02)
  assert np.array_equal(result.indices, again.indices)
  other_seed = resampling.resample("ml_ros", y, seed=8, extra_fraction=0.02)
  assert not np.array_equal(result.indices, other_seed.indices)


def test_ml_ros_stops_when_no_label_is_a_minority():
  y = np.array([A, B, C, AB])  # IRLbl 1, 1, 2: meanIR 4/3; C is a minority until it has 2 images
  assert resampling.ml_ros(y, extra_fraction=1.0, seed=0).tolist() == [2]


def test_ml_rus_deletes_majority_images_and_lowers_mean_ir():
  # One frequent label and three rare ones: only label 0 is a majority label (IRLbl < meanIR).
  rng = np.random.default_rng(4)
  y = rng.random((3000, 4)) < np.array([0.9, 0.05, 0.05, 0.05])
  irlbl = label_stats.irlbl_vector(y.sum(axis=0))
  majority = (irlbl < irlbl.mean()) & (y.sum(axis=0) > 0)
  result = resampling.resample("ml_rus", y, seed=5, keep_fraction=0.85)
  assert result.indices.size == 2550
  deleted = np.setdiff1d(np.arange(3000), result.indices)
  assert np.all(y[deleted][:, majority].any(axis=1))
  assert label_stats.mean_ir(y[result.indices]) < label_stats.mean_ir(y)
  again = resampling.resample("ml_rus", y, seed=5, keep_fraction=0.85)
  assert np.array_equal(result.indices, again.indices)
  other_seed = resampling.resample("ml_rus", y, seed=6, keep_fraction=0.85)
  assert not np.array_equal(result.indices, other_seed.indices)


def test_ml_rus_stops_when_the_majority_bags_are_exhausted():
  # counts A=6, B=2, C=2: IRLbl 1, 3, 3, meanIR 7/3, so A is the only majority label. Its IRLbl stays
  # below 7/3 down to its last image (max count 2 / 1), so all six A images go, and nothing else.
  y = np.array([A, A, A, A, AB, AB, C, C])
  for seed in range(3):
    removed = resampling.ml_rus(y, keep_fraction=1 / 8, seed=seed)  # asks for 7 deletions
    assert sorted(removed.tolist()) == [0, 1, 2, 3, 4, 5]
