"""C-HMCNN's MCM and MCLoss against literal NumPy references of the paper's formulas, and taxonomy checks.

The `ref_*` functions are plain float64 NumPy, written from the paper / reference code with the explicit
(B, L, L) broadcast on probabilities; they have no pytest dependency so benchmarks can import them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wikitopics_jax import hierarchy
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

# ---------------------------------------------------------------------------------------------------
# Literal references.


def ref_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_mcm(h, r):
  """The paper's MCM: out[b, i] = max_j R[i, j] * h[b, j], by explicit (B, L, L) broadcasting."""
  h = np.asarray(h, np.float64)
  r = np.asarray(r, np.float64)
  return np.max(r[None, :, :] * h[:, None, :], axis=2)


def ref_mcloss(z, y, r):
  """The paper's MCLoss on probabilities: BCE(y * MCM(y * h) + (1 - y) * MCM(h), y), mean over all entries."""
  y = np.asarray(y, np.float64)
  h = ref_sigmoid(z)
  constrained = ref_mcm(h, r)
  train_output = (1.0 - y) * constrained + y * ref_mcm(y * h, r)
  return -np.mean(y * np.log(train_output) + (1.0 - y) * np.log(1.0 - train_output))


def ref_masked_max(x, r):
  """max over j with R[i, j] = 1 of x[b, j], for any real x (what `max_constraint` computes on logits)."""
  x = np.asarray(x, np.float64)
  return np.max(np.where(np.asarray(r, bool)[None], x[:, None, :], -np.inf), axis=2)


def fd_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 scalar function."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    g[idx] = (f(up) - f(down)) / (2 * eps)
  return g


def random_dag(num_labels, seed, *, max_parents=2):
  """A random DAG taxonomy; label index order is shuffled so it is not topological."""
  rng = np.random.default_rng(seed)
  order = [f"L{k}" for k in range(num_labels)]  # Topological order: parents come earlier.
  parents = {}
  for k, name in enumerate(order):
    n = 0 if k == 0 or rng.random() < 0.1 else rng.integers(1, max_parents + 1)
    parents[name] = sorted({order[p] for p in rng.integers(0, k, size=n)}) if k else []
  labels = list(rng.permutation(order))
  return taxonomy_lib.Taxonomy.from_json({"version": f"dag{seed}", "labels": labels, "parents": parents})


def random_tree_matrix(num_labels, seed):
  """R of a random recursive tree (node k's parent is uniform in 0..k-1), straight in NumPy."""
  rng = np.random.default_rng(seed)
  parent = np.concatenate([[-1], [rng.integers(0, k) for k in range(1, num_labels)]])
  r = np.eye(num_labels, dtype=np.float32)
  for j in range(1, num_labels):
    a = parent[j]
    while a >= 0:
      r[a, j] = 1.0
      a = parent[a]
  return r


@pytest.fixture(scope="session")
def dag500():
  return random_dag(500, seed=0)


@pytest.fixture(scope="session")
def dag40():
  return random_dag(40, seed=1)


# ---------------------------------------------------------------------------------------------------
# max_constraint.


def test_v13_matrix_matches_hand_derived_entries():
  tax = taxonomy_lib.load("v1.3")
  r = hierarchy.validate_ancestor_matrix(tax.ancestor_matrix)
  i = tax.index
  assert r[i["Nature"], i["Plants"]] and r[i["STEM"], i["Nature"]]
  assert r[i["STEM"], i["Plants"]]  # Grandchild.
  assert not r[i["Plants"], i["Nature"]] and not r[i["Places"], i["Plants"]]
  assert not r[i["Art"], i["Music"]]  # Siblings.
  assert r[i["STEM"]].sum() == 12  # Itself, 8 children, 3 grandchildren (Plants, Animals, Fossils).
  assert r[i["Culture"]].sum() == 7
  assert r[i["Logos & Symbols"]].sum() == 1  # A root without children.
  assert all(r[i[leaf]].sum() == 1 for leaf in tax.leaves)


def test_v13_mcm_example():
  tax = taxonomy_lib.load("v1.3")
  p = np.full((1, tax.num_labels), 0.1, np.float32)
  p[0, tax.index["Plants"]] = 0.9
  out = np.asarray(hierarchy.make_coherent(p, tax.ancestor_matrix))[0]
  for name in ("Plants", "Nature", "STEM"):
    assert out[tax.index[name]] == pytest.approx(0.9)
  assert out[tax.index["Animals"]] == pytest.approx(0.1)
  assert out[tax.index["Places"]] == pytest.approx(0.1)


