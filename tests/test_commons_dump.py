"""The Commons category graph (labels/graph.py) and its build from a dump (labels/dump.py).

The fixture tests/fixtures/commons/commons-sample-pages-articles.xml is a dump excerpt in the real
export format; the expected graph below is derived by hand from its pages. The multistream form is
made here from it: a header stream, streams of 3 pages, a footer stream, and the bz2 index.
"""

from __future__ import annotations

import bz2
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from wikitopics_jax.errors import InputError
from wikitopics_jax.labels import dump
from wikitopics_jax.labels.graph import CategoryGraph, normalize_title

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "commons", "commons-sample-pages-articles.xml")

EDGES = {
    "Topics": ["CommonsRoot"], "Nature": ["Topics"], "Animals": ["Nature", "Topics"],
    # [[Category:Fake]] inside wpTextbox1.value+='...' is not a link; Pets' parent is a soft redirect.
    "Dogs": ["Animals", "Pets"], "Pets": ["Animals"],
    # Old dogs -> Dogs and Dogs again: one edge; the self link is dropped.
    "Puppies": ["Dogs"], "Media needing categories": ["Topics"], "CC-BY-SA-4.0": ["License tags"],
    "Paris (disambiguation)": ["Nature"], "Files from Flickr": ["Media contributed by Flickr"],
    "Disputed cats": ["Animals", "Categories for discussion/2020/01"], "Orphan": ["Nowhere"],
}
PAGES = {"CommonsRoot", "Photos by User:Alice", "Wiki maintenance"} | set(EDGES)
RED_LINKS = {"License tags", "Media contributed by Flickr", "Categories for discussion/2020/01",
             "Nowhere"}
HIDDEN = {"Media needing categories", "CC-BY-SA-4.0", "Photos by User:Alice",
          "Paris (disambiguation)", "Files from Flickr", "Disputed cats", "Wiki maintenance"}
REDIRECTS = {"Domestic animals": "Animals", "Old dogs": "Dogs", "Lost cats": "Disputed cats"}
DEPTH = {"CommonsRoot": 0, "Topics": 1, "Nature": 2, "Animals": 2, "Media needing categories": 2,
         "Dogs": 3, "Pets": 3, "Paris (disambiguation)": 3, "Disputed cats": 3, "Puppies": 4}
ALL_FILES = {"Dog photo.jpg": ["Dogs", "Red link cat"], "Cat.jpg": ["Animals"],
             "Puppy.jpg": ["Puppies", "Pets"], "Unwanted.png": ["Nature"], "No cats.jpg": []}


def make_multistream(xml_path: str, out_dir: str, *, pages_per_stream: int = 3,
                     corrupt_stream: int | None = None) -> tuple[str, str]:
  """(dump, index) in the layout of Wikimedia's -multistream.xml.bz2 files."""
  with open(xml_path, encoding="utf-8") as f:
    text = f.read()
  first = text.index("  <page>")
  end = text.rindex("</mediawiki>")
  pages = re.findall(r"  <page>.*?</page>\n", text[first:end], flags=re.S)
  assert "".join(pages) == text[first:end]
  dump_path = os.path.join(out_dir, "sample-multistream.xml.bz2")
  index_lines = []
  with open(dump_path, "wb") as f:
    f.write(bz2.compress(text[:first].encode()))
    for n, start in enumerate(range(0, len(pages), pages_per_stream)):
      group = pages[start:start + pages_per_stream]
      offset = f.tell()
      for page in group:
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        page_id = re.search(r"<id>(\d+)</id>", page).group(1)
        index_lines.append(f"{offset}:{page_id}:{title.replace('&amp;', '&')}\n")
      data = "".join(group).encode()
      if n == corrupt_stream:
        data = data.replace(b"</title>", b"</titel>", 1)
      f.write(bz2.compress(data))
    f.write(bz2.compress(text[end:].encode()))
  index_path = os.path.join(out_dir, "sample-multistream-index.txt.bz2")
  with bz2.open(index_path, "wt", encoding="utf-8") as f:
    f.writelines(index_lines)
  return dump_path, index_path


