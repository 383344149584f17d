"""The one-pass causal teacher: no leak from the future, and the objectives agree with a loop.

`CausalTeacher.encode(prefix)` (the prefix x[0..t] run as one input) is the definition of m_t;
`encode_all(x)` computes all T+1 memories in one pass (`encode_at(x, times)` those of some times
only). These tests pin the one to the other, and
the SMT / DMT losses with the one-pass teacher to the same losses fed by a Python loop of prefix
encodings, values and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import smt_jax
from smt_jax import objectives
from smt_jax.models import CausalTeacher, teacher_fns

KINDS = tuple(sorted(smt_jax.RNN_KINDS))
V, K, D, T = 7, 3, 16, 9


def _teacher(*, depth=2, window=0, seed=0, attention=None):
  t = CausalTeacher(
    vocab_size=V,
    num_memory_tokens=K,
    width=D,
    encoder_depth=depth,
    decoder_depth=1,
    num_heads=2,
    head_dim=8,
    window=window,
    attention=attention,
    rngs=nnx.Rngs(seed),
  )
  graphdef, state = nnx.split(t)
  return t, graphdef, state


def _x(seed=1, batch=2, length=T):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


def _prefix(encode, params, x, t):
  """m_t from the prefix x[0..t] alone (t = -1: the empty context)."""
  ctx = x[:, : t + 1] if t >= 0 else jnp.full((x.shape[0], 1), -1, x.dtype)
  return encode(params, ctx)


def _jitted(graphdef):
  """(encode, encode_all) of the teacher, jitted."""
  fns = teacher_fns(graphdef)
  return jax.jit(fns.encode), jax.jit(fns.encode_all)


def _loop_fns(graphdef):
  """The teacher's functions with its memories from a Python loop of prefix encodings."""

  fns = teacher_fns(graphdef)

  def encode_all(p, x):
    return jnp.stack([_prefix(fns.encode, p, x, s) for s in range(-1, x.shape[1])], axis=1)

  # No `encode_at`: the objectives then take the loop's memories, not the one-pass ones.
  return fns._replace(encode_all=encode_all, encode_at=None)


@pytest.mark.parametrize("window", [0, 3])
def test_one_pass_equals_every_prefix_alone(window):
  _, graphdef, p = _teacher(window=window)
  encode, encode_all = _jitted(graphdef)
  x = _x()
  every = encode_all(p, x)
  assert every.shape == (2, T + 1, K, D)
  for t in range(-1, T):
    np.testing.assert_allclose(every[:, t + 1], _prefix(encode, p, x, t), atol=2e-6, rtol=0)
  # A left-padded window holding the whole prefix is the same prefix (padding is never read).
  padded = jnp.concatenate([jnp.full((2, 4), -1, x.dtype), x[:, :5]], axis=1)
  np.testing.assert_allclose(encode(p, padded), every[:, 5], atol=2e-6, rtol=0)


@pytest.mark.parametrize("window", [0, 3])
def test_memories_at_some_times_are_those_of_the_full_pass(window):
  # encode_at computes only the registers asked for (any order, repeats, the empty context -1).
  _, graphdef, p = _teacher(window=window)
  fns = teacher_fns(graphdef)
  x = _x()
  every = jax.jit(fns.encode_all)(p, x)
  times = jnp.array([T - 1, 2, -1, 5, 2])
  some = jax.jit(fns.encode_at)(p, x, times)
  assert some.shape == (2, 5, K, D)
  np.testing.assert_allclose(some, every[:, times + 1], atol=2e-6, rtol=0)
  np.testing.assert_allclose(some[:, 1], _prefix(fns.encode, p, x, 2), atol=2e-6, rtol=0)


@pytest.mark.parametrize("window", [0, 3])
def test_the_future_never_leaks_into_a_memory(window):
  _, graphdef, p = _teacher(window=window)
  _, encode_all = _jitted(graphdef)
  x = _x()
  every = encode_all(p, x)
  for t in range(T - 1):
    other = x.at[:, t + 1 :].set((x[:, t + 1 :] + 1) % V)  # every later token changed
    changed = encode_all(p, other)
    np.testing.assert_array_equal(changed[:, : t + 2], every[:, : t + 2])  # m_-1 .. m_t
    assert not np.allclose(changed[:, t + 2], every[:, t + 2])  # m_{t+1} does see x[t+1]


def test_a_window_limits_what_the_registers_read_at_depth_one():
  # One layer: m_t reads x[t-W+1 .. t] only, so tokens before the window do not matter.
  _, graphdef, p = _teacher(depth=1, window=3)
  _, encode_all = _jitted(graphdef)
  x = _x()
  every = encode_all(p, x)
  early = x.at[:, :3].set((x[:, :3] + 2) % V)
  np.testing.assert_array_equal(encode_all(p, early)[:, 6:], every[:, 6:])  # t >= 5


def test_one_layer_unwindowed_equals_the_windowed_teacher():
  # With one layer only the registers' outputs matter, and they read the same keys in both kinds
  # (every context token <= t, at the same relative positions): an independent cross-check.
  _, graphdef, state = _teacher(depth=1, window=0)
  windowed = smt_jax.Teacher(
    vocab_size=V,
    num_memory_tokens=K,
    width=D,
    encoder_depth=1,
    decoder_depth=1,
    num_heads=2,
    head_dim=8,
    rngs=nnx.Rngs(0),
  )
  nnx.update(windowed, state)
  g, wstate = nnx.split(windowed)
  x = _x()
  times = jnp.arange(-1, T)
  one_pass = objectives.teacher_memories(teacher_fns(graphdef), state, x, times, T)
  windows = objectives.teacher_memories(teacher_fns(g), wstate, x, times, T)
  np.testing.assert_allclose(one_pass, windows, atol=2e-6, rtol=0)


