"""Literal NumPy losses with hand-derived gradients: the baselines of the `losses` suite.

Written as the papers' formulas read (for `asl` and `distribution_balanced`, as the authors' released
code computes them), on probabilities p = sigmoid(z), with the backward pass as the chain rule through
those same formulas (no simplification such as dBCE/dz = p - y). Each returns the batch loss (mean over
labels, then over examples, as `losses.Objective`) and its gradient with respect to the logits.
Computed in the logits' dtype (float32 in the benchmark, like ours). `value_and_grad_fn(name, params)`
gives the baseline of a registered loss configured with `params` (an `Objective.params`, class
statistics already filled in).
"""

from __future__ import annotations

import numpy as np

# Elements of one (rows, L, L) block of the MCM broadcast: 2**25 float32 = 128 MiB per array.
MCM_BLOCK_ELEMENTS = 2**25


def sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


def _mean_over_elements(per_label: np.ndarray, d_per_label_d_p: np.ndarray, p: np.ndarray
                        ) -> tuple[float, np.ndarray]:
  """Mean loss and d(mean)/dz from the per-label loss and its derivative in p (dp/dz = p (1 - p))."""
  return float(per_label.mean()), d_per_label_d_p / per_label.size * p * (1 - p)


def weighted_bce_value_and_grad(z, y, *, weights=1.0, pos_weights=1.0):
  """Thesis eqs. 2.6 and 2.8: -w_j [a_j y log p + (1 - y) log(1 - p)]; unit weights give eq. 2.1."""
  p = sigmoid(z)
  loss = -weights * (pos_weights * y * np.log(p) + (1 - y) * np.log(1 - p))
  d_p = -weights * (pos_weights * y / p - (1 - y) / (1 - p))
  return _mean_over_elements(loss, d_p, p)


def focal_value_and_grad(z, y, *, gamma, alpha=None):
  """Thesis eq. 2.2 (Lin et al. 2017): -[a y (1 - p)^g log p + (1 - a)(1 - y) p^g log(1 - p)]."""
  p = sigmoid(z)
  a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1.0 - alpha)
  loss = -(a_pos * y * (1 - p)**gamma * np.log(p) + a_neg * (1 - y) * p**gamma * np.log(1 - p))
  d_p = -(a_pos * y * (-gamma * (1 - p)**(gamma - 1) * np.log(p) + (1 - p)**gamma / p)
          + a_neg * (1 - y) * (gamma * p**(gamma - 1) * np.log(1 - p) - p**gamma / (1 - p)))
  return _mean_over_elements(loss, d_p, p)


def _power_derivative(x, gamma):
  """d(x^gamma)/dx, with 0 for gamma = 0 (torch.pow's gradient of x^0 is 0, and 0^-1 is not)."""
  if gamma == 0:
    return np.zeros_like(x)
  with np.errstate(divide="ignore"):
    return gamma * x**(gamma - 1)


def asl_value_and_grad(z, y, *, gamma_neg, gamma_pos, clip, focusing_grad=False, clamp_eps=1e-8):
  """Ridnik et al. 2021 as the authors' `AsymmetricLoss` computes it (Alibaba-MIIL/ASL):

  p = sigmoid(z), q = min(1 - p + m, 1) (1 - p without the clip), w+ = (1 - p)^g+, w- = (1 - q)^g-,
  loss = -[y w+ log(max(p, eps)) + (1 - y) w- log(max(q, eps))]. The weights are constants for the
  backward unless `focusing_grad` (their `disable_torch_grad_focal_loss=False`); a clamp passes gradient
  only where its input is inside the bound, as torch's.
  """
  p = sigmoid(z)
  q_raw = 1 - p + clip
  q = np.minimum(q_raw, 1) if clip > 0 else 1 - p
  with np.errstate(divide="ignore"):
    log_p = np.log(np.maximum(p, clamp_eps))
    log_q = np.log(np.maximum(q, clamp_eps))
  w_pos, w_neg = (1 - p)**gamma_pos, (1 - q)**gamma_neg
  loss = -(y * w_pos * log_p + (1 - y) * w_neg * log_q)
  d_q = np.where(q_raw <= 1, -1.0, 0.0) if clip > 0 else -1.0
  with np.errstate(divide="ignore", invalid="ignore"):
    d_log_p = np.where(p >= clamp_eps, 1 / p, 0)
    d_log_q = np.where(q >= clamp_eps, d_q / q, 0)
  d_p = -(y * w_pos * d_log_p + (1 - y) * w_neg * d_log_q)
  if focusing_grad:
    d_w_pos = -_power_derivative(1 - p, gamma_pos)
    d_w_neg = -_power_derivative(1 - q, gamma_neg) * d_q
    d_p = d_p - (y * d_w_pos * log_p + (1 - y) * d_w_neg * log_q)
  return _mean_over_elements(loss, d_p, p)


