"""Suite `labels_graph`: the Commons category graph (wikitopics_jax/labels; docs/labels.md).

Section "dump -> graph" (labels/graph.py, labels/dump.py):

* Build + save a synthetic graph of 10,000,000 categories (--tiny: 100,000) from (child, parent)
  title arrays, as `dump.build_graph` gets them from the parts: 1-5 parents per category with
  P(k) ~ 1/k^2 (mean ~1.6, Commons has ~1.7), parents drawn towards older (lower-numbered)
  categories with a power law, so a few hubs have millions of children and depth grows like a real
  taxonomy's. It runs in a fresh process, so its peak RSS (getrusage) is the build's own; the row's
  extra has it, with the file size and the load time.
* Queries on that graph: `index(title)`, `parents(i)` and `depth[i]` per second, against a dict of
  parent lists keyed by title (the prototype's networkx adjacency is such dicts), built on the tiny
  graph only (the 10M one would take tens of GB as Python objects).
* Parsing a synthetic multistream dump (`dump.run_categories`, all CPUs): pages per second, the
  figure the runtime estimate for all of Commons in docs/labels.md scales from.
"""

from __future__ import annotations

import bz2
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wikitopics_jax.bench import runner

SUITE = "labels_graph"
NUM_QUERIES = 100_000


# --- dump -> graph ----------------------------------------------------------------------------------

def synthetic_edges(num_categories: int, *, seed: int = 0) -> tuple[pa.Array, pa.Array]:
  """(child, parent) title arrays of a Commons-like DAG; category 0 is CommonsRoot."""
  rng = np.random.default_rng(seed)
  k = np.arange(1, 6)
  fanout = rng.choice(k, size=num_categories - 1, p=(1 / k**2) / (1 / k**2).sum())
  child = np.repeat(np.arange(1, num_categories, dtype=np.int64), fanout)
  # u^3 leans towards small ids: old, general categories collect most children.
  parent = (child * rng.random(child.size) ** 3).astype(np.int64)
  # Titles in an order unrelated to the ids, so that sorting them is real work.
  perm = rng.permutation(num_categories)
  names = pc.binary_join_element_wise(
      "Topic ", pc.cast(pa.array(perm), pa.string()), " of synthetic things", "")
  names = pc.if_else(pa.array(np.arange(num_categories) == 0), "CommonsRoot", names)
  return pc.take(names, pa.array(child)), pc.take(names, pa.array(parent))


def _build_and_save(num_categories: int, path: str) -> dict:
  """In a fresh process (`python -m wikitopics_jax.bench.labels_suite N PATH`): time and peak RSS."""
  from wikitopics_jax.labels import graph as graph_lib  # pylint: disable=g-import-not-at-top
  child, parent = synthetic_edges(num_categories)
  rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  g = graph_lib.CategoryGraph.from_arrays(child, parent)
  built = time.perf_counter()
  g.save(path)
  saved = time.perf_counter()
  del g, child, parent
  start_load = time.perf_counter()
  h = graph_lib.CategoryGraph.load(path)
  loaded = time.perf_counter()
  return dict(build_s=built - start, save_s=saved - built, load_s=loaded - start_load,
              categories=len(h), edges=h.num_edges, max_depth=int(h.depth.max()),
              unreachable=int((h.depth < 0).sum()), file_mb=os.path.getsize(path) / 2**20,
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              inputs_rss_mb=rss_inputs / 1024)