def check_graph(g: CategoryGraph):
  titles = list(g.titles)
  assert titles == sorted(PAGES | RED_LINKS)
  edges = {t: sorted(g.titles[p] for p in g.parents(i)) for i, t in enumerate(titles)
           if len(g.parents(i))}
  assert edges == {k: sorted(v) for k, v in EDGES.items()}
  assert {t for t, h in zip(titles, g.hidden) if h} == HIDDEN
  assert {t for t, p in zip(titles, g.has_page) if not p} == RED_LINKS
  assert {t: int(d) for t, d in zip(titles, g.depth) if d >= 0} == DEPTH
  for alias, target in REDIRECTS.items():
    assert g.index(f"Category:{alias.replace(' ', '_')}") == titles.index(target)
  assert g.index("Category redirects") is None and g.index("Fake") is None


def files_of(out_dir: str) -> dict[str, list[str]]:
  table = pq.read_table(os.path.join(out_dir, "files.parquet"))
  assert table.column_names == ["file", "categories"]
  return dict(zip(table["file"].to_pylist(), table["categories"].to_pylist()))


def test_normalize_title():
  assert normalize_title("Category:foo_bar") == "Foo bar"
  assert normalize_title(" category :  foo   bar ") == "Foo bar"
  assert normalize_title("Foo#Section") == "Foo"
  assert normalize_title("Caf%C3%A9s_in_Paris") == "Cafés in Paris"
  assert normalize_title("ßtraße") == "ßtraße"
  assert dump.normalize_file_title("File:dog_photo.jpg") == "Dog photo.jpg"
  assert dump.file_title_from_url(
      "https://upload.wikimedia.org/wikipedia/commons/a/ab/Dog_photo%21.jpg") == "Dog photo!.jpg"
  assert dump.file_title_from_url(
      "https://upload.wikimedia.org/wikipedia/en/a/ab/Local.jpg") is None


def test_from_edges_and_storage(tmp_path):
  g = CategoryGraph.from_edges(
      [("Category:A", "CommonsRoot"), ("b", "A"), ("C", "B"), ("C", "Old_a"), ("D", "E"),
       ("B", "B"), ("b", "a")],
      hidden=["E"], redirects={"Old a": "A", "X": "Y", "Y": "A"}, pages=["CommonsRoot", "A", "B",
                                                                        "C", "D", "E"])
  assert list(g.titles) == ["A", "B", "C", "CommonsRoot", "D", "E"] and len(g) == 6
  assert g.parents(g.index("C")).tolist() == [0, 1] and g.parents(g.index("B")).dtype == np.int32
  assert g.parents(g.index("B")).tolist() == [0]  # Self loop and duplicate gone.
  assert g.depth.tolist() == [1, 2, 2, 0, -1, -1] and g.depth.dtype == np.int32
  assert g.hidden.tolist() == [False] * 5 + [True]
  assert g.index("x") == 0 and g.index("Category:Old a") == 0 and g.index("zz") is None
  assert g.indices(["X", "c", "q"]).tolist() == [0, 2, -1]
  assert sorted(g.children(0).tolist()) == [1, 2]
  path = str(tmp_path / "g.npz")
  g.save(path)
  h = CategoryGraph.load(path)
  assert list(h.titles) == list(g.titles) and h.index("y") == 0
  for name in ("hidden", "depth", "has_page", "alias_targets"):
    np.testing.assert_array_equal(getattr(h, name), getattr(g, name))
  assert all(h.parents(i).tolist() == g.parents(i).tolist() for i in range(len(g)))
  assert os.listdir(tmp_path) == ["g.npz"]  # No temporary file left.
  # Without the root every depth is -1; a graph with no edges still works.
  assert (CategoryGraph.from_edges([("A", "B")]).depth == -1).all()
  assert len(CategoryGraph.from_edges([], pages=["A"])) == 1


