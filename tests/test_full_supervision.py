"""Full supervision from one teacher pass: every transition trained, a few memories decoded.

`smt_loss(num_decoded=n)` decodes n memories per sequence, those whose future window holds a
target first. Windows without a target add exactly zero to L_dec, so when n covers every scored
window the loss and its gradients equal decoding every memory; these tests pin that against an
independent loop over the memories, and the window bookkeeping against numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smt_jax import objectives
from smt_jax.models import CausalTeacher, teacher_fns

V, K, D, T, TF = 7, 2, 16, 10, 3


def _sparse_batch(seed=0, batch=3):
  """Random tokens; targets at a few random positions only (as in the probes)."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, V, (batch, T))
  y = np.where(rng.random((batch, T)) < 0.2, rng.integers(0, V, (batch, T)), -1)
  y[:, -1] = rng.integers(0, V, batch)  # at least one target per row
  return {"x": jnp.asarray(x, jnp.int32), "y": jnp.asarray(y, jnp.int32)}


def _scored_numpy(y, times, length):
  y = np.asarray(y)
  out = np.zeros((y.shape[0], len(times)), int)
  for g, t in enumerate(np.asarray(times)):
    lo, hi = max(t, 0), min(t + length, y.shape[1])
    out[:, g] = (y[:, lo:hi] != -1).sum(1) if hi > lo else 0
  return out


def test_scored_windows_count_the_targets_of_each_window():
  y = _sparse_batch(1)["y"]
  times = jnp.arange(-1, T)
  for length in (1, TF, T + 2):
    np.testing.assert_array_equal(
      objectives.scored_windows(y, times, length), _scored_numpy(y, times, length)
    )


def test_decoded_memories_take_the_scored_windows_first():
  y = _sparse_batch(2)["y"]
  times = jnp.arange(-1, T)
  scored = _scored_numpy(y, times, TF) > 0
  for key in (None, jax.random.key(0)):
    for num in (1, 4, T + 1):
      pick = np.asarray(objectives.decoded_memories(y, times, TF, num, key))
      assert pick.shape == (y.shape[0], num)
      for row in range(y.shape[0]):
        assert len(set(pick[row])) == num  # no memory twice
        n_scored = scored[row].sum()
        # Every pick is scored while scored windows remain; all of them are taken when they fit.
        assert scored[row, pick[row, : min(num, n_scored)]].all()
        if num >= n_scored:
          assert set(np.flatnonzero(scored[row])) <= set(pick[row])
  # With a key the scored windows are drawn at random: two keys pick differently.
  a = objectives.decoded_memories(y, times, TF, 2, jax.random.key(0))
  b = objectives.decoded_memories(y, times, TF, 2, jax.random.key(1))
  assert not np.array_equal(a, b)


def _models(tiny):
  teacher = CausalTeacher(
    vocab_size=V,
    num_memory_tokens=K,
    width=D,
    encoder_depth=1,
    decoder_depth=1,
    num_heads=2,
    head_dim=8,
    rngs=nnx.Rngs(0),
  )
  graphdef, tstate = nnx.split(teacher)
  rfns, rstate = tiny.rnn("gru", vocab_size=V, num_memory_tokens=K, width=D)
  return teacher_fns(graphdef), rfns, {"teacher": tstate, "rnn": rstate}


def _loss(fns, rfns, num_decoded, c_readout=0.0):
  return functools.partial(
    objectives.smt_loss,
    teacher=fns,
    rnn=rfns,
    context_length=T,
    future_length=TF,
    num_transitions=T,
    num_decoded=num_decoded,
    c_unif=0.0,  # its random subset would differ with the key; it does not touch the decoder
    c_readout=c_readout,
  )


def _decoding_loss_by_loop(fns, params, batch):
  """L_dec over every memory m_{-1} .. m_{T-1}, one decoder call per memory, summed in numpy."""
  x, y = batch["x"], batch["y"]
  mem = fns.encode_all(params["teacher"], x)
  total, count = 0.0, 0
  for t in range(-1, T):
    start = jnp.array([t])
    logits = fns.decode(
      params["teacher"], mem[:, t + 1], objectives.shifted(x, start + 1, TF)[:, 0]
    )
    target = np.asarray(objectives.shifted(y, start, TF)[:, 0])
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    for b, j in zip(*np.nonzero(target != -1), strict=True):
      total -= logp[b, j, target[b, j]]
      count += 1
  return total / count


def test_decoding_the_scored_windows_equals_decoding_every_memory(tiny):
  fns, rfns, params = _models(tiny)
  batch = _sparse_batch(3)
  needed = int((_scored_numpy(batch["y"], np.arange(-1, T), TF) > 0).sum(1).max())
  assert needed < T + 1  # some windows are skipped: the test is not vacuous
  key = jax.random.key(5)
  grad = lambda n: jax.jit(jax.value_and_grad(_loss(fns, rfns, n), has_aux=True))  # noqa: E731
  (l_all, m_all), g_all = grad(T + 1)(params, batch, key)
  (l_few, m_few), g_few = grad(needed)(params, batch, key)
  expected = _decoding_loss_by_loop(fns, params, batch)
  np.testing.assert_allclose(m_all["decoding_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(m_few["decoding_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(l_few, l_all, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_few, g_all)
  # One fewer drops a scored window from some row: the loss is then a different estimate.
  (_, m_less), _ = grad(needed - 1)(params, batch, key)
  assert not np.isclose(m_less["decoding_loss"], expected, rtol=1e-5)
  # L_readout reads the decoded memories: with all of them, readout(m_t) against y[t] for every t.
  _, m_read = jax.jit(_loss(fns, rfns, T + 1, c_readout=1.0))(params, batch, key)
  mem = fns.encode_all(params["teacher"], batch["x"])
  logp = np.asarray(
    jax.nn.log_softmax(jax.vmap(rfns.readout, (None, 1), 1)(params["rnn"], mem), -1)
  )
  y = np.asarray(batch["y"])
  ce = [-logp[b, t + 1, y[b, t]] for b in range(y.shape[0]) for t in range(T) if y[b, t] != -1]
  np.testing.assert_allclose(m_read["readout_loss"], np.mean(ce), rtol=1e-5)
  # The transition terms do not depend on how many memories are decoded.
  for k in ("dynamics_loss", "init_loss"):
    np.testing.assert_allclose(m_few[k], m_all[k], rtol=1e-6, err_msg=k)


def test_jit_equals_eager_and_bad_counts_are_refused(tiny):
  fns, rfns, params = _models(tiny)
  batch, key = _sparse_batch(4), jax.random.key(1)
  eager, _ = _loss(fns, rfns, 4)(params, batch, key)
  jitted, _ = jax.jit(_loss(fns, rfns, 4))(params, batch, key)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5)
  with pytest.raises(ValueError, match="num_decoded = 12 exceeds the 11 memories"):
    _loss(fns, rfns, T + 2)(params, batch, key)
  with pytest.raises(ValueError, match="num_decoded must be >= 0"):
    _loss(fns, rfns, -1)(params, batch, key)
