"""The objectives against hand-written loops: SMT (all transitions, one transition, random subset),
DMT, BPTT, the rollout; where gradients reach (teacher stop, DMT carry stop, truncation); finite
differences; the O(1) credit path; every updater kind trains; jit = eager; input checks."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import KINDS, get_leaf, log_softmax_np, with_leaf
from jax.test_util import check_grads

import smt_jax
from smt_jax import contract, objectives
from smt_jax.contract import RNNFns

# ---------------------------------------------------------------- helpers (library-independent)


def left_padded_window(x: np.ndarray, end: int, length: int) -> np.ndarray:
  """x[:, end-length+1 .. end], left-padded with -1 (end = -1: all padding). Plain NumPy."""
  out = np.full((x.shape[0], length), -1, x.dtype)
  for i in range(length):
    src = end - length + 1 + i
    if 0 <= src < x.shape[1]:
      out[:, i] = x[:, src]
  return out


def ce_sum_count(logits, targets):
  """Sum and count of -log softmax(logits)[target] over targets != -1 (NumPy, float64)."""
  logp = log_softmax_np(logits)
  targets = np.asarray(targets)
  total, count = 0.0, 0
  for idx in np.ndindex(targets.shape):
    if targets[idx] != -1:
      total += -logp[idx][targets[idx]]
      count += 1
  return total, count


def uniformity_np(tokens, t=2.0):
  z = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  sq = np.sum((z[:, None] - z[None]) ** 2, axis=-1)
  n = len(z)
  return float(np.log(np.sum(np.exp(-t * sq)[~np.eye(n, dtype=bool)]) / (n * (n - 1))))


def tanh_rnn(vocab_size: int, k: int, d: int, seed: int = 0, dtype=jnp.float32, scale=0.5):
  """A pure-function RNN: m' = tanh(m W + e[x]) (per memory token), readout = mean_k(m) R."""
  ks = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w": scale * jax.random.normal(ks[0], (d, d), dtype) / np.sqrt(d),
    "e": jax.random.normal(ks[1], (vocab_size, d), dtype),
    "r": jax.random.normal(ks[2], (d, vocab_size), dtype),
    "m0": jax.random.normal(ks[3], (k, d), dtype),
  }
  fns = RNNFns(
    update=lambda p, m, x: jnp.tanh(m @ p["w"] + p["e"][x][:, None, :]),
    readout=lambda p, m: jnp.mean(m, axis=1) @ p["r"],
    initial_memory=lambda p: p["m0"],
  )
  return fns, params


