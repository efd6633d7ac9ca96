"""Losses against literal float64 NumPy references of their papers' formulas (values and gradients).

The `ref_*` functions are plain NumPy on probabilities p = sigmoid(z), written as the formulas read, and
return per-label losses (B, L); `ref_objective` applies the module's reduction (mean over labels, then over
the batch). They have no pytest dependency so benchmarks can import them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wikitopics_jax import hierarchy
from wikitopics_jax import losses
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

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


def ref_objective(per_label):
  return float(np.mean(np.mean(per_label, axis=1)))


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


@pytest.fixture(scope="module")
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
    "asl": ({}, lambda z, y: ref_asl(z, y, 4.0, 1.0, 0.05)),
    "asl_no_clip": ({"gamma_neg": 2.0, "gamma_pos": 0.0, "clip": 0.0},
                    lambda z, y: ref_asl(z, y, 2.0, 0.0, 0.0)),
    "distribution_balanced": ({"positives": POSITIVES, "num_examples": NUM_EXAMPLES},
                              lambda z, y: ref_distribution_balanced(z, y, POSITIVES, NUM_EXAMPLES)),
}


def _loss_name(case):
  return case.split("_alpha")[0].split("_no_clip")[0]


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


def test_identities_with_bce(batch):
  z, y = (a.astype(np.float32) for a in batch)
  bce = losses.get_per_example_loss("bce")(z, y)
  same_as_bce = [
      ("focal", {"gamma": 0.0}),
      ("asl", {"gamma_neg": 0.0, "gamma_pos": 0.0, "clip": 0.0}),
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
  obj = losses.from_config(losses.default_config("chmcnn"), positives=None, num_examples=None,
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
                     match=r"loss\.gama is not a parameter of loss 'focal'.*\['alpha', 'gamma'\]"):
    losses.get_loss("focal", gama=2)
  with pytest.raises(InputError, match=r"loss\.gamma must be >= 0"):
    losses.get_loss("focal", gamma=-1)
  with pytest.raises(InputError, match=r"loss\.alpha must be <= 1"):
    losses.get_loss("focal", alpha=2)
  with pytest.raises(InputError, match=r"loss\.clip must be a number"):
    losses.get_loss("asl", clip="lots")
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

    assert losses.default_config()["scale"] == 1.0
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


def test_default_config_covers_every_loss_and_command_line_overrides():
  cfg = losses.default_config()
  assert cfg.name == "bce"
  for key in ("gamma", "alpha", "gamma_neg", "gamma_pos", "clip", "class_weights", "pos_weights",
              "positives", "num_examples", "db_alpha", "db_beta", "db_mu", "db_lambda", "db_kappa"):
    assert key in cfg, key
  assert "ancestor_matrix" not in cfg
  assert cfg.alpha is None and cfg.positives == "auto" and cfg.gamma == 2.0
  # What `--config.loss.name=focal --config.loss.gamma=3 --config.loss.alpha=0.25` does.
  cfg.name, cfg.gamma, cfg.alpha = "focal", 3.0, 0.25
  obj = losses.from_config(cfg, positives=None, num_examples=None, ancestor_matrix=np.eye(5))
  assert obj.name == "focal" and obj.params == {"alpha": 0.25, "gamma": 3.0}


def test_from_config_auto_statistics(v13, batch):
  tax, positives = v13
  cfg = losses.default_config("pos_weighted_bce")
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
  as_list = losses.default_config("distribution_balanced")
  as_list.positives, as_list.num_examples = positives.tolist(), 2000
  # On the command line a list arrives as a string: --config.loss.positives='[10, 20, ...]'.
  as_string = losses.default_config("distribution_balanced")
  as_string.positives, as_string.num_examples = str(positives.tolist()), "2000"
  rng = np.random.default_rng(5)
  z = rng.normal(size=(3, tax.num_labels)).astype(np.float32)
  y = (rng.random(z.shape) < 0.3).astype(np.float32)
  # Explicit values win over the manifest's statistics.
  a = losses.from_config(as_list, positives=positives * 0 + 1, num_examples=5, ancestor_matrix=r)
  b = losses.from_config(as_string, positives=None, num_examples=None, ancestor_matrix=r)
  expected = ref_objective(ref_distribution_balanced(z.astype(np.float64), y, positives, 2000))
  assert float(a(z, y)) == pytest.approx(expected, rel=1e-5)
  assert float(b(z, y)) == pytest.approx(expected, rel=1e-5)

  weights = losses.default_config("class_weighted_bce")
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
  cfg = losses.default_config("bce")
  cfg.gamma = 3.0
  with pytest.raises(InputError,
                     match=r"loss\.gamma=3\.0 is set, but loss 'bce' does not take it.*\['focal'\]"):
    losses.from_config(cfg, **kwargs)
  with pytest.raises(InputError, match=r"loss\.gammma is not a parameter of any loss"):
    losses.from_config(ml_collections.ConfigDict({"name": "focal", "gammma": 2.0}), **kwargs)
  with pytest.raises(InputError, match=r"loss\.ancestor_matrix cannot be set in the config"):
    losses.from_config({"name": "chmcnn", "ancestor_matrix": np.eye(31)}, **kwargs)
  with pytest.raises(InputError, match=r"loss\.name is missing"):
    losses.from_config({"gamma": 2.0}, **kwargs)
  with pytest.raises(InputError, match=r"unknown loss 'nope'"):
    losses.from_config({"name": "nope"}, **kwargs)
  with pytest.raises(InputError, match=r"model has 31 labels but the taxonomy's R has 5"):
    losses.from_config({"name": "chmcnn"}, positives=None, num_examples=None, ancestor_matrix=np.eye(5)
                       ).per_example(np.zeros((1, 31)), np.zeros((1, 31)))