@pytest.mark.parametrize("method,max_elements", [("dense", 2**25), ("sparse", 2**25), ("sparse", 1000)])
def test_max_constraint_matches_literal_and_is_coherent(dag500, method, max_elements):
  r = dag500.ancestor_matrix
  rng = np.random.default_rng(0)
  probs = rng.random((4, 500)).astype(np.float32)
  out = np.asarray(hierarchy.max_constraint(probs, r, method=method, max_elements=max_elements))
  np.testing.assert_array_equal(out, ref_mcm(probs, r).astype(np.float32))
  # Coherence: every parent's output >= each child's, on every edge of the DAG.
  i = dag500.index
  edges = [(i[p], i[c]) for c in dag500.labels for p in dag500.parents_of(c)]
  assert len(edges) > 400
  parent_idx, child_idx = np.array(edges).T
  assert np.all(out[:, parent_idx] >= out[:, child_idx])
  assert np.all(out >= probs)


@pytest.mark.parametrize("method,max_elements", [("dense", 2**25), ("sparse", 2**25), ("sparse", 64)])
def test_max_constraint_gradient_goes_to_argmax_descendant(dag40, method, max_elements):
  r = dag40.ancestor_matrix
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 40)).astype(np.float32)
  w = rng.normal(size=(3, 40)).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(w * hierarchy.max_constraint(x, r, method=method,
                                                              max_elements=max_elements)))(x)
  expected = np.zeros_like(x)
  masked = np.where(r.astype(bool)[None], x[:, None, :], -np.inf)
  argmax = masked.argmax(axis=2)
  for b in range(3):
    for i in range(40):
      expected[b, argmax[b, i]] += w[b, i]
  np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6, atol=1e-6)


def test_max_constraint_on_logits_keeps_shape_dtype_and_jits(dag40):
  r = dag40.ancestor_matrix
  x = np.random.default_rng(2).normal(size=(2, 3, 40)).astype(np.float32) * 5
  out = jax.jit(lambda x: hierarchy.max_constraint(x, r))(x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out).reshape(6, 40),
                                ref_masked_max(x.reshape(6, 40), r).astype(np.float32))
  assert hierarchy.max_constraint(x.astype(jnp.bfloat16), r).dtype == jnp.bfloat16


def test_max_constraint_scales_to_4000_labels():
  r = random_tree_matrix(4000, seed=3)
  x = np.random.default_rng(3).normal(size=(64, 4000)).astype(np.float32)
  # The dense form would be 64 * 4000^2 = 1e9 elements; "auto" must pick the sparse one.
  out = np.asarray(jax.jit(lambda x: hierarchy.max_constraint(x, r))(x))
  assert out.shape == (64, 4000)
  mask = r.astype(bool)
  for b in (0, 63):
    np.testing.assert_array_equal(out[b], np.max(np.where(mask, x[b][None, :], -np.inf), axis=1))
  g = jax.jit(jax.grad(lambda x: jnp.sum(hierarchy.max_constraint(x, r))))(x)
  # Each output's gradient lands on exactly one input: the counts sum to B * L.
  assert float(jnp.sum(g)) == pytest.approx(64 * 4000)


# ---------------------------------------------------------------------------------------------------
# MCLoss.


def _closed_labels(tax, batch, seed, rate=0.15):
  rng = np.random.default_rng(seed)
  return tax.close((rng.random((batch, tax.num_labels)) < rate).astype(np.uint8))


@pytest.mark.parametrize("method,max_elements", [("dense", 2**25), ("sparse", 2**25), ("sparse", 50)])
def test_mcloss_matches_literal_value_and_gradient(dag40, method, max_elements):
  r = dag40.ancestor_matrix
  y = _closed_labels(dag40, 3, seed=4)
  assert y.sum() > 0 and (y == 0).sum() > 0
  z = np.random.default_rng(4).normal(size=(3, 40)) * 2

  def ours(z):
    return jnp.mean(hierarchy.mcloss_per_label(z, y, r, method=method, max_elements=max_elements))

  assert float(ours(z.astype(np.float32))) == pytest.approx(ref_mcloss(z, y, r), rel=1e-5)
  g = np.asarray(jax.grad(ours)(z.astype(np.float32)))
  np.testing.assert_allclose(g, fd_grad(lambda z: ref_mcloss(z, y, r), z), rtol=2e-3, atol=1e-6)


