"""Literal NumPy losses with hand-derived gradients: the baselines of the `losses` suite.

Written as the papers' formulas read, on probabilities p = sigmoid(z), with the backward pass as the
chain rule through those same formulas (no simplification such as dBCE/dz = p - y). Both return the
batch loss (mean over labels, then over examples, as `losses.Objective`) and its gradient with
respect to the logits. Computed in the logits' dtype (float32 in the benchmark, like ours).
"""

from __future__ import annotations

import numpy as np

# Elements of one (rows, L, L) block of the MCM broadcast: 2**25 float32 = 128 MiB per array.
MCM_BLOCK_ELEMENTS = 2**25


def sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


def bce_value_and_grad(z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
  """Thesis eq. 2.1, -[y log p + (1 - y) log(1 - p)], and d(mean loss)/dz."""
  p = sigmoid(z)
  loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  d_loss = np.full_like(z, 1.0 / z.size)  # d mean / d loss_ij
  d_p = d_loss * -(y / p - (1 - y) / (1 - p))
  d_z = d_p * p * (1 - p)
  return float(loss.mean()), d_z


def mcm_rows_per_block(num_labels: int) -> int:
  return max(1, MCM_BLOCK_ELEMENTS // (num_labels * num_labels))


def mcloss_value_and_grad(z: np.ndarray, y: np.ndarray, ancestor_matrix: np.ndarray
                          ) -> tuple[float, np.ndarray]:
  """C-HMCNN's MCLoss as in the paper's code, and d(mean loss)/dz.

  h = sigmoid(z); MCM(x)_i = max_j R[i, j] x_j through the (B, L, L) broadcast R * x[:, None, :];
  out = y * MCM(y * h) + (1 - y) * MCM(h); loss = BCE(out, y). Backward: through BCE to out, through
  each max to its argmax entry (a (B, L, L) one-hot), through y * h and the sigmoid. The broadcast is
  processed `mcm_rows_per_block` examples at a time, since (B, L, L) is 32 GB for B = 512, L = 4000.
  """
  r = ancestor_matrix.astype(z.dtype)
  num_examples, num_labels = z.shape
  rows = mcm_rows_per_block(num_labels)
  total = 0.0
  d_z = np.empty_like(z)
  for start in range(0, num_examples, rows):
    block = slice(start, start + rows)
    loss_sum, d_z[block] = _mcloss_block(z[block], y[block], r, z.size)
    total += loss_sum
  return total / z.size, d_z


def _mcloss_block(z, y, r, num_elements):
  h = sigmoid(z)
  yh = y * h
  arg_pos = np.argmax(r[None] * yh[:, None, :], axis=-1)  # (b, L): the argmax descendant
  arg_all = np.argmax(r[None] * h[:, None, :], axis=-1)
  mcm_pos = np.take_along_axis(yh, arg_pos, axis=-1)
  mcm_all = np.take_along_axis(h, arg_all, axis=-1)
  out = y * mcm_pos + (1 - y) * mcm_all
  loss = -(y * np.log(out) + (1 - y) * np.log(1 - out))
  d_out = -(y / out - (1 - y) / (1 - out)) / num_elements
  labels = np.arange(z.shape[-1])
  one_hot_pos = (arg_pos[..., None] == labels).astype(z.dtype)  # (b, L, L)
  one_hot_all = (arg_all[..., None] == labels).astype(z.dtype)
  d_yh = np.einsum("bi,bij->bj", d_out * y, one_hot_pos)
  d_h = d_yh * y + np.einsum("bi,bij->bj", d_out * (1 - y), one_hot_all)
  return float(loss.sum()), d_h * h * (1 - h)
