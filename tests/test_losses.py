"""The loss terms against independent NumPy evaluations: uniformity, cross-entropy, decoding (gamma
weights), dynamics, drift, and the input checks that refuse to broadcast."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import log_softmax_np
from jax.test_util import check_grads

from smt_jax import losses


def _uniformity_np(tokens: np.ndarray, t: float = 2.0) -> float:
  """log(mean_{i != j} exp(-t ||z_i - z_j||^2)) with an explicit double loop (no Gram trick)."""
  z = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  terms = [
    np.exp(-t * np.sum((z[i] - z[j]) ** 2)) for i, j in itertools.permutations(range(len(z)), 2)
  ]
  return float(np.log(np.mean(terms)))


# ---------------------------------------------------------------- uniformity


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_uniformity_matches_numpy_double_loop(temperature):
  tokens = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32) * 3.0
  got = losses.uniformity_loss(jnp.asarray(tokens), temperature=temperature)
  np.testing.assert_allclose(got, _uniformity_np(tokens, temperature), rtol=1e-5, atol=1e-6)
  # Normalisation: scaling individual tokens changes nothing.
  scales = np.random.default_rng(1).uniform(0.1, 10.0, size=(3, 4, 1)).astype(np.float32)
  np.testing.assert_allclose(
    losses.uniformity_loss(jnp.asarray(tokens * scales), temperature=temperature), got, rtol=1e-5
  )


def test_uniformity_subset_without_key_takes_the_first_tokens():
  tokens = np.random.default_rng(2).normal(size=(10, 6)).astype(np.float32)
  got = losses.uniformity_loss(jnp.asarray(tokens), max_samples=4, key=None)
  np.testing.assert_allclose(got, _uniformity_np(tokens[:4]), rtol=1e-5, atol=1e-6)
  assert abs(float(got) - _uniformity_np(tokens)) > 1e-3  # the subset really is a subset


def test_uniformity_subset_with_key_is_some_subset_of_that_size():
  tokens = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
  got = float(losses.uniformity_loss(jnp.asarray(tokens), max_samples=3, key=jax.random.key(0)))
  candidates = [_uniformity_np(tokens[list(s)]) for s in itertools.combinations(range(7), 3)]
  assert min(abs(got - c) for c in candidates) < 1e-5


def test_uniformity_collapsed_tokens_give_zero_and_antipodal_give_minimum():
  v = np.random.default_rng(4).normal(size=(1, 5)).astype(np.float32)
  collapsed = np.concatenate([v, 2.0 * v, 0.5 * v, v], axis=0)  # one direction, any length
  np.testing.assert_allclose(losses.uniformity_loss(jnp.asarray(collapsed)), 0.0, atol=1e-6)
  # Two antipodal directions: ||z_i - z_j||^2 = 4 for the only pair, so the loss is -4t.
  np.testing.assert_allclose(
    losses.uniformity_loss(jnp.asarray(np.concatenate([v, -v]))), -8.0, rtol=1e-5
  )


def test_uniformity_rejects_bad_inputs():
  with pytest.raises(ValueError):
    losses.uniformity_loss(jnp.ones((4, 3), jnp.int32))
  with pytest.raises(ValueError):
    losses.uniformity_loss(jnp.ones((3,)))  # needs [..., d] with at least one leading axis
  with pytest.raises(ValueError):
    losses.uniformity_loss(jnp.ones((1, 3)))  # one token has no pairs
  with pytest.raises(ValueError):
    losses.uniformity_loss(jnp.ones((4, 3)), max_samples=1)


# ---------------------------------------------------------------- cross-entropy / decoding


def test_masked_cross_entropy_matches_numpy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 2
  targets = np.array([[0, 4, -1], [-1, 2, 3]], np.int32)
  ce, mask = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  logp = log_softmax_np(logits)
  want = np.zeros(targets.shape)
  for idx in np.ndindex(targets.shape):
    if targets[idx] != -1:
      want[idx] = -logp[idx][targets[idx]]
  np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, targets != -1)
  # A hand value: uniform logits over 5 classes give log 5.
  ce_u, _ = losses.masked_cross_entropy(jnp.zeros((1, 5)), jnp.array([3], jnp.int32))
  np.testing.assert_allclose(ce_u, [np.log(5.0)], rtol=1e-6)


def test_masked_cross_entropy_rejects_bad_inputs():
  logits, targets = jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32)
  with pytest.raises(ValueError):  # float targets
    losses.masked_cross_entropy(logits, targets.astype(jnp.float32))
  with pytest.raises(ValueError):  # integer logits
    losses.masked_cross_entropy(logits.astype(jnp.int32), targets)
  with pytest.raises(ValueError):  # would broadcast [2, 1] against [2, 3]
    losses.masked_cross_entropy(logits, targets[:, :1])
  with pytest.raises(ValueError):  # targets missing the leading axis
    losses.masked_cross_entropy(logits, targets[0])


def test_decoding_loss_gamma_weights_by_hand():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 3, 4)).astype(np.float32)
  targets = np.array([[1, 2, 3], [0, -1, 2]], np.int32)  # 5 targets
  logp = log_softmax_np(logits)
  ce = lambda n, j: -logp[n, j, targets[n, j]]
  weights = [1.0, 0.5, 0.25]  # gamma = 0.5 on a 3-step future
  want = (
    sum(weights[j] * ce(0, j) for j in range(3)) + weights[0] * ce(1, 0) + weights[2] * ce(1, 2)
  ) / 5.0
  got = losses.decoding_loss(jnp.asarray(logits), jnp.asarray(targets), gamma=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # gamma = 1: the plain masked mean.
  want1 = np.mean([ce(0, 0), ce(0, 1), ce(0, 2), ce(1, 0), ce(1, 2)])
  np.testing.assert_allclose(
    losses.decoding_loss(jnp.asarray(logits), jnp.asarray(targets)), want1, rtol=1e-5
  )


def test_decoding_loss_all_masked_is_zero_not_nan():
  got = losses.decoding_loss(jnp.ones((2, 3, 4)), jnp.full((2, 3), -1, jnp.int32))
  assert float(got) == 0.0


def test_decoding_loss_rejects_bad_inputs():
  with pytest.raises(ValueError):
    losses.decoding_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.float32))
  with pytest.raises(ValueError):
    losses.decoding_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError):
    losses.decoding_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), gamma=0.0)


# ---------------------------------------------------------------- dynamics / drift


def test_dynamics_loss_by_hand():
  rng = np.random.default_rng(7)
  pred = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  tgt = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  sq = (pred.astype(np.float64) - tgt) ** 2
  np.testing.assert_allclose(
    losses.dynamics_loss(jnp.asarray(pred), jnp.asarray(tgt)), sq.mean(), rtol=1e-5
  )
  mask = np.array([[True, False, True], [False, False, True]])
  per = sq.mean(axis=(-2, -1))
  np.testing.assert_allclose(
    losses.dynamics_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.asarray(mask)),
    per[mask].mean(),
    rtol=1e-5,
  )
  # A mask with nothing selected gives 0, never NaN.
  assert (
    float(losses.dynamics_loss(jnp.asarray(pred), jnp.asarray(tgt), jnp.zeros((2, 3), bool))) == 0.0
  )


def test_dynamics_loss_rejects_bad_inputs():
  a = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError):
    losses.dynamics_loss(a, jnp.zeros((1, 3, 4)))  # would broadcast
  with pytest.raises(ValueError):
    losses.dynamics_loss(a, a.astype(jnp.int32))
  with pytest.raises(ValueError):
    losses.dynamics_loss(a, a, jnp.ones((2, 3), bool))  # mask must be the leading shape [2]
  with pytest.raises(ValueError):
    losses.dynamics_loss(jnp.zeros((4,)), jnp.zeros((4,)))  # needs [..., K, d]


def test_drift_by_hand():
  rng = np.random.default_rng(8)
  tgt = rng.normal(size=(3, 5, 2, 4)).astype(np.float32)
  pred = (tgt + 0.3 * rng.normal(size=tgt.shape)).astype(np.float32)
  t64, p64 = tgt.astype(np.float64).reshape(15, 2, 4), pred.astype(np.float64).reshape(15, 2, 4)
  mean = t64.mean(axis=0)  # per feature (k, d), over samples and times
  want_r = np.sum((p64 - t64) ** 2) / np.sum((t64 - mean) ** 2)
  got = losses.drift(jnp.asarray(pred), jnp.asarray(tgt))
  np.testing.assert_allclose(got["mse"], np.mean((p64 - t64) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["one_minus_r2"], want_r, rtol=1e-5)
  assert 0.0 < float(got["one_minus_r2"]) < 1.0

  perfect = losses.drift(jnp.asarray(tgt), jnp.asarray(tgt))
  assert float(perfect["mse"]) == 0.0 and float(perfect["one_minus_r2"]) == 0.0
  mean_pred = np.broadcast_to(tgt.reshape(15, 2, 4).mean(0), tgt.shape).astype(np.float32)
  np.testing.assert_allclose(
    losses.drift(jnp.asarray(mean_pred), jnp.asarray(tgt))["one_minus_r2"], 1.0, rtol=1e-5
  )


def test_drift_rejects_bad_inputs():
  with pytest.raises(ValueError):
    losses.drift(jnp.zeros((2, 3, 4)), jnp.zeros((3, 4)))
  with pytest.raises(ValueError):
    losses.drift(jnp.zeros((2, 3, 4), jnp.int32), jnp.zeros((2, 3, 4), jnp.int32))


def test_masked_mean_rejects_broadcasting_and_handles_empty():
  with pytest.raises(ValueError):
    losses.masked_mean(jnp.ones((2, 3)), jnp.ones((3,), bool))
  assert float(losses.masked_mean(jnp.ones((2, 3)), jnp.zeros((2, 3), bool))) == 0.0
  np.testing.assert_allclose(
    losses.masked_mean(jnp.arange(4.0), jnp.array([True, False, True, True])), (0 + 2 + 3) / 3
  )


def test_every_loss_term_has_the_gradient_of_its_value():
  # Finite differences against JAX's gradients, forward and reverse mode, for every term (float32
  # inputs: the terms compute in float32 by design; check_grads picks float32 tolerances).
  r = np.random.default_rng(7)
  logits = jnp.asarray(r.normal(size=(2, 3, 5)), jnp.float32)
  targets = jnp.asarray([[0, -1, 4], [2, 3, -1]], jnp.int32)
  m, m2 = (jnp.asarray(r.normal(size=(2, 3, 2, 4)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[True, False, True], [True, True, False]])
  terms = {
    "masked_cross_entropy": lambda a: jnp.sum(losses.masked_cross_entropy(a, targets)[0]),
    "decoding_loss": lambda a: losses.decoding_loss(a, targets, gamma=0.9),
    "dynamics_loss": lambda a: losses.dynamics_loss(a, m2),
    "uniformity_loss": lambda a: losses.uniformity_loss(a, temperature=2.0),
    "masked_mean": lambda a: losses.masked_mean(jnp.sum(a**2, axis=(-2, -1)), mask),
  }
  args = {"masked_cross_entropy": logits, "decoding_loss": logits}
  for name, f in terms.items():
    check_grads(f, (args.get(name, m),), order=2, modes=["fwd", "rev"], atol=2e-2, rtol=2e-2)
