"""Losses against literal float64 NumPy references of their papers' formulas (values and gradients).

The `ref_*` functions are plain NumPy on probabilities p = sigmoid(z), written as the formulas read, and
return per-label losses (B, L); `ref_objective` applies the module's reduction (mean over labels, then over
the batch). They have no pytest dependency so benchmarks can import them. `ref_asl_authors` and
`ref_resample_loss` transcribe the authors' released code (Alibaba-MIIL/ASL `AsymmetricLoss`,
wutong16/DistributionBalancedLoss `ResampleLoss`), which `asl` and `distribution_balanced` follow by default.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from wikitopics_jax import configlib
from wikitopics_jax import hierarchy
from wikitopics_jax import losses
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.bench import numpy_losses
from wikitopics_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------
# Literal references.


def ref_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def ref_bce(z, y):
  """Thesis eq. 2.1."""
  p = ref_sigmoid(z)
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def ref_focal(z, y, gamma, alpha=None):
  """Thesis eq. 2.2; Lin et al.'s alpha-balanced form when alpha is given."""
  p = ref_sigmoid(z)
  a_pos, a_neg = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
  return -(a_pos * y * (1 - p) ** gamma * np.log(p) + a_neg * (1 - y) * p**gamma * np.log(1 - p))


def ref_class_weights(positives, num_examples):
  """Thesis eq. 2.7: total images / (instances of class j * number of classes)."""
  positives = np.asarray(positives, np.float64)
  return num_examples / (positives * len(positives))


def ref_class_weighted_bce(z, y, weights):
  """Thesis eq. 2.6."""
  p = ref_sigmoid(z)
  return -np.asarray(weights) * (y * np.log(p) + (1 - y) * np.log(1 - p))


def ref_pos_weights(positives, num_examples):
  """Thesis eq. 2.9: negatives of class j / positives of class j."""
  positives = np.asarray(positives, np.float64)
  return (num_examples - positives) / positives


def ref_pos_weighted_bce(z, y, alphas):
  """Thesis eq. 2.8."""
  p = ref_sigmoid(z)
  return -(np.asarray(alphas) * y * np.log(p) + (1 - y) * np.log(1 - p))


def ref_asl(z, y, gamma_neg, gamma_pos, clip):
  """Ridnik et al. 2021: L+ = (1-p)^g+ log p, L- = p_m^g- log(1-p_m), p_m = max(p - m, 0)."""
  p = ref_sigmoid(z)
  p_m = np.maximum(p - clip, 0.0)
  return -(y * (1 - p) ** gamma_pos * np.log(p) + (1 - y) * p_m**gamma_neg * np.log(1 - p_m))


def ref_distribution_balanced(z, y, positives, num_examples, alpha=0.1, beta=10.0, mu=0.3, lam=5.0,
                              kappa=0.05):
  """Wu et al. 2020, eqs. 3-8, with the 1/C factors written out (counts clipped to [1, N-1])."""
  y = np.asarray(y, np.float64)
  n = np.clip(np.asarray(positives, np.float64), 1, num_examples - 1)
  c = len(n)
  p_class = (1 / c) * (1 / n)
  p_instance = (1 / c) * np.sum(y * (1 / n), axis=1, keepdims=True)
  with np.errstate(divide="ignore"):
    r = p_class / p_instance  # inf for an instance without positives.
  r_hat = alpha + 1 / (1 + np.exp(-beta * (r - mu)))
  prior = n / num_examples
  nu = kappa * -np.log(1 / prior - 1)
  return r_hat * (y * np.log1p(np.exp(-(z - nu))) + (1 / lam) * (1 - y) * np.log1p(np.exp(lam * (z - nu))))


def ref_asl_authors(z, y, gamma_neg=4.0, gamma_pos=1.0, clip=0.05, eps=1e-8, z_focus=None):
  """Per-label terms of `AsymmetricLoss.forward` (Alibaba-MIIL/ASL), whose batch loss is their sum:

  q = min(1 - p + clip, 1) (1 - p if clip = 0); log terms log(max(p, eps)), log(max(q, eps)); weight
  (1 - pt)^gamma with pt = p for a positive, q for a negative. The weight is computed from `z_focus`
  (default z): a finite difference in z with z_focus held is their gradient with the weight detached.
  """
  def probabilities(logits):
    p = ref_sigmoid(logits)
    q = 1 - p
    if clip > 0:
      q = np.minimum(q + clip, 1)
    return p, q

  p, q = probabilities(z)
  with np.errstate(divide="ignore"):
    loss = y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(q, eps))
  if gamma_neg > 0 or gamma_pos > 0:
    p_w, q_w = probabilities(z if z_focus is None else z_focus)
    pt = y * p_w + (1 - y) * q_w
    loss = loss * (1 - pt) ** (y * gamma_pos + (1 - y) * gamma_neg)
  return -loss


# The loss_cls sections of the authors' configs/{voc,coco}/LT_resnet50_pfc_DB.py (reweight_func='rebalance',
# use_sigmoid=True, loss_weight=1.0 in both), written independently of `losses.DB_SETTINGS`.
AUTHORS_DB_CONFIGS = {
    "voc_mlt": {"focal": {"focal": True, "balance_param": 2.0, "gamma": 2},
                "logit_reg": {"init_bias": 0.05, "neg_scale": 5},
                "map_param": {"alpha": 0.1, "beta": 10.0, "gamma": 0.3}},
    "coco_mlt": {"focal": {"focal": True, "balance_param": 2.0, "gamma": 2},
                 "logit_reg": {"neg_scale": 2.0, "init_bias": 0.05},
                 "map_param": {"alpha": 0.1, "beta": 10.0, "gamma": 0.2}},
}