def toy_teacher(vocab_size: int, k: int, d: int, context_length: int, seed: int = 0):
  """A cheap pure-function teacher (fast to compile, cheap to run op by op): position-weighted sum
  of the context embeddings, padding masked; a decoder whose output j reads the memory and
  x_future[j-1] (causal)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  params = {
    "emb": jax.random.normal(ks[0], (vocab_size, k, d)),
    "pos": jax.random.normal(ks[1], (context_length, k, d)),
    "bias": jax.random.normal(ks[2], (k, d)),
    "out": jax.random.normal(ks[3], (d, vocab_size)),
    "xemb": jax.random.normal(ks[4], (vocab_size, vocab_size)),
  }

  def encode(p, ctx):
    valid = (ctx != -1)[..., None, None]
    return jnp.tanh(jnp.sum(valid * p["emb"][jnp.maximum(ctx, 0)] * p["pos"], axis=1) + p["bias"])

  def decode(p, m, xf):
    prev = jnp.concatenate(
      [jnp.zeros((xf.shape[0], 1, vocab_size)), p["xemb"][jnp.maximum(xf[:, :-1], 0)]], axis=1
    )
    return prev + (jnp.mean(m, axis=1) @ p["out"])[:, None]

  return contract.TeacherFns(encode, decode), params


def nonzero_rows(g: jax.Array) -> set[int]:
  return {int(i) for i in np.nonzero(np.any(np.asarray(g) != 0, axis=-1))[0]}


# ---------------------------------------------------------------- SMT vs a hand-written loop


class HandSMT:
  """Every per-position SMT term, computed one position at a time with jitted single calls."""

  def __init__(self, tfns, rfns, params, x, y, tc, tf):
    tp, rp = params["teacher"], params["rnn"]
    encode, decode = jax.jit(tfns.encode), jax.jit(tfns.decode)
    update, readout = jax.jit(rfns.update), jax.jit(rfns.readout)
    x, y = np.asarray(x), np.asarray(y)
    b, t_len = x.shape
    self.tc, self.pos = tc, {}
    for t in range(-1, t_len - 1):
      m_t = encode(tp, jnp.asarray(left_padded_window(x, t, tc)))
      m_next = encode(tp, jnp.asarray(left_padded_window(x, t + 1, tc)))
      # Teacher-forced decoder inputs x[t+1 .. t+Tf]; past the end any token will do (causal:
      # it only feeds outputs whose targets do not exist).
      xf = np.array(
        [[x[n, s] if s < t_len else 0 for s in range(t + 1, t + 1 + tf)] for n in range(b)],
        np.int32,
      )
      yf = np.array(
        [[y[n, s] if 0 <= s < t_len else -1 for s in range(t, t + tf)] for n in range(b)], np.int32
      )
      logits = np.asarray(decode(tp, m_t, jnp.asarray(xf)), np.float64)  # [B, Tf, V]
      logp = log_softmax_np(logits)
      ce = np.array(
        [[-logp[n, j, yf[n, j]] if yf[n, j] != -1 else 0.0 for j in range(tf)] for n in range(b)]
      )
      pred = update(rp, m_t, jnp.asarray(x[:, t + 1]))
      r_sum, r_cnt = ce_sum_count(readout(rp, m_next), y[:, t + 1])
      self.pos[t] = dict(
        ce=ce,
        count=int(np.sum(yf != -1)),
        m_t=np.asarray(m_t),
        sq=np.sum((np.asarray(pred, np.float64) - np.asarray(m_next)) ** 2),
        size=np.asarray(pred).size,
        r_sum=r_sum,
        r_cnt=r_cnt,
      )
    m_init = np.asarray(encode(tp, jnp.full((1, tc), -1, jnp.int32))[0], np.float64)
    self.l_init = float(np.mean((np.asarray(rfns.initial_memory(rp)) - m_init) ** 2))

  def terms(self, positions, *, gamma=1.0):
    ps = [self.pos[t] for t in positions]
    w = gamma ** np.arange(ps[0]["ce"].shape[1])
    count = sum(p["count"] for p in ps)
    return {
      "decoding_loss": sum(np.sum(p["ce"] * w) for p in ps) / max(count, 1),
      "dynamics_loss": sum(p["sq"] for p in ps) / sum(p["size"] for p in ps),
      "init_loss": self.l_init,
      "uniformity_loss": uniformity_np(np.stack([p["m_t"] for p in ps], axis=1)),
      "readout_loss": sum(p["r_sum"] for p in ps) / max(sum(p["r_cnt"] for p in ps), 1),
    }


COEF = dict(c_dec=1.3, c_dyn=0.7, c_init=0.4, c_unif=0.05, c_readout=0.6)


def total(terms):
  return (
    COEF["c_dec"] * terms["decoding_loss"]
    + COEF["c_dyn"] * terms["dynamics_loss"]
    + COEF["c_init"] * terms["init_loss"]
    + COEF["c_unif"] * terms["uniformity_loss"]
    + COEF["c_readout"] * terms["readout_loss"]
  )


@pytest.fixture(scope="module")
def smt_case(tiny):
  tfns, rfns, params = tiny.models("elman", seed=10)
  batch = tiny.batch(11, batch_size=2, seq_len=6, mask_frac=0.3)
  hand = HandSMT(tfns, rfns, params, batch["x"], batch["y"], tc=3, tf=2)
  loss = jax.jit(
    functools.partial(
      smt_jax.smt_loss, teacher=tfns, rnn=rfns, context_length=3, future_length=2, gamma=0.5, **COEF
    ),
    static_argnames="num_transitions",
  )
  return tfns, rfns, params, batch, hand, loss


def _assert_terms(metrics, want):
  for name, value in want.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(metrics["loss"], total(want), rtol=2e-5, atol=1e-6)


def test_smt_all_transitions_equals_a_python_loop(smt_case):
  _, _, params, batch, hand, loss = smt_case
  got, metrics = loss(params, batch, None, num_transitions=6)  # T = 6: t = -1 .. 4
  want = hand.terms(range(-1, 5), gamma=0.5)
  _assert_terms(metrics, want)
  np.testing.assert_allclose(got, total(want), rtol=2e-5)


def test_smt_one_transition_equals_the_published_position(smt_case):
  _, _, params, batch, hand, loss = smt_case
  _, metrics = loss(params, batch, None, num_transitions=1)
  _assert_terms(metrics, hand.terms([2], gamma=0.5))  # t = Tc-1 = 2


def test_smt_random_subset_is_a_subset_of_that_size(smt_case):
  _, _, params, batch, hand, loss = smt_case
  _, metrics = loss(params, batch, jax.random.key(3), num_transitions=3)
  matches = []
  for subset in itertools.combinations(range(-1, 5), 3):
    want = hand.terms(subset, gamma=0.5)
    if all(np.isclose(metrics[k], v, rtol=2e-5, atol=1e-6) for k, v in want.items()):
      matches.append(subset)
  assert len(matches) == 1, matches


def test_smt_one_transition_reads_exactly_the_published_windows(tiny):
  """Records what encode / update / decode / readout receive (debug callbacks see each vmapped
  element, concretely, even under jit): windows x[0:Tc] and x[1:Tc+1] (plus the empty context for
  the initial memory), RNN input x[Tc], decoder inputs x[Tc:Tc+Tf], readout memory E(x[1:Tc+1])."""
  tc, tf = 3, 2
  tfns, tp = toy_teacher(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, tc, seed=12)
  rfns, rp = tanh_rnn(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, seed=12)
  params = {"teacher": tp, "rnn": rp}
  x = np.arange(1, 8, dtype=np.int32)[None].repeat(2, 0) % tiny.vocab_size  # [2, 7]
  x[1] = x[1][::-1]
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(np.roll(x, -1, axis=1))}
  seen = {"encode": [], "update": [], "decode": [], "readout": []}

  def record(name, *arrays):
    jax.debug.callback(lambda *a: seen[name].append(tuple(np.asarray(v) for v in a)), *arrays)

  def encode(p, ctx):
    record("encode", ctx)
    return tfns.encode(p, ctx)

  def decode(p, m, xf):
    record("decode", m, xf)
    return tfns.decode(p, m, xf)

  def update(p, m, xt):
    record("update", m, xt)
    return rfns.update(p, m, xt)

  def readout(p, m):
    record("readout", m)
    return rfns.readout(p, m)

  jax.jit(
    functools.partial(
      smt_jax.smt_loss,
      teacher=contract.TeacherFns(encode, decode),
      rnn=RNNFns(update, readout, rfns.initial_memory),
      context_length=tc,
      future_length=tf,
      num_transitions=1,
    )
  )(params, batch, None)
  jax.effects_barrier()
  windows = sorted(tuple(map(tuple, c[0])) for c in seen["encode"])
  want = sorted([tuple(map(tuple, x[:, 0:tc])), tuple(map(tuple, x[:, 1 : tc + 1])), ((-1,) * tc,)])
  assert windows == want
  ((m_src, x_in),) = seen["update"]
  np.testing.assert_array_equal(x_in, x[:, tc])
  m_want = np.asarray(tfns.encode(params["teacher"], jnp.asarray(x[:, 0:tc])))
  np.testing.assert_allclose(m_src, m_want, atol=1e-6)
  ((m_dec, xf),) = seen["decode"]
  np.testing.assert_array_equal(xf, x[:, tc : tc + tf])
  np.testing.assert_allclose(m_dec, m_want, atol=1e-6)
  ((m_read,),) = seen["readout"]
  np.testing.assert_allclose(
    m_read, tfns.encode(params["teacher"], jnp.asarray(x[:, 1 : tc + 1])), atol=1e-6
  )


def test_smt_gradient_routing(tiny):
  """L_dyn trains the encoder by default and not with stop_teacher_grad; L_readout never does."""
  tfns, tp = toy_teacher(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, 3, seed=13)
  rfns, rp = tanh_rnn(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, seed=13)
  batch = tiny.batch(14, 2, 6)
  kw = dict(
    teacher=tfns,
    rnn=rfns,
    context_length=3,
    future_length=2,
    num_transitions=6,
    c_dec=0.0,
    c_unif=0.0,
  )

  @jax.jit
  def grads(params):
    g = lambda **c: jax.grad(lambda p: smt_jax.smt_loss(p, batch, None, **kw, **c)[0])(params)
    return (
      g(c_dyn=1.0, c_init=1.0, c_readout=1.0, stop_teacher_grad=True),
      g(c_dyn=1.0, c_init=1.0, c_readout=0.0, stop_teacher_grad=False),
      g(c_dyn=0.0, c_init=0.0, c_readout=1.0, stop_teacher_grad=False),
    )

  stopped, flowing, readout = grads({"teacher": tp, "rnn": rp})
  norm = lambda t: float(optax.tree.norm(t))
  assert norm(stopped["teacher"]) == 0.0 and norm(stopped["rnn"]) > 0.0
  assert norm(flowing["teacher"]["emb"]) > 0.0 and norm(flowing["teacher"]["pos"]) > 0.0
  assert norm(flowing["teacher"]["out"]) == 0.0  # L_dyn does not involve the decoder
  assert norm(flowing["rnn"]["r"]) == 0.0  # nor the readout
  # L_readout trains the readout only: not the teacher, not the update.
  assert norm(readout["teacher"]) == 0.0 and norm(readout["rnn"]["r"]) > 0.0
  assert norm(readout["rnn"]["w"]) == 0.0 and norm(readout["rnn"]["e"]) == 0.0


# ---------------------------------------------------------------- rollout / DMT / BPTT


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_rollout_equals_a_python_loop_of_updates(tiny, kind):
  rfns, rp = tiny.rnn(kind, seed=15)
  rng = np.random.default_rng(0)
  m0 = jnp.asarray(rng.normal(size=(2, tiny.num_memory_tokens, tiny.width)), jnp.float32)
  xs = jnp.asarray(rng.integers(0, tiny.vocab_size, (2, 5)), jnp.int32)
  run = jax.jit(objectives.rollout, static_argnames=("update", "stop_gradient_every"))
  states = run(rp, m0, xs, update=rfns.update)
  update = jax.jit(rfns.update)
  m, want = m0, []
  for i in range(xs.shape[1]):
    m = update(rp, m, xs[:, i])
    want.append(m)
  np.testing.assert_allclose(states, jnp.stack(want, 1), atol=1e-5)
  # Cutting gradients changes no value.
  for every in (1, 2):
    np.testing.assert_allclose(
      run(rp, m0, xs, update=rfns.update, stop_gradient_every=every), states, atol=1e-6
    )


@pytest.mark.parametrize("start, from_rnn", [(None, False), (-1, False), (-1, True)])
def test_dmt_loss_equals_a_python_loop(tiny, start, from_rnn):
  tc, td, k = 3, 4, 2
  tfns, tp = toy_teacher(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, tc, seed=16)
  rfns, rp = tanh_rnn(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, seed=1)
  batch = tiny.batch(17, batch_size=2, seq_len=tc + td, mask_frac=0.3)
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  loss, metrics = jax.jit(
    functools.partial(
      smt_jax.dmt_loss,
      teacher=tfns,
      rnn=rfns,
      context_length=tc,
      rollout_length=td,
      label_every=k,
      c_dyn=3.0,
      c_readout=0.5,
      start=start,
      from_rnn_initial_memory=from_rnn,
    )
  )({"teacher": tp, "rnn": rp}, batch)
  t0 = tc - 1 if start is None else start
  encode = jax.jit(tfns.encode)
  label = lambda s: np.asarray(
    encode(tp, jnp.asarray(left_padded_window(x, t0 + s, tc))), np.float64
  )
  # From the RNN's own initial memory (where its evaluation starts), or the teacher's E(empty).
  first = np.asarray(rfns.initial_memory(rp))[None].repeat(2, 0) if from_rnn else label(0)
  assert not np.allclose(first, label(0)) or not from_rnn
  state, states = jnp.asarray(first, jnp.float32), [np.asarray(first, np.float64)]
  for s in range(1, td + 1):
    state = rfns.update(rp, state, jnp.asarray(x[:, t0 + s]))
    states.append(np.asarray(state, np.float64))
  sq = [np.mean((states[s] - label(s)) ** 2) for s in range(k, td + 1, k)]
  r_sum, r_cnt = 0.0, 0
  for s in range(td + 1):
    if 0 <= t0 + s < x.shape[1]:
      a, c = ce_sum_count(rfns.readout(rp, jnp.asarray(states[s], jnp.float32)), y[:, t0 + s])
      r_sum, r_cnt = r_sum + a, r_cnt + c
  np.testing.assert_allclose(metrics["dynamics_loss"], np.mean(sq), rtol=2e-5)
  np.testing.assert_allclose(metrics["readout_loss"], r_sum / r_cnt, rtol=2e-5)
  np.testing.assert_allclose(loss, 3.0 * np.mean(sq) + 0.5 * r_sum / r_cnt, rtol=2e-5)
  pred = np.stack(states[k::k], 1)
  lab = np.stack([label(s) for s in range(k, td + 1, k)], 1)
  ss_tot = np.sum((lab - lab.reshape(-1, *lab.shape[2:]).mean(0)) ** 2)
  np.testing.assert_allclose(metrics["drift_1mr2"], np.sum((pred - lab) ** 2) / ss_tot, rtol=1e-4)
  if start == -1:  # the RNN's initial memory learns in DMT exactly when the rollout starts there
    g = jax.grad(
      lambda p: smt_jax.dmt_loss(
        p,
        batch,
        teacher=tfns,
        rnn=rfns,
        context_length=tc,
        rollout_length=td,
        label_every=k,
        start=-1,
        from_rnn_initial_memory=from_rnn,
      )[0]
    )({"teacher": tp, "rnn": rp})
    assert (float(jnp.abs(g["rnn"]["m0"]).sum()) > 0) == from_rnn


@pytest.mark.parametrize("label_every, trained", [(4, {4}), (2, {2, 4})])
def test_dmt_carry_stop_gradient_trains_only_the_last_update(tiny, label_every, trained):
  """Inputs x[Tc..Tc+3] are the distinct tokens 1, 2, 3, 4. With stop_carry_grad each label
  trains only the update that produced it, so only the embedding rows of the tokens read right
  before a label get gradient; without it, every earlier input's row does."""
  tc, td = 4, 4
  tfns, tp = toy_teacher(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, tc, seed=18)
  rfns, rp = tanh_rnn(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, seed=2)
  x = jnp.array([[0, 5, 0, 5, 1, 2, 3, 4]] * 2, jnp.int32)
  batch = {"x": x, "y": jnp.roll(x, -1, axis=1)}

  @jax.jit
  def grads(params):
    g = lambda stop, c_dyn=1.0, c_readout=0.0: jax.grad(
      lambda p: smt_jax.dmt_loss(
        p,
        batch,
        teacher=tfns,
        rnn=rfns,
        context_length=tc,
        rollout_length=td,
        label_every=label_every,
        c_dyn=c_dyn,
        c_readout=c_readout,
        stop_carry_grad=stop,
      )[0]
    )(params)
    return g(True), g(False), g(True, c_dyn=0.0, c_readout=1.0)

  g_stop, g_bptt, g_read = grads({"teacher": tp, "rnn": rp})
  assert nonzero_rows(g_stop["rnn"]["e"]) == trained
  assert nonzero_rows(g_bptt["rnn"]["e"]) == {1, 2, 3, 4}
  assert float(optax.tree.norm(g_stop["teacher"])) == 0.0
  assert float(optax.tree.norm(g_bptt["teacher"])) == 0.0
  # The readout term sees stop_gradient(state): it trains the readout only.
  assert float(jnp.abs(g_read["rnn"]["r"]).sum()) > 0.0
  for name in ("e", "w", "m0"):
    assert float(jnp.abs(g_read["rnn"][name]).sum()) == 0.0