def test_mcloss_also_matches_literal_on_unclosed_labels(dag40):
  # The paper's formula is defined for any binary y; the log-space form agrees there too.
  r = dag40.ancestor_matrix
  y = (np.random.default_rng(5).random((3, 40)) < 0.3).astype(np.float32)
  z = np.random.default_rng(6).normal(size=(3, 40)) * 2
  ours = float(jnp.mean(hierarchy.mcloss_per_label(z.astype(np.float32), y, r)))
  assert ours == pytest.approx(ref_mcloss(z, y, r), rel=1e-5)


def test_mcloss_without_hierarchy_is_bce():
  z = np.random.default_rng(7).normal(size=(4, 9)).astype(np.float32) * 3
  y = (np.random.default_rng(8).random((4, 9)) < 0.4).astype(np.float32)
  bce = -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z))
  np.testing.assert_allclose(hierarchy.mcloss_per_label(z, y, np.eye(9)), bce, rtol=1e-6)


def test_mcloss_finite_at_extreme_logits_and_bf16(dag40):
  r = dag40.ancestor_matrix
  y = _closed_labels(dag40, 4, seed=9)
  signs = np.where(np.random.default_rng(9).random((4, 40)) < 0.5, -1.0, 1.0)
  for dtype in (jnp.float32, jnp.bfloat16):
    z = jnp.asarray(100.0 * signs, dtype)
    loss, g = jax.jit(jax.value_and_grad(lambda z: jnp.mean(hierarchy.mcloss_per_label(z, y, r))))(z)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # The probability form would need log(0) here: wrong-side logits of 100 give loss 100, not inf.
  z = jnp.asarray(-100.0 * np.ones((1, 40)), jnp.float32)
  y1 = np.ones((1, 40), np.float32)
  np.testing.assert_allclose(hierarchy.mcloss_per_label(z, y1, r), 100.0, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Validation and taxonomy checks.


def test_validate_ancestor_matrix_errors():
  with pytest.raises(InputError, match="square"):
    hierarchy.validate_ancestor_matrix(np.ones((2, 3)))
  with pytest.raises(InputError, match="0 or 1"):
    hierarchy.validate_ancestor_matrix(np.eye(3) * 2)
  with pytest.raises(InputError, match=r"R\[i, i\]"):
    hierarchy.validate_ancestor_matrix(np.zeros((3, 3)))
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda r: hierarchy.max_constraint(jnp.zeros((1, 3)), r))(np.eye(3))
  with pytest.raises(ValueError, match="3 labels"):
    hierarchy.max_constraint(jnp.zeros((1, 3)), np.eye(4))


def test_check_same_taxonomy_accepts_identical_and_renamed_versions():
  v13 = taxonomy_lib.load("v1.3")
  hierarchy.check_same_taxonomy(v13.to_json(), v13.to_json(), where="ckpt")
  renamed = dict(v13.to_json(), version="v1.3-copy")
  hierarchy.check_same_taxonomy(renamed, v13, where="ckpt")


def test_check_same_taxonomy_names_the_first_difference():
  v13 = taxonomy_lib.load("v1.3").to_json()
  with pytest.raises(InputError, match=r"ckpt: label names differ.*only in checkpoint \['Belief'"):
    hierarchy.check_same_taxonomy(v13, taxonomy_lib.load("v1.4").to_json(), where="ckpt")

  swapped = dict(v13, labels=list(v13["labels"]))
  swapped["labels"][1], swapped["labels"][2] = swapped["labels"][2], swapped["labels"][1]
  with pytest.raises(InputError, match=r"different order.*index 1 is 'Architecture' in the checkpoint "
                                       r"but 'Art' in the data"):
    hierarchy.check_same_taxonomy(v13, swapped, where="ckpt")

  moved = dict(v13, parents=dict(v13["parents"], Food=["Society"]))
  with pytest.raises(InputError,
                     match=r"parents of 'Food' differ.*checkpoint \['Culture'\], data \['Society'\]"):
    hierarchy.check_same_taxonomy(v13, moved, where="ckpt")
