"""Resampling of a multilabel training set: the thesis's heuristics and Charte et al.'s ML-RUS / ML-ROS.

Every method maps a binary (N, L) label matrix to a `Resampled(indices, is_duplicate)`: `indices` are
rows of the original dataset in the order the new dataset lists them, and `is_duplicate` marks the
added copies (so the input pipeline can send them to label-dependent augmentation). Undersampling keeps
the surviving rows in their original order; oversampling lists all N originals, then the copies in
the order they were chosen (a row copied twice appears three times). `resample(method, y, seed=...,
**params)` dispatches by name through the `RESAMPLERS` registry: "none", "heuristic_under",
"heuristic_over", "ml_rus", "ml_ros".

Sizes. The thesis's Algorithm 1 says "0 < pctg < 1 is the relative size of the undersampled dataset"
and section 4.2.1 "80% of the data is kept", but its loop `while N < pctg * len(y_true)` would remove
pctg of the images; the thesis code removes images `while size > original_size * kept_pctg`. So the
parameter is what is *kept*: `keep_fraction` (undersampling, ML-RUS) keeps round(keep_fraction * N)
images; `extra_fraction` (oversampling, ML-ROS) adds round(extra_fraction * N) copies (the thesis's
"duplicate 20%" and its code's `while size < original_size * (1 + add_pctg)`). Python's round (half
to even) decides halves.

Heuristic undersampling (thesis Algorithm 1). With count_j = images of the *current* (already reduced)
dataset having label j, label_cost_j = BIG_NUMBER / count_j and cost(image) = sum of the costs of its
labels; each step removes the cheapest image, then the costs are recomputed. Decisions the pseudo-code
leaves open:
- Ties: the lowest original index among the cheapest images goes first.
- An image without labels costs 0 (the empty sum), so label-less images are removed first.
- A label whose count reaches 0 (or starts at 0) has an undefined cost BIG_NUMBER / 0; no image of the
  current dataset has it, and an image's cost only sums its own labels, so the value is never used.

Heuristic oversampling (thesis Algorithm 2). label_reward_j = BIG_NUMBER / count_j with counts in the
current, *augmented* dataset (copies included); reward(image) = sum of its labels' rewards; each step
copies the image with the greatest reward. A copy has its original's labels and reward, so choosing a
copy is choosing its original again: selection runs over the originals. Ties go to the image with the
fewest copies so far, then the lowest index: this spreads the copies over interchangeable images (same
label vector, same reward) instead of copying one image thousands of times. Label-less images have
reward 0 and are copied only if no image has a label. Counts only grow, so no reward divides by 0.

Floating point. Costs are float64, label_cost = BIG_NUMBER / count (IEEE division), summed over the
image's labels in increasing label index from 0.0; every implementation here computes them in exactly
this way, so images with the same label vector have bit-identical costs and the tie rules above decide
every tie identically everywhere. BIG_NUMBER only rescales (the thesis used it "to avoid numerical
problems"); 1e4 as in the thesis.

Speed. `literal_heuristic_undersample` / `literal_heuristic_oversample` run the pseudo-code as written
(O(N L) per step) and are the reference. `heuristic_undersample` / `heuristic_oversample` return the
same sequences: images with the same label vector are interchangeable, so they work on the distinct
label vectors (groups) with a lazy heap keyed by (cost, next index in the group) or (-reward, copies,
next index). A step changes only the counts of the chosen image's labels, so other groups' costs can
only rise (counts fall) when undersampling, and rewards only fall when oversampling: a heap entry is a
lower bound of its group's true key. The top entry is recomputed; if unchanged it is the true minimum,
else it is pushed back with its new key.

ML-RUS / ML-ROS (Charte, Rivera, del Jesus, Herrera, "Addressing imbalance in multilabel
classification: Measures and random resampling algorithms", Neurocomputing 163 (2015) 3-16,
Algorithms 1 and 2), with IRLbl and meanIR as in `label_stats` (mldr's definitions):
- meanIR is computed once, on the original dataset. ML-ROS: minority labels have IRLbl > meanIR; each
  pass over them (label order) clones one uniformly drawn original image of each label's bag (the
  images having the label), then recomputes the label's IRLbl on the augmented dataset and drops the
  label when IRLbl <= meanIR. ML-RUS: majority labels have IRLbl < meanIR; each pass deletes one
  uniformly drawn still-present image of each bag, and drops the label when IRLbl >= meanIR (or its bag
  is empty). A deleted image leaves every bag.
- Both stop as soon as the requested number is reached (the paper's loop may overshoot by up to one
  pass) or when no label is left: the result can then be smaller than requested.
- Random draws come from numpy's default_rng(seed): the same seed gives the same result.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from wikitopics_jax.eval import label_stats
from wikitopics_jax import registry
from wikitopics_jax.errors import InputError

BIG_NUMBER = 1e4

RESAMPLERS = registry.Registry("resampling method")


class Resampled(NamedTuple):
  indices: np.ndarray  # (M,) int64 rows of the original dataset, in the new dataset's order
  is_duplicate: np.ndarray  # (M,) bool, True for an added copy


def _num_kept(num_images: int, keep_fraction: float) -> int:
  keep_fraction = float(keep_fraction)
  if not 0 < keep_fraction <= 1:
    raise InputError(f"keep_fraction must be in (0, 1] (the fraction of images kept), got {keep_fraction}")
  return round(keep_fraction * num_images)


def _num_extra(num_images: int, extra_fraction: float) -> int:
  extra_fraction = float(extra_fraction)
  if not extra_fraction >= 0:
    raise InputError(f"extra_fraction must be >= 0 (copies added, as a fraction of the images), "
                     f"got {extra_fraction}")
  return round(extra_fraction * num_images)


def _image_costs(y: np.ndarray, label_costs: np.ndarray) -> np.ndarray:
  """Per row, the sum of its labels' costs, added in increasing label index from 0.0 (see docstring)."""
  costs = np.zeros(y.shape[0])
  for j in range(y.shape[1]):
    costs[y[:, j]] += label_costs[j]
  return costs


