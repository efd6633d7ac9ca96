"""The labelling heuristics on a hand-built category graph; expected labels derived by hand."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import precision_recall_fscore_support

from wikitopics_jax.data import labels_table
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError
from wikitopics_jax.labels import heuristics
from wikitopics_jax.labels import human_eval
from wikitopics_jax.labels.graph import CategoryGraph

# A is a child label of P; seeds: Animalia -> A, Buildings -> B, Nature -> P.
TAX = taxonomy_lib.Taxonomy.from_json({
    "version": "test", "labels": ["A", "B", "P"], "parents": {"A": ["P"], "B": [], "P": []},
    "seeds": {"A": ["Animalia"], "B": ["Buildings"], "P": ["Nature"]}})

# Depths (edges from CommonsRoot): Nature 1, Buildings 1, Paris 1, Animalia 2, Dogs 3,
# Dogs in Paris 2 (via Paris), Museums 2, Museums in Paris 2, Art museums in Paris 3, Wolves 1,
# Trees in X 1, Trees in Y 2, 1900 in zoology 3, Hidden cat 3.
EDGES = [
    ("Nature", "CommonsRoot"), ("Buildings", "CommonsRoot"), ("Paris", "CommonsRoot"),
    ("Animalia", "Nature"), ("Dogs", "Animalia"),
    ("Dogs in Paris", "Dogs"), ("Dogs in Paris", "Paris"),
    ("Museums", "Buildings"), ("Museums in Paris", "Museums"), ("Museums in Paris", "Paris"),
    ("Art museums in Paris", "Museums in Paris"),
    ("Wolves", "Animalia"), ("Wolves", "CommonsRoot"),
    ("Trees in X", "Trees in Y"), ("Trees in Y", "Trees in X"), ("Trees in Y", "Nature"),
    ("Trees in X", "CommonsRoot"),
    ("1900 in zoology", "Animalia"), ("Hidden cat", "Animalia"),
    ("Lost", "Unconnected parent"),
]


def graph():
  return CategoryGraph.from_edges(EDGES, hidden=["Hidden cat"])


def labels(spec, title, hierarchical=False, graph_=None):
  lab = heuristics.Labeller(graph_ or graph(), TAX, spec, hierarchical=hierarchical)
  return lab.category_labels(title)


def test_graph_depths_as_derived():
  g = graph()
  depth = {t: int(g.depth[g.index(t)]) for t in ("Dogs in Paris", "Art museums in Paris", "Wolves",
                                                 "Trees in Y", "Museums", "Lost")}
  assert depth == {"Dogs in Paris": 2, "Art museums in Paris": 3, "Wolves": 1, "Trees in Y": 2,
                   "Museums": 2, "Lost": -1}


@pytest.mark.parametrize("spec,title,expected", [
    # Dogs in Paris: depth reaches Paris -> CommonsRoot (nothing); head reaches Dogs, whose only
    # parent Animalia has another head, so head alone stops there; Dogs is deeper than Dogs in
    # Paris, so headJ does not jump to it.
    ("depth", "Dogs in Paris", ()),
    ("head", "Dogs in Paris", ()),
    ("headJ", "Dogs in Paris", ()),
    ("head+depth", "Dogs in Paris", ("A",)),     # Dogs falls through to depth -> Animalia.
    ("depth+head", "Dogs in Paris", ("A",)),     # depth gives nothing, then head -> Dogs -> depth.
    ("headJ+depth", "Dogs in Paris", ()),        # depth -> Paris -> CommonsRoot: nothing.
    # Art museums in Paris: "Art museums" is shortened to "Museums", the head of Museums in Paris.
    ("headJ", "Art museums in Paris", ()),       # jumps to Museums, where headJ finds nothing.
    ("headJ+depth", "Art museums in Paris", ("B",)),  # ... and Museums -> depth -> Buildings.
    ("head", "Art museums in Paris", ()),        # -> Museums in Paris -> Museums: no shared head.
    ("head+depth", "Art museums in Paris", ("B",)),
    ("depth", "Art museums in Paris", ()),       # -> Museums in Paris -> Paris -> CommonsRoot.
    # Wolves: Animalia is deeper (2 > 1), so only lookahead (a seed parent) finds it.
    ("depth", "Wolves", ()),
    ("lookahead", "Wolves", ("A",)),
    ("depth+lookahead", "Wolves", ("A",)),
    ("lookahead+depth", "Wolves", ("A",)),
    # A null head (a number) and a hidden category give nothing, whatever the heuristics.
    ("lookahead+depth", "1900 in zoology", ()),
    ("lookahead+depth", "Hidden cat", ()),
    ("depth", "Lost", ()),                       # unconnected
    ("depth", "Not in the graph", ()),           # red link
    ("depth", "Animalia", ("A",)),               # a seed
])
def test_heuristics_hand_derived(spec, title, expected):
  assert labels(spec, title) == expected


def test_hierarchical_seeds_give_ancestor_labels():
  assert labels("depth", "Dogs", hierarchical=True) == ("A", "P")
  assert labels("depth", "Dogs", hierarchical=False) == ("A",)
  assert TAX.seed_labels(hierarchical=True) == {"Animalia": ("A", "P"), "Buildings": ("B",),
                                                "Nature": ("P",)}


def test_cycle_back_edge_gives_nothing_and_terminates():
  lab = heuristics.Labeller(graph(), TAX, "head+depth")
  # X -head-> Y -head-> X (still searching: nothing) ; Y falls through to depth -> Nature.
  assert lab.category_labels("Trees in X") == ("P",)
  assert lab.category_labels("Trees in Y") == ("P",)
  _, trail = lab.label_file(["Trees in X"])
  assert trail == {"P": {"category": "Trees in X", "path": [["Trees in X", "head"],
                                                           ["Trees in Y", "depth"],
                                                           ["Nature", "seed"]]}}
  # Memoisation makes the result depend on the first query, as in the prototype: from Y first,
  # X is searched while Y is open, finds nothing and keeps it.
  lab = heuristics.Labeller(graph(), TAX, "head+depth")
  assert lab.category_labels("Trees in Y") == ("P",)
  assert lab.category_labels("Trees in X") == ()
  # head alone: each side meets the other still open; nothing, and no infinite recursion.
  assert labels("head", "Trees in X") == ()


def test_file_union_and_audit_trail():
  lab = heuristics.Labeller(graph(), TAX, "headJ+depth", hierarchical=True)
  names, trail = lab.label_file(["Not in the graph", "Hidden cat", "Art museums in Paris", "Dogs"])
  assert names == ("A", "B", "P")
  assert trail["B"] == {"category": "Art museums in Paris",
                        "path": [["Art museums in Paris", "headJ"], ["Museums", "depth"],
                                 ["Buildings", "seed"]]}
  assert trail["A"]["path"] == [["Dogs", "depth"], ["Animalia", "seed"]]
  assert trail["P"]["category"] == "Dogs"


def test_parser_rejects_unknown_and_embedding_heuristics():
  assert heuristics.parse_heuristics("headJ+depth") == ("headJ", "depth")
  with pytest.raises(InputError, match="not available.*valid heuristics: head, headJ, depth, "
                     "lookahead"):
    heuristics.parse_heuristics("headJ+embedding25")
  with pytest.raises(InputError, match="unknown heuristic 'deep'"):
    heuristics.parse_heuristics("deep")


def test_shipped_seeds_match_the_prototype():
  v13, v14 = taxonomy_lib.load("v1.3"), taxonomy_lib.load("v1.4")
  assert len(v13.seeds) == 31 and len(v14.seeds) == 28
  assert v13.seeds["People"] == ("People", "Human births")
  assert v13.seeds["Maps & Flags"] == ("Maps", "Flags")
  assert v13.seeds["Space"] == ("Astronomy",)
  assert v14.seeds["Geology & Fossils"] == ("Geology", "Fossils")
  assert set(v13.seed_labels(hierarchical=True)["Animalia"]) == {"Animals", "Nature", "STEM"}


def test_label_table_is_read_by_ingest_reader(tmp_path):
  g = graph()
  g.save(str(tmp_path / "graph.npz"))
  files = tmp_path / "files.parquet"
  pq.write_table(pa.table({"file": ["Dog one.jpg", "Museum.jpg", "Nothing.jpg"],
                           "categories": [["Dogs"], ["Art museums in Paris", "Dogs"], ["Lost"]]}),
                 str(files))
  lab = heuristics.Labeller(heuristics.load_graph(str(tmp_path)), TAX, "headJ+depth")
  out = str(tmp_path / "labels.parquet")
  assert heuristics.write_labels_table(lab, str(files), out) == {"files": 3, "labelled": 2}
  unknown = labels_table.UnknownLabels()
  rows = list(labels_table.check_labels(labels_table.iter_rows(out), TAX, unknown))
  unknown.raise_if_any(TAX)
  assert [r.labels for r in rows] == [("A",), ("A", "B"), ()]
  assert rows[1].title == "Museum.jpg"
  assert rows[1].url.startswith("https://upload.wikimedia.org/wikipedia/commons/")
  assert rows[1].url.endswith("/Museum.jpg")
  audit = json.loads(pq.read_table(out).column("audit")[1].as_py())
  assert audit["B"]["path"][-1] == ["Buildings", "seed"]


def test_report_matches_sklearn():
  rng = np.random.default_rng(0)
  y_true = rng.integers(0, 2, (12, 4))
  y_pred = rng.integers(0, 2, (12, 4))
  y_pred[:, 3] = 0  # A label never predicted: precision 0/0 -> 0.
  rep = human_eval.report(y_true, y_pred, ["a", "b", "c", "d"])
  p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
  for k, name in enumerate("abcd"):
    assert rep[name]["precision"] == pytest.approx(p[k])
    assert rep[name]["recall"] == pytest.approx(r[k])
    assert rep[name]["f1"] == pytest.approx(f[k])
    assert rep[name]["support"] == s[k]
  for avg in ("micro", "macro", "weighted", "samples"):
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
    got = rep[f"{avg} avg"]
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f)), avg


def test_evaluate_on_annotations(tmp_path):
  # Two annotated images: one right (A, P), one with a missed B and a spurious A.
  path = str(tmp_path / "annotated.parquet")
  pq.write_table(pa.table({"title": ["x.jpg", "y.jpg"], "categories": [["Dogs"], ["Wolves", "Dogs"]],
                           "labels": [["A", "P"], ["B"]]}), path)
  lab = heuristics.Labeller(graph(), TAX, "depth", hierarchical=True)
  rep = human_eval.evaluate(lab, [path])
  assert rep["images"] == 2
  assert rep["A"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
  assert rep["B"]["recall"] == 0.0 and rep["P"]["precision"] == 0.5
  assert rep["micro avg"]["precision"] == pytest.approx(2 / 4)
  assert rep["micro avg"]["recall"] == pytest.approx(2 / 3)
