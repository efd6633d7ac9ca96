"""Taxonomy labels from Commons categories: the thesis's heuristics over the category graph.

A category's labels (the prototype's `query_category`, epfl-dlab/wiki_image_classification
`src/taxonomy/heuristics.py`; docs/labels.md, "Labelling heuristics"):

* a seed category (the taxonomy's `seeds`) has its label(s), and is not searched further;
* a missing (red link) or unconnected category (depth -1), a hidden one, or one whose lexical head is
  a month, "Century", "Category"/"Categories" or a number has none;
* otherwise the heuristics run in the configured order ("headJ+depth": headJ, then depth); each names
  next categories, whose labels are unioned; the first heuristic whose union is non-empty wins.

Labels are memoised per category. A category met again while it is still being searched (a cycle)
contributes no labels on that back edge. A file's labels are the union over its categories.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError
from wikitopics_jax.labels import heads as heads_lib
from wikitopics_jax.labels.graph import CategoryGraph

HEURISTICS = ("head", "headJ", "depth", "lookahead")
# As the prototype: heads that headJ does not jump to (they are too generic to say anything about a
# topic), querying the matching parent instead.
NO_JUMP = frozenset({"Genera", "Specimens", "Antagonists", "Births"})
_UNSEEN, _SEARCHING, _DONE = 0, 1, 2


def parse_heuristics(spec: str) -> tuple[str, ...]:
  """"headJ+depth" -> ("headJ", "depth"); one-line error for anything else."""
  names = tuple(n.strip() for n in spec.split("+"))
  for name in names:
    if name.startswith("embedding"):
      raise InputError(f"heuristic {name!r} is not available: it needs sentence embeddings of every "
                       f"category (the prototype's BERT model), and none ships offline; valid "
                       f"heuristics: {', '.join(HEURISTICS)} (joined with '+')")
    if name not in HEURISTICS:
      raise InputError(f"unknown heuristic {name!r} in {spec!r}; valid heuristics: "
                       f"{', '.join(HEURISTICS)} (joined with '+', tried in order)")
  if len(set(names)) != len(names):
    raise InputError(f"heuristics {spec!r} name one twice")
  return names


@dataclasses.dataclass
class _Frame:
  node: int
  step: int  # Index of the heuristic being tried.
  targets: list[int]
  pos: int = 0
  mask: int = 0
  hops: list = dataclasses.field(default_factory=list)  # (target, mask it gave)


class Labeller:
  """Labels categories and files of one graph under one taxonomy and heuristics (memoised)."""

  def __init__(self, graph: CategoryGraph, taxonomy: taxonomy_lib.Taxonomy,
               heuristics: str | Sequence[str] = "headJ+depth", *, hierarchical: bool = False):
    if not taxonomy.seeds:
      raise InputError(f"taxonomy {taxonomy.version}: has no 'seeds' (the Commons categories of each "
                       f"label), needed to label from categories")
    self.graph = graph
    self.taxonomy = taxonomy
    self.heuristics = parse_heuristics(heuristics) if isinstance(heuristics, str) else tuple(
        parse_heuristics("+".join(heuristics)))
    self.hierarchical = hierarchical
    # Labels are bit masks over the taxonomy's label indices: unions are one int "or".
    self._mask: dict[int, int] = {}
    self._state: dict[int, int] = {}
    self._how: dict[int, tuple[str, list]] = {}  # node -> (heuristic or reason, [(target, mask)])
    self._head: dict[int, str] = {}
    self.seeds: dict[int, int] = {}
    self.missing_seeds: list[str] = []
    for category, labels in taxonomy.seed_labels(hierarchical=hierarchical).items():
      i = graph.index(category)
      if i is None:
        self.missing_seeds.append(category)
        continue
      self.seeds[i] = self.seeds.get(i, 0) | self._bits(labels)

  def _bits(self, labels: Iterable[str]) -> int:
    m = 0
    for label in labels:
      m |= 1 << self.taxonomy.index[label]
    return m

  def names(self, mask: int) -> tuple[str, ...]:
    return tuple(l for k, l in enumerate(self.taxonomy.labels) if mask >> k & 1)

  def head(self, i: int) -> str:
    h = self._head.get(i)
    if h is None:
      h = self._head[i] = heads_lib.find_head(str(self.graph.titles[i]))
    return h

  # --- the heuristics: each gives the next categories to query --------------------------------

  def _head_targets(self, i: int, jump: bool) -> list[int]:
    parents = [int(p) for p in self.graph.parents(i)]
    if not parents:
      return []
    own = self.head(i)
    # `head` compares parents' one-word heads, `headJ` their full heads (as the prototype).
    theirs = [self.head(p) if jump else heads_lib.last_word(self.head(p)) for p in parents]
    while True:
      matched = [k for k, h in enumerate(theirs) if h == own]
      longest = max(len(h.split()) for h in [own] + theirs)
      if matched or longest == 1:
        break
      # Shorten the longest heads from the left ("Art museums" -> "Museums") and try again.
      if len(own.split()) == longest:
        own = heads_lib.shorten(own)
      theirs = [heads_lib.shorten(h) if len(h.split()) == longest else h for h in theirs]
    if not matched:
      return []
    if not jump:
      return [parents[k] for k in matched]
    # Jump to the category named by the shared head, if it exists and is shallower (a cheap proxy
    # for "is an ancestor"); for the NO_JUMP heads, query the matching parent instead.
    j = self.graph.index(own)
    depth = self.graph.depth
    if j is None or depth[j] < 0 or depth[j] >= depth[i]:
      return []
    return [parents[k] for k in matched] if own in NO_JUMP else [j]

  def _targets(self, i: int, name: str) -> list[int]:
    if name == "head":
      out = self._head_targets(i, jump=False)
    elif name == "headJ":
      out = self._head_targets(i, jump=True)
    elif name == "depth":
      d = self.graph.depth[i]
      out = [int(p) for p in self.graph.parents(i) if 0 <= self.graph.depth[p] < d]
    else:  # lookahead
      out = [int(p) for p in self.graph.parents(i) if int(p) in self.seeds]
    return list(dict.fromkeys(out))

  # --- the recursive query, with an explicit stack (Commons chains can be long) ---------------

  def _settle(self, i: int) -> bool:
    """Decides a category without searching, if it can be; True if it is now done."""
    if self._state.get(i) is not None:
      return True
    g = self.graph
    if g.depth[i] < 0:
      reason, mask = "unconnected", 0
    elif i in self.seeds:
      reason, mask = "seed", self.seeds[i]
    elif g.hidden[i]:
      reason, mask = "hidden", 0
    elif heads_lib.is_null_head(self.head(i)):
      reason, mask = "null head", 0
    else:
      return False
    self._state[i], self._mask[i], self._how[i] = _DONE, mask, (reason, [])
    return True

  def category_mask(self, i: int) -> int:
    if self._settle(i) and self._state[i] == _DONE:
      return self._mask[i]
    self._state[i] = _SEARCHING
    stack = [_Frame(i, 0, self._targets(i, self.heuristics[0]))]
    while stack:
      f = stack[-1]
      if f.pos < len(f.targets):
        t = f.targets[f.pos]
        f.pos += 1
        if self._settle(t):
          # A category still being searched is a back edge of a cycle: it gives nothing here.
          m = self._mask[t] if self._state[t] == _DONE else 0
          f.mask |= m
          f.hops.append((t, m))
        else:
          self._state[t] = _SEARCHING
          stack.append(_Frame(t, 0, self._targets(t, self.heuristics[0])))
        continue
      if not f.mask and f.step + 1 < len(self.heuristics):
        f.step += 1  # Nothing from this heuristic: fall through to the next one.
        f.targets, f.pos, f.hops = self._targets(f.node, self.heuristics[f.step]), 0, []
        continue
      self._state[f.node], self._mask[f.node] = _DONE, f.mask
      self._how[f.node] = (self.heuristics[f.step] if f.mask else "no labels", f.hops)
      stack.pop()
      if stack:
        stack[-1].mask |= f.mask
        stack[-1].hops.append((f.node, f.mask))
    return self._mask[i]

  def category_labels(self, title: str) -> tuple[str, ...]:
    i = self.graph.index(title)
    return () if i is None else self.names(self.category_mask(i))

  def chain(self, i: int, label: str) -> list[list[str]]:
    """How category i got `label`: [[category, heuristic], ..., [seed, "seed"]]."""
    bit = 1 << self.taxonomy.index[label]
    out = []
    while True:
      how, hops = self._how[i]
      out.append([str(self.graph.titles[i]), how])
      if how == "seed":
        return out
      # Hops recorded the mask each target gave at the time, so following them only goes to
      # categories finished earlier: the walk ends.
      i = next(t for t, m in hops if m & bit)

  def label_file(self, categories: Iterable[str], *,
                 audit: bool = True) -> tuple[tuple[str, ...], dict[str, dict]]:
    """A file's labels (union over its categories) and, per label, the first category giving it and
    the chain of categories and heuristics that led to a seed."""
    nodes = [self.graph.index(c) for c in categories]
    mask, trail = 0, {}
    for c, i in zip(categories, nodes):
      if i is None:
        continue
      m = self.category_mask(i)
      new = m & ~mask
      mask |= m
      if audit and new:
        for label in self.names(new):
          trail[label] = {"category": c, "path": self.chain(i, label)}
    return self.names(mask), trail

  def stats(self) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for how, _ in self._how.values():
      reasons[how] = reasons.get(how, 0) + 1
    return {"categories_visited": len(self._how), **dict(sorted(reasons.items()))}


def label_masks(labeller: Labeller, offsets: np.ndarray, nodes: np.ndarray) -> np.ndarray:
  """Label bit masks of many files at once (no audit): file k has nodes[offsets[k]:offsets[k+1]]
  (graph indices, -1 for a missing category). For the benchmark and large runs."""
  out = np.zeros(len(offsets) - 1, np.int64)
  memo = labeller._mask  # pylint: disable=protected-access
  for k in range(len(out)):
    m = 0
    for i in nodes[offsets[k]:offsets[k + 1]].tolist():
      if i >= 0:
        m |= memo[i] if i in memo and labeller._state.get(i) == _DONE else labeller.category_mask(i)
    out[k] = m
  return out


def load_graph(path: str) -> CategoryGraph:
  """A graph file, or the directory `wikitopics categories` wrote (its graph.npz)."""
  import os  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    path = os.path.join(path, "graph.npz")
  if not os.path.isfile(path):
    raise InputError(f"{path}: category graph not found (give graph.npz or the directory "
                     f"`wikitopics categories` wrote)")
  return CategoryGraph.load(path)


def write_labels_table(labeller: Labeller, files_path: str, out_path: str, *,
                       batch_size: int = 65536) -> dict[str, int]:
  """Labels every file of a files table (Parquet: `file`, `categories`) and writes the labels table
  `ingest` reads (Parquet: id, title, url, labels) plus `audit`, a JSON object per image: for each
  label, the first category that gave it and its chain [[category, heuristic], ..., [seed, "seed"]].
  Written to a temporary name and renamed."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  from wikitopics_jax.data import wit  # pylint: disable=g-import-not-at-top
  if not out_path.endswith(".parquet"):
    raise InputError(f"{out_path}: the labels table is written as Parquet; name it *.parquet")
  try:
    source = pq.ParquetFile(files_path)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{files_path}: not a readable Parquet files table ({type(e).__name__}: {e})"
                     ) from None
  missing = {"file", "categories"} - set(source.schema_arrow.names)
  if missing:
    raise InputError(f"{files_path}: a files table needs columns 'file' and 'categories'; missing "
                     f"{sorted(missing)}")
  schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("url", pa.string()),
                      ("labels", pa.list_(pa.string())), ("audit", pa.string())])
  tmp = out_path + ".tmp"
  counts = {"files": 0, "labelled": 0}
  with pq.ParquetWriter(tmp, schema) as writer:
    for batch in source.iter_batches(batch_size=batch_size, columns=["file", "categories"]):
      cols = {"id": [], "title": [], "url": [], "labels": [], "audit": []}
      for name, cats in zip(batch.column("file").to_pylist(), batch.column("categories").to_pylist()):
        labels, trail = labeller.label_file(cats or [])
        title = name[5:] if name[:5].lower() == "file:" else name
        cols["id"].append("")
        cols["title"].append(title)
        cols["url"].append(wit.file_from_title(title).url())
        cols["labels"].append(list(labels))
        cols["audit"].append(json.dumps(trail, ensure_ascii=False))
        counts["files"] += 1
        counts["labelled"] += bool(labels)
      writer.write_table(pa.table(cols, schema=schema))
  os.replace(tmp, out_path)
  return counts