def ref_resample_loss(z, y, class_freq, train_num, focal, logit_reg, map_param, loss_weight=1.0):
  """Per-label `ResampleLoss` (wutong16/DistributionBalancedLoss) with reweight_func='rebalance', before
  the trainer's mean over all entries; the config dicts as in their files.
  """
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  class_freq = np.asarray(class_freq, np.float64)
  freq_inv = 1 / class_freq
  neg_scale = logit_reg["neg_scale"]
  init_bias = -np.log(train_num / class_freq - 1) * logit_reg["init_bias"] / neg_scale
  # Rebalance weight: P^C / P^I through the map, for positives and negatives alike.
  with np.errstate(divide="ignore", over="ignore"):
    ratio = freq_inv[None] / np.sum(y * freq_inv, axis=1, keepdims=True)
    weight = ref_sigmoid(map_param["beta"] * (ratio - map_param["gamma"])) + map_param["alpha"]
  logits = z + init_bias
  logits = logits * (1 - y) * neg_scale + logits * y
  weight = weight / neg_scale * (1 - y) + weight * y
  # binary_cross_entropy_with_logits, unreduced, in torch's stable form.
  ce = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
  loss = weight * ce
  if focal["focal"]:
    pt = np.exp(-ce)
    loss = focal["balance_param"] * (1 - pt) ** focal["gamma"] * loss
  return loss_weight * loss


def ref_objective(per_label):
  return float(np.mean(np.mean(per_label, axis=1)))


def fd_diagonal(f, z, h=1e-6):
  """Central differences of a per-label f whose entry (i, j) depends on z[i, j] only (diagonal Jacobian)."""
  z = np.asarray(z, np.float64)
  return (f(z + h) - f(z - h)) / (2 * h)


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


# ---------------------------------------------------------------------------------------------------
# Shared inputs: B = 4 examples, L = 6 labels; the last example has no positive label.

B, L = 4, 6
POSITIVES = np.array([500, 40, 3, 120, 900, 10])
NUM_EXAMPLES = 1000


@pytest.fixture(scope="session")
def batch():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(B, L)) * 2.5
  y = (rng.random((B, L)) < 0.4).astype(np.float64)
  y[0, 0] = 1.0
  y[-1] = 0.0
  return z, y


CASES = {
    "bce": ({}, ref_bce),
    "focal": ({"gamma": 2.0}, lambda z, y: ref_focal(z, y, 2.0)),
    "focal_alpha": ({"gamma": 1.5, "alpha": 0.25}, lambda z, y: ref_focal(z, y, 1.5, 0.25)),
    "class_weighted_bce": ({"positives": POSITIVES, "num_examples": NUM_EXAMPLES},
                           lambda z, y: ref_class_weighted_bce(
                               z, y, ref_class_weights(POSITIVES, NUM_EXAMPLES))),
    "pos_weighted_bce": ({"positives": POSITIVES, "num_examples": NUM_EXAMPLES},
                         lambda z, y: ref_pos_weighted_bce(z, y, ref_pos_weights(POSITIVES, NUM_EXAMPLES))),
    # The paper's ASL (focusing weights differentiated, no eps floor; the floor is inactive at these
    # logits anyway). The authors' default, with detached weights, is tested against their code below.
    "asl_paper": ({"focusing_grad": True, "clamp_eps": 0.0}, lambda z, y: ref_asl(z, y, 4.0, 1.0, 0.05)),
    "asl_no_clip": ({"gamma_neg": 2.0, "gamma_pos": 0.0, "clip": 0.0, "focusing_grad": True,
                     "clamp_eps": 0.0}, lambda z, y: ref_asl(z, y, 2.0, 0.0, 0.0)),
    # Defaults: the authors' ResampleLoss with their VOC-MLT config.
    "distribution_balanced": ({"positives": POSITIVES, "num_examples": NUM_EXAMPLES},
                              lambda z, y: ref_resample_loss(z, y, POSITIVES, NUM_EXAMPLES,
                                                             **AUTHORS_DB_CONFIGS["voc_mlt"])),
    # The paper's eqs. 7-8 (nu = kappa b subtracted, no focal term): init_bias = -kappa lambda.
    "distribution_balanced_paper": ({"positives": POSITIVES, "num_examples": NUM_EXAMPLES,
                                     "init_bias": -0.05 * 5.0, "focal": False},
                                    lambda z, y: ref_distribution_balanced(z, y, POSITIVES, NUM_EXAMPLES)),
}