@pytest.mark.parametrize("num_queries", [3, 400])  # Binary search / hash probe.
def test_indices_agree_with_index(num_queries):
  names = [f"Topic {i:03d} with a title longer than fifteen bytes" for i in range(300)]
  g = CategoryGraph.from_edges([(names[i], names[i // 2]) for i in range(1, 300)],
                               redirects={"Old topic": names[7]}, root=names[0])
  rng = np.random.default_rng(0)
  query = [names[i] for i in rng.integers(0, 300, num_queries - 2)] + ["old_topic", "Nope"]
  expected = [g.index(t) for t in query]
  assert g.indices(query).tolist() == [-1 if i is None else i for i in expected]
  assert expected[-2:] == [g.index(names[7]), None]
  assert g.depth[g.index(names[299])] == 9  # 299 -> 149 -> 74 -> 37 -> 18 -> 9 -> 4 -> 2 -> 1 -> 0


def test_load_rejects_other_files(tmp_path):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(InputError, match="bad.npz: not a category graph"):
    CategoryGraph.load(str(bad))


@pytest.mark.parametrize("form", ["xml", "xml.bz2", "multistream"])
def test_dump_to_graph(tmp_path, form):
  if form == "xml":
    path, index = FIXTURE, None
  elif form == "xml.bz2":
    path, index = str(tmp_path / "sample.xml.bz2"), None
    with open(FIXTURE, "rb") as f, bz2.open(path, "wb") as out:
      out.write(f.read())
  else:
    path, index = make_multistream(FIXTURE, str(tmp_path))
  summary = dump.run_categories(path, str(tmp_path / "out"), index=index, blocks_per_chunk=2,
                                num_workers=1, log=lambda _: None)
  check_graph(CategoryGraph.load(str(tmp_path / "out" / "graph.npz")))
  assert files_of(str(tmp_path / "out")) == ALL_FILES
  assert summary.line() == ("15 categories (7 hidden, 4 red links, 9 not connected to "
                            "CommonsRoot), 3 redirects, 15 edges, 5 files")


def test_wit_selection_and_parallel_workers(tmp_path):
  # WIT rows: English Commons images; "Old name.jpg" redirects to Puppy.jpg, which no row names, so
  # its page is read in the second pass; another language's row and a local file are ignored.
  rows = [("en", "https://upload.wikimedia.org/wikipedia/commons/1/1a/Dog_photo.jpg"),
          ("en", "https://upload.wikimedia.org/wikipedia/commons/2/2b/Old_name.jpg"),
          ("en", "http://upload.wikimedia.org/wikipedia/commons/thumb/3/3c/Cat.jpg/120px-Cat.jpg"),
          ("en", "https://upload.wikimedia.org/wikipedia/commons/4/4d/Missing.jpg"),
          ("de", "https://upload.wikimedia.org/wikipedia/commons/5/5e/Unwanted.png"),
          ("en", "https://upload.wikimedia.org/wikipedia/en/6/6f/No_cats.jpg")]
  tsv = tmp_path / "wit.tsv"
  tsv.write_text("language\timage_url\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
  dump_path, index = make_multistream(FIXTURE, str(tmp_path))
  summary = dump.run_categories(dump_path, str(tmp_path / "out"), index=index, wit_tsv=[str(tsv)],
                                num_workers=2, blocks_per_chunk=1, log=lambda _: None)
  assert files_of(str(tmp_path / "out")) == {
      "Cat.jpg": ["Animals"], "Dog photo.jpg": ["Dogs", "Red link cat"],
      "Old name.jpg": ["Puppies", "Pets"]}
  assert (summary.files, summary.wanted, summary.missing) == (3, 4, 1)
  check_graph(CategoryGraph.load(str(tmp_path / "out" / "graph.npz")))


class Interrupted(Exception):
  pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
  dump_path, index = make_multistream(FIXTURE, str(tmp_path))
  full = tmp_path / "full"
  dump.run_categories(dump_path, str(full), index=index, blocks_per_chunk=1, num_workers=1,
                      log=lambda _: None)

  def stop_after_three(_):
    written.append(_)
    if len(written) == 3:
      raise Interrupted

  written = []
  resumed = tmp_path / "resumed"
  with pytest.raises(Interrupted):
    dump.run_categories(dump_path, str(resumed), index=index, blocks_per_chunk=1, num_workers=1,
                        on_part=stop_after_three, log=lambda _: None)
  assert not (resumed / "graph.npz").exists()
  # A chunk killed mid-write leaves only a temporary file, which is not a part.
  (resumed / "parts" / "part-000005.parquet.tmp123").write_bytes(b"half")
  written, logs = [], []
  dump.run_categories(dump_path, str(resumed), index=index, blocks_per_chunk=1, num_workers=1,
                      on_part=written.append, log=logs.append)
  num_parts = len([p for p in os.listdir(full / "parts") if p.startswith("part-")])
  assert len(written) == num_parts - 3 and f"3 of {num_parts} parts done" in logs[0] and num_parts == 9
  for name in ("graph.npz", "files.parquet"):
    assert (resumed / name).read_bytes() == (full / name).read_bytes(), name


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
  """A real SIGKILL (no exception handler, no cleanup runs) after the fourth part, then a rerun."""
  dump_path, index = make_multistream(FIXTURE, str(tmp_path))
  full = tmp_path / "full"
  dump.run_categories(dump_path, str(full), index=index, blocks_per_chunk=1, num_workers=1,
                      log=lambda _: None)
  killed = tmp_path / "killed"
  script = (
      "import os, signal\n"
      "from wikitopics_jax.labels import dump\n"
      "done = []\n"
      "def on_part(part):\n"
      "  done.append(part)\n"
      "  if len(done) == 4:\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      f"dump.run_categories({dump_path!r}, {str(killed)!r}, index={index!r}, blocks_per_chunk=1, "
      "num_workers=1, on_part=on_part, log=lambda _: None)\n")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == -9, proc.stderr
  assert not (killed / "graph.npz").exists() and not (killed / "files.parquet").exists()
  logs = []
  dump.run_categories(dump_path, str(killed), index=index, blocks_per_chunk=1, num_workers=1,
                      log=logs.append)
  assert any("4 of 9 parts done" in line for line in logs), logs
  for name in ("graph.npz", "files.parquet"):
    assert (killed / name).read_bytes() == (full / name).read_bytes(), name


def test_malformed_pages_are_named(tmp_path):
  text = open(FIXTURE, encoding="utf-8").read()
  no_ns = text.replace("<ns>14</ns>\n    <id>5</id>", "<id>5</id>", 1)
  (tmp_path / "no_ns.xml").write_text(no_ns)
  with pytest.raises(InputError, match=r"no_ns.xml: page 'Category:Dogs' \(id 5\) .* has no <ns>"):
    dump.run_categories(str(tmp_path / "no_ns.xml"), str(tmp_path / "o1"), log=lambda _: None)
  third = [m.start() for m in re.finditer("</title>", text)][2]
  (tmp_path / "broken.xml").write_text(text[:third] + "</titel>" + text[third + 8:])
  with pytest.raises(InputError, match=r"broken.xml: malformed XML at line \d+ column \d+ after "
                                       r"page 'Category:Topics' \(id 2\): mismatched tag$"):
    dump.run_categories(str(tmp_path / "broken.xml"), str(tmp_path / "o2"), log=lambda _: None)
  dump_path, index = make_multistream(FIXTURE, str(tmp_path), corrupt_stream=2)
  offset = int(bz2.open(index, "rt").read().splitlines()[6].split(":")[0])
  with pytest.raises(InputError, match=rf"stream at byte {offset} \(starting with page "
                                       r"'Category:Domestic animals' \(id 7\)\): malformed XML at line 2 "):
    dump.run_categories(dump_path, str(tmp_path / "o3"), index=index, num_workers=1,
                        log=lambda _: None)


def test_cli_summary_and_one_line_errors(tmp_path):
  dump_path, index = make_multistream(FIXTURE, str(tmp_path))
  cmd = [sys.executable, "-m", "wikitopics_jax.main", "categories"]
  proc = subprocess.run(cmd + [f"--dump={dump_path}", f"--dump_index={index}",
                               f"--out={tmp_path / 'out'}", "--num_workers=1"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().endswith("3 redirects, 15 edges, 5 files")
  proc = subprocess.run(cmd + [f"--dump={tmp_path / 'nope.xml'}", f"--out={tmp_path / 'o'}"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope.xml'}: dump not found"