def distribution_balanced_value_and_grad(z, y, *, positives, num_examples, alpha, beta, mu, neg_scale,
                                         init_bias, focal, balance_param, gamma):
  """Wu et al. 2020 as the authors' `ResampleLoss` computes it (wutong16/DistributionBalancedLoss) with
  reweight_func='rebalance' and loss_weight 1; class counts clipped to [1, N - 1] as ours:

  w = sigmoid(beta (freq_inv / sum(y freq_inv) - mu)) + alpha; x = z - log(N / n - 1) init_bias / neg_scale;
  negatives: x *= neg_scale, w /= neg_scale; ce = BCE-with-logits(x, y) in torch's stable form
  max(x, 0) - x y + log(1 + e^-|x|); focal: loss = balance (1 - e^-ce)^gamma w ce, else w ce. w depends on
  y only, so the backward is through ce and the focal factor to x, then dx/dz = neg_scale or 1.
  """
  n = np.clip(np.asarray(positives, z.dtype), 1, num_examples - 1)
  freq_inv = 1 / n
  repeat_rate = np.sum(y * freq_inv, axis=1, keepdims=True)
  with np.errstate(divide="ignore", over="ignore"):
    pos_weight = freq_inv / repeat_rate  # inf for an instance without positives: w = alpha + 1.
    weight = 1 / (1 + np.exp(-beta * (pos_weight - mu))) + alpha
  x = z + (-np.log(num_examples / n - 1) * init_bias / neg_scale).astype(z.dtype)
  scale = (1 - y) * neg_scale + y
  x = x * scale
  weight = weight / neg_scale * (1 - y) + weight * y
  e = np.exp(-np.abs(x))
  ce = np.maximum(x, 0) - x * y + np.log1p(e)
  d_ce = (x > 0).astype(x.dtype) - y - np.sign(x) * e / (1 + e)
  if focal:
    pt = np.exp(-ce)
    factor = (1 - pt)**gamma
    loss = balance_param * factor * weight * ce
    d_loss_d_ce = balance_param * weight * (factor + ce * _power_derivative(1 - pt, gamma) * pt)
  else:
    loss = weight * ce
    d_loss_d_ce = weight
  d_z = d_loss_d_ce * d_ce * scale
  return float(loss.mean()), (d_z / loss.size).astype(z.dtype)


def value_and_grad_fn(name: str, params: dict):
  """The literal baseline of registered loss `name` with its resolved parameters, or None if it has none.

  MCLoss needs R, which is not a config parameter: build it with `mcloss_value_and_grad` directly.
  """
  params = dict(params)

  def from_counts(key, formula):
    if not isinstance(params[key], str):  # An explicit list in the config.
      return np.asarray(params[key], np.float32)
    pos, n = np.asarray(params["positives"], np.float64), float(params["num_examples"])
    return formula(np.maximum(pos, 1), n).astype(np.float32)  # n_j = 0 counted as 1, as ours.

  if name == "class_weighted_bce":
    weights = from_counts("class_weights", lambda pos, n: n / (pos * pos.size))  # Eq. 2.7.
    return lambda z, y: weighted_bce_value_and_grad(z, y, weights=weights)
  if name == "pos_weighted_bce":
    alphas = from_counts("pos_weights", lambda pos, n: (n - pos) / pos)  # Eq. 2.9.
    return lambda z, y: weighted_bce_value_and_grad(z, y, pos_weights=alphas)
  simple = {"bce": weighted_bce_value_and_grad, "focal": focal_value_and_grad, "asl": asl_value_and_grad,
            "distribution_balanced": distribution_balanced_value_and_grad}
  if name not in simple:
    return None
  fn = simple[name]
  if name == "distribution_balanced":
    params["num_examples"] = float(params["num_examples"])
  return lambda z, y: fn(z, y, **params)


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