def _loss_name(case):
  return max((name for name in losses.names() if case.startswith(name)), key=len)


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_gradient_match_literal_reference(batch, case):
  z, y = batch
  kwargs, ref = CASES[case]
  loss = jax.jit(losses.get_loss(_loss_name(case), **kwargs))
  per_example = losses.get_per_example_loss(_loss_name(case), **kwargs)(z.astype(np.float32), y)
  assert per_example.shape == (B,) and per_example.dtype == jnp.float32
  np.testing.assert_allclose(per_example, np.mean(ref(z, y), axis=1), rtol=1e-5, atol=1e-7)
  assert float(loss(z.astype(np.float32), y)) == pytest.approx(ref_objective(ref(z, y)), rel=1e-5)
  g = np.asarray(jax.grad(loss)(z.astype(np.float32), y))
  np.testing.assert_allclose(g, fd_grad(lambda z: ref_objective(ref(z, y)), z), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Against the authors' released code (transcribed above; the bench's hand-derived backward as a second,
# analytic reference where finite differences cannot resolve the float64 values).

# Every sign and magnitude with each label value: row 0 negatives, row 1 positives. Kinks (the eps floor
# at |z| = 18.4, the clip at p = clip) are avoided: there only one-sided derivatives exist.
GRID_LOGITS = np.array([-100.0, -30.0, -5.0, -0.5, 0.5, 5.0, 30.0, 100.0])
GRID_Z = np.stack([GRID_LOGITS, GRID_LOGITS])
GRID_Y = np.stack([np.zeros(8), np.ones(8)])
GRID_POSITIVES = np.array([500, 40, 3, 120, 900, 10, 250, 7])


def _check_per_label(obj, z, y, ref, ref_grad, *, rtol=1e-5, grad_rtol=1e-4, atol=1e-7):
  """Ours in float32 against a float64 reference: per-label values and gradients, and the batch mean."""
  z32 = np.asarray(z, np.float32)
  per_label = np.asarray(obj.per_label(z32, y))
  np.testing.assert_allclose(per_label, ref, rtol=rtol, atol=atol)
  # Entry (i, j) depends on z[i, j] only, so the gradient of the sum is the per-label derivative.
  grad = np.asarray(jax.grad(lambda u: jnp.sum(obj.per_label(u, y)))(z32))
  np.testing.assert_allclose(grad, ref_grad, rtol=grad_rtol, atol=atol)
  assert float(obj(z32, y)) == pytest.approx(float(np.mean(ref)), rel=rtol, abs=atol)
  np.testing.assert_allclose(jax.grad(obj)(z32, y), ref_grad / ref.size, rtol=grad_rtol, atol=atol / ref.size)


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("focusing_grad", [False, True])
def test_asl_matches_authors_code(batch, clip, focusing_grad):
  z, y = batch
  obj = losses.build("asl", clip=clip, focusing_grad=focusing_grad)  # eps 1e-8, gammas 4 and 1: theirs.

  def authors(u, u_focus):
    return ref_asl_authors(u, y, clip=clip, z_focus=u_focus)

  ref = authors(z, z)
  # Their default detaches the weights: differentiate with the weights' logits held.
  ref_grad = fd_diagonal(lambda u: authors(u, u if focusing_grad else z), z)
  _check_per_label(obj, z, y, ref, ref_grad)
  if not focusing_grad:  # The two settings are told apart: the detached gradient is not d(value)/dz.
    full = fd_diagonal(lambda u: authors(u, u), z)
    assert np.max(np.abs(full - ref_grad) / np.maximum(np.abs(full), 1e-3)) > 0.05
  value, grad = numpy_losses.asl_value_and_grad(z, y, gamma_neg=4.0, gamma_pos=1.0, clip=clip,
                                                focusing_grad=focusing_grad)
  assert value == pytest.approx(float(np.mean(ref)), rel=1e-12)
  np.testing.assert_allclose(grad * z.size, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("focusing_grad", [False, True])
def test_asl_matches_authors_code_at_extreme_logits(clip, focusing_grad):
  obj = losses.build("asl", clip=clip, focusing_grad=focusing_grad)
  ref = ref_asl_authors(GRID_Z, GRID_Y, clip=clip)
  _, grad = numpy_losses.asl_value_and_grad(GRID_Z, GRID_Y, gamma_neg=4.0, gamma_pos=1.0, clip=clip,
                                            focusing_grad=focusing_grad)
  _check_per_label(obj, GRID_Z, GRID_Y, ref, grad * GRID_Z.size)
  # The eps floor holds a positive at -30 or -100 at (1 - p) * -log(1e-8), not 30 or 100.
  per_label = np.asarray(obj.per_label(GRID_Z.astype(np.float32), GRID_Y))
  np.testing.assert_allclose(per_label[1, :2], -np.log(1e-8), rtol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_asl_unclamped_variant_at_30(clip):
  """clamp_eps=0 with focusing_grad=True is the paper's formula, also where the floor would act."""
  z, y = GRID_Z[:, 1:-1], GRID_Y[:, 1:-1]  # +-100 is beyond float64's 1 - sigmoid(z).
  obj = losses.build("asl", clip=clip, focusing_grad=True, clamp_eps=0.0)
  ref = ref_asl(z, y, 4.0, 1.0, clip)
  _, grad = numpy_losses.asl_value_and_grad(z, y, gamma_neg=4.0, gamma_pos=1.0, clip=clip,
                                            focusing_grad=True, clamp_eps=0.0)
  # 1 - sigmoid(30) in float64 carries a relative error of ~1e-3, ~3e-5 in its log.
  _check_per_label(obj, z, y, ref, grad * z.size, rtol=1e-4)
  per_label = np.asarray(obj.per_label(z.astype(np.float32), y))
  assert per_label[1, 0] == pytest.approx(30.0, rel=1e-6)  # A positive at -30: -log p, no floor.


def _distribution_balanced_case(setting, focal):
  authors = dict(AUTHORS_DB_CONFIGS[setting])
  authors["focal"] = {**authors["focal"], "focal": focal}
  return authors, {**losses.DB_SETTINGS[setting], "focal": focal}


@pytest.mark.parametrize("setting", ["voc_mlt", "coco_mlt"])
@pytest.mark.parametrize("focal", [True, False])
def test_distribution_balanced_matches_authors_code(batch, setting, focal):
  z, y = batch
  authors, params = _distribution_balanced_case(setting, focal)
  obj = losses.build("distribution_balanced", positives=POSITIVES, num_examples=NUM_EXAMPLES, **params)

  def ref_fn(u):
    return ref_resample_loss(u, y, POSITIVES, NUM_EXAMPLES, **authors)

  ref, ref_grad = ref_fn(z), fd_diagonal(ref_fn, z)
  _check_per_label(obj, z, y, ref, ref_grad)
  value, grad = numpy_losses.distribution_balanced_value_and_grad(
      z, y, positives=POSITIVES, num_examples=float(NUM_EXAMPLES), **params)
  assert value == pytest.approx(float(np.mean(ref)), rel=1e-12)
  np.testing.assert_allclose(grad * z.size, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("setting", ["voc_mlt", "coco_mlt"])
@pytest.mark.parametrize("focal", [True, False])
def test_distribution_balanced_matches_authors_code_at_extreme_logits(setting, focal):
  authors, params = _distribution_balanced_case(setting, focal)
  obj = losses.build("distribution_balanced", positives=GRID_POSITIVES, num_examples=NUM_EXAMPLES, **params)
  ref = ref_resample_loss(GRID_Z, GRID_Y, GRID_POSITIVES, NUM_EXAMPLES, **authors)
  _, grad = numpy_losses.distribution_balanced_value_and_grad(
      GRID_Z, GRID_Y, positives=GRID_POSITIVES, num_examples=float(NUM_EXAMPLES), **params)
  _check_per_label(obj, GRID_Z, GRID_Y, ref, grad * GRID_Z.size)


def test_distribution_balanced_settings_are_the_authors_configs():
  for setting, authors in AUTHORS_DB_CONFIGS.items():
    ours = losses.DB_SETTINGS[setting]
    assert ours == {"alpha": authors["map_param"]["alpha"], "beta": authors["map_param"]["beta"],
                    "mu": authors["map_param"]["gamma"], "neg_scale": authors["logit_reg"]["neg_scale"],
                    "init_bias": authors["logit_reg"]["init_bias"], "focal": authors["focal"]["focal"],
                    "balance_param": authors["focal"]["balance_param"],
                    "gamma": authors["focal"]["gamma"]}, setting
  cfg = losses.config("distribution_balanced")
  assert {k: cfg[k] for k in losses.DB_SETTINGS["voc_mlt"]} == losses.DB_SETTINGS["voc_mlt"]
  # Selecting COCO-MLT in a config file, and focal off from the command line (a string there).
  cfg = losses.config("distribution_balanced", **losses.DB_SETTINGS["coco_mlt"])
  cfg.focal = "False"
  obj = losses.from_config(cfg, positives=POSITIVES, num_examples=NUM_EXAMPLES, ancestor_matrix=np.eye(L))
  assert obj.params["focal"] == "False" and obj.params["neg_scale"] == 2.0
  rng = np.random.default_rng(6)
  z = rng.normal(size=(3, L)) * 2
  y = (rng.random(z.shape) < 0.4).astype(np.float64)
  authors, _ = _distribution_balanced_case("coco_mlt", False)
  np.testing.assert_allclose(obj.per_label(z.astype(np.float32), y),
                             ref_resample_loss(z, y, POSITIVES, NUM_EXAMPLES, **authors), rtol=1e-5)


@pytest.mark.parametrize("name, params", [("asl", {}), ("asl", {"focusing_grad": True}),
                                          ("distribution_balanced", {}),
                                          ("distribution_balanced", losses.DB_SETTINGS["coco_mlt"])])
def test_bench_numpy_baselines_agree_in_float32(name, params):
  """The `losses` suite's check (tests/test_bench.py thresholds) on its inputs: float32, 31 labels."""
  rng = np.random.default_rng(7)
  positives = rng.integers(5, 400, size=31)
  cfg = losses.config(name, **params)
  obj = losses.from_config(cfg, positives=positives, num_examples=1000, ancestor_matrix=np.eye(31))
  z = (2 * rng.standard_normal((64, 31))).astype(np.float32)
  y = (rng.random(z.shape) < 0.1).astype(np.float32)
  ref_loss, ref_grad = numpy_losses.value_and_grad_fn(name, obj.params)(z, y)
  loss, grad = jax.value_and_grad(obj)(z, y)
  assert abs(float(loss) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
  assert np.max(np.abs(np.asarray(grad) - ref_grad)) < 1e-4 * np.max(np.abs(ref_grad))


def test_identities_with_bce(batch):
  z, y = (a.astype(np.float32) for a in batch)
  bce = losses.get_per_example_loss("bce")(z, y)
  same_as_bce = [
      ("focal", {"gamma": 0.0}),
      ("asl", {"gamma_neg": 0.0, "gamma_pos": 0.0, "clip": 0.0, "clamp_eps": 0.0}),
      ("class_weighted_bce", {"class_weights": [1.0] * L}),
      ("pos_weighted_bce", {"pos_weights": [1.0] * L}),
  ]
  for name, kwargs in same_as_bce:
    np.testing.assert_allclose(losses.get_per_example_loss(name, **kwargs)(z, y), bce, rtol=1e-6,
                               err_msg=name)
  # Half the mass on each side: alpha 0.5 with gamma 0 is BCE / 2.
  np.testing.assert_allclose(losses.get_per_example_loss("focal", gamma=0.0, alpha=0.5)(z, y), bce / 2,
                             rtol=1e-6)
  # Balanced classes (n_j = N / 2): eq. 2.9 gives alpha_j = 1, eq. 2.7 gives w_j = 2 / L.
  half = {"positives": [500] * L, "num_examples": 1000}
  np.testing.assert_allclose(losses.get_per_example_loss("pos_weighted_bce", **half)(z, y), bce, rtol=1e-6)
  np.testing.assert_allclose(losses.get_per_example_loss("class_weighted_bce", **half)(z, y), bce * 2 / L,
                             rtol=1e-6)


def test_class_weights_match_thesis_example():
  # Thesis section 2.1.8: classes of 1000, 500 and 10 images, 1510 images: w = 0.50, 1.01, 50.33.
  z = np.zeros((1, 3), np.float32)
  y = np.ones((1, 3), np.float32)
  per_label = losses.build("class_weighted_bce", positives=[1000, 500, 10], num_examples=1510).per_label(z, y)
  np.testing.assert_allclose(np.asarray(per_label)[0] / np.log(2), [0.5033, 1.0067, 50.333], rtol=1e-3)


def test_zero_positive_counts_are_guarded():
  z = np.zeros((1, 3), np.float32)
  y = np.array([[1.0, 0.0, 1.0]], np.float32)
  for name in ("class_weighted_bce", "pos_weighted_bce", "distribution_balanced"):
    obj = losses.build(name, positives=[0, 5, 10], num_examples=10)
    assert np.all(np.isfinite(np.asarray(obj.per_label(z, y)))), name
  # Counted as 1: w_0 = N / (1 * K), alpha_0 = N / 1.
  cw = losses.build("class_weighted_bce", positives=[0, 5, 10], num_examples=10).per_label(z, y)
  assert float(cw[0, 0]) == pytest.approx(10 / 3 * np.log(2), rel=1e-6)
  pw = losses.build("pos_weighted_bce", positives=[0, 5, 10], num_examples=10).per_label(z, y)
  assert float(pw[0, 0]) == pytest.approx(10 * np.log(2), rel=1e-6)


def _all_objectives():
  tax = taxonomy_lib.load("v1.3")
  rng = np.random.default_rng(1)
  positives = rng.integers(0, 5000, size=tax.num_labels)
  cfg_names = losses.names()
  objectives = {name: losses.from_config({"name": name}, positives=positives, num_examples=10000,
                                         ancestor_matrix=tax.ancestor_matrix) for name in cfg_names}
  objectives["asl_no_clip"] = losses.build("asl", clip=0.0, gamma_pos=0.0)
  objectives["asl_weak"] = losses.build("asl", gamma_neg=0.5, gamma_pos=0.5, clip=0.05)
  for clip in (0.0, 0.05):
    objectives[f"asl_paper_{clip}"] = losses.build("asl", clip=clip, focusing_grad=True, clamp_eps=0.0)
    objectives[f"asl_weak_paper_{clip}"] = losses.build("asl", gamma_neg=0.5, gamma_pos=0.5, clip=clip,
                                                        focusing_grad=True, clamp_eps=0.0)
  for setting, params in losses.DB_SETTINGS.items():
    for focal in (True, False):
      objectives[f"distribution_balanced_{setting}_{focal}"] = losses.build(
          "distribution_balanced", positives=positives, num_examples=10000, **{**params, "focal": focal})
  objectives["distribution_balanced_weak_focal"] = losses.build(
      "distribution_balanced", positives=positives, num_examples=10000, gamma=0.5, init_bias=-1.0)
  objectives["focal_weak"] = losses.build("focal", gamma=0.5, alpha=0.25)
  return tax, objectives


def test_finite_values_and_gradients_at_extreme_logits_and_bf16():
  tax, objectives = _all_objectives()
  assert set(losses.names()) <= set(objectives)
  rng = np.random.default_rng(2)
  y = tax.close((rng.random((8, tax.num_labels)) < 0.15).astype(np.uint8))
  y[-1] = 0
  # Mostly +-100, with some moderate and near-zero logits mixed in.
  magnitudes = rng.choice([100.0, 100.0, 30.0, 3.0, 1e-3], size=y.shape)
  z = np.where(rng.random(y.shape) < 0.5, -1.0, 1.0) * magnitudes

  # One compiled program for all losses, per dtype: compiling each separately is slow on CPU.
  @jax.jit
  def values_and_grads(z):
    return {name: jax.value_and_grad(obj)(z, y) for name, obj in objectives.items()}

  for dtype in (jnp.float32, jnp.bfloat16):
    for name, (value, g) in values_and_grads(jnp.asarray(z, dtype)).items():
      assert value.dtype == jnp.float32, name
      assert np.isfinite(float(value)), (name, dtype)
      assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, dtype)
  for name, obj in objectives.items():
    probs = obj.probabilities(jnp.asarray(z, jnp.bfloat16))
    assert probs.dtype == jnp.float32 and np.all((probs >= 0) & (probs <= 1)), name


def test_bf16_inputs_are_computed_in_float32(batch):
  z, y = batch
  z16 = jnp.asarray(z, jnp.bfloat16)
  for name in ("bce", "focal", "asl"):
    from_bf16 = losses.get_loss(name)(z16, y)
    from_f32 = losses.get_loss(name)(np.asarray(z16, np.float32), y)
    assert from_bf16.dtype == jnp.float32 and float(from_bf16) == float(from_f32), name


def test_objective_api(batch):
  z, y = (a.astype(np.float32) for a in batch)
  obj = losses.build("focal", gamma=2.0)
  assert obj.name == "focal" and not obj.hierarchical and obj.params == {"gamma": 2.0}
  assert float(obj(z, y)) == pytest.approx(float(jnp.mean(obj.per_example(z, y))))
  np.testing.assert_allclose(obj.probabilities(z), ref_sigmoid(z), rtol=1e-6)
  # Masking a padded example is the trainer's job on the (B,) vector.
  mask = np.array([1, 1, 0, 1], np.float32)
  masked = jnp.sum(obj.per_example(z, y) * mask) / mask.sum()
  assert float(masked) == pytest.approx(float(obj(z[mask > 0], y[mask > 0])), rel=1e-6)


def test_chmcnn_objective_trains_with_mcloss_and_predicts_coherently():
  tax = taxonomy_lib.load("v1.3")
  r = tax.ancestor_matrix
  obj = losses.from_config(losses.config("chmcnn"), positives=None, num_examples=None,
                           ancestor_matrix=r)
  assert obj.name == "chmcnn" and obj.hierarchical
  rng = np.random.default_rng(3)
  z = rng.normal(size=(5, tax.num_labels)).astype(np.float32) * 2
  y = tax.close((rng.random(z.shape) < 0.15).astype(np.uint8))
  np.testing.assert_allclose(obj.per_label(z, y), hierarchy.mcloss_per_label(z, y, r), rtol=1e-6)
  probs = np.asarray(obj.probabilities(z))
  np.testing.assert_allclose(probs, hierarchy.make_coherent(ref_sigmoid(z).astype(np.float32), r), rtol=1e-6)
  assert tax.violations(probs > 0.5).sum() == 0


# ---------------------------------------------------------------------------------------------------
# Registry and config errors.


def test_registry_errors():
  with pytest.raises(InputError, match=r"unknown loss 'focall'; valid names: \['asl', 'bce', 'chmcnn'"):
    losses.get_loss("focall")
  with pytest.raises(InputError,
                     match=r"^loss\.gama: not a parameter of loss 'focal' \(valid: \['alpha', 'gamma'\]\)$"):
    losses.get_loss("focal", gama=2)
  with pytest.raises(InputError, match=r"loss\.gamma must be >= 0"):
    losses.get_loss("focal", gamma=-1)
  with pytest.raises(InputError, match=r"loss\.alpha must be <= 1"):
    losses.get_loss("focal", alpha=2)
  with pytest.raises(InputError, match=r"loss\.clip must be a number"):
    losses.get_loss("asl", clip="lots")
  with pytest.raises(InputError, match=r"loss\.focusing_grad must be True or False, got 1"):
    losses.get_loss("asl", focusing_grad=1)
  with pytest.raises(InputError, match=r"loss\.clamp_eps must be >= 0"):
    losses.get_loss("asl", clamp_eps=-1e-8)
  with pytest.raises(InputError, match=r"loss\.neg_scale must be > 0"):
    losses.get_loss("distribution_balanced", positives=[1, 2], num_examples=10, neg_scale=0)
  with pytest.raises(InputError, match=r"loss\.focal must be True or False, got 'yes'"):
    losses.get_loss("distribution_balanced", positives=[1, 2], num_examples=10, focal="yes")
  with pytest.raises(InputError, match=r"loss\.positives='auto' needs the training split's statistics"):
    losses.get_loss("pos_weighted_bce")
  with pytest.raises(InputError, match=r"loss\.positives\[1\] = 20 exceeds loss\.num_examples = 10"):
    losses.get_loss("pos_weighted_bce", positives=[1, 20], num_examples=10)
  with pytest.raises(InputError, match=r"loss 'chmcnn' needs ancestor_matrix"):
    losses.get_loss("chmcnn")
  with pytest.raises(InputError, match=r"loss\.class_weights has 2 entries but the model has 6 labels"):
    losses.get_loss("class_weighted_bce", class_weights=[1, 2])(np.zeros((1, 6)), np.zeros((1, 6)))


def test_registering_a_loss_is_one_function_and_one_line():
  registry = losses.LOSSES
  name = "test_only_scaled_bce"
  try:
    @losses.register(name)
    def scaled_bce(*, scale: float = 1.0):
      def per_label(z, y):
        return scale * (-(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)))
      return per_label

    assert losses.config(name).to_dict() == {"name": name, "scale": 1.0}
    z = np.zeros((1, 2), np.float32)
    assert float(losses.get_loss(name, scale=2.0)(z, z)) == pytest.approx(2 * np.log(2))
    with pytest.raises(ValueError, match="registered twice"):
      losses.register(name)(scaled_bce)
  finally:
    registry._entries.pop(name, None)  # Keep the registry as other tests expect it.


@pytest.fixture()
def v13():
  tax = taxonomy_lib.load("v1.3")
  positives = np.arange(1, tax.num_labels + 1) * 10
  return tax, positives


def test_config_holds_only_the_chosen_losss_own_keys():
  assert losses.config().to_dict() == {"name": "bce"}
  assert losses.config("focal").to_dict() == {"name": "focal", "gamma": 2.0, "alpha": None}
  assert losses.config("asl").to_dict() == {"name": "asl", "gamma_neg": 4.0, "gamma_pos": 1.0, "clip": 0.05,
                                           "focusing_grad": False, "clamp_eps": 1e-8}
  assert losses.config("pos_weighted_bce").to_dict() == {"name": "pos_weighted_bce", "pos_weights": "auto",
                                                        "positives": "auto", "num_examples": "auto"}
  # No prefixes: distribution_balanced's alpha and gamma are its own, with its own defaults.
  assert losses.config("distribution_balanced").to_dict() == {
      "name": "distribution_balanced", "positives": "auto", "num_examples": "auto", "alpha": 0.1,
      "beta": 10.0, "mu": 0.3, "neg_scale": 5.0, "init_bias": 0.05, "focal": True, "balance_param": 2.0,
      "gamma": 2.0}
  assert losses.config("chmcnn").to_dict() == {"name": "chmcnn"}  # R comes from the manifest.
  # What a config file's `losses.config("focal", gamma=3.0)` then `--config.loss.alpha=0.25` does.
  cfg = losses.config("focal", gamma=3.0)
  cfg.alpha = 0.25
  obj = losses.from_config(cfg, positives=None, num_examples=None, ancestor_matrix=np.eye(5))
  assert obj.name == "focal" and obj.params == {"alpha": 0.25, "gamma": 3.0}
  with pytest.raises(InputError, match=r"^config\.loss\.clip: not a parameter of loss 'focal' \(valid: "
                                       r"\['alpha', 'gamma'\]\); it is a parameter of loss \['asl'\]"):
    losses.config("focal", clip=0.1)


def test_two_losses_may_give_one_key_different_defaults():
  name = "test_only_sharp_bce"
  try:
    @losses.register(name)
    def sharp_bce(*, gamma: float = 5.0):
      def per_label(z, y):
        return -(y * jax.nn.log_sigmoid(gamma * z) + (1 - y) * jax.nn.log_sigmoid(-gamma * z))
      return per_label

    assert losses.config(name).gamma == 5.0 and losses.config("focal").gamma == 2.0
    obj = losses.from_config(losses.config(name), positives=None, num_examples=None,
                             ancestor_matrix=np.eye(2))
    assert obj.params == {"gamma": 5.0}
  finally:
    losses.LOSSES._entries.pop(name, None)  # Keep the registry as other tests expect it.


def test_from_config_auto_statistics(v13, batch):
  tax, positives = v13
  cfg = losses.config("pos_weighted_bce")
  obj = losses.from_config(cfg, positives=positives, num_examples=1000, ancestor_matrix=tax.ancestor_matrix)
  explicit = losses.build("pos_weighted_bce", positives=positives, num_examples=1000)
  rng = np.random.default_rng(4)
  z = rng.normal(size=(3, tax.num_labels)).astype(np.float32)
  y = (rng.random(z.shape) < 0.3).astype(np.float32)
  np.testing.assert_allclose(obj(z, y), explicit(z, y), rtol=1e-6)
  with pytest.raises(InputError, match=r"loss\.positives='auto' needs"):
    losses.from_config(cfg, positives=None, num_examples=None, ancestor_matrix=tax.ancestor_matrix)
  # Stats of another taxonomy (wrong length) are caught when the objective is built.
  with pytest.raises(InputError, match=r"loss\.positives has 5 entries but the model has 31 labels"):
    losses.from_config(cfg, positives=positives[:5], num_examples=1000, ancestor_matrix=tax.ancestor_matrix)


def test_from_config_explicit_lists(v13):
  tax, positives = v13
  r = tax.ancestor_matrix
  as_list = losses.config("distribution_balanced")
  as_list.positives, as_list.num_examples = positives.tolist(), 2000
  # On the command line a list arrives as a string: --config.loss.positives='[10, 20, ...]'.
  as_string = losses.config("distribution_balanced")
  as_string.positives, as_string.num_examples = str(positives.tolist()), "2000"
  rng = np.random.default_rng(5)
  z = rng.normal(size=(3, tax.num_labels)).astype(np.float32)
  y = (rng.random(z.shape) < 0.3).astype(np.float32)
  # Explicit values win over the manifest's statistics.
  a = losses.from_config(as_list, positives=positives * 0 + 1, num_examples=5, ancestor_matrix=r)
  b = losses.from_config(as_string, positives=None, num_examples=None, ancestor_matrix=r)
  expected = ref_objective(ref_resample_loss(z, y, positives, 2000, **AUTHORS_DB_CONFIGS["voc_mlt"]))
  assert float(a(z, y)) == pytest.approx(expected, rel=1e-5)
  assert float(b(z, y)) == pytest.approx(expected, rel=1e-5)

  weights = losses.config("class_weighted_bce")
  weights.class_weights = [1.0] * 30
  with pytest.raises(InputError, match=r"loss\.class_weights has 30 entries but the model has 31 labels"):
    losses.from_config(weights, positives=positives, num_examples=1000, ancestor_matrix=r)
  weights.class_weights = "[1, 2, oops]"
  with pytest.raises(InputError, match=r"loss\.class_weights must be 'auto' or a list of numbers"):
    losses.from_config(weights, positives=positives, num_examples=1000, ancestor_matrix=r)
  weights.class_weights = [1.0] * 30 + [-1.0]
  with pytest.raises(InputError, match=r"loss\.class_weights must hold finite non-negative numbers"):
    losses.from_config(weights, positives=positives, num_examples=1000, ancestor_matrix=r)


def test_from_config_key_errors(v13):
  tax, positives = v13
  kwargs = {"positives": positives, "num_examples": 1000, "ancestor_matrix": tax.ancestor_matrix}
  # `--config.loss.name=bce` on a config written for focal: focal's key is left over.
  cfg = losses.config("focal")
  cfg.name = "bce"
  with pytest.raises(InputError) as error:
    losses.from_config(cfg, **kwargs)
  assert str(error.value) == (
      "config.loss.alpha: not a parameter of loss 'bce' (valid: []); it is a parameter of loss "
      "['distribution_balanced', 'focal']; to switch losses, append :loss=<name> to --config "
      "(docs/losses.md)")
  with pytest.raises(InputError, match=r"^config\.loss\.gammma: not a parameter of loss 'focal' "
                                       r"\(valid: \['alpha', 'gamma'\]\)$"):
    losses.from_config(ml_collections.ConfigDict({"name": "focal", "gammma": 2.0}), **kwargs)
  with pytest.raises(InputError, match=r"^config\.loss\.gamma: not a parameter of loss 'asl' "
                                       r"\(valid: \['clamp_eps', 'clip', 'focusing_grad', 'gamma_neg', "
                                       r"'gamma_pos'\]\); it is a parameter of loss"):
    losses.from_config({"name": "asl", "gamma": 2.0}, **kwargs)
  with pytest.raises(InputError, match=r"loss\.ancestor_matrix cannot be set in the config"):
    losses.from_config({"name": "chmcnn", "ancestor_matrix": np.eye(31)}, **kwargs)
  with pytest.raises(InputError, match=r"loss\.name is missing"):
    losses.from_config({"gamma": 2.0}, **kwargs)
  with pytest.raises(InputError, match=r"unknown loss 'nope'"):
    losses.from_config({"name": "nope"}, **kwargs)
  with pytest.raises(InputError, match=r"model has 31 labels but the taxonomy's R has 5"):
    losses.from_config({"name": "chmcnn"}, positives=None, num_examples=None, ancestor_matrix=np.eye(5)
                       ).per_example(np.zeros((1, 31)), np.zeros((1, 31)))


# ---------------------------------------------------------------------------------------------------
# Switching the loss from the command line, and saved configs of earlier versions.


def _load_config(argument, *overrides):
  """The config `wikitopics train --config=<argument> <overrides>` trains with, after its early check."""
  argv = ["wikitopics", f"--config={os.path.join(REPO, argument)}", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags defines a flag per override it finds there, as `wikitopics` parses them.
  holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  configlib.check(holder.value)
  return holder.value


def test_a_config_files_loss_argument_switches_the_loss():
  assert _load_config("configs/demo.py").loss.to_dict() == {"name": "bce"}
  config = _load_config("configs/demo.py:loss=distribution_balanced", "--config.loss.gamma=1.5")
  assert config.loss.to_dict() == losses.config("distribution_balanced", gamma=1.5).to_dict()
  # ml_collections cannot add a key from the command line: bce's config has no gamma.
  with pytest.raises((KeyError, AttributeError, flags.Error), match="gamma"):
    _load_config("configs/demo.py", "--config.loss.gamma=3")
  # The rest of the argument still reaches get_config: a row and its scale, a dataset directory.
  row = _load_config("configs/experiments.py:table4_3_focal:smoke:loss=asl")
  assert row.loss.to_dict() == losses.config("asl").to_dict()
  assert row.num_epochs == _load_config("configs/experiments.py:table4_3_focal:smoke").num_epochs
  tiny = _load_config("configs/tiny.py:/data/wit_32px:loss=focal", "--config.loss.alpha=0.25")
  assert tiny.data.dir == "/data/wit_32px" and tiny.loss.to_dict() == {"name": "focal", "gamma": 2.0,
                                                                         "alpha": 0.25}
  with pytest.raises(flags.Error, match=r"unknown loss 'focall'; valid names"):
    _load_config("configs/demo.py:loss=focall")


def test_renaming_the_loss_leaves_the_other_losss_keys_and_fails_in_one_line():
  with pytest.raises(InputError) as error:
    _load_config("configs/demo.py:loss=focal", "--config.loss.name=asl")
  message = str(error.value)
  assert "\n" not in message and message.startswith(
      "config.loss.alpha: not a parameter of loss 'asl' (valid: ['clamp_eps', 'clip', 'focusing_grad', "
      "'gamma_neg', 'gamma_pos']); it is a parameter of loss ['distribution_balanced', 'focal']")
  # A loss without parameters set is renamed freely: the new loss takes its defaults.
  assert _load_config("configs/demo.py", "--config.loss.name=chmcnn").loss.to_dict() == {"name": "chmcnn"}


# A config.json's `loss` as earlier versions wrote it (written out, not derived from today's code):
# every registered loss's keys in one namespace, distribution_balanced's prefixed with `db_`.
UNION_LOSS_CONFIG = {
    "name": "bce", "alpha": None, "class_weights": "auto", "clamp_eps": 1e-8, "clip": 0.05,
    "db_alpha": 0.1, "db_balance_param": 2.0, "db_beta": 10.0, "db_focal": True, "db_gamma": 2.0,
    "db_init_bias": 0.05, "db_mu": 0.3, "db_neg_scale": 5.0, "focusing_grad": False, "gamma": 2.0,
    "gamma_neg": 4.0, "gamma_pos": 1.0, "num_examples": "auto", "pos_weights": "auto", "positives": "auto",
}


def test_upgrade_saved_config_keeps_only_the_saved_losss_keys():
  where = "workdir/config.json"
  # COCO-MLT without the focal term and with a gamma unlike focal's, to tell the two gammas apart.
  union = {**UNION_LOSS_CONFIG, "name": "distribution_balanced", "db_mu": 0.2, "db_neg_scale": 2.0,
           "db_focal": False, "db_gamma": 1.5}
  upgraded = losses.upgrade_saved_config(union, where=where)
  assert upgraded == {"name": "distribution_balanced", "positives": "auto", "num_examples": "auto",
                      "alpha": 0.1, "beta": 10.0, "mu": 0.2, "neg_scale": 2.0, "init_bias": 0.05,
                      "focal": False, "balance_param": 2.0, "gamma": 1.5}
  obj = losses.from_config(upgraded, positives=POSITIVES, num_examples=NUM_EXAMPLES,
                           ancestor_matrix=np.eye(L))
  z = np.linspace(-3, 3, 2 * L, dtype=np.float32).reshape(2, L)
  y = (z > 0.5).astype(np.float32)
  same = losses.build("distribution_balanced", positives=POSITIVES, num_examples=NUM_EXAMPLES,
                      **{**losses.DB_SETTINGS["coco_mlt"], "focal": False, "gamma": 1.5})
  np.testing.assert_array_equal(obj.per_label(z, y), same.per_label(z, y))
  assert losses.upgrade_saved_config({**UNION_LOSS_CONFIG, "name": "focal"}, where=where) == {
      "name": "focal", "gamma": 2.0, "alpha": None}
  assert losses.upgrade_saved_config(UNION_LOSS_CONFIG, where=where) == {"name": "bce"}
  assert losses.upgrade_saved_config({**UNION_LOSS_CONFIG, "name": "class_weighted_bce"}, where=where) == {
      "name": "class_weighted_bce", "class_weights": "auto", "positives": "auto", "num_examples": "auto"}
  # Today's form comes back as it is, distribution_balanced's unprefixed alpha and gamma included.
  for name in losses.names():
    saved = losses.config(name).to_dict()
    assert losses.upgrade_saved_config(saved, where=where) == saved, name
  saved = losses.config("distribution_balanced", alpha=0.3, gamma=1.0).to_dict()
  assert losses.upgrade_saved_config(saved, where=where) == saved
  with pytest.raises(InputError, match=r"^workdir/config\.json: loss\.name='nope' is not a registered loss"):
    losses.upgrade_saved_config({"name": "nope"}, where=where)


def test_upgrade_saved_config_refuses_only_distribution_balanced_runs_with_retired_keys():
  where = "workdir/config.json"
  oldest = {**UNION_LOSS_CONFIG, "db_kappa": 0.05, "db_lambda": 5.0}
  # Defaults of a loss the run did not use: dropped.
  assert losses.upgrade_saved_config({**oldest, "name": "asl"}, where=where) == losses.config("asl").to_dict()
  with pytest.raises(InputError) as error:
    losses.upgrade_saved_config({**oldest, "name": "distribution_balanced"}, where=where)
  assert str(error.value) == (
      "workdir/config.json: trained with the earlier distribution_balanced parameters ['db_kappa', "
      "'db_lambda'], which the loss no longer has; give --config with today's keys (docs/losses.md)")
