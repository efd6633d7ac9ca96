"""The Wikimedia Commons category graph: titles, parent edges (CSR), depth from CommonsRoot, hidden flags.

Node i is the i-th title in code-point order (`titles` is sorted), so a lookup is a binary search and
the file needs no hash table. Category redirects are aliases: `index(alias)` is the target's index and
edges to an alias are edges to its target (no redirect page is a node). A parent that has no page (a
red link) is still a node, as in the thesis prototype's networkx graph; `has_page` tells them apart.

The build is vectorised with pyarrow's hash kernels (`index_in`) and numpy sorts, so a graph of all
Commons (~10M+ categories) builds in minutes and a few GB; see docs/labels.md.
"""

from __future__ import annotations

import bisect
import os
import re
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wikitopics_jax.errors import InputError

ROOT = "CommonsRoot"
FORMAT_VERSION = 1
_STR = np.dtypes.StringDType()
# Titles are converted between Arrow and numpy this many at a time, so the Python strings in flight
# stay a bounded few hundred MB whatever the graph's size.
_CONVERT_CHUNK = 1 << 20
_CATEGORY_PREFIX = re.compile(r"^\s*category\s*:", re.IGNORECASE)


def normalize_title(title: str) -> str:
  """MediaWiki's canonical form of a category title, without the "Category:" prefix.

  As the prototype's `normalize_title`: percent-decoded, underscores -> spaces, "#anchor" dropped,
  stripped, first letter upper case; and also whitespace runs collapsed (MediaWiki does that too).
  """
  if "%" in title:
    title = urllib.parse.unquote(title)
  title = title.replace("_", " ")
  if ":" in title:  # The checks skip the slower steps for titles that need none (most lookups).
    title = _CATEGORY_PREFIX.sub("", title, count=1)
  if "#" in title:
    title = title.split("#", 1)[0]
  if "  " in title or title[:1].isspace() or title[-1:].isspace() or not title.isprintable():
    title = " ".join(title.split())
  if title:
    first = title[0].upper()
    if len(first) == 1:  # "ß".upper() is "SS"; MediaWiki keeps such letters.
      title = first + title[1:]
  return title


def _to_numpy(arr: pa.Array) -> np.ndarray:
  out = np.empty(len(arr), _STR)
  for start in range(0, len(arr), _CONVERT_CHUNK):
    piece = arr.slice(start, _CONVERT_CHUNK).to_numpy(zero_copy_only=False)
    out[start:start + len(piece)] = piece
  return out


def _strings(values) -> pa.Array:
  """A pyarrow large_string array of `values` (pyarrow array/chunked array, numpy array, list)."""
  if isinstance(values, pa.ChunkedArray):
    values = values.combine_chunks() if values.num_chunks else pa.array([], pa.large_string())
  if not isinstance(values, pa.Array):
    values = pa.array(values if isinstance(values, np.ndarray) else list(values), pa.large_string())
  return values.cast(pa.large_string())


