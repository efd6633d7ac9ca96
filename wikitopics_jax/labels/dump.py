"""From a Wikimedia Commons XML dump to the category graph and the file -> categories table.

Step 1 (`extract_parts`) streams the dump's pages into Parquet parts, one per chunk of pages:
category pages (namespace 14) with their parent links, redirect target and hidden flag, and file
pages (namespace 6) with their category links. A multistream dump (``*-multistream.xml.bz2`` with its
``*-multistream-index.txt.bz2``) is a concatenation of independent bz2 streams of 100 pages each, whose
byte offsets the index lists; chunks of those streams are parsed in parallel processes, each part is
written to a temporary name and renamed, and a rerun skips the parts that exist, so a killed run loses
only the chunks in flight. A plain ``.xml`` or ``.xml.bz2`` is read sequentially and a rerun starts
over. Memory is bounded by a chunk: pages are parsed with iterparse and cleared as they end.

Step 2 (`build_outputs`) reads the parts: redirects resolved, the graph built (`graph.CategoryGraph`)
and saved as ``graph.npz``, and ``files.parquet`` written: each file's non-hidden categories, after
redirects, in wikitext order without repeats.

The rules follow the thesis prototype (epfl-dlab/wiki_image_classification,
src/parsing/generateCategories.ipynb); docs/labels.md lists them and where we differ.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError
from wikitopics_jax.labels import graph as graph_lib

NS_FILE = 6
NS_CATEGORY = 14
# 100 streams of 100 pages: ~10k pages, a few seconds of parsing, per part.
BLOCKS_PER_CHUNK = 100
PAGES_PER_CHUNK = 10_000  # Plain dumps: pages per part.

# [[Category:X]] or [[Category:X|sort key]]; as the prototype, not inside the JavaScript strings
# that some pages' text holds (wpTextbox1.value+='[[Category:...]]').
CATEGORY_LINK = re.compile(
    r"(?<!wpTextbox1\.value\+=')(?<!wpTextbox1\.value=')"
    r"\[\[\s*[cC][aA][tT][eE][gG][oO][rR][yY]\s*:([^|\]\n]*)(?:\|[^\]]*)?\]\]")
# The prototype's hidden-category rule, verbatim in meaning: the magic word, {{Hiddencat}}, user
# categories, disambiguation pages, global maintenance categories, and categories filed under
# "Categories for discussion..." or "Media contributed by...". Template names match as MediaWiki does
# (first letter either case).
HIDDEN = re.compile(
    r"__HIDDENCAT__"
    r"|\{\{\s*[hH]iddencat\s*\}\}"
    r"|\{\{\s*[uU]ser category.*?\}\}"
    r"|\{\{\s*[dD]isambig.*?\}\}"
    r"|\{\{\s*[gG]lobal maintenance category\s*\}\}"
    r"|\[\[\s*[cC]ategory\s*:\s*Categories for discussion[^|\]]*(?:\|[^\]]*)?\]\]"
    r"|\[\[\s*[cC]ategory\s*:\s*Media contributed by[^|\]]*(?:\|[^\]]*)?\]\]", re.DOTALL)
# Commons' soft category redirects, {{Category redirect|Target}} and the template's redirects.
# The prototype only followed hard redirects (<redirect title=.../>); most Commons category
# redirects are soft ones, so both count here.
SOFT_REDIRECT = re.compile(
    r"\{\{\s*(?:[cC]ategory ?[rR]edirect|[cC]at ?redirect|[cC]at-red|[sS]eecat)\s*\|"
    r"\s*(?:1\s*=\s*)?([^|}\n]+)")

PART_SCHEMA = pa.schema([
    ("ns", pa.int8()), ("page_id", pa.int64()), ("title", pa.string()),
    ("redirect", pa.string()), ("hidden", pa.bool_()), ("links", pa.list_(pa.string())),
])
FILES_SCHEMA = pa.schema([("file", pa.string()), ("categories", pa.list_(pa.string()))])


def normalize_file_title(title: str) -> str:
  """"File:Foo_bar.jpg" / "foo bar.jpg" -> "Foo bar.jpg" (as in the dump's page titles)."""
  title = " ".join(title.replace("_", " ").split())
  if title[:5].lower() == "file:":
    title = title[5:].lstrip()
  if title:
    first = title[0].upper()
    if len(first) == 1:
      title = first + title[1:]
  return title


def file_title_from_url(url: str) -> str | None:
  """The Commons file title of an upload URL; None for another wiki's local file."""
  parsed = wit.parse_image_url(url)
  return normalize_file_title(parsed.name) if parsed.project == "commons" else None


# --- parsing --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Page:
  title: str
  ns: int
  page_id: int
  redirect: str | None
  text: str


def _local(tag: str) -> str:
  return tag.rpartition("}")[2]


def iter_pages(source, *, where: str) -> Iterator[Page]:
  """Pages of MediaWiki export XML (a whole dump, or <page> elements under any root), streaming.

  Each <page> is cleared once read and detached from the root, so memory holds one page at a time.
  Malformed XML or a page without title/ns/id raises a one-line InputError naming `where` and the
  page (or the last good page before the break).
  """
  last = "the first page"
  root = None
  try:
    for event, elem in ET.iterparse(source, events=("start", "end")):
      if event == "start":
        if root is None:
          root = elem
        continue
      if _local(elem.tag) != "page":
        continue
      fields = {}
      redirect = None
      text = ""
      for child in elem:
        name = _local(child.tag)
        if name in ("title", "ns", "id") and name not in fields:
          fields[name] = (child.text or "").strip()
        elif name == "redirect":
          redirect = child.get("title")
        elif name == "revision":
          for sub in child:  # The last revision's text (a dump with history has several).
            if _local(sub.tag) == "text":
              text = sub.text or ""
      title, page_id = fields.get("title"), fields.get("id")
      who = f"page {title!r}" if title else "a page"
      who += f" (id {page_id})" if page_id else ""
      for name in ("title", "ns", "id"):
        if not fields.get(name):
          raise InputError(f"{where}: {who} after {last} has no <{name}>")
      try:
        ns, pid = int(fields["ns"]), int(page_id)
      except ValueError:
        raise InputError(f"{where}: {who}: <ns> {fields['ns']!r} / <id> {page_id!r} is not an "
                         f"integer") from None
      last = f"page {title!r} (id {pid})"
      elem.clear()
      if root is not None and root is not elem:
        root.clear()  # Drops the references the root keeps to finished pages.
      yield Page(title, ns, pid, redirect, text)
  except ET.ParseError as e:
    line, column = e.position
    raise InputError(f"{where}: malformed XML at line {line} column {column} after {last}: "
                     f"{str(e).rsplit(': line ', 1)[0]}") from None


def page_record(page: Page, wanted: frozenset[str] | None) -> dict | None:
  """The part row of a category or file page; None for other namespaces and unwanted files."""
  if page.ns == NS_CATEGORY:
    title = graph_lib.normalize_title(page.title)
    redirect = page.redirect
    if redirect is None:
      soft = SOFT_REDIRECT.search(page.text)
      redirect = soft.group(1) if soft else None
    if redirect is not None:
      redirect = graph_lib.normalize_title(redirect) or None
    links = [graph_lib.normalize_title(m) for m in CATEGORY_LINK.findall(page.text)]
    return dict(ns=NS_CATEGORY, page_id=page.page_id, title=title, redirect=redirect,
                hidden=HIDDEN.search(page.text) is not None,
                links=list(dict.fromkeys(t for t in links if t)))
  if page.ns == NS_FILE:
    title = normalize_file_title(page.title)
    if wanted is not None and title not in wanted:
      return None
    redirect = normalize_file_title(page.redirect) if page.redirect else None
    links = [graph_lib.normalize_title(m) for m in CATEGORY_LINK.findall(page.text)]
    return dict(ns=NS_FILE, page_id=page.page_id, title=title, redirect=redirect, hidden=False,
                links=list(dict.fromkeys(t for t in links if t)))
  return None


# --- the dump's layout ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Block:
  """One bz2 stream of a multistream dump: bytes [start, stop), and its first page from the index."""
  start: int
  stop: int
  first_page: str


def read_index(path: str, dump_size: int) -> list[Block]:
  """The streams listed by a multistream index (lines ``offset:page_id:title``), in file order."""
  starts: dict[int, str] = {}
  try:
    with bz2.open(path, "rt", encoding="utf-8") if path.endswith(".bz2") else open(
        path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line:
          continue
        offset, sep1, rest = line.partition(":")
        page_id, sep2, title = rest.partition(":")
        if not (sep1 and sep2 and offset.isdigit()):
          raise InputError(f"{path}:{n}: not an index line offset:page_id:title: {line[:80]!r}")
        starts.setdefault(int(offset), f"page {title!r} (id {page_id})")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise InputError(f"{path}: unreadable index ({type(e).__name__}: {e})") from None
  offsets = sorted(starts)
  if offsets and offsets[-1] >= dump_size:
    raise InputError(f"{path}: offset {offsets[-1]} is past the end of the dump ({dump_size} bytes)")
  # The last stream runs to the end of the file, footer stream (</mediawiki>) included.
  stops = offsets[1:] + [dump_size]
  return [Block(a, b, starts[a]) for a, b in zip(offsets, stops)]


def _block_pages(dump: str, block: Block) -> Iterator[Page]:
  where = f"{dump}: stream at byte {block.start} (starting with {block.first_page})"
  with open(dump, "rb") as f:
    f.seek(block.start)
    raw = f.read(block.stop - block.start)
  try:
    data = bz2.decompress(raw)  # Also reads a following footer stream.
  except (OSError, EOFError, ValueError) as e:
    raise InputError(f"{where}: not a bz2 stream ({e})") from None
  # A stream holds bare <page> elements; the root's open/close tags sit in the first/last streams.
  head = data.find(b"<page")
  data = data[head:] if head >= 0 else b""
  tail = data.rfind(b"</mediawiki>")
  if tail >= 0:
    data = data[:tail]
  yield from iter_pages(io.BytesIO(b"<pages>" + data + b"</pages>"), where=where)


# --- step 1: parts --------------------------------------------------------------------------------

def _write_part(path: str, records: list[dict]) -> None:
  table = pa.Table.from_pylist(records, schema=PART_SCHEMA)
  tmp = f"{path}.tmp{os.getpid()}"
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def _part_path(parts_dir: str, chunk: int) -> str:
  return os.path.join(parts_dir, f"part-{chunk:06d}.parquet")


_WORKER_WANTED: frozenset[str] | None = None


def _init_worker(wanted_path: str | None) -> None:
  global _WORKER_WANTED
  _WORKER_WANTED = _load_wanted(wanted_path)


def _load_wanted(path: str | None) -> frozenset[str] | None:
  if path is None:
    return None
  with open(path, encoding="utf-8") as f:
    return frozenset(f.read().split("\n")) - {""}


def _do_chunk(args: tuple[str, str, int, Sequence[Block]]) -> int:
  dump, parts_dir, chunk, blocks = args
  records = []
  for block in blocks:
    for page in _block_pages(dump, block):
      record = page_record(page, _WORKER_WANTED)
      if record is not None:
        records.append(record)
  _write_part(_part_path(parts_dir, chunk), records)
  return chunk


def _plan(dump: str, index: str | None, wanted_path: str | None, blocks_per_chunk: int) -> dict:
  st = os.stat(dump)
  digest = None
  if wanted_path is not None:
    with open(wanted_path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  return dict(dump=os.path.abspath(dump), size=st.st_size, mtime_ns=st.st_mtime_ns,
              index=os.path.abspath(index) if index else None, wanted_sha256=digest,
              blocks_per_chunk=blocks_per_chunk if index else None,
              pages_per_chunk=None if index else PAGES_PER_CHUNK, version=1)


def extract_parts(dump: str, parts_dir: str, *, index: str | None = None,
                  wanted_path: str | None = None, num_workers: int = 0,
                  blocks_per_chunk: int = BLOCKS_PER_CHUNK,
                  on_part: Callable[[int], None] | None = None,
                  log: Callable[[str], None] = print) -> int:
  """Writes parts_dir/part-NNNNNN.parquet for the dump; returns the number of parts.

  Parts of an earlier run with the same dump, index and file selection are kept (resume); otherwise
  the folder is emptied first. `on_part(chunk)` is called after each part is written (tests use it
  to interrupt a run). `wanted_path`: a file of file titles, one a line, to keep (None = all).
  """
  if not os.path.isfile(dump):
    raise InputError(f"{dump}: dump not found")
  if index is not None and not os.path.isfile(index):
    raise InputError(f"{index}: dump index not found")
  plan = _plan(dump, index, wanted_path, blocks_per_chunk)
  plan_path = os.path.join(parts_dir, "plan.json")
  old = None
  if os.path.isfile(plan_path):
    with open(plan_path, encoding="utf-8") as f:
      old = json.load(f)
  if old != plan or index is None:  # Plain dumps cannot seek to a chunk: start over.
    if os.path.isdir(parts_dir):
      shutil.rmtree(parts_dir)
    os.makedirs(parts_dir)
    with open(plan_path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(plan, f, indent=1)
    os.replace(plan_path + ".tmp", plan_path)
  if index is None:
    return _extract_sequential(dump, parts_dir, _load_wanted(wanted_path), on_part)

  blocks = read_index(index, plan["size"])
  chunks = [blocks[i:i + blocks_per_chunk] for i in range(0, len(blocks), blocks_per_chunk)]
  todo = [(dump, parts_dir, c, b) for c, b in enumerate(chunks)
          if not os.path.exists(_part_path(parts_dir, c))]
  if len(todo) < len(chunks):
    log(f"{parts_dir}: resuming, {len(chunks) - len(todo)} of {len(chunks)} parts done")
  workers = min(num_workers or os.cpu_count() or 1, max(len(todo), 1))
  t0 = time.monotonic()
  done = 0
  if workers <= 1:
    _init_worker(wanted_path)
    results: Iterable[int] = map(_do_chunk, todo)
    pool = None
  else:
    # Spawned workers: fork would copy the parent's JAX threads (the CLI may have imported JAX).
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (wanted_path,))
    results = pool.imap_unordered(_do_chunk, todo)
  try:
    for chunk in results:
      done += 1
      if on_part is not None:
        on_part(chunk)
      if done % 100 == 0 or done == len(todo):
        log(f"{parts_dir}: {done}/{len(todo)} parts ({time.monotonic() - t0:.0f} s)")
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  return len(chunks)


def _extract_sequential(dump: str, parts_dir: str, wanted: frozenset[str] | None,
                        on_part: Callable[[int], None] | None) -> int:
  opener = bz2.open if dump.endswith(".bz2") else open
  records, pages, chunk = [], 0, 0
  try:
    with opener(dump, "rb") as f:
      for page in iter_pages(f, where=dump):
        record = page_record(page, wanted)
        if record is not None:
          records.append(record)
        pages += 1
        if pages == PAGES_PER_CHUNK:
          _write_part(_part_path(parts_dir, chunk), records)
          if on_part is not None:
            on_part(chunk)
          records, pages, chunk = [], 0, chunk + 1
  except (OSError, EOFError) as e:
    raise InputError(f"{dump}: unreadable ({type(e).__name__}: {e})") from None
  _write_part(_part_path(parts_dir, chunk), records)
  return chunk + 1


# --- step 2: graph and files table ----------------------------------------------------------------

@dataclasses.dataclass
class Summary:
  categories: int = 0
  hidden: int = 0
  red_links: int = 0
  unreachable: int = 0
  redirects: int = 0
  edges: int = 0
  files: int = 0
  wanted: int | None = None
  missing: int = 0

  def line(self) -> str:
    files = f"{self.files} files"
    if self.wanted is not None:
      files += f" ({self.missing} of {self.wanted} wanted titles not in the dump)"
    return (f"{self.categories} categories ({self.hidden} hidden, {self.red_links} red links, "
            f"{self.unreachable} not connected to {graph_lib.ROOT}), {self.redirects} redirects, "
            f"{self.edges} edges, {files}")


def _read_parts(parts_dir: str, ns: int) -> pa.Table:
  paths = sorted(p for p in os.listdir(parts_dir) if p.endswith(".parquet"))
  tables = [pq.read_table(os.path.join(parts_dir, p), filters=[("ns", "=", ns)]) for p in paths]
  return pa.concat_tables(tables) if tables else PART_SCHEMA.empty_table()


def build_graph(parts_dir: str) -> graph_lib.CategoryGraph:
  cats = _read_parts(parts_dir, NS_CATEGORY)
  is_redirect = pc.is_valid(cats["redirect"])
  redirects = cats.filter(is_redirect)
  pages = cats.filter(pc.invert(is_redirect))
  links = pages["links"].combine_chunks()
  child = pc.take(pages["title"].combine_chunks(), pc.list_parent_indices(links))
  return graph_lib.CategoryGraph.from_arrays(
      child, pc.list_flatten(links), hidden=pages["title"].filter(pages["hidden"]),
      redirect_from=redirects["title"], redirect_to=redirects["redirect"], pages=pages["title"])


def _clean_categories(links: pa.Array, graph: graph_lib.CategoryGraph) -> pa.Array:
  """Per file: redirects resolved, hidden categories dropped, repeats dropped (first kept)."""
  if isinstance(links, pa.ChunkedArray):
    links = links.combine_chunks() if links.num_chunks else pa.array([], pa.list_(pa.string()))
  flat = pc.list_flatten(links).cast(pa.large_string())
  row = pc.list_parent_indices(links).to_numpy().astype(np.int64)
  alias = pc.index_in(flat, value_set=graph._alias_arrow)  # pylint: disable=protected-access
  targets = pc.take(graph._titles_arrow,  # pylint: disable=protected-access
                    pa.array(graph.alias_targets, pa.int32()))
  flat = pc.if_else(pc.is_valid(alias), pc.take(targets, alias), flat)
  node = pc.index_in(flat, value_set=graph._titles_arrow)  # pylint: disable=protected-access
  node_np = node.to_numpy(zero_copy_only=False)
  is_node = ~np.isnan(node_np) if node_np.dtype.kind == "f" else np.ones(len(node_np), bool)
  node_ids = np.where(is_node, np.nan_to_num(node_np, nan=0), 0).astype(np.int64)
  keep = ~(is_node & graph.hidden[node_ids])
  # Repeats within a file: the same title twice (an alias and its target, say).
  uniq = pc.index_in(flat, value_set=pc.unique(flat)).to_numpy().astype(np.int64)
  key = row * max(len(flat), 1) + uniq
  _, first = np.unique(key, return_index=True)
  is_first = np.zeros(len(flat), bool)
  is_first[first] = True
  keep &= is_first
  values = flat.filter(pa.array(keep)).cast(pa.string())
  counts = np.bincount(row[keep], minlength=len(links))
  offsets = np.zeros(len(links) + 1, np.int32)
  np.cumsum(counts, out=offsets[1:])
  return pa.ListArray.from_arrays(pa.array(offsets), values)


def _atomic_parquet(table: pa.Table, path: str) -> None:
  # Not mkstemp (0600): the table gets the umask's mode like every other output.
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".files-{uuid.uuid4().hex}.tmp")
  try:
    pq.write_table(table, tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def build_outputs(parts_dir: str, out_dir: str, *, wanted: Sequence[str] | None = None) -> Summary:
  """graph.npz and files.parquet in out_dir from the parts; returns the counts."""
  graph = build_graph(parts_dir)
  graph.save(os.path.join(out_dir, "graph.npz"))
  s = Summary(categories=int(graph.has_page.sum()), hidden=int(graph.hidden.sum()),
              red_links=int((~graph.has_page).sum()), unreachable=int((graph.depth < 0).sum()),
              redirects=len(graph.alias_titles), edges=graph.num_edges)
  files_path = os.path.join(out_dir, "files.parquet")
  if wanted is None:
    # All files: part by part, so memory stays one part's whatever the dump's size.
    tmp = files_path + ".tmp"
    with pq.ParquetWriter(tmp, FILES_SCHEMA) as writer:
      for p in sorted(p for p in os.listdir(parts_dir) if p.endswith(".parquet")):
        t = pq.read_table(os.path.join(parts_dir, p), filters=[("ns", "=", NS_FILE)])
        t = t.filter(pc.invert(pc.is_valid(t["redirect"])))
        if t.num_rows:
          writer.write_table(pa.table({"file": t["title"].combine_chunks(),
                                       "categories": _clean_categories(t["links"], graph)},
                                      schema=FILES_SCHEMA))
          s.files += t.num_rows
    os.replace(tmp, files_path)
    return s
  files = _read_parts(parts_dir, NS_FILE)
  is_redirect = pc.is_valid(files["redirect"])
  file_redirects = dict(zip(files["title"].filter(is_redirect).to_pylist(),
                            files["redirect"].filter(is_redirect).to_pylist()))
  pages = files.filter(pc.invert(is_redirect))
  cats = _clean_categories(pages["links"], graph).to_pylist()
  by_title = dict(zip(pages["title"].to_pylist(), cats))
  # A wanted title that redirects takes its target's categories; the row keeps the wanted title,
  # the join key of the WIT rows.
  wanted = sorted(set(wanted))
  out_titles, out_cats = [], []
  for title in wanted:
    page = file_redirects.get(title, title)
    found = by_title.get(page)
    if found is None:
      s.missing += 1
      continue
    out_titles.append(title)
    out_cats.append(found)
  _atomic_parquet(pa.table({"file": out_titles, "categories": out_cats}, schema=FILES_SCHEMA),
                  files_path)
  s.files, s.wanted = len(out_titles), len(wanted)
  return s


# --- the wanted files -----------------------------------------------------------------------------

def wanted_titles(wit_tsv: Sequence[str] = (), labels: Sequence[str] = ()) -> list[str]:
  """Commons file titles of English WIT rows and of labels tables (the prototype's selection:
  language 'en', '/commons/' URLs)."""
  from wikitopics_jax.data import labels_table  # pylint: disable=g-import-not-at-top
  titles = set()
  for path in wit_tsv:
    for row in wit.iter_rows(path):
      if row.get("language") not in ("en", "") or "/commons/" not in row.image_url:
        continue
      title = file_title_from_url(row.image_url)
      if title:
        titles.add(title)
  for path in labels:
    for row in labels_table.iter_rows(path):
      title = (file_title_from_url(row.url) if row.url and "/wikipedia/" in row.url
               else normalize_file_title(row.title))
      if title:
        titles.add(title)
  return sorted(titles)


def run_categories(dump: str, out_dir: str, *, index: str | None = None,
                   wit_tsv: Sequence[str] = (), labels: Sequence[str] = (), num_workers: int = 0,
                   blocks_per_chunk: int = BLOCKS_PER_CHUNK,
                   on_part: Callable[[int], None] | None = None,
                   log: Callable[[str], None] = print) -> Summary:
  """The `wikitopics categories` command: parts in out_dir/parts, then graph.npz, files.parquet."""
  os.makedirs(out_dir, exist_ok=True)
  wanted = wanted_titles(wit_tsv, labels) if (wit_tsv or labels) else None
  wanted_path = None
  if wanted is not None:
    wanted_path = os.path.join(out_dir, "wanted_files.txt")
    with open(wanted_path + ".tmp", "w", encoding="utf-8") as f:
      f.write("\n".join(wanted))
    os.replace(wanted_path + ".tmp", wanted_path)
  parts_dir = os.path.join(out_dir, "parts")
  extract_parts(dump, parts_dir, index=index, wanted_path=wanted_path, num_workers=num_workers,
                blocks_per_chunk=blocks_per_chunk, on_part=on_part, log=log)
  if wanted is not None:
    _redirect_targets_part(dump, index, parts_dir, log)
  return build_outputs(parts_dir, out_dir, wanted=wanted)


def _redirect_targets_part(dump: str, index: str | None, parts_dir: str,
                           log: Callable[[str], None]) -> None:
  """parts_dir/targets.parquet: the pages that wanted file redirects point to, when not wanted
  themselves (the first pass kept only wanted titles). With an index only their streams are read;
  a plain dump is read once more."""
  path = os.path.join(parts_dir, "targets.parquet")
  if os.path.exists(path):
    return
  files = _read_parts(parts_dir, NS_FILE)
  have = set(files["title"].to_pylist())
  targets = frozenset(t for t in files["redirect"].to_pylist() if t is not None and t not in have)
  records = []
  with contextlib.ExitStack() as stack:
    if targets:
      log(f"{dump}: reading the pages of {len(targets)} file redirect targets")
      for page in _target_pages(dump, index, targets, stack):
        record = page_record(page, targets) if page.ns == NS_FILE else None
        if record is not None:
          records.append(record)
  _write_part(path, records)


def _target_pages(dump: str, index: str | None, targets: frozenset[str],
                  stack: contextlib.ExitStack) -> Iterator[Page]:
  if index is None:
    opener = bz2.open if dump.endswith(".bz2") else open
    return iter_pages(stack.enter_context(opener(dump, "rb")), where=dump)
  starts = set()
  with bz2.open(index, "rt", encoding="utf-8") if index.endswith(".bz2") else open(
      index, encoding="utf-8") as f:
    for line in f:
      offset, _, rest = line.rstrip("\n").partition(":")
      if normalize_file_title(rest.partition(":")[2]) in targets:
        starts.add(int(offset))
  return (page for block in read_index(index, os.path.getsize(dump)) if block.start in starts
          for page in _block_pages(dump, block))