def test_bptt_loss_equals_a_python_loop(tiny):
  rfns, rp = tiny.rnn("gru", seed=19)
  batch = tiny.batch(20, 2, 5, mask_frac=0.3)
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
  loss, _ = jax.jit(functools.partial(smt_jax.bptt_loss, rnn=rfns))({"rnn": rp}, batch)
  m = jnp.broadcast_to(rfns.initial_memory(rp), (2, tiny.num_memory_tokens, tiny.width))
  update, readout = jax.jit(rfns.update), jax.jit(rfns.readout)
  total_ce, count = 0.0, 0
  for t in range(x.shape[1]):
    m = update(rp, m, jnp.asarray(x[:, t]))
    a, c = ce_sum_count(readout(rp, m), y[:, t])
    total_ce, count = total_ce + a, count + c
  np.testing.assert_allclose(loss, total_ce / count, rtol=2e-5)


def test_bptt_gradients_match_finite_differences(tiny, x64):
  batch = tiny.batch(21, 2, 5, mask_frac=0.3)
  # A pure float64 RNN with a strong recurrence (scale 1.5), so that the unroll matters. (The loss
  # terms compute cross-entropy in float32 by design; check_grads picks float32 tolerances.)
  rfns, rp = tanh_rnn(tiny.vocab_size, 2, 4, seed=3, dtype=jnp.float64, scale=1.5)
  f = jax.jit(lambda r: smt_jax.bptt_loss({"rnn": r}, batch, rnn=rfns)[0])
  check_grads(f, (rp,), order=1, modes=["rev"])
  # Truncated BPTT is *not* the gradient of the loss: the same check must then fail.
  f = jax.jit(lambda r: smt_jax.bptt_loss({"rnn": r}, batch, rnn=rfns, truncation=2)[0])
  with pytest.raises(AssertionError):
    check_grads(f, (rp,), order=1, modes=["rev"])