def build_in_subprocess(num_categories: int, path: str) -> dict:
  proc = subprocess.run([sys.executable, "-m", "wikitopics_jax.bench.labels_suite",
                         str(num_categories), path], capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"graph build of {num_categories} categories failed: {proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _topic(k: int) -> str:
  return "CommonsRoot" if k == 1 else f"Topic {k}"


def synthetic_multistream(out_dir: str, num_pages: int, *, seed: int = 0) -> tuple[str, str]:
  """A multistream dump and index: 90% file pages (~1 KB of {{Information}} and 4 categories),
  10% category pages, streams of 100 pages as Wikimedia's."""
  rng = random.Random(seed)
  num_cats = max(num_pages // 10, 2)
  dump_path, index_path = os.path.join(out_dir, "bench.xml.bz2"), os.path.join(out_dir, "index.bz2")
  lines = []
  with open(dump_path, "wb") as f:
    f.write(bz2.compress(b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" '
                         b'version="0.11">\n<siteinfo><sitename>Bench</sitename></siteinfo>\n'))
    for start in range(0, num_pages, 100):
      offset, pages = f.tell(), []
      for pid in range(start + 1, min(start + 100, num_pages) + 1):
        if pid <= num_cats:
          title, ns = f"Category:{_topic(pid)}", 14
          text = "{{Topic}}\n" + "".join(f"[[Category:{_topic(rng.randint(1, pid - 1))}]]\n"
                                         for _ in range(rng.choice((1, 1, 2, 3)) if pid > 1 else 0))
        else:
          title, ns = f"File:Photo {pid} from somewhere.jpg", 6
          text = ("== {{int:filedesc}} ==\n{{Information\n|description={{en|1=" + "A photo. " * 60
                  + "}}\n|date=2020-01-01\n|source={{own}}\n|author=[[User:Example]]\n}}\n"
                  "{{self|cc-by-sa-4.0}}\n" + "".join(
                      f"[[Category:{_topic(rng.randint(2, num_cats))}]]\n" for _ in range(4)))
        pages.append(f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id><revision>"
                     f"<id>{pid}0</id><text xml:space=\"preserve\">{text}</text></revision>"
                     f"</page>\n")
        lines.append(f"{offset}:{pid}:{title}\n")
      f.write(bz2.compress("".join(pages).encode()))
    f.write(bz2.compress(b"</mediawiki>\n"))
  with bz2.open(index_path, "wt", encoding="utf-8") as f:
    f.writelines(lines)
  return dump_path, index_path


def _graph_rows(ctx: runner.Context) -> list[runner.Row]:
  from wikitopics_jax.labels import dump  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import graph as graph_lib  # pylint: disable=g-import-not-at-top
  num_categories = 100_000 if ctx.tiny else 10_000_000
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "graph.npz")
    info = build_in_subprocess(num_categories, path)
    ctx.log(f"[{SUITE}] build of {num_categories:,} categories: {info}")
    rows.append(runner.Row(
        SUITE, f"build + save a {info['categories']:,}-category graph ({info['edges']:,} edges)",
        "pyarrow hash joins + numpy CSR/BFS", "s",
        runner.Stats.of([info["build_s"] + info["save_s"]]),
        note=(f"one run in a fresh process; peak RSS {info['peak_rss_mb']:,.0f} MB "
              f"(inputs alone {info['inputs_rss_mb']:,.0f} MB), file {info['file_mb']:,.0f} MB, "
              f"load {info['load_s']:.1f} s"),
        extra=info))

    g = graph_lib.CategoryGraph.load(path)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(g), NUM_QUERIES)
    titles = [str(g.titles[i]) for i in ids]
    small = (graph_lib.CategoryGraph.from_arrays(*synthetic_edges(100_000)) if not ctx.tiny else g)
    # The prototype-style baseline: dicts keyed by title, on the 100k graph.
    adjacency = {str(small.titles[i]): [str(small.titles[p]) for p in small.parents(i)]
                 for i in range(len(small))}
    depth = {str(t): int(d) for t, d in zip(small.titles, small.depth)}
    small_titles = [str(small.titles[i]) for i in rng.integers(0, len(small), NUM_QUERIES)]
    measured = f"queries on the {len(g):,}-category graph"
    for what, ours, theirs in (
        ("index(title)", lambda: [g.index(t) for t in titles],
         lambda: [t in adjacency for t in small_titles]),
        ("parents(i)", lambda: [g.parents(i) for i in ids],
         lambda: [adjacency[t] for t in small_titles]),
        ("depth of index(title)", lambda: [g.depth[g.index(t)] for t in titles],
         lambda: [depth[t] for t in small_titles]),
    ):
      out = runner.measure_alternating(
          [runner.Candidate("ours", ours, work=NUM_QUERIES),
           runner.Candidate("dict", theirs, work=NUM_QUERIES)], repeats=3, unit="queries/s")
      rows.append(runner.Row(
          SUITE, f"{what}, {measured}", "CategoryGraph (sorted titles, CSR)", "queries/s",
          out["ours"][0], baseline=f"dict of lists, {len(small):,} categories",
          baseline_stats=out["dict"][0],
          note="baseline holds Python objects: does not scale to 10M in memory"))
    # Vectorised lookup (a hash join) for batches, e.g. all categories of a files table.
    batch = runner.measure_alternating(
        [runner.Candidate("ours", lambda: g.indices(titles, normalized=True), work=NUM_QUERIES)],
        repeats=3, unit="queries/s")["ours"][0]
    rows.append(runner.Row(SUITE, f"indices(titles) in batches of {NUM_QUERIES:,}, {measured}",
                           "CategoryGraph.indices (hash probe)", "queries/s", batch))

    num_pages = 5_000 if ctx.tiny else 100_000
    dump_path, index_path = synthetic_multistream(tmp, num_pages)
    workers = os.cpu_count() or 1

    def parse():
      out_dir = tempfile.mkdtemp(dir=tmp)
      dump.run_categories(dump_path, out_dir, index=index_path, num_workers=workers,
                          blocks_per_chunk=10, log=lambda _: None)

    stats = runner.measure_alternating([runner.Candidate("ours", parse, work=num_pages)],
                                       repeats=1 if ctx.tiny else 2, warmup=0 if ctx.tiny else 1,
                                       unit="pages/s")["ours"][0]
    rows.append(runner.Row(
        SUITE, f"dump -> graph + files table, synthetic multistream dump of {num_pages:,} pages "
        f"({os.path.getsize(dump_path) / 2**20:.1f} MB bz2)", f"dump.run_categories, {workers} "
        "processes", "pages/s", stats,
        note="90% file pages (~1 KB text), 10% category pages; includes process start-up",
        extra={"num_pages": num_pages, "workers": workers}))
  return rows