def _smt(fns, rfns, num_transitions, tc):
  return functools.partial(
    objectives.smt_loss,
    teacher=fns,
    rnn=rfns,
    context_length=tc,
    future_length=3,
    num_transitions=num_transitions,
    c_readout=1.0,
    c_init=0.1,
  )


@pytest.mark.parametrize("num_transitions", [1, 3, 6])
def test_smt_loss_and_gradients_equal_a_loop_over_prefixes(tiny, num_transitions):
  _, graphdef, tstate = _teacher(window=5)
  fns, loop = teacher_fns(graphdef), _loop_fns(graphdef)
  rfns, rstate = tiny.rnn("gru", vocab_size=V, num_memory_tokens=K, width=D)
  params = {"teacher": tstate, "rnn": rstate}
  batch = {"x": _x(2, 3, 6), "y": _x(3, 3, 6)}
  key = jax.random.key(4)
  tc = 4  # < T: num_transitions = 1 trains t = Tc-1
  (l1, m1), g1 = jax.jit(jax.value_and_grad(_smt(fns, rfns, num_transitions, tc), has_aux=True))(
    params, batch, key
  )
  (l2, m2), g2 = jax.jit(jax.value_and_grad(_smt(loop, rfns, num_transitions, tc), has_aux=True))(
    params, batch, key
  )
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)
  assert optax.tree.norm(g1["teacher"]) > 0
  if num_transitions == 6:  # jit == eager (the values above are jitted)
    eager = objectives.teacher_memories(fns, tstate, batch["x"], jnp.arange(-1, 6), tc)
    jitted = jax.jit(objectives.teacher_memories, static_argnums=(0, 4))(
      fns, tstate, batch["x"], jnp.arange(-1, 6), tc
    )
    np.testing.assert_allclose(eager, jitted, atol=1e-6, rtol=0)


def test_dmt_labels_equal_a_loop_over_prefixes(tiny):
  _, graphdef, tstate = _teacher(window=4)
  fns, loop = teacher_fns(graphdef), _loop_fns(graphdef)
  rfns, rstate = tiny.rnn("elman", vocab_size=V, num_memory_tokens=K, width=D)
  params = {"teacher": tstate, "rnn": rstate}
  batch = {"x": _x(5, 2, 8), "y": _x(6, 2, 8)}
  kw = dict(rnn=rfns, context_length=3, rollout_length=4, label_every=2)
  (l1, m1), g1 = jax.jit(
    jax.value_and_grad(lambda p: objectives.dmt_loss(p, batch, teacher=fns, **kw), has_aux=True)
  )(params)
  (l2, m2), g2 = jax.jit(
    jax.value_and_grad(lambda p: objectives.dmt_loss(p, batch, teacher=loop, **kw), has_aux=True)
  )(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


@pytest.mark.parametrize("kind", KINDS)
def test_every_rnn_kind_trains_with_the_causal_teacher(tiny, kind):
  _, graphdef, tstate = _teacher(window=0)
  fns = teacher_fns(graphdef)
  rfns, rstate = tiny.rnn(kind, vocab_size=V, num_memory_tokens=K, width=D)
  params = {"teacher": tstate, "rnn": rstate}
  loss_fn = _smt(fns, rfns, T, T)
  opt = optax.adam(3e-3)
  batch = {"x": _x(7, 4), "y": _x(7, 4)}

  @jax.jit
  def step(p, s):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.key(0))
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  state, losses = opt.init(params), []
  for _ in range(8):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.parametrize("length, window", [(9, 0), (9, 3), (21, 0), (21, 5), (40, 7)])
def test_fused_attention_path_equals_the_einsum_path(length, window):
  # model.attention="xla": the context through dot_product_attention's causal window, the
  # registers in chunks of REGISTER_CHUNK memory times (here 1 to 5 chunks, the last padded);
  # the explicit einsum form is the definition. Values and gradients, all memories and a few.
  x = _x(length=length)
  times = jnp.array([length - 1, 2, -1, 5, 2])
  out = {}
  for impl in ("explicit", "xla"):
    _, graphdef, p = _teacher(window=window, attention=impl)
    fns = teacher_fns(graphdef)
    w = jax.random.normal(jax.random.key(2), (2, length + 1, K, D))
    loss = lambda p, fns=fns, w=w: jnp.sum(fns.encode_all(p, x) * w)
    out[impl] = (
      jax.jit(fns.encode_all)(p, x),
      jax.jit(fns.encode_at)(p, x, times),
      jax.jit(jax.grad(loss))(p),
    )
  (a_all, a_some, a_grad), (b_all, b_some, b_grad) = out["explicit"], out["xla"]
  np.testing.assert_allclose(b_all, a_all, atol=2e-6, rtol=0)
  np.testing.assert_allclose(b_some, a_some, atol=2e-6, rtol=0)
  for ga, gb in zip(jax.tree.leaves(a_grad), jax.tree.leaves(b_grad)):
    np.testing.assert_allclose(gb, ga, atol=2e-5, rtol=1e-5)