def _label_costs(counts: np.ndarray) -> np.ndarray:
  # A label with count 0 is held by no current image: its (infinite) cost is never added.
  with np.errstate(divide="ignore"):
    return BIG_NUMBER / counts.astype(np.float64)


# ---------------------------------------------------------------------------------------------------
# The thesis's heuristics: literal reference


def literal_heuristic_undersample(y: Any, *, keep_fraction: float) -> np.ndarray:
  """Algorithm 1 step by step: the original indices of the removed images, in removal order."""
  y = label_stats.as_label_matrix(y)
  num_remove = y.shape[0] - _num_kept(y.shape[0], keep_fraction)
  remaining = np.arange(y.shape[0])
  removed = []
  for _ in range(num_remove):
    current = y[remaining]
    costs = _image_costs(current, _label_costs(current.sum(axis=0)))
    cheapest = int(np.argmin(costs))  # the first minimum: lowest index
    removed.append(remaining[cheapest])
    remaining = np.delete(remaining, cheapest)
  return np.asarray(removed, dtype=np.int64)


def literal_heuristic_oversample(y: Any, *, extra_fraction: float) -> np.ndarray:
  """Algorithm 2 step by step: the original indices of the copied images, in selection order."""
  y = label_stats.as_label_matrix(y)
  num_images = y.shape[0]
  num_extra = _num_extra(num_images, extra_fraction)
  augmented = np.zeros((num_images + num_extra, y.shape[1]), bool)
  augmented[:num_images] = y
  copies = np.zeros(num_images, np.int64)
  chosen = []
  for step in range(num_extra):
    size = num_images + step
    rewards = _image_costs(y, _label_costs(augmented[:size].sum(axis=0)))
    best = np.flatnonzero(rewards == rewards.max())
    pick = int(best[np.argmin(copies[best])])  # fewest copies, then the first: lowest index
    augmented[size] = y[pick]
    copies[pick] += 1
    chosen.append(pick)
  return np.asarray(chosen, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# The thesis's heuristics: fast, on distinct label vectors


class _Groups(NamedTuple):
  labels: list[tuple[int, ...]]  # per group, its label indices in increasing order
  members: list[np.ndarray]  # per group, its image indices in increasing order
  counts: list[int]  # per label, images having it


def _groups(y: np.ndarray) -> _Groups:
  sets = label_stats.label_sets(y)
  order = np.argsort(sets.inverse, kind="stable")
  bounds = np.concatenate([[0], np.cumsum(sets.multiplicity)])
  members = [order[bounds[g]:bounds[g + 1]] for g in range(sets.num_sets)]
  labels = [tuple(int(j) for j in np.flatnonzero(row)) for row in sets.sets]
  return _Groups(labels, members, [int(c) for c in y.sum(axis=0)])


def _group_cost(labels: tuple[int, ...], counts: list[int]) -> float:
  # Python floats are IEEE float64: the same divisions and additions, in the same order, as _image_costs.
  cost = 0.0
  for j in labels:
    cost += BIG_NUMBER / counts[j]
  return cost


def heuristic_undersample(y: Any, *, keep_fraction: float) -> np.ndarray:
  """Algorithm 1, fast: the same removal sequence as `literal_heuristic_undersample`."""
  y = label_stats.as_label_matrix(y)
  num_remove = y.shape[0] - _num_kept(y.shape[0], keep_fraction)
  removed = np.empty(num_remove, np.int64)
  if num_remove == 0:
    return removed
  labels, members, counts = _groups(y)
  next_member = [0] * len(members)
  heap = [(_group_cost(labels[g], counts), int(members[g][0]), g) for g in range(len(members))]
  heapq.heapify(heap)
  for step in range(num_remove):
    while True:
      cost, image, g = heap[0]
      current = _group_cost(labels[g], counts)
      if current == cost:
        break
      heapq.heapreplace(heap, (current, image, g))  # costs only rise: the old key was a lower bound
    removed[step] = image
    for j in labels[g]:
      counts[j] -= 1
    next_member[g] += 1
    if next_member[g] < len(members[g]):
      heapq.heapreplace(heap, (_group_cost(labels[g], counts), int(members[g][next_member[g]]), g))
    else:
      heapq.heappop(heap)
  return removed


def heuristic_oversample(y: Any, *, extra_fraction: float) -> np.ndarray:
  """Algorithm 2, fast: the same selection sequence as `literal_heuristic_oversample`."""
  y = label_stats.as_label_matrix(y)
  num_extra = _num_extra(y.shape[0], extra_fraction)
  chosen = np.empty(num_extra, np.int64)
  if num_extra == 0 or y.shape[0] == 0:
    return chosen[:0]
  labels, members, counts = _groups(y)
  # Within a group the copies go round robin over its members: the k-th copy is member k mod size,
  # which then has k // size copies so far (the "fewest copies, then lowest index" rule).
  taken = [0] * len(members)

  def key(g: int) -> tuple[float, int, int, int]:
    size = len(members[g])
    return (-_group_cost(labels[g], counts), taken[g] // size, int(members[g][taken[g] % size]), g)

  heap = [key(g) for g in range(len(members))]
  heapq.heapify(heap)
  for step in range(num_extra):
    while True:
      neg_reward, num_copies, image, g = heap[0]
      current = -_group_cost(labels[g], counts)
      if current == neg_reward:
        break
      heapq.heapreplace(heap, (current, num_copies, image, g))  # rewards only fall
    chosen[step] = image
    for j in labels[g]:
      counts[j] += 1
    taken[g] += 1
    heapq.heapreplace(heap, key(g))
  return chosen


# ---------------------------------------------------------------------------------------------------
# ML-RUS and ML-ROS (Charte et al. 2015)


def _irlbl(counts: np.ndarray, j: int) -> float:
  """IRLbl of label j in the current dataset (inf once the label has no image left)."""
  return float(counts.max()) / counts[j] if counts[j] > 0 else np.inf


def ml_rus(y: Any, *, keep_fraction: float, seed: int) -> np.ndarray:
  """ML-RUS: the original indices of the deleted images, in deletion order."""
  y = label_stats.as_label_matrix(y)
  num_images = y.shape[0]
  num_delete = num_images - _num_kept(num_images, keep_fraction)
  counts = y.sum(axis=0).astype(np.int64)
  irlbl = label_stats.irlbl_vector(counts)
  mean_ir = float(np.mean(irlbl))
  rng = np.random.default_rng(seed)
  # Bags shrink by swap-removal; an entry already deleted through another bag is dropped when drawn.
  bags = {j: np.flatnonzero(y[:, j]) for j in range(y.shape[1]) if counts[j] > 0 and irlbl[j] < mean_ir}
  bag_sizes = {j: bag.size for j, bag in bags.items()}
  deleted = np.zeros(num_images, bool)
  removed: list[int] = []
  active = list(bags)
  while len(removed) < num_delete and active:
    for j in list(active):
      bag = bags[j]
      image = -1
      while bag_sizes[j] > 0 and image < 0:
        k = int(rng.integers(bag_sizes[j]))
        candidate = int(bag[k])
        bag[k] = bag[bag_sizes[j] - 1]
        bag_sizes[j] -= 1
        if not deleted[candidate]:
          image = candidate
      if image < 0:
        active.remove(j)
        continue
      deleted[image] = True
      counts -= y[image]
      removed.append(image)
      if _irlbl(counts, j) >= mean_ir:
        active.remove(j)
      if len(removed) == num_delete:
        break
  return np.asarray(removed, dtype=np.int64)


def ml_ros(y: Any, *, extra_fraction: float, seed: int) -> np.ndarray:
  """ML-ROS: the original indices of the cloned images, in cloning order."""
  y = label_stats.as_label_matrix(y)
  num_clone = _num_extra(y.shape[0], extra_fraction)
  counts = y.sum(axis=0).astype(np.int64)
  irlbl = label_stats.irlbl_vector(counts)
  mean_ir = float(np.mean(irlbl))
  rng = np.random.default_rng(seed)
  bags = {j: np.flatnonzero(y[:, j]) for j in range(y.shape[1]) if irlbl[j] > mean_ir}
  cloned: list[int] = []
  active = list(bags)
  while len(cloned) < num_clone and active:
    for j in list(active):
      image = int(bags[j][rng.integers(bags[j].size)])
      counts += y[image]
      cloned.append(image)
      if _irlbl(counts, j) <= mean_ir:
        active.remove(j)
      if len(cloned) == num_clone:
        break
  return np.asarray(cloned, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Registry


def _kept(num_images: int, removed: np.ndarray) -> Resampled:
  keep = np.ones(num_images, bool)
  keep[removed] = False
  indices = np.flatnonzero(keep).astype(np.int64)
  return Resampled(indices, np.zeros(indices.size, bool))


def _with_copies(num_images: int, copied: np.ndarray) -> Resampled:
  indices = np.concatenate([np.arange(num_images, dtype=np.int64), copied.astype(np.int64)])
  is_duplicate = np.zeros(indices.size, bool)
  is_duplicate[num_images:] = True
  return Resampled(indices, is_duplicate)


@RESAMPLERS.register("none")
def _none(y: np.ndarray, *, seed: int) -> Resampled:
  del seed  # deterministic
  return _with_copies(y.shape[0], np.zeros(0, np.int64))


@RESAMPLERS.register("heuristic_under")
def _heuristic_under(y: np.ndarray, *, seed: int, keep_fraction: float = 0.8) -> Resampled:
  del seed  # deterministic
  return _kept(y.shape[0], heuristic_undersample(y, keep_fraction=keep_fraction))


@RESAMPLERS.register("heuristic_over")
def _heuristic_over(y: np.ndarray, *, seed: int, extra_fraction: float = 0.2) -> Resampled:
  del seed  # deterministic
  return _with_copies(y.shape[0], heuristic_oversample(y, extra_fraction=extra_fraction))


@RESAMPLERS.register("ml_rus")
def _ml_rus(y: np.ndarray, *, seed: int, keep_fraction: float = 0.8) -> Resampled:
  return _kept(y.shape[0], ml_rus(y, keep_fraction=keep_fraction, seed=seed))


@RESAMPLERS.register("ml_ros")
def _ml_ros(y: np.ndarray, *, seed: int, extra_fraction: float = 0.2) -> Resampled:
  return _with_copies(y.shape[0], ml_ros(y, extra_fraction=extra_fraction, seed=seed))


def resample(method: str, y: Any, *, seed: int = 0, key_prefix: str = "resampling", **params: Any
             ) -> Resampled:
  """Runs resampling method `method` ("none", "heuristic_under", "heuristic_over", "ml_rus", "ml_ros")
  on the binary (N, L) label matrix `y`.

  params: keep_fraction (undersamplers, default 0.8) or extra_fraction (oversamplers, default 0.2).
  Unknown methods and parameters raise InputError naming the valid ones (`key_prefix` names the config
  section in that message).
  """
  y = label_stats.as_label_matrix(y)
  return RESAMPLERS.build(method, params, key_prefix=key_prefix, y=y, seed=seed)


def stats_after(y: Any, names: Sequence[str], method: str, *, seed: int = 0,
                key_prefix: str = "resampling", **params: Any) -> dict[str, Any]:
  """`label_stats.compute` of the training set that resampling `method` makes of `y` (copies counted
  as often as they occur), for Table 3.1 after resampling and Figure 4.1's "after" bars."""
  y = label_stats.as_label_matrix(y)
  result = resample(method, y, seed=seed, key_prefix=key_prefix, **params)
  return label_stats.compute(y[result.indices], names)