def test_bptt_truncation_cuts_gradients(tiny):
  """Distinct tokens 0..5; the only target is at t = 5. With truncation 2 (cuts before updates 2
  and 4) the gradient reaches the embeddings of x[4], x[5] only; untruncated, every token's."""
  rfns, rp = tanh_rnn(tiny.vocab_size, 2, 4, seed=4, scale=1.5)
  x = jnp.array([[0, 1, 2, 3, 4, 5]], jnp.int32)

  @functools.partial(jax.jit, static_argnames="truncation")
  def grad(rp, y, truncation):
    return jax.grad(
      lambda r: smt_jax.bptt_loss({"rnn": r}, {"x": x, "y": y}, rnn=rfns, truncation=truncation)[0]
    )(rp)

  late = jnp.array([[-1, -1, -1, -1, -1, 3]], jnp.int32)
  assert nonzero_rows(grad(rp, late, None)["e"]) == {0, 1, 2, 3, 4, 5}
  assert float(jnp.abs(grad(rp, late, None)["m0"]).sum()) > 0.0
  g = grad(rp, late, 2)
  assert nonzero_rows(g["e"]) == {4, 5}
  assert float(jnp.abs(g["m0"]).sum()) == 0.0
  assert nonzero_rows(grad(rp, late, 3)["e"]) == {3, 4, 5}
  # The first segment still reaches the initial memory (truncated BPTT trains it).
  early = jnp.array([[-1, 2, -1, -1, -1, -1]], jnp.int32)
  g = grad(rp, early, 2)
  assert nonzero_rows(g["e"]) == {0, 1} and float(jnp.abs(g["m0"]).sum()) > 0.0


