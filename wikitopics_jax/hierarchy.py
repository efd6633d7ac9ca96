"""C-HMCNN's max-constraint module (MCM) and max-constraint loss (MCLoss), and taxonomy checks.

Giunchiglia & Lukasiewicz, "Coherent Hierarchical Multi-Label Classification Networks", NeurIPS 2020.

The hierarchy is the matrix R of `taxonomy.Taxonomy.ancestor_matrix`: R[i, j] = 1 iff label j is label i or
a descendant of label i (R is reflexive and transitively closed; trees and DAGs alike). Always derive it from
the taxonomy stored in the dataset manifest: the thesis's hierarchical model was trained with a hard-coded
matrix in another label order (in the thesis code, epfl-dlab/wiki_image_classification), and
`check_same_taxonomy` guards checkpoints.

MCM (paper eq. 2; the reference code's `get_constr_out`)::

    MCM(h)_i = max_j R[i, j] * h_j = max over j in D(i) of h_j,      D(i) = {i} u descendants(i)

(the two forms agree because h >= 0 and i is in D(i)). Every parent's output is >= each child's, so
thresholding MCM's output at any t gives hierarchy-coherent predictions.

Implementation (`max_constraint`): a masked max over D(i), never a product with R, so it is defined for any
real input (we use it on logits too). Two exact forms, chosen by size:

* "dense": (B, L, L) `where(R, x, -inf)` then max. Fastest for small taxonomies (v1.3 has 31 labels), but
  B * L^2 elements: 8e9 for L = 4000 and B = 512.
* "sparse": a scatter-max over the nnz(R) pairs (i, j) with R[i, j] = 1, on the labels-major (L, B)
  transpose (contiguous updates), in chunks of at most
  `max_elements` gathered values (`lax.scan`). Work and memory are O(B * nnz(R)), and
  nnz(R) = sum over labels of (1 + number of ancestors) <= L * depth for a tree: 24k pairs instead of 16M
  for a 4000-label tree of depth 6. One pass; no iteration over depth. Worst case (a chain) is nnz ~ L^2/2,
  still bounded in memory by the chunking.

Both are differentiable with the max's subgradient: the gradient of out_i goes to its argmax descendant, as
in the reference PyTorch code (`torch.max` backward). On exact ties XLA splits it equally among the tied
entries instead of picking one (a measure-zero event for real-valued logits; the sum is the same).

MCLoss in logit space (`mcloss_per_label`). Paper / reference training output, with h = sigmoid(z)::

    train_output = y * MCM(y * h) + (1 - y) * MCM(h),   loss = BCE(train_output, y)

For binary y: where y_i = 1 only log(train_output_i) = log MCM(y * h)_i counts, and i itself is a positive in
D(i), so MCM(y * h)_i = max over positive j in D(i) of h_j; where y_i = 0 only log(1 - MCM(h)_i) counts.
sigmoid is increasing, so max_j sigmoid(z_j) = sigmoid(max_j z_j), and exactly::

    loss_i = -[ y_i * log_sigmoid(max_{j in D(i), y_j = 1} z_j)
                + (1 - y_i) * log_sigmoid(-max_{j in D(i)} z_j) ]

This is finite for any logits (the paper's form on probabilities needs clipping at log(0), e.g. PyTorch's
BCELoss clamps log at -100), and its gradient reaches the same argmax logit with the same value
(d/dz_j of -log sigmoid(z_j) is the derivative of the probability form through the chain rule).
Labels must be binary (0/1) and hierarchy-closed (`Taxonomy.close`), as in the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

# Chunk size of the sparse form, in gathered elements (2**25 float32 = 128 MiB), and the largest
# taxonomy for which "auto" picks the dense form.
DEFAULT_MAX_ELEMENTS = 2**25
_DENSE_MAX_LABELS = 256


@dataclasses.dataclass(frozen=True, eq=False)
class DescendantIndex:
  """R in the two layouts `max_constraint` uses; build once with `descendant_index(R)` and reuse."""
  num_labels: int
  mask: np.ndarray  # bool (L, L): mask[i, j] = R[i, j] == 1.
  rows: np.ndarray  # int32 (nnz,), sorted: pair k says label cols[k] is in D(rows[k]).
  cols: np.ndarray  # int32 (nnz,)


def validate_ancestor_matrix(matrix: Any, *, where: str = "ancestor matrix") -> np.ndarray:
  """R as a bool numpy array after checking it is square, 0/1 and has a unit diagonal (i is in D(i)).

  Transitive closure is not checked (O(L^3)); `Taxonomy.ancestor_matrix` is closed by construction.
  """
  if isinstance(matrix, jax.core.Tracer):
    raise TypeError(f"{where}: R must be a concrete array (numpy), not a traced value; it defines the "
                    "index structure of the computation")
  r = np.asarray(matrix)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise InputError(f"{where}: must be a square (L, L) matrix, got shape {r.shape}")
  if not np.all((r == 0) | (r == 1)):
    raise InputError(f"{where}: entries must be 0 or 1")
  r = r.astype(bool)
  missing = np.flatnonzero(~np.diagonal(r))
  if missing.size:
    raise InputError(f"{where}: R[i, i] must be 1 (a label is in its own descendant set); "
                     f"not so for indices {missing[:10].tolist()}")
  return r


def descendant_index(matrix: Any) -> DescendantIndex:
  if isinstance(matrix, DescendantIndex):
    return matrix
  mask = validate_ancestor_matrix(matrix)
  rows, cols = np.nonzero(mask)  # Row-major, so rows come out sorted.
  for a in (mask, rows, cols):
    a.setflags(write=False)
  return DescendantIndex(num_labels=mask.shape[0], mask=mask, rows=rows.astype(np.int32),
                         cols=cols.astype(np.int32))


def max_constraint(values: jax.Array, matrix: Any, *, method: str = "auto",
                   max_elements: int = DEFAULT_MAX_ELEMENTS) -> jax.Array:
  """MCM: out[..., i] = max over j with R[i, j] = 1 of values[..., j]; same shape and dtype as `values`.

  Equals the paper's max_j R[i, j] * values_j for values >= 0 (probabilities). Jit-able (R is a static
  numpy constant) and differentiable (gradient to the argmax descendant).

  Args:
    values: (..., L) floating array: probabilities or logits.
    matrix: R as an (L, L) 0/1 array, or a `DescendantIndex` built from it.
    method: "dense", "sparse" or "auto" (dense for L <= 256 when B * L^2 <= max_elements). See module doc.
    max_elements: bound on the elements one step of the computation materialises (per chunk).
  """
  index = descendant_index(matrix)
  values = jnp.asarray(values)
  if not jnp.issubdtype(values.dtype, jnp.floating):
    raise TypeError(f"max_constraint needs floating values, got {values.dtype}")
  if values.shape[-1] != index.num_labels:
    raise ValueError(f"values have {values.shape[-1]} labels, R has {index.num_labels}")
  batch_shape = values.shape[:-1]
  flat = values.reshape(-1, index.num_labels)
  batch = flat.shape[0]
  if method == "auto":
    dense_size = batch * index.num_labels**2
    method = ("dense" if index.num_labels <= _DENSE_MAX_LABELS and dense_size <= max_elements
              else "sparse")
  if method == "dense":
    out = _max_dense(flat, index)
  elif method == "sparse":
    out = _max_sparse(flat, index, max_elements)
  else:
    raise ValueError(f"method must be 'auto', 'dense' or 'sparse', got {method!r}")
  return out.reshape(*batch_shape, index.num_labels)


def _max_dense(x: jax.Array, index: DescendantIndex) -> jax.Array:
  masked = jnp.where(index.mask[None], x[:, None, :], -jnp.inf)
  return jnp.max(masked, axis=-1)


def _max_sparse(x: jax.Array, index: DescendantIndex, max_elements: int) -> jax.Array:
  batch = x.shape[0]
  rows, cols = index.rows, index.cols
  # Labels-major (L, B): each scattered update, and each row of its backward's scatter-adds, is one
  # contiguous run of B values. In the (B, L) layout every update was B strided elements, and
  # MCLoss on 4000 labels ran about 10x slower on CPU (bench suite `losses`).
  xt = x.T
  # -inf is max's identity; every row gets at least its diagonal pair, so none stays -inf unless x is.
  init = jnp.full(xt.shape, -jnp.inf, x.dtype)
  chunk = max(1, max_elements // max(batch, 1))

  def scatter(out, r, c):
    return out.at[r].max(xt[c], indices_are_sorted=True, mode="promise_in_bounds")

  if rows.size <= chunk:
    return scatter(init, rows, cols).T
  # Equal chunks, as few as the bound allows, so padding stays under one pair per chunk.
  num_chunks = -(-rows.size // chunk)
  chunk = -(-rows.size // num_chunks)
  # Pad with copies of the last pair: sortedness holds and a repeated (i, j) does not change a max.
  pad = (-rows.size) % chunk
  rows = np.concatenate([rows, np.full(pad, rows[-1], np.int32)]).reshape(-1, chunk)
  cols = np.concatenate([cols, np.full(pad, cols[-1], np.int32)]).reshape(-1, chunk)
  out, _ = jax.lax.scan(lambda out, rc: (scatter(out, *rc), None), init, (rows, cols))
  return out.T


def make_coherent(probs: jax.Array, matrix: Any, **kwargs) -> jax.Array:
  """Post-hoc MCM for any flat model's probabilities: a parent scores at least as high as each child."""
  return max_constraint(probs, matrix, **kwargs)


