"""Gradient accumulation (`optim.grad_accum_steps`): an optimiser step over k micro-batches is
the step over the whole batch, for every phase (parameters and optimiser state after several
steps), with the clip applied to the accumulated gradient; a run stopped between two micro-batches
checkpoints the sums so far and resumes bit for bit. The runner's micro-batch steps, sharded, ==
the one-call scan on one device: tests/test_sharding.py."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import run_helpers

from experiments.configs import pixels, synthetic
from smt_jax.runner import experiment, train

STEPS = 3  # the warm-up's first learning rate is 0: steps 2 and 3 move the parameters


def _config(accum: int):
  c = pixels.get_config("smoke")  # digits: every position of every row is scored
  c.phases = "smt,dmt,bptt"
  for p in ("smt", "dmt", "bptt"):
    c[p].batch_size = 32
    c[p].lr = 1e-3
  # The loss must be a mean over rows for the two to agree: no uniformity term (it pairs the
  # memories of whatever batch it sees) and no per-row random choice of decoded memories.
  c.smt.c_unif = 0.0
  c.smt.num_decoded = 0
  c.optim.clip_norm = 0.05  # small enough that it clips: the clip must see the whole gradient
  c.optim.grad_accum_steps = accum
  return c


def _train(accum: int, phase: str):
  exp = experiment.build_experiment(_config(accum))
  p = experiment.make_phase(exp, phase)
  init = jax.device_get(exp.init_params())
  state = p.init_state(exp.init_params())
  norms = []
  with jax.set_mesh(exp.mesh):
    for i in range(STEPS):
      state, metrics = p.train_step(state, p.batch(i), jax.random.fold_in(jax.random.key(0), i))
      norms.append(float(metrics["grad_norm"]))
  return init, jax.device_get(state), jax.device_get(metrics), norms


@pytest.mark.parametrize("phase", ["smt", "dmt", "bptt"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(phase):
  init, whole, m_whole, norms = _train(1, phase)
  _, parts, m_parts, _ = _train(4, phase)
  assert min(norms) > _config(1).optim.clip_norm  # the clip was active at every step
  np.testing.assert_allclose(m_parts["loss"], m_whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_parts["grad_norm"], m_whole["grad_norm"], rtol=1e-4)
  acc = parts["opt_state"]  # the accumulator: the optimiser's state and the sums, reset
  assert acc["micro"] == 0 and acc["finite"]
  assert all(not np.any(v) for v in jax.tree.leaves((acc["grads"], acc["metrics"])))
  a = jax.tree.leaves((parts["params"], acc["inner"]))
  b = jax.tree.leaves((whole["params"], whole["opt_state"]))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  moved = [
    np.abs(x - y).max() for x, y in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(init))
  ]
  assert max(moved) > 1e-4  # the steps trained


def test_micro_batch_j_takes_rows_j_j_plus_k_and_counts_add_up():
  def loss_fn(w, batch, key):
    del key
    loss = w * jnp.max(batch["x"])  # depends on which rows share a micro-batch
    return loss, {"loss": loss, "num_targets": jnp.float32(batch["x"].shape[0])}

  x = np.arange(12, dtype=np.float32)
  (loss, metrics), grad = experiment.accumulated(loss_fn, 3)(2.0, {"x": x}, None)
  # Rows {0, 3, 6, 9}, {1, 4, 7, 10}, {2, 5, 8, 11}: maxima 9, 10, 11 (contiguous thirds: 3, 7, 11).
  np.testing.assert_allclose(loss, 2.0 * 10.0)
  np.testing.assert_allclose(grad, 10.0)
  assert metrics["num_targets"] == 12


def test_the_micro_batch_steps_equal_the_one_call_scan():
  def loss_fn(w, batch, key):
    del key
    loss = w * jnp.max(batch["x"]) ** 2
    return loss, {"loss": loss, "num_targets": jnp.float32(batch["x"].shape[0])}

  x = np.arange(12, dtype=np.float32)
  opt = optax.chain(optax.clip_by_global_norm(50.0), optax.sgd(0.1))
  one = experiment.make_train_step(loss_fn, opt, 3)
  micro = experiment.make_micro_step(loss_fn, opt, 3)
  w = jnp.float32(2.0)
  whole, w_metrics = one({"params": w, "opt_state": opt.init(w)}, {"x": x}, None)
  metrics = loss_fn(w, {"x": x}, None)[1]  # the loss's metrics: what the sums hold
  state = {"params": w, "opt_state": experiment.init_accumulator(opt, 3, metrics)(w)}
  for _ in range(3):
    assert state["params"] == 2.0  # nothing applied before the third micro-batch
    state, metrics = micro(state, {"x": x}, None)
  # maxima 9, 10, 11: mean gradient (81 + 100 + 121) / 3 = 100.67, clipped to 50; w = 2 - 5
  np.testing.assert_allclose(state["params"], whole["params"], rtol=1e-6)
  np.testing.assert_allclose(state["params"], -3.0, rtol=1e-6)
  for k in ("loss", "num_targets", "grad_norm"):
    np.testing.assert_allclose(metrics[k], w_metrics[k], rtol=1e-6)
  assert metrics["num_targets"] == 12 and bool(metrics["finite"])


def test_a_run_stopped_between_micro_batches_resumes_bit_identical(tmp_path):
  """SIGTERM during BPTT step 4 of 6 (0-based 3, just after the checkpoint of step 3), with two
  micro-batches a step: the checkpoint replaces step 3's with the first micro-batch's sums; the
  rerun finishes the step and ends with the parameters, rows and summary of an unbroken run."""
  c = synthetic.get_config("parity,smoke")  # BPTT 6 steps; logs every 2, checkpoints every 3
  c.phases, c.model.rnn_kind = "bptt", "elman"
  c.bptt.batch_size, c.optim.grad_accum_steps = 8, 2
  whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
  train.train_and_evaluate(c, whole)

  def sigterm_at_3(step, rows):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # sets the runner's flag before the step runs
    return rows

  with pytest.raises(train.Preempted, match="mid-accumulation of step 4"):
    train.train_and_evaluate(c, cut, hooks=train.Hooks(train_batch=sigterm_at_3))
  step, state, meta = run_helpers.restore(cut)
  assert (step, meta["phase_step"], int(state["opt_state"]["micro"])) == (3, 3, 1)
  assert np.any(jax.tree.leaves(state["opt_state"]["grads"])[0])  # the first half's sum
  train.train_and_evaluate(c, cut)
  assert run_helpers.rows(cut) == run_helpers.rows(whole)
  assert run_helpers.summary(cut) == run_helpers.summary(whole)
  a, b = (run_helpers.leaves(run_helpers.restore(w)[1]) for w in (cut, whole))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