def test_smt_credit_path_does_not_vanish_with_length(tiny):
  """Retrieval-like: a unique token at t = 0, the only target at t = T-1. BPTT's gradient w.r.t.
  that token's embedding passes through T-1 contracting Elman steps and vanishes; SMT's reaches
  it through one encoder pass (Tc = T), so going from T = 8 to T = 64 costs only a small factor."""
  v = tiny.vocab_size
  tfns, tp = tiny.teacher(seed=23)
  rfns, rp = tiny.rnn("elman", seed=24)
  rp = with_leaf(rp, "recurrent/kernel", lambda w: 0.3 * w)  # a contracting recurrence

  def grad_norms(seq_len):
    rng = np.random.default_rng(seq_len)
    x = rng.integers(0, v - 1, (4, seq_len)).astype(np.int32)
    x[:, 0] = v - 1  # the only occurrence of token V-1
    y = np.full_like(x, -1)
    y[:, -1] = rng.integers(0, v, 4)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}

    @jax.jit  # XLA's cheap compile: conftest
    def grads(params):
      g_bptt = jax.grad(lambda p: smt_jax.bptt_loss(p, batch, rnn=rfns)[0])(params)
      g_smt = jax.grad(
        lambda p: smt_jax.smt_loss(
          p,
          batch,
          None,
          teacher=tfns,
          rnn=rfns,
          context_length=seq_len,
          future_length=2,
          num_transitions=seq_len,
          c_dyn=0.0,
          c_unif=0.0,
          c_readout=0.0,
        )[0]
      )(params)
      return (
        jnp.linalg.norm(get_leaf(g_bptt["rnn"], "embed/embedding")[v - 1]),
        jnp.linalg.norm(get_leaf(g_smt["teacher"], "embed/embedding")[v - 1]),
      )

    return [float(a) for a in grads({"teacher": tp, "rnn": rp})]

  (bptt_8, smt_8), (bptt_64, smt_64) = grad_norms(8), grad_norms(64)
  assert bptt_8 > 0 and smt_8 > 0
  assert bptt_64 < 1e-6 * bptt_8  # vanishes: many orders of magnitude
  assert smt_64 > 0.05 * smt_8  # O(1) path: within a small factor
  assert smt_64 > 1e4 * bptt_64


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_every_updater_kind_trains_under_smt(tiny, kind):
  """100 AdamW steps of SMT on a counting sequence x[t+1] = x[t] + 1 (mod V), all transitions."""
  tfns, rfns, params = tiny.models(kind, seed=25)
  v, b, t_len = tiny.vocab_size, 8, 6
  x = (np.random.default_rng(0).integers(0, v, (b, 1)) + np.arange(t_len + 1)) % v
  batch = {"x": jnp.asarray(x[:, :-1], jnp.int32), "y": jnp.asarray(x[:, 1:], jnp.int32)}
  loss = functools.partial(
    smt_jax.smt_loss,
    teacher=tfns,
    rnn=rfns,
    context_length=4,
    future_length=2,
    num_transitions=t_len,
  )
  opt = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.01)

  @jax.jit  # XLA's cheap compile: conftest
  def train(params):
    def step(carry, _):
      p, s = carry
      (_, metrics), g = jax.value_and_grad(loss, has_aux=True)(p, batch, None)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), metrics

    return jax.lax.scan(step, (params, opt.init(params)), None, length=100)[1]

  metrics = jax.device_get(train(params))
  first = {k: v[0] for k, v in metrics.items()}
  last = {k: v[-5:].mean() for k, v in metrics.items()}
  assert np.all(np.isfinite(metrics["loss"]))
  assert last["loss"] < 0.5 * first["loss"], (first, last)
  assert last["decoding_loss"] < 0.3 * first["decoding_loss"], (first, last)
  assert last["readout_loss"] < 0.6 * first["readout_loss"], (first, last)


