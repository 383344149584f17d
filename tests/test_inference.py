"""Inference against hand-written loops: `read` (from the RNN's own initial memory and from a
teacher-encoded prompt), `write` (greedy = argmax loop; sampling follows softmax(logits / T)),
`prompt_memory` (teacher window, or the RNN's own rollout)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import log_softmax_np, with_leaf

import smt_jax


@pytest.fixture(scope="module")
def setup(tiny):
  tfns, rfns, params = tiny.models("lstm", seed=40)
  update, readout = jax.jit(rfns.update), jax.jit(rfns.readout)
  return tfns, rfns, params, update, readout


def _left_padded(x, end, length):
  out = np.full((x.shape[0], length), -1, np.int32)
  for i in range(length):
    if 0 <= end - length + 1 + i < x.shape[1]:
      out[:, i] = x[:, end - length + 1 + i]
  return out


def _score(logits, y):
  """NLL (0 where y == -1), mask and argmax-correct for one step, in NumPy."""
  logp = log_softmax_np(logits)
  mask = y != -1
  nll = np.where(mask, -logp[np.arange(len(y)), np.maximum(y, 0)], 0.0)
  return nll, mask, (np.argmax(logits, -1) == y) & mask


def test_read_from_the_initial_memory_equals_a_python_loop(tiny, setup):
  tfns, rfns, params, update, readout = setup
  batch = tiny.batch(41, 3, 6, mask_frac=0.3)
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  out = smt_jax.read(params, batch, rnn=rfns)
  rp = params["rnn"]
  m = jnp.broadcast_to(rfns.initial_memory(rp), (3, tiny.num_memory_tokens, tiny.width))
  for t in range(x.shape[1]):
    m = update(rp, m, jnp.asarray(x[:, t]))  # read x[t], then score y[t]
    nll, mask, correct = _score(np.asarray(readout(rp, m)), y[:, t])
    np.testing.assert_allclose(out["nll"][:, t], nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["mask"][:, t], mask)
    np.testing.assert_array_equal(out["correct"][:, t], correct)
    np.testing.assert_allclose(out["states"][:, t], m, atol=1e-5)


@pytest.mark.parametrize("prompt_length", [2, 6])  # shorter than Tc = 4 (padded), and longer
def test_read_with_a_prompt_starts_from_the_teacher_memory(tiny, setup, prompt_length):
  tfns, rfns, params, update, readout = setup
  tc, p = tiny.context_length, prompt_length
  batch = tiny.batch(42, 2, 9, mask_frac=0.2)
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  out = smt_jax.read(params, batch, rnn=rfns, teacher=tfns, context_length=tc, prompt_length=p)
  rp = params["rnn"]
  # m_{P-1} = E(x[P-Tc .. P-1]) (left-padded); it scores y[P-1]; then read x[P..].
  m = tfns.encode(params["teacher"], jnp.asarray(_left_padded(x, p - 1, tc)))
  for t in range(x.shape[1]):
    if t < p - 1:
      assert not np.any(out["mask"][:, t]) and np.all(out["nll"][:, t] == 0)
      continue
    if t > p - 1:
      m = update(rp, m, jnp.asarray(x[:, t]))
    nll, mask, correct = _score(np.asarray(readout(rp, m)), y[:, t])
    np.testing.assert_allclose(out["nll"][:, t], nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["mask"][:, t], mask)
    np.testing.assert_array_equal(out["correct"][:, t], correct)
    np.testing.assert_allclose(out["states"][:, t - (p - 1)], m, atol=1e-5)  # from t = P-1 on
  assert out["states"].shape[1] == x.shape[1] - p + 1


def test_prompt_memory_with_and_without_teacher(tiny, setup):
  tfns, rfns, params, update, _ = setup
  prompt = np.asarray(tiny.batch(43, 2, 5)["x"])
  rp = params["rnn"]
  m = jnp.broadcast_to(rfns.initial_memory(rp), (2, tiny.num_memory_tokens, tiny.width))
  for t in range(prompt.shape[1]):
    m = update(rp, m, jnp.asarray(prompt[:, t]))
  np.testing.assert_allclose(
    smt_jax.prompt_memory(params, jnp.asarray(prompt), rnn=rfns), m, atol=1e-5
  )
  want = tfns.encode(params["teacher"], jnp.asarray(prompt[:, -tiny.context_length :]))
  got = smt_jax.prompt_memory(
    params, jnp.asarray(prompt), rnn=rfns, teacher=tfns, context_length=tiny.context_length
  )
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError):
    smt_jax.prompt_memory(params, jnp.asarray(prompt), rnn=rfns, teacher=tfns)


def test_write_at_temperature_zero_is_a_greedy_loop(tiny, setup):
  _, rfns, params, update, readout = setup
  rp = params["rnn"]
  m0 = smt_jax.prompt_memory(params, jnp.asarray(np.asarray(tiny.batch(44, 3, 4)["x"])), rnn=rfns)
  tokens = smt_jax.write(params, jax.random.key(0), m0, rnn=rfns, num_steps=7, temperature=0.0)
  assert tokens.shape == (3, 7) and tokens.dtype == jnp.int32
  m, want = m0, []
  for _ in range(7):
    tok = jnp.argmax(readout(rp, m), -1).astype(jnp.int32)
    want.append(np.asarray(tok))
    m = update(rp, m, tok)
  np.testing.assert_array_equal(tokens, np.stack(want, 1))


def test_write_samples_follow_the_tempered_softmax(tiny, setup):
  _, rfns, params, _, readout = setup
  # Readout logits fixed to a known vector whatever the memory: last layer kernel 0, bias = logits.
  n, v = 4000, tiny.vocab_size
  logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5, -2.0])[:v]
  rp = with_leaf(params["rnn"], "head/fc2/kernel", jnp.zeros_like)
  rp = with_leaf(rp, "head/fc2/bias", lambda b: jnp.asarray(logits, b.dtype))
  params = {**params, "rnn": rp}
  m0 = smt_jax.initial_memories(rfns, rp, n)
  np.testing.assert_allclose(readout(rp, m0[:2]), np.stack([logits] * 2), atol=1e-6)
  probs = {t: np.exp(log_softmax_np(logits / t)) for t in (0.5, 2.0)}
  assert np.max(np.abs(probs[0.5] - probs[2.0])) > 0.2  # the two temperatures are distinguishable
  for temperature in (0.5, 2.0):
    tokens = np.asarray(
      smt_jax.write(params, jax.random.key(1), m0, rnn=rfns, num_steps=3, temperature=temperature)
    )
    assert tokens.min() >= 0 and tokens.max() < v
    freq = np.bincount(tokens.ravel(), minlength=v) / tokens.size  # every step: same logits
    np.testing.assert_allclose(freq, probs[temperature], atol=0.03)  # > 5 sigma at 12000 draws
  # Different keys give different samples.
  a = smt_jax.write(params, jax.random.key(2), m0[:64], rnn=rfns, num_steps=5)
  b = smt_jax.write(params, jax.random.key(3), m0[:64], rnn=rfns, num_steps=5)
  assert np.any(np.asarray(a) != np.asarray(b))


def test_teacher_eval_at_full_context_and_the_references_decoding_loss(setup):
  """teacher_full_*: the decoder's next-target NLL from m_t at t >= Tc-1 only (a loop over t);
  teacher_decoding_*: its Tf-step loss from E(x[0..Tc-1]), the reference's held-out loss."""
  from smt_jax.runner import evaluation

  tfns, rfns, params, _, _ = setup
  tc, tf, t_len = 3, 2, 7
  x = jax.random.randint(jax.random.key(4), (3, t_len), 0, 6)
  y = jnp.concatenate([x[:, 1:], jnp.full((3, 1), -1, x.dtype)], axis=1)
  out = evaluation.evaluate(
    params, {"x": x, "y": y}, rnn=rfns, teacher=tfns, context_length=tc, future_length=tf
  )
  x, y = np.asarray(x), np.asarray(y)
  total, count, every = 0.0, 0, 0.0
  for t in range(t_len):
    m = tfns.encode(params["teacher"], jnp.asarray(_left_padded(x, t, tc)))
    logits = np.asarray(tfns.decode(params["teacher"], m, jnp.asarray(x[:, t : t + 1]))[:, 0])
    nll, mask, _ = _score(logits, y[:, t])
    every += nll.sum()
    if t >= tc - 1:
      total, count = total + nll.sum(), count + mask.sum()
  np.testing.assert_allclose(out["teacher_nll_sum"], every, rtol=1e-5)
  np.testing.assert_allclose(out["teacher_full_nll_sum"], total, rtol=1e-5)
  assert int(out["teacher_full_count"]) == count
  m = tfns.encode(params["teacher"], jnp.asarray(x[:, :tc]))
  dec = smt_jax.decoding_loss(
    tfns.decode(params["teacher"], m, jnp.asarray(x[:, tc : tc + tf])),
    jnp.asarray(y[:, tc - 1 : tc - 1 + tf]),
  )
  np.testing.assert_allclose(
    out["teacher_decoding_sum"] / out["teacher_decoding_count"], dec, rtol=1e-5
  )
