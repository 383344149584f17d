"""Gradient accumulation (`optim.grad_accum_steps`): an optimiser step over k micro-batches is
the step over the whole batch, for every phase (parameters and optimiser state after several
steps), with the clip applied to the accumulated gradient. Sharded == one device for accumulated
steps: tests/test_sharding.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import pixels
from smt_jax.runner import experiment

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
      state, metrics = p.step(state, p.batch(i), jax.random.fold_in(jax.random.key(0), i))
      norms.append(float(metrics["grad_norm"]))
  return init, jax.device_get(state), jax.device_get(metrics), norms


@pytest.mark.parametrize("phase", ["smt", "dmt", "bptt"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(phase):
  init, whole, m_whole, norms = _train(1, phase)
  _, parts, m_parts, _ = _train(4, phase)
  assert min(norms) > _config(1).optim.clip_norm  # the clip was active at every step
  np.testing.assert_allclose(m_parts["loss"], m_whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(m_parts["grad_norm"], m_whole["grad_norm"], rtol=1e-4)
  a, b = jax.tree.leaves(parts), jax.tree.leaves(whole)
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