# ---------------------------------------------------------------- jit = eager


def test_objectives_jit_equals_eager(tiny):
  # Pure-function toy models keep the op-by-op (eager) run cheap; the objectives' own logic (time
  # indexing, random subsets, masks, scans) is what jit must not change.
  tc = 3
  tfns, tp = toy_teacher(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, tc, seed=26)
  rfns, rp = tanh_rnn(tiny.vocab_size, tiny.num_memory_tokens, tiny.width, seed=26)
  params = {"teacher": tp, "rnn": rp}
  batch = tiny.batch(27, 2, 7, mask_frac=0.2)
  cases = {  # (op by op, every primitive compiles on its own: keep the list short)
    "smt": functools.partial(
      smt_jax.smt_loss,
      teacher=tfns,
      rnn=rfns,
      context_length=tc,
      future_length=2,
      num_transitions=7,
      gamma=0.7,
      uniformity_max_samples=8,
    ),
    "dmt": functools.partial(
      smt_jax.dmt_loss, teacher=tfns, rnn=rfns, context_length=tc, rollout_length=4, label_every=2
    ),
    "bptt": functools.partial(smt_jax.bptt_loss, rnn=rfns, truncation=3),
  }
  key = jax.random.key(5)
  for name, f in cases.items():
    eager = f(params, batch, key)
    jitted = jax.jit(f)(params, batch, key)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name),
      eager,
      jitted,
    )


