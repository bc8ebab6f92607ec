"""The per-entry losses (BCE, ASL, focal): the published formulas, their special cases, the
entries in the loss and the reduction, finite gradients, and `from_config`'s checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import demo_config
from scipy.special import expit

from ctran_jax import losses


def asl_reference(x, y, gamma_neg, gamma_pos, clip):
  """Ridnik et al. 2021, eq. (1)-(5), in float64: L = -y L+ - (1 - y) L-,
  L+ = (1 - p)^g+ log p, L- = p_m^g- log(1 - p_m), p_m = max(p - m, 0)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  p = expit(x)
  p_m = np.maximum(p - clip, 0.0)
  l_pos = (1.0 - p) ** gamma_pos * np.log(p)
  l_neg = p_m ** gamma_neg * np.log(1.0 - p_m)
  return -y * l_pos - (1.0 - y) * l_neg


def focal_reference(x, y, gamma):
  """Lin et al. 2017 without alpha: -(1 - p_t)^gamma log p_t."""
  p = expit(np.asarray(x, np.float64))
  p_t = np.where(np.asarray(y) == 1, p, 1.0 - p)
  return -(1.0 - p_t) ** gamma * np.log(p_t)


def random_batch(seed=0, shape=(8, 12), scale=4.0):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal(shape) * scale).astype(np.float32)
  labels = rng.integers(0, 2, shape).astype(np.int32)
  states = rng.integers(-1, 2, shape).astype(np.int32)
  return jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(states)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [
    (4.0, 0.0, 0.05), (4.0, 1.0, 0.05), (2.0, 2.0, 0.0), (0.5, 0.0, 0.2), (0.0, 0.0, 0.1),
    (3.0, 1.5, 0.0),
])
def test_asl_matches_the_published_formula(gamma_neg, gamma_pos, clip):
  logits, labels, _ = random_batch()
  loss = losses.MaskedASL(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
  got = loss.per_entry(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, asl_reference(logits, labels, gamma_neg, gamma_pos, clip),
                             rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 2.5])
def test_focal_is_asl_with_equal_gammas_and_no_clip(gamma):
  logits, labels, _ = random_batch(1)
  config = demo_config(**{"loss.name": "focal", "loss.gamma_neg": gamma,
                          "loss.gamma_pos": gamma})
  loss = losses.from_config(config.loss)
  np.testing.assert_allclose(loss.per_entry(logits, labels),
                             focal_reference(logits, labels, gamma), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("labels_in_loss", losses.LOSS_LABELS)
def test_asl_at_zero_gammas_and_clip_is_exactly_the_bce(reduction, labels_in_loss):
  logits, labels, states = random_batch(2)
  asl = losses.MaskedASL(reduction, labels_in_loss, gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
  bce = losses.MaskedBCE(reduction, labels_in_loss)
  np.testing.assert_array_equal(asl.per_entry(logits, labels), bce.per_entry(logits, labels))
  for with_states in (states, None):
    assert float(asl(logits, labels, with_states)) == float(bce(logits, labels, with_states))
  # ... and the BCE is optax's.
  import optax
  np.testing.assert_allclose(bce.per_entry(logits, labels),
                             optax.sigmoid_binary_cross_entropy(logits, labels.astype(float)),
                             rtol=1e-6)


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("labels_in_loss", losses.LOSS_LABELS)
def test_asl_takes_the_same_entries_and_reduction_as_bce(reduction, labels_in_loss):
  logits, labels, states = random_batch(3)
  loss = losses.MaskedASL(reduction, labels_in_loss, gamma_neg=4.0, gamma_pos=1.0, clip=0.05)
  per_entry = asl_reference(logits, labels, 4.0, 1.0, 0.05)
  in_loss = (np.asarray(states) == -1) if labels_in_loss == "unknown" else np.ones(states.shape)
  np.testing.assert_array_equal(loss.weights(states), in_loss.astype(np.float32))
  total = float(np.sum(per_entry * in_loss))
  assert float(loss.total(logits, labels, states)) == pytest.approx(total, rel=1e-5)
  expected = total if reduction == "sum" else total / in_loss.sum()
  assert float(loss(logits, labels, states)) == pytest.approx(expected, rel=1e-5)
  # No states: every entry.
  everything = float(np.sum(per_entry))
  assert float(loss(logits, labels)) == pytest.approx(
      everything if reduction == "sum" else everything / per_entry.size, rel=1e-5)


@pytest.mark.parametrize("params", [
    dict(gamma_neg=0.0, gamma_pos=0.0, clip=0.0), dict(gamma_neg=4.0, gamma_pos=0.0, clip=0.05),
    dict(gamma_neg=0.5, gamma_pos=0.3, clip=0.0), dict(gamma_neg=0.5, gamma_pos=2.0, clip=0.3),
    dict(gamma_neg=2.0, gamma_pos=2.0, clip=0.0)])
def test_gradients_are_finite_at_extreme_logits(params):
  logits = jnp.array([[-50.0, 50.0, -50.0, 50.0, 0.0, -1e4, 1e4]], jnp.float32)
  labels = jnp.array([[0, 0, 1, 1, 1, 0, 1]], jnp.int32)
  loss = losses.MaskedASL("sum", "all", **params)
  value, grads = jax.value_and_grad(lambda x: loss(x, labels))(logits)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grads)), (value, grads)
  # Confidently right entries cost (almost) nothing; confidently wrong ones ~ |logit|.
  per_entry = np.asarray(loss.per_entry(logits, labels))[0]
  assert np.all(per_entry[[0, 3, 5, 6]] < 1e-6)
  assert np.all(np.isfinite(per_entry)) and per_entry[2] > 0
  # bfloat16 logits are upcast: the loss is float32.
  assert loss.per_entry(logits.astype(jnp.bfloat16), labels).dtype == jnp.float32


def test_from_config_picks_by_name():
  assert type(losses.from_config(demo_config().loss)) is losses.MaskedBCE
  asl = losses.from_config(demo_config(**{
      "loss.name": "asl", "loss.gamma_neg": 4.0, "loss.gamma_pos": 0.0, "loss.clip": 0.05,
      "loss.reduction": "sum", "loss.labels": "all"}).loss)
  assert asl == losses.MaskedASL("sum", "all", gamma_neg=4.0, gamma_pos=0.0, clip=0.05)


@pytest.mark.parametrize("overrides,match", [
    ({"loss.name": "bce2"}, "config.loss.name='bce2'; expected one of bce, asl, focal"),
    ({"loss.gamma_neg": 4.0}, "config.loss.gamma_neg=4.0 has no effect with .*'bce'"),
    ({"loss.name": "asl", "loss.gamma_pos": -1.0}, r"config.loss.gamma_pos=-1.0; expected"),
    ({"loss.name": "asl", "loss.clip": 1.0}, r"config.loss.clip=1.0; expected a value in"),
    ({"loss.name": "focal", "loss.gamma_neg": 2.0}, "'focal' is ASL with gamma_neg == gamma_pos"),
    ({"loss.name": "focal", "loss.clip": 0.05}, "'focal' is ASL with"),
    ({"loss.name": "asl", "loss.reduction": "avg"}, "config.loss.reduction='avg'"),
])
def test_bad_loss_values_name_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    losses.from_config(demo_config(**overrides).loss)