def mcloss_per_label(logits: jax.Array, labels: jax.Array, matrix: Any, **kwargs) -> jax.Array:
  """C-HMCNN's MCLoss per label, (..., L) float32, in the exact log-space form of the module docstring.

  Args:
    logits: (..., L) pre-sigmoid outputs of the network (any float dtype; computed in float32).
    labels: (..., L) binary, hierarchy-closed labels.
    matrix: R or its `DescendantIndex`.
    **kwargs: `max_constraint` options.
  """
  z = jnp.asarray(logits).astype(jnp.float32)
  y = jnp.asarray(labels).astype(jnp.float32)
  positive = y > 0.5
  z_all = max_constraint(z, matrix, **kwargs)
  z_pos = max_constraint(jnp.where(positive, z, -jnp.inf), matrix, **kwargs)
  # Where y_i = 0, z_pos may be -inf (no positive descendant) and is unused: keep it out of the graph.
  z_pos = jnp.where(positive, z_pos, 0.0)
  return -(y * jax.nn.log_sigmoid(z_pos) + (1.0 - y) * jax.nn.log_sigmoid(-z_all))


def check_same_taxonomy(checkpoint_taxonomy_json: Mapping[str, Any] | taxonomy_lib.Taxonomy,
                        data_taxonomy_json: Mapping[str, Any] | taxonomy_lib.Taxonomy,
                        *, where: str = "checkpoint") -> None:
  """Raises InputError naming the first difference in label order, label names or parents.

  The version string alone may differ (a renamed but identical taxonomy gives the same R). Parent lists
  are compared as sets.
  """
  ckpt = _as_taxonomy(checkpoint_taxonomy_json, "checkpoint")
  data = _as_taxonomy(data_taxonomy_json, "data")
  versions = f"(checkpoint taxonomy {ckpt.version!r}, data taxonomy {data.version!r})"
  if ckpt.labels != data.labels:
    only_ckpt = [l for l in ckpt.labels if l not in data.index]
    only_data = [l for l in data.labels if l not in ckpt.index]
    if only_ckpt or only_data:
      raise InputError(f"{where}: label names differ {versions}: only in checkpoint {only_ckpt}, "
                       f"only in data {only_data}")
    if len(ckpt.labels) != len(data.labels):
      raise InputError(f"{where}: {len(ckpt.labels)} labels in checkpoint, {len(data.labels)} in data "
                       f"{versions}")
    i = next(i for i, (a, b) in enumerate(zip(ckpt.labels, data.labels)) if a != b)
    raise InputError(f"{where}: same labels in a different order {versions}: index {i} is "
                     f"{ckpt.labels[i]!r} in the checkpoint but {data.labels[i]!r} in the data; the "
                     "output units and the hierarchy matrix would not match the labels")
  for label in ckpt.labels:
    a, b = set(ckpt.parents_of(label)), set(data.parents_of(label))
    if a != b:
      raise InputError(f"{where}: parents of {label!r} differ {versions}: checkpoint {sorted(a)}, "
                       f"data {sorted(b)}")


def _as_taxonomy(value: Mapping[str, Any] | taxonomy_lib.Taxonomy, source: str) -> taxonomy_lib.Taxonomy:
  if isinstance(value, taxonomy_lib.Taxonomy):
    return value
  return taxonomy_lib.Taxonomy.from_json(dict(value), source=f"{source} taxonomy")