# ---------------------------------------------------------------- input checks


def test_objectives_reject_bad_inputs(tiny):
  tfns, rfns, params = tiny.models("elman", seed=28)
  good = tiny.batch(29, 2, 6)
  smt = functools.partial(
    smt_jax.smt_loss, params, teacher=tfns, rnn=rfns, context_length=3, future_length=2
  )
  dmt = functools.partial(
    smt_jax.dmt_loss,
    params,
    teacher=tfns,
    rnn=rfns,
    context_length=3,
    rollout_length=2,
    label_every=1,
  )
  bptt = functools.partial(smt_jax.bptt_loss, params, rnn=rfns)
  bad_batches = [
    {"x": good["x"].astype(jnp.float32), "y": good["y"]},  # float tokens
    {"x": good["x"], "y": good["y"].astype(jnp.float32)},
    {"x": good["x"][:, :5], "y": good["y"]},  # mismatched shapes
    {"x": good["x"][0], "y": good["y"][0]},  # not [B, T]
  ]
  for f in (lambda b: smt(b, None), lambda b: dmt(b), lambda b: bptt(b)):
    for b in bad_batches:
      with pytest.raises(ValueError):
        f(b)
  with pytest.raises(ValueError, match="num_transitions"):
    smt(good, None, num_transitions=0)
  with pytest.raises(ValueError, match="num_transitions"):
    smt(good, None, num_transitions=7)  # T = 6
  with pytest.raises(ValueError):
    smt(tiny.batch(29, 2, 3), None, num_transitions=1)  # needs T >= Tc + 1 = 4
  with pytest.raises(ValueError, match="key"):
    smt(good, None, num_transitions=3)  # a random subset needs a key
  with pytest.raises(ValueError):
    smt(good, None, context_length=0)
  with pytest.raises(ValueError):
    smt(good, None, uniformity_over="pairs")
  with pytest.raises(ValueError, match="divide"):
    dmt(good, rollout_length=3, label_every=2)
  with pytest.raises(ValueError):
    dmt(tiny.batch(29, 2, 4))  # needs T >= Tc + Td = 5
  with pytest.raises(ValueError):
    dmt(good, start=-2)
  with pytest.raises(ValueError):
    bptt(good, truncation=0)