def _blob(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
  """(int64 offsets (N+1), uint8 UTF-8 data) of a string array, for an .npz without pickles."""
  arr = pa.concat_arrays([_strings(arr)])  # Compacts a slice so the buffers start at 0.
  _, offsets, data = arr.buffers()
  offsets = np.frombuffer(offsets, np.int64, len(arr) + 1) if len(arr) else np.zeros(1, np.int64)
  data = np.frombuffer(data, np.uint8, int(offsets[-1])) if data is not None else np.zeros(0, np.uint8)
  return offsets.copy(), data.copy()


def _unblob(offsets: np.ndarray, data: np.ndarray) -> pa.Array:
  n = len(offsets) - 1
  return pa.LargeStringArray.from_buffers(n, pa.py_buffer(np.ascontiguousarray(offsets, np.int64)),
                                          pa.py_buffer(np.ascontiguousarray(data, np.uint8)))


def _search(sorted_titles: np.ndarray, queries: np.ndarray) -> np.ndarray:
  """Position of each query in `sorted_titles`, -1 where absent: a binary search run on all queries
  at once (numpy 2.4's StringDType searchsorted fails on strings longer than 15 bytes)."""
  n = len(sorted_titles)
  lo = np.zeros(len(queries), np.int64)
  hi = np.full(len(queries), n, np.int64)
  active = np.flatnonzero(lo < hi)
  while active.size:
    mid = (lo[active] + hi[active]) // 2
    less = sorted_titles[mid] < queries[active]
    lo[active] = np.where(less, mid + 1, lo[active])
    hi[active] = np.where(less, hi[active], mid)
    active = active[lo[active] < hi[active]]
  if not n:
    return np.full(len(queries), -1, np.int64)
  at = np.minimum(lo, n - 1)
  return np.where((lo < n) & (sorted_titles[at] == queries), at, -1)


def resolve_redirects(redirects: Mapping[str, str]) -> dict[str, str]:
  """alias -> final target, following chains (A -> B -> C gives A -> C); a cycle stays unresolved
  at the title before it repeats, and a self-redirect is dropped."""
  out = {}
  for alias, target in redirects.items():
    seen = {alias}
    while target in redirects and target not in seen:
      seen.add(target)
      target = redirects[target]
    if target != alias:
      out[alias] = target
  return out


def _bfs_depth(num_nodes: int, parent_of_edge: np.ndarray, child_of_edge: np.ndarray,
               root: int) -> np.ndarray:
  """Shortest number of child edges from `root` to each node (-1 when unreachable), level by level."""
  depth = np.full(num_nodes, -1, np.int32)
  if root < 0:
    return depth
  order = np.argsort(parent_of_edge, kind="stable")
  children = child_of_edge[order]
  starts = np.zeros(num_nodes + 1, np.int64)
  np.cumsum(np.bincount(parent_of_edge, minlength=num_nodes), out=starts[1:])
  frontier = np.array([root], np.int64)
  depth[root] = 0
  level = 0
  while frontier.size:
    level += 1
    counts = starts[frontier + 1] - starts[frontier]
    # Positions of all the frontier's children in `children`, without a Python loop over nodes.
    first = np.repeat(starts[frontier] - np.cumsum(counts) + counts, counts)
    nxt = children[first + np.arange(counts.sum())]
    nxt = np.unique(nxt[depth[nxt] < 0])
    depth[nxt] = level
    frontier = nxt.astype(np.int64)
  return depth


class CategoryGraph:
  """Category titles, parents (CSR, redirects resolved, no self loops), depth and hidden flags."""

  def __init__(self, titles: pa.Array, parent_offsets: np.ndarray, parent_indices: np.ndarray,
               hidden: np.ndarray, depth: np.ndarray, has_page: np.ndarray,
               alias_titles: pa.Array, alias_targets: np.ndarray, root: str = ROOT):
    self._titles_arrow = _strings(titles)
    self.titles = _to_numpy(self._titles_arrow)
    self.hidden = np.asarray(hidden, bool)
    self.depth = np.asarray(depth, np.int32)
    self.has_page = np.asarray(has_page, bool)
    self._offsets = np.asarray(parent_offsets, np.int32)
    self._parents = np.asarray(parent_indices, np.int32)
    self._alias_arrow = _strings(alias_titles)
    self.alias_titles = _to_numpy(self._alias_arrow)
    self.alias_targets = np.asarray(alias_targets, np.int32)
    self.root = root
    self._children = None

  def __len__(self) -> int:
    return len(self.titles)

  @property
  def num_edges(self) -> int:
    return len(self._parents)

  def index(self, title: str) -> int | None:
    """The node of a title (any form: "Category:Foo_bar", "foo bar", an alias); None if none."""
    # bisect over the array, not np.searchsorted: numpy 2.4's StringDType searchsorted fails on
    # strings longer than 15 bytes ("Failed to load string in string comparison").
    t = normalize_title(title)
    i = bisect.bisect_left(self.titles, t)
    if i < len(self.titles) and self.titles[i] == t:
      return i
    j = bisect.bisect_left(self.alias_titles, t)
    if j < len(self.alias_titles) and self.alias_titles[j] == t:
      return int(self.alias_targets[j])
    return None

  def indices(self, titles: Iterable[str], *, normalized: bool = False) -> np.ndarray:
    """`index` of many titles at once: int64, -1 where absent. A large batch (the categories of a
    whole files table) probes every title against a hash of the batch, one pass over the graph;
    a small one is a vectorised binary search."""
    query = list(titles) if normalized else [normalize_title(t) for t in titles]
    out = self._positions(self._titles_arrow, self.titles, query)
    missing = np.flatnonzero(out < 0)
    if missing.size and len(self.alias_titles):
      alias = self._positions(self._alias_arrow, self.alias_titles, [query[i] for i in missing])
      out[missing] = np.where(alias >= 0, self.alias_targets[np.maximum(alias, 0)], -1)
    return out

  @staticmethod
  def _positions(arrow: pa.Array, sorted_titles: np.ndarray, query: list[str]) -> np.ndarray:
    if len(query) * 32 < len(arrow):
      return _search(sorted_titles, np.array(query, _STR))
    q = pa.array(query, pa.large_string())
    uniq = pc.unique(q)
    hit = pc.index_in(arrow, value_set=uniq).to_numpy(zero_copy_only=False)
    found = ~np.isnan(hit) if hit.dtype.kind == "f" else np.ones(len(hit), bool)
    of_unique = np.full(len(uniq), -1, np.int64)
    of_unique[hit[found].astype(np.int64)] = np.flatnonzero(found)
    return of_unique[pc.index_in(q, value_set=uniq).to_numpy().astype(np.int64)]

  def parents(self, i: int) -> np.ndarray:
    return self._parents[self._offsets[i]:self._offsets[i + 1]]

  def children(self, i: int) -> np.ndarray:
    """int32 child indices (the transposed CSR is built on first use)."""
    if self._children is None:
      child_of_edge = np.repeat(np.arange(len(self), dtype=np.int32), np.diff(self._offsets))
      order = np.argsort(self._parents, kind="stable")
      starts = np.zeros(len(self) + 1, np.int64)
      np.cumsum(np.bincount(self._parents, minlength=len(self)), out=starts[1:])
      self._children = (starts, child_of_edge[order])
    starts, kids = self._children
    return kids[starts[i]:starts[i + 1]]

  def csr(self) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (N+1,), parent indices) int32: node i's parents are indices[offsets[i]:offsets[i+1]]."""
    return self._offsets, self._parents

  # --- building -----------------------------------------------------------------------------------

  @classmethod
  def from_edges(cls, edges: Iterable[tuple[str, str]], *, hidden: Iterable[str] = (),
                 redirects: Mapping[str, str] | None = None, root: str = ROOT,
                 pages: Iterable[str] | None = None) -> CategoryGraph:
    """A graph from (child, parent) titles (any form; normalised here).

    `redirects` maps alias -> target; `pages` names the categories that have a page (default: all
    nodes), so parents outside it are red links. Depth is by BFS from `root`.
    """
    child, parent = [], []
    for c, p in edges:
      child.append(normalize_title(c))
      parent.append(normalize_title(p))
    redirects = {normalize_title(a): normalize_title(t) for a, t in (redirects or {}).items()}
    return cls.from_arrays(
        child, parent, hidden=[normalize_title(h) for h in hidden],
        redirect_from=list(redirects), redirect_to=list(redirects.values()), root=root,
        pages=None if pages is None else [normalize_title(p) for p in pages])

  @classmethod
  def from_arrays(cls, child, parent, *, hidden=(), redirect_from=(), redirect_to=(),
                  root: str = ROOT, pages=None) -> CategoryGraph:
    """As `from_edges` on already normalised titles given as arrays (pyarrow, numpy or lists).

    Every title in `pages`, `hidden`, `child` and `parent` becomes a node unless it is an alias.
    """
    child, parent = _strings(child), _strings(parent)
    if len(child) != len(parent):
      raise ValueError(f"{len(child)} children but {len(parent)} parents")
    hidden = _strings(hidden)
    redirects = resolve_redirects(dict(zip(_strings(redirect_from).to_pylist(),
                                           _strings(redirect_to).to_pylist())))
    alias_src = pa.array(list(redirects), pa.large_string())
    alias_dst = pa.array(list(redirects.values()), pa.large_string())

    def resolve(arr: pa.Array) -> pa.Array:
      if not len(alias_src) or not len(arr):
        return arr
      hit = pc.index_in(arr, value_set=alias_src)
      return pc.if_else(pc.is_valid(hit), pc.take(alias_dst, hit), arr)

    child, parent, hidden = resolve(child), resolve(parent), resolve(hidden)
    pages_arr = None if pages is None else resolve(_strings(pages))
    parts = [child, parent, hidden] + ([pages_arr] if pages_arr is not None else [])
    nodes = pc.unique(pa.concat_arrays(parts))
    nodes = nodes.filter(pc.not_equal(nodes, ""))  # A title that normalises to nothing.
    nodes = pc.take(nodes, pc.sort_indices(nodes))  # UTF-8 byte order = code-point order.
    n = len(nodes)

    def ids(arr: pa.Array) -> np.ndarray:
      return pc.index_in(arr, value_set=nodes).to_numpy(zero_copy_only=False)

    c_ids, p_ids = ids(child), ids(parent)
    keep = ~(np.isnan(c_ids) | np.isnan(p_ids)) if c_ids.dtype.kind == "f" else None
    if keep is not None:  # Nulls (an empty title) came back as NaN.
      c_ids, p_ids = c_ids[keep], p_ids[keep]
    c_ids, p_ids = c_ids.astype(np.int64), p_ids.astype(np.int64)
    keys = np.unique(c_ids[c_ids != p_ids] * n + p_ids[c_ids != p_ids])  # Sorted by child, parent.
    del c_ids, p_ids
    if len(keys) >= 2**31:
      raise InputError(f"{len(keys)} category edges: more than the int32 CSR holds")
    c_sorted, parents = keys // n, (keys % n).astype(np.int32)
    del keys
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.bincount(c_sorted, minlength=n), out=offsets[1:])

    def flags(arr: pa.Array) -> np.ndarray:
      out = np.zeros(n, bool)
      hit = pc.index_in(nodes, value_set=arr) if len(arr) else None
      if hit is not None:
        out[:] = pc.is_valid(hit).to_numpy(zero_copy_only=False)
      return out

    hidden_mask = flags(hidden)
    has_page = np.ones(n, bool) if pages_arr is None else flags(pages_arr)
    root_hit = pc.index_in(pa.array([root], pa.large_string()), value_set=nodes)[0].as_py()
    depth = _bfs_depth(n, parents, c_sorted.astype(np.int32), -1 if root_hit is None else root_hit)
    # Aliases whose target is a node; sorted for binary search.
    target_ids = pc.index_in(alias_dst, value_set=nodes)
    valid = pc.is_valid(target_ids)
    alias_titles, alias_targets = alias_src.filter(valid), target_ids.filter(valid)
    order = pc.sort_indices(alias_titles)
    alias_titles = pc.take(alias_titles, order)
    alias_targets = pc.take(alias_targets, order).to_numpy(zero_copy_only=False).astype(np.int32)
    return cls(nodes, offsets, parents, hidden_mask, depth, has_page, alias_titles, alias_targets,
               root)

  # --- storage ------------------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """One .npz (no pickles), written to a temporary file and renamed: a crash leaves no half file."""
    t_off, t_data = _blob(self._titles_arrow)
    a_off, a_data = _blob(self._alias_arrow)
    arrays = dict(
        format_version=np.array(FORMAT_VERSION), root=np.frombuffer(self.root.encode(), np.uint8),
        titles_offsets=t_off, titles_data=t_data, hidden=self.hidden, depth=self.depth,
        has_page=self.has_page, parent_offsets=self._offsets, parent_indices=self._parents,
        alias_offsets=a_off, alias_data=a_data, alias_targets=self.alias_targets)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A plain open, not mkstemp: the file gets the umask's mode (0644) like every other output.
    tmp = os.path.join(directory, f".graph-{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "xb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  @classmethod
  def load(cls, path: str) -> CategoryGraph:
    try:
      with np.load(path, allow_pickle=False) as z:
        version = int(z["format_version"])
        if version != FORMAT_VERSION:
          raise InputError(f"{path}: category graph format {version}, this code reads "
                           f"{FORMAT_VERSION}")
        return cls(_unblob(z["titles_offsets"], z["titles_data"]), z["parent_offsets"],
                   z["parent_indices"], z["hidden"], z["depth"], z["has_page"],
                   _unblob(z["alias_offsets"], z["alias_data"]), z["alias_targets"],
                   bytes(z["root"]).decode())
    except (OSError, KeyError, ValueError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(f"{path}: not a category graph file ({type(e).__name__}: {e})") from None