# --- labelling (labels/heads.py, heuristics.py): rows go below ------------------------------------


def _labelling_rows(ctx: runner.Context) -> list[runner.Row]:
  """Labels of 1,000,000 synthetic files (--tiny: 10,000), 1-10 categories each drawn uniformly,
  through the synthetic 10M-category graph (--tiny: 100k) with headJ+depth and memoisation; 31
  labels seeded at depth-1 categories. The time (and files/s) includes every category's first (memoised) search."""
  from wikitopics_jax import taxonomy as taxonomy_lib  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import graph as graph_lib  # pylint: disable=g-import-not-at-top
  from wikitopics_jax.labels import heuristics  # pylint: disable=g-import-not-at-top
  num_categories = 100_000 if ctx.tiny else 10_000_000
  num_files = 10_000 if ctx.tiny else 1_000_000
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "graph.npz")
    build_in_subprocess(num_categories, path)
    g = graph_lib.CategoryGraph.load(path)
  rng = np.random.default_rng(2)
  shallow = np.flatnonzero(g.depth == 1)
  seeds = rng.choice(shallow, size=min(31, shallow.size), replace=False)
  names = [f"L{k}" for k in range(len(seeds))]
  tax = taxonomy_lib.Taxonomy.from_json({"version": "synthetic", "labels": names,
                                         "parents": {n: [] for n in names},
                                         "seeds": {n: [str(g.titles[i])] for n, i in zip(names, seeds)}})
  counts = rng.integers(1, 11, num_files)
  offsets = np.concatenate([[0], np.cumsum(counts)])
  nodes = rng.integers(0, len(g), int(offsets[-1]))
  labeller = heuristics.Labeller(g, tax, "headJ+depth")
  start = time.perf_counter()
  masks = heuristics.label_masks(labeller, offsets, nodes)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  visited = labeller.stats()["categories_visited"]
  ctx.log(f"[{SUITE}] labelled {num_files:,} files in {seconds:.1f} s; {labeller.stats()}")
  return [runner.Row(
      SUITE, f"label {num_files:,} files (1-10 categories each) through a {len(g):,}-category "
      "graph, headJ+depth", "Labeller (memoised, bit-mask labels)", "s",
      runner.Stats.of([seconds]),
      note=(f"{num_files / seconds:,.0f} files/s; one cold run: {visited:,} categories searched and memoised, "
            f"{int((masks != 0).sum()):,} files labelled; process peak RSS {peak:,.0f} MB "
            "(includes the graph and the suite's earlier rows)"),
      extra={"files": num_files, "seconds": seconds, "categories_visited": visited,
             "peak_rss_mb": peak})]


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  return _graph_rows(ctx) + _labelling_rows(ctx)


if __name__ == "__main__":
  print(json.dumps(_build_and_save(int(sys.argv[1]), sys.argv[2])))
