import json

import numpy as np
import pytest

from wikitopics_jax import taxonomy
from wikitopics_jax.errors import InputError

# The thesis's label index order (alphabetical, as in the thesis code).
THESIS_ORDER = [
    "Animals", "Architecture", "Art", "Belief", "Chemistry", "Culture", "Diagrams", "Events", "Food",
    "Fossils", "Geology", "History", "Landscapes", "Literature", "Logos & Symbols", "Maps & Flags",
    "Mathematics", "Medicine & Health", "Monuments & Memorials", "Music", "Nature", "People", "Places",
    "Plants", "Politics", "STEM", "Society", "Space", "Sports", "Technology & Engineering",
    "Transportation"]

# Hand-written from the tree of thesis Figure 3.3 (taxonomy v1.3): each internal node and its descendants.
DESCENDANTS = {
    "STEM": ["Diagrams", "Mathematics", "Chemistry", "Geology", "Space", "Medicine & Health",
             "Technology & Engineering", "Nature", "Plants", "Animals", "Fossils"],
    "Nature": ["Plants", "Animals", "Fossils"],
    "Places": ["Architecture", "Monuments & Memorials", "Landscapes", "Maps & Flags"],
    "Society": ["People", "Sports", "Politics", "Events", "Transportation"],
    "Culture": ["History", "Art", "Music", "Literature", "Food", "Belief"],
}


def test_v13_order_and_structure():
  tax = taxonomy.load("v1.3")
  assert list(tax.labels) == THESIS_ORDER
  assert sorted(tax.roots) == ["Culture", "Logos & Symbols", "Places", "STEM", "Society"]
  assert len(tax.leaves) == 26
  assert max(tax.depth(l) for l in tax.labels) == 3
  assert tax.depth("Fossils") == 3 and tax.depth("Logos & Symbols") == 1


def test_v13_ancestor_matrix_matches_hand_written():
  tax = taxonomy.load("v1.3")
  expected = np.eye(31, dtype=np.float32)
  idx = {name: i for i, name in enumerate(THESIS_ORDER)}
  for parent, children in DESCENDANTS.items():
    for child in children:
      expected[idx[parent], idx[child]] = 1
  np.testing.assert_array_equal(tax.ancestor_matrix, expected)
  # Spot checks written out by hand: row = ancestor, column = descendant.
  assert tax.ancestor_matrix[25, 0] == 1      # STEM -> Animals
  assert tax.ancestor_matrix[20, 9] == 1      # Nature -> Fossils
  assert tax.ancestor_matrix[0, 20] == 0      # Animals is not an ancestor of Nature
  assert tax.ancestor_matrix[22, 5] == 0      # Places -/-> Culture
  assert tax.ancestor_matrix.sum() == 31 + 29


def test_v14_ships_28_labels():
  tax = taxonomy.load("v1.4")
  assert tax.num_labels == 28
  assert "Politics" not in tax.labels and "Geology & Fossils" in tax.labels
  assert tax.labels == tuple(sorted(tax.labels))


def test_closure_adds_ancestors_and_is_idempotent():
  tax = taxonomy.load("v1.3")
  y = tax.multi_hot(["Fossils", "Maps & Flags", "History"])
  closed = tax.close(y)
  assert tax.names(closed) == sorted(
      ["Fossils", "Nature", "STEM", "Maps & Flags", "Places", "History", "Culture"],
      key=THESIS_ORDER.index)
  np.testing.assert_array_equal(tax.close(closed), closed)
  batch = np.stack([y, tax.multi_hot(["Logos & Symbols"])])
  assert tax.close(batch).sum(axis=1).tolist() == [7, 1]


def test_coherence_check():
  tax = taxonomy.load("v1.3")
  good = tax.close(tax.multi_hot(["Plants", "Sports"]))
  tax.check_coherent(good[None])
  bad = tax.multi_hot(["Plants"])
  assert tax.violations(bad[None]).tolist() == [2]  # Nature and STEM
  with pytest.raises(InputError, match=r"missing ancestors \['Nature', 'STEM'\]"):
    tax.check_coherent(bad[None])


def test_unknown_labels_are_listed():
  tax = taxonomy.load("v1.3")
  with pytest.raises(InputError, match=r"unknown labels \['Pokemon', 'Geology & Fossils'\]"):
    tax.multi_hot(["Plants", "Pokemon", "Geology & Fossils"], where="labels.json row 3")


def test_loads_any_tree_from_file_and_detects_errors(tmp_path):
  dag = {"version": "toy", "labels": ["a", "b", "c", "d"],
         "parents": {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}}
  path = tmp_path / "toy.json"
  path.write_text(json.dumps(dag))
  tax = taxonomy.load(str(path))
  r = tax.ancestor_matrix
  assert r[0].tolist() == [1, 1, 1, 1] and r[1].tolist() == [0, 1, 0, 1] and r[3].tolist() == [0, 0, 0, 1]
  cyclic = dict(dag, parents={"a": ["d"], "b": ["a"], "c": ["a"], "d": ["b"]})
  with pytest.raises(InputError, match="cycle"):
    taxonomy.Taxonomy.from_json(cyclic)
  with pytest.raises(InputError, match="unknown labels"):
    taxonomy.Taxonomy.from_json(dict(dag, parents={"d": ["zz"]}))
  with pytest.raises(InputError, match="unknown taxonomy 'v9'"):
    taxonomy.load("v9")
