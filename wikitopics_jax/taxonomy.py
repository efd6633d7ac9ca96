"""Topic taxonomies as data: label order, parent/child relations and the C-HMCNN matrix R.

A taxonomy is a JSON file::

    {"version": "v1.3", "labels": [...index order...], "parents": {"Plants": ["Nature"], "STEM": [], ...}}

`parents` maps every label to the list of its parents (a DAG is allowed; the Wikipedia taxonomies are
trees). Roots have an empty list. An optional `seeds` maps labels to the Commons categories that define
them (the labelling heuristics' starting points, `wikitopics_jax.labels.heuristics`); it is not part of
a taxonomy's identity (`to_json`, equality), so manifests written before it existed still match. The shipped versions live in `wikitopics_jax/taxonomies/`.

R follows Giunchiglia & Lukasiewicz (NeurIPS 2020): R[i, j] = 1 iff label j is label i or a descendant
of label i, so a hierarchical ("closed") label vector is y_hier = (R @ y_flat) > 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from wikitopics_jax.errors import InputError

_SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "taxonomies")


@dataclasses.dataclass(frozen=True)
class Taxonomy:
  version: str
  labels: tuple[str, ...]
  parents: dict[str, tuple[str, ...]]
  seeds: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict, compare=False,
                                                        repr=False)

  def __post_init__(self):
    where = f"taxonomy {self.version!r}"
    if len(set(self.labels)) != len(self.labels):
      dupes = sorted({l for l in self.labels if self.labels.count(l) > 1})
      raise InputError(f"{where}: duplicate labels {dupes}")
    unknown = sorted(set(self.parents) - set(self.labels))
    unknown += sorted({p for ps in self.parents.values() for p in ps} - set(self.labels))
    if unknown:
      raise InputError(f"{where}: parents mention unknown labels {sorted(set(unknown))}")
    if set(self.seeds) - set(self.labels):
      raise InputError(f"{where}: seeds mention unknown labels {sorted(set(self.seeds) - set(self.labels))}")
    # Raises on cycles.
    self._ancestors_by_index()

  @property
  def num_labels(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def index(self) -> dict[str, int]:
    return {name: i for i, name in enumerate(self.labels)}

  def parents_of(self, label: str) -> tuple[str, ...]:
    return self.parents.get(label, ())

  def children_of(self, label: str) -> tuple[str, ...]:
    return tuple(l for l in self.labels if label in self.parents_of(l))

  @functools.cached_property
  def roots(self) -> tuple[str, ...]:
    return tuple(l for l in self.labels if not self.parents_of(l))

  @functools.cached_property
  def leaves(self) -> tuple[str, ...]:
    has_child = {p for ps in self.parents.values() for p in ps}
    return tuple(l for l in self.labels if l not in has_child)

  def _ancestors_by_index(self) -> list[frozenset[int]]:
    cache: dict[str, frozenset[int]] = {}

    def visit(label: str, stack: tuple[str, ...]) -> frozenset[int]:
      if label in stack:
        cycle = " -> ".join(stack[stack.index(label):] + (label,))
        raise InputError(f"taxonomy {self.version!r}: cycle {cycle}")
      if label not in cache:
        acc: set[int] = set()
        for p in self.parents_of(label):
          acc.add(self.labels.index(p))
          acc |= visit(p, stack + (label,))
        cache[label] = frozenset(acc)
      return cache[label]

    return [visit(l, ()) for l in self.labels]

  def depth(self, label: str) -> int:
    """1 for a root, 1 + the longest path to a root otherwise."""
    ps = self.parents_of(label)
    return 1 if not ps else 1 + max(self.depth(p) for p in ps)

  @functools.cached_property
  def ancestor_matrix(self) -> np.ndarray:
    """R[i, j] = 1 iff j == i or j is a descendant of i (C-HMCNN's matrix), float32 (L, L)."""
    n = self.num_labels
    r = np.eye(n, dtype=np.float32)
    for j, ancestors in enumerate(self._ancestors_by_index()):
      for i in ancestors:
        r[i, j] = 1.0
    r.setflags(write=False)
    return r

  def indices(self, names: Iterable[str], *, where: str = "") -> list[int]:
    """Label names -> indices; unknown names are one error listing all of them."""
    names = list(names)
    unknown = [n for n in names if n not in self.index]
    if unknown:
      prefix = f"{where}: " if where else ""
      raise InputError(f"{prefix}unknown labels {unknown} for taxonomy {self.version} "
                       f"(valid: {list(self.labels)})")
    return [self.index[n] for n in names]

  def multi_hot(self, names: Iterable[str], *, where: str = "") -> np.ndarray:
    y = np.zeros(self.num_labels, np.uint8)
    y[self.indices(names, where=where)] = 1
    return y

  def names(self, multi_hot: Sequence[int] | np.ndarray) -> list[str]:
    return [self.labels[i] for i in np.flatnonzero(np.asarray(multi_hot))]

  def close(self, y: np.ndarray) -> np.ndarray:
    """Flat -> hierarchical labels: adds every ancestor of every positive label. y: (..., L)."""
    y = np.asarray(y)
    closed = (y.astype(np.float32) @ self.ancestor_matrix.T) > 0
    return closed.astype(y.dtype)

  def violations(self, y: np.ndarray) -> np.ndarray:
    """Per example: how many ancestors of its positive labels are missing. y: (N, L) binary."""
    y = np.asarray(y).astype(bool)
    return (self.close(y.astype(np.uint8)).astype(bool) & ~y).sum(axis=-1)

  def check_coherent(self, y: np.ndarray, *, where: str = "labels") -> None:
    """Raises if any example has a label without all of its ancestors."""
    bad = np.flatnonzero(self.violations(np.atleast_2d(y)))
    if bad.size:
      first = int(bad[0])
      row = np.atleast_2d(y)[first]
      missing = self.names(self.close(row) & ~row.astype(bool))
      raise InputError(f"{where}: {bad.size} examples are not hierarchy-coherent; first is #{first}, "
                       f"missing ancestors {missing}")

  def seed_labels(self, *, hierarchical: bool = False) -> dict[str, tuple[str, ...]]:
    """Seed category -> the labels it gives, in label order. Hierarchical: a label also has its
    descendants' seeds (so "Animalia" gives Animals, Nature and STEM), as the prototype's taxonomy."""
    out: dict[str, set[str]] = {}
    for label, categories in self.seeds.items():
      given = {label}
      if hierarchical:
        given |= {self.labels[i] for i in self._ancestors_by_index()[self.index[label]]}
      for category in categories:
        out.setdefault(category, set()).update(given)
    return {c: tuple(l for l in self.labels if l in ls) for c, ls in out.items()}

  def to_json(self) -> dict:
    return {"version": self.version, "labels": list(self.labels),
            "parents": {l: list(self.parents_of(l)) for l in self.labels}}

  @classmethod
  def from_json(cls, data: dict, *, source: str = "<dict>") -> "Taxonomy":
    for key in ("version", "labels", "parents"):
      if key not in data:
        raise InputError(f"{source}: taxonomy has no {key!r} field")
    parents = {}
    for label, ps in data["parents"].items():
      ps = [ps] if isinstance(ps, str) else list(ps or [])
      parents[label] = tuple(ps)
    seeds = {label: tuple([cs] if isinstance(cs, str) else cs)
             for label, cs in (data.get("seeds") or {}).items()}
    return cls(version=str(data["version"]), labels=tuple(data["labels"]), parents=parents,
               seeds=seeds)


def check_saved(meta: dict, taxonomy: Taxonomy, where: str) -> None:
  """A checkpoint's saved taxonomy (meta["taxonomy"]) must be the dataset's: same labels, same parents."""
  saved = meta.get("taxonomy")
  current = taxonomy.to_json()
  if saved is not None and saved != current:
    if saved.get("labels") != current["labels"]:
      raise InputError(f"{where}: checkpoint taxonomy {saved.get('version')!r} has labels "
                       f"{saved.get('labels')} but the dataset's ({current['version']!r}) are "
                       f"{current['labels']}")
    raise InputError(f"{where}: checkpoint taxonomy {saved.get('version')!r} differs from the "
                     f"dataset's {current['version']!r} in its parent relations")


def shipped_versions() -> list[str]:
  return sorted(f[:-5] for f in os.listdir(_SHIPPED_DIR) if f.endswith(".json"))


@functools.lru_cache(maxsize=None)
def load(name_or_path: str = "v1.3") -> Taxonomy:
  """A shipped version by name ("v1.3", "v1.4") or any taxonomy JSON file by path."""
  if os.path.exists(name_or_path):
    path = name_or_path
  else:
    path = os.path.join(_SHIPPED_DIR, f"{name_or_path}.json")
    if not os.path.exists(path):
      raise InputError(f"unknown taxonomy {name_or_path!r}: not a file, and not one of the shipped "
                       f"versions {shipped_versions()}")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  return Taxonomy.from_json(data, source=path)
