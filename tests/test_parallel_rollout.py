"""The rollout solved in parallel over time (`smt_jax.parallel_rollout`, `dmt.rollout=parallel`).

Pinned: the linear scan and the Jacobian's diagonal against direct computation; the solve against
`lax.scan`'s rollout for every RNN kind (after k iterations the first k states are exact, so L
iterations always reach the rollout); its gradients against the sequential rollout's; the DMT loss
and its gradients in both gradient modes on an RNN trained by a short SMT run, at several Td.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import smt_jax
from smt_jax import parallel
from smt_jax.objectives import rollout
from smt_jax.runner import config as config_lib

KINDS = ("transformer", "gru", "mlp")


def _case(tiny, kind, length=12, batch_size=3, seed=0):
  fns, p = tiny.rnn(kind, seed=seed + 1)
  x = jnp.asarray(np.random.default_rng(seed).integers(0, tiny.vocab_size, (batch_size, length)))
  m0 = jax.random.normal(jax.random.key(seed), (batch_size, tiny.num_memory_tokens, tiny.width))
  m0 = m0 / jnp.sqrt(jnp.mean(m0**2, axis=-1, keepdims=True))
  return fns, p, m0, x.astype(jnp.int32)


@pytest.mark.parametrize("reverse", [False, True])
def test_linear_recurrence_equals_a_python_loop(reverse):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 2, 7, 3)).astype(np.float32)
  s0 = rng.normal(size=(2, 3)).astype(np.float32)
  want, s = np.zeros_like(b), s0
  for i in reversed(range(7)) if reverse else range(7):
    s = a[:, i] * s + b[:, i]
    want[:, i] = s
  got = parallel.linear_recurrence(jnp.asarray(a), jnp.asarray(b), jnp.asarray(s0), reverse)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_jacobian_diagonal_is_the_diagonal_of_each_rows_jacobian(tiny):
  fns, p, m0, x = _case(tiny, "transformer")
  f = lambda m: fns.update(p, m, x[:, 0])  # noqa: E731
  got = parallel.jacobian_diagonal(f, m0)
  n = m0.shape[1] * m0.shape[2]
  for row in range(m0.shape[0]):
    g = lambda m, row=row: f(m0.at[row].set(m))[row]  # noqa: E731
    jac = jax.jacfwd(g)(m0[row]).reshape(n, n)
    np.testing.assert_allclose(got[row].reshape(n), jnp.diag(jac), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jacobian", parallel.JACOBIANS)
def test_after_k_iterations_the_first_k_states_are_the_rollouts(tiny, kind, jacobian):
  fns, p, m0, x = _case(tiny, kind)
  want = rollout(p, m0, x, update=fns.update)
  solve = jax.jit(
    lambda k: parallel.solve_rollout(
      p, m0, x, update=fns.update, jacobian=jacobian, tol=1e-30, max_iters=k
    )
  )
  for k in (1, 5, 12):
    states, info = solve(k)
    assert int(info.iterations) == k
    np.testing.assert_allclose(states[:, :k], want[:, :k], atol=3e-5, err_msg=f"k={k}")
  assert float(jnp.max(jnp.abs(solve(3)[0][:, 3:] - want[:, 3:]))) > 1e-3  # not yet the rest
  # With a tolerance it stops once the states stop moving (or at L: exact by then).
  states, info = parallel.solve_rollout(p, m0, x, update=fns.update, jacobian=jacobian, tol=1e-6)
  assert float(info.change) <= 1e-6 or int(info.iterations) == 12
  np.testing.assert_allclose(states, want, atol=3e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_equal_the_sequential_rollouts(tiny, kind):
  fns, p, m0, x = _case(tiny, kind, seed=1)
  w = jax.random.normal(jax.random.key(5), (*x.shape, tiny.num_memory_tokens, tiny.width))
  seq = lambda p, m: jnp.sum(rollout(p, m, x, update=fns.update) ** 2 * w)  # noqa: E731

  def par(p, m, jacobian):
    return jnp.sum(
      parallel.parallel_rollout(p, m, x, update=fns.update, jacobian=jacobian)[0] ** 2 * w
    )

  want = jax.grad(seq, argnums=(0, 1))(p, m0)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  for jacobian in parallel.JACOBIANS:
    got = jax.jit(jax.grad(par, argnums=(0, 1)), static_argnums=2)(p, m0, jacobian)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(g, h, atol=2e-5 * scale, err_msg=jacobian)


def test_bad_arguments_fail_with_their_name(tiny):
  fns, p, m0, x = _case(tiny, "mlp")
  with pytest.raises(ValueError, match="jacobian must be one of"):
    parallel.parallel_rollout(p, m0, x, update=fns.update, jacobian="full")
  with pytest.raises(ValueError, match="damping must be >= 0"):
    parallel.parallel_rollout(p, m0, x, update=fns.update, damping=-1.0)
  with pytest.raises(ValueError, match="inputs must be int"):
    parallel.parallel_rollout(p, m0, x.astype(jnp.float32), update=fns.update)
  with pytest.raises(ValueError, match="rollout_solver"):
    smt_jax.dmt_loss(
      {"teacher": {}, "rnn": p},
      {"x": x, "y": x},
      teacher=None,
      rnn=fns,
      context_length=2,
      rollout_length=4,
      label_every=2,
      rollout_solver="fast",
    )


@pytest.fixture(scope="module")
def smt_trained(tiny):
  """A tiny teacher and RNN after 40 SMT steps on random streams: memories the RNN has learnt."""
  tfns, rfns, params = tiny.models("transformer", seed=3)
  loss = functools.partial(
    smt_jax.smt_loss, teacher=tfns, rnn=rfns, context_length=4, future_length=2
  )
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch, key):
    grads, metrics = jax.grad(loss, has_aux=True)(params, batch, key)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, metrics["loss"]

  first = None
  for i in range(40):
    batch = tiny.batch(100 + i, batch_size=8, seq_len=10)
    params, state, value = step(params, state, batch, jax.random.key(i))
    first = value if first is None else first
  assert value < first  # it trained
  return tfns, rfns, params


@pytest.mark.parametrize("td", [4, 8, 16])
@pytest.mark.parametrize("stop_carry_grad", [False, True])
def test_dmt_loss_and_gradients_equal_between_the_two_rollouts(
  tiny, smt_trained, td, stop_carry_grad
):
  tfns, rfns, params = smt_trained
  batch = tiny.batch(7, batch_size=4, seq_len=td, mask_frac=0.2)
  kw = dict(
    teacher=tfns,
    rnn=rfns,
    context_length=4,
    rollout_length=td,
    label_every=2,
    start=-1,
    from_rnn_initial_memory=True,
    stop_carry_grad=stop_carry_grad,
  )
  results = {}
  for solver in ("sequential", "parallel"):
    fn = functools.partial(
      smt_jax.dmt_loss, **kw, rollout_solver=solver, parallel_options=dict(tol=1e-7)
    )
    results[solver] = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)
  (loss_s, m_s), g_s = results["sequential"]
  (loss_p, m_p), g_p = results["parallel"]
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
  np.testing.assert_allclose(m_p["drift_mse"], m_s["drift_mse"], rtol=1e-4, atol=1e-7)
  assert 1 <= int(m_p["rollout_iters"]) <= td
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_s["rnn"]))
  for g, h in zip(jax.tree.leaves(g_p["rnn"]), jax.tree.leaves(g_s["rnn"]), strict=True):
    np.testing.assert_allclose(g, h, atol=1e-4 * scale)


def test_config_names_the_rollout_solver():
  from experiments.configs import synthetic

  c = synthetic.get_config("stack,smoke")
  c.dmt.rollout = "parallel"
  config_lib.validate(c)
  for field, value, message in (
    ("rollout", "fast", "config.dmt.rollout = 'fast': use 'sequential'"),
    ("parallel_jacobian", "full", "config.dmt.parallel_jacobian = 'full': use 'none'"),
    ("parallel_tol", 0.0, "config.dmt.parallel_tol = 0.0: must be a number in (0.0, 1.0)"),
  ):
    bad = synthetic.get_config("stack,smoke")
    bad.dmt.rollout = "parallel"
    bad.dmt[field] = value
    with pytest.raises(
      config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
      config_lib.validate(bad)
