"""`python -m experiments.rollout_check` on a smoke run: the parallel rollout against `lax.scan`'s
at every checkpoint (iterations within Td, states and DMT loss equal), with a Lyapunov exponent."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import rollout_check
from experiments.configs import pixels
from experiments.studies import common
from smt_jax import objectives
from smt_jax.models import layers
from smt_jax.runner import config as config_lib
from smt_jax.runner import train

# One worker: the module fixture (a smoke run and its check, 22-28 s) runs once, not per worker.
pytestmark = pytest.mark.xdist_group("rollout_check")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rollout_check"))
  train.train_and_evaluate(pixels.get_config("smoke"), workdir)
  return rollout_check.check(
    workdir,
    [],
    lengths=[4, 8],
    jacobians=["diag", "none"],
    rows=2,
    tol=1e-6,
    repeats=1,
    diag_max_length=8,
    drift_rows=3,
  )


def test_every_checkpoint_every_length_and_jacobian(checked):
  # The initial parameters, the end of SMT (6 steps) and of DMT (4 more).
  assert sorted(checked["lyapunov"]) == [0, 6, 10]
  assert all(math.isfinite(x) for v in checked["lyapunov"].values() for x in v.values())
  rows = checked["rows"]
  assert {(r["step"], r["td"], r["jacobian"]) for r in rows} == {
    (s, td, j) for s in (0, 6, 10) for td in (4, 8) for j in ("diag", "none")
  }
  for r in rows:
    assert 1 <= r["fwd_iters"] <= r["td"] and 1 <= r["bwd_iters"] <= r["td"], r
    assert r["max_error"] < 1e-4 and r["seqflops_ratio"] > 0, r


def test_lyapunov_splits_into_the_update_and_its_rms_norm():
  # m' = rms_normalize(tanh(m W + x)): Jacobians by jacfwd, tangents carried in a Python loop.
  k, d, steps = 2, 3, 12
  w = jax.random.normal(jax.random.key(0), (d, d)) * 1.5
  update = lambda w, m, x: layers.rms_normalize(jnp.tanh(m @ w + x[:, None, None]))
  m = layers.rms_normalize(jax.random.normal(jax.random.key(1), (1, k, d)))
  x = jax.random.normal(jax.random.key(2), (1, steps))
  got = rollout_check.lyapunov(update, w, m, x)
  v = jax.random.normal(jax.random.key(0), m.shape)
  v = v / jnp.linalg.norm(v)
  pre, full = [], []
  for t in range(steps):
    h = jnp.tanh(m @ w + x[:, t, None, None])
    u = jax.jvp(lambda m: jnp.tanh(m @ w + x[:, t, None, None]), (m,), (v,))[1]
    j = jax.jacfwd(lambda h: layers.rms_normalize(h))(h).reshape(k * d, k * d)
    nxt = (j @ u.reshape(-1)).reshape(m.shape)
    pre.append(np.log(np.linalg.norm(u)))
    full.append(np.log(np.linalg.norm(nxt)))
    m, v = layers.rms_normalize(h), nxt / np.linalg.norm(nxt)
  past = slice(steps // 4, None)
  assert got["exponent"] == pytest.approx(np.mean(full[past]), abs=1e-5)
  assert got["pre_norm"] == pytest.approx(np.mean(pre[past]), abs=1e-5)
  assert got["norm"] == pytest.approx(np.mean(full[past]) - np.mean(pre[past]), abs=1e-5)
  assert abs(got["norm"]) > 1e-2  # the norm does change the growth here


def test_serial_flops_follow_the_documented_formula():
  # f_update 1, K d = 4, Td = 8 (scans of 3 x 4 x log2 8 = 36), 2 forward and 3 adjoint iterations.
  assert rollout_check.seq_flops(1.0, 4, 8, 2, 3, "none") == (24.0, 2 * 37 + 3 * 38 + 4)
  assert rollout_check.seq_flops(1.0, 4, 8, 2, 3, "diag") == (24.0, 2 * 39 + 3 * 38 + 4)


def test_the_dmt_loss_is_the_same_both_ways(checked):
  for step, t in checked["dmt"].items():
    assert set(t) == {"td", "sequential", "parallel_diag", "parallel_none"}, step
    for solver in ("parallel_diag", "parallel_none"):
      assert t[solver]["loss_difference"] < 1e-4 * abs(t["sequential"]["loss"]), (step, solver)
      assert 1 <= t[solver]["iters"] <= t["td"] and t[solver]["s"] > 0
  assert "| rollout |" in rollout_check.markdown([checked])
  # A compare's two runs keep their compare's name in the tables.
  assert rollout_check.run_name("runs/digits/smt_dmt") == "digits/smt_dmt"
  assert rollout_check.run_name("runs/pixels_digits/") == "pixels_digits"


def test_the_drift_from_the_teacher_is_a_loop_of_updates_against_its_memories(checked):
  assert sorted(checked["drift"]) == [0, 6, 10]
  wd = checked["workdir"]
  cfg = config_lib.complete(
    ml_collections.ConfigDict(json.load(open(os.path.join(wd, "config.json"))))
  )
  exp, params = common.restore(cfg, wd, 10)
  tfns, rnn = exp.fns
  x = common.eval_batch(exp, batch_size=3)["x"]
  t = x.shape[1]
  mem = objectives.teacher_memories(
    tfns, params["teacher"], x, jnp.arange(-1, t), cfg.smt.context_length
  )  # m_{-1} .. m_{T-1}
  p = params["rnn"]
  m = jnp.broadcast_to(rnn.initial_memory(p), mem[:, 0].shape)
  roll, one = [], []
  for i in range(t):  # one update at a time, from the RNN's own memory and from the teacher's
    m = rnn.update(p, m, x[:, i])
    roll.append(float(jnp.mean(jnp.square(m - mem[:, i + 1]))))
    one.append(float(jnp.mean(jnp.square(rnn.update(p, mem[:, i], x[:, i]) - mem[:, i + 1]))))
  got = checked["drift"][10]
  assert got["t"] == t
  want = [float(np.mean(q)) for q in np.array_split(np.array(roll), 4)]
  np.testing.assert_allclose(got["rollout"], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["one_step"], np.mean(one), rtol=1e-4, atol=1e-6)
