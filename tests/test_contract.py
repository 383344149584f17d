"""The memory contract, checked for a user's own cell: one clear error before anything compiles.

The cell is what a user brings from their own project: an `nnx.GRUCell` wrapped to the
`update` / `readout` / `initial_memory` interface, passed through `smt_jax.rnn_fns`. Each mistake
of the issue (K or d differing from the teacher's, an `update` returning [B, K*d], an initial
memory [1, K, d], a different vocabulary, out-of-vocabulary tokens, no RMS normalisation) must give
one line naming the function that found it, from `jax.jit(...).trace` (tracing, no compile).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import smt_jax

V, K, D, TC = 8, 2, 8, 4


class GRUMemory(nnx.Module):
  """A user's cell: nnx.GRUCell on the flat state, reshaped to the [B, K, d] memory."""

  def __init__(
    self,
    *,
    k=K,
    d=D,
    vocab=V,
    flat_update=False,
    init_batch_axis=False,
    normalize=True,
    rngs,
  ):
    self.k, self.d = k, d
    self.flat_update, self.init_batch_axis, self.normalize = flat_update, init_batch_axis, normalize
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.cell = nnx.GRUCell(d, k * d, rngs=rngs)
    self.head = nnx.Linear(k * d, vocab, rngs=rngs)
    self.m0 = nnx.Param(jnp.ones((k, d)))

  def update(self, m, x):
    h, _ = self.cell(m.reshape(m.shape[0], -1), self.embed(x))  # [B, K*d]
    if self.flat_update:
      return h
    h = h.reshape(m.shape)
    if self.normalize:
      h = h * jax.lax.rsqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6)
    return h

  def readout(self, m):
    return self.head(m.reshape(m.shape[0], -1))

  def initial_memory(self):
    return self.m0[None] if self.init_batch_axis else self.m0[...]


def _models(**cell):
  teacher = smt_jax.Teacher(
    vocab_size=V,
    num_memory_tokens=K,
    width=D,
    encoder_depth=1,
    decoder_depth=1,
    num_heads=2,
    head_dim=4,
    rngs=nnx.Rngs(0),
  )
  tg, tp = nnx.split(teacher)
  rg, rp = nnx.split(GRUMemory(**cell, rngs=nnx.Rngs(1)))
  return smt_jax.teacher_fns(tg), smt_jax.rnn_fns(rg), {"teacher": tp, "rnn": rp}


def _batch(seq_len=12, batch_size=3, seed=0):
  x = np.random.default_rng(seed).integers(0, V, (batch_size, seq_len)).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(np.roll(x, -1, 1))}


def _objectives(teacher, rnn):
  """The three objectives bound to the same pieces, as a user writes them."""
  return {
    "smt_loss": functools.partial(
      smt_jax.smt_loss,
      teacher=teacher,
      rnn=rnn,
      context_length=TC,
      future_length=2,
      num_transitions=12,
    ),
    "dmt_loss": functools.partial(
      smt_jax.dmt_loss,
      teacher=teacher,
      rnn=rnn,
      context_length=TC,
      rollout_length=4,
      label_every=2,
    ),
    "bptt_loss": functools.partial(smt_jax.bptt_loss, teacher=teacher, rnn=rnn),
  }


def _trace_error(fn, params, batch) -> str:
  """The one-line ValueError that tracing `fn` under jit raises (tracing compiles nothing)."""
  with pytest.raises(ValueError) as e:
    jax.jit(fn).trace(params, batch, jax.random.key(0))
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_a_user_gru_cell_is_taken_by_every_objective_from_the_same_pieces():
  teacher, rnn, params = _models()
  assert smt_jax.check_memory_contract(params, rnn=rnn, teacher=teacher) == (K, D, V)
  batch = _batch()
  fns = _objectives(teacher, rnn)
  for name, fn in fns.items():  # the same params, batch, key, teacher=, rnn= for all three
    loss = jax.jit(fn).trace(params, batch, jax.random.key(0)).out_info[0]
    assert loss.shape == () and loss.dtype == jnp.float32, name
  # And SMT trains the user's cell (docs/quickstart.ipynb trains it with all three).
  (loss, _), grads = jax.jit(jax.value_and_grad(fns["smt_loss"], has_aux=True))(
    params, batch, jax.random.key(0)
  )
  assert np.isfinite(float(loss)) and float(optax.tree.norm(grads["rnn"])) > 0


@pytest.mark.parametrize(
  "cell, objectives, expected",
  [
    (dict(k=3), ("smt_loss", "dmt_loss"), "the RNN's memory is [K, d] = (3, 8)"),
    (dict(d=6), ("smt_loss", "dmt_loss"), "teacher's encoder gives (2, 8)"),
    (
      dict(flat_update=True),
      ("smt_loss", "dmt_loss", "bptt_loss"),
      "rnn.update(p, m, x) must return the memory's shape [B, K, d] = (3, 2, 8), got (3, 16) "
      "([B, K*d]: a flat state)",
    ),
    (
      dict(init_batch_axis=True),
      ("smt_loss", "dmt_loss", "bptt_loss"),
      "rnn.initial_memory must return one memory [K, d], got shape (1, 2, 8) (drop the batch",
    ),
    (dict(vocab=9), ("smt_loss", "dmt_loss"), "readout has V = 9 logits but the teacher's"),
  ],
)
def test_each_broken_contract_is_one_line_naming_the_function(cell, objectives, expected):
  teacher, rnn, params = _models(**cell)
  fns = _objectives(teacher, rnn)
  for name in objectives:
    msg = _trace_error(fns[name], params, _batch())
    assert msg.startswith(f"{name}: "), msg
    assert expected in msg, msg


def test_an_update_that_changes_the_dtype_is_refused_before_the_scan():
  teacher, rnn, params = _models()
  rnn64 = rnn._replace(update=lambda p, m, x: rnn.update(p, m, x).astype(jnp.bfloat16))
  msg = _trace_error(_objectives(teacher, rnn64)["bptt_loss"], params, _batch())
  assert msg.startswith(
    "bptt_loss: rnn.update must return the memory's dtype float32, got bfloat16"
  )


def test_the_memory_rms_is_checked_eagerly():
  teacher, rnn, params = _models(normalize=False)
  with pytest.raises(ValueError, match=r"^check_memory_contract: rnn.update gives memory tokens"):
    smt_jax.check_memory_contract(params, rnn=rnn, teacher=teacher)
  # The built-in kinds all keep the contract.
  for kind in smt_jax.RNN_KINDS:
    g, p = nnx.split(
      smt_jax.make_rnn(
        kind, vocab_size=V, num_memory_tokens=K, width=D, depth=1, num_heads=2, readout_depth=1,
        head_dim=4, rngs=nnx.Rngs(0),
      )
    )  # fmt: skip
    assert smt_jax.check_memory_contract({"rnn": p}, rnn=smt_jax.rnn_fns(g)) == (K, D, V), kind


@pytest.mark.parametrize(
  "field, value, expected",
  [("x", V, "batch['x'] holds tokens in [0, 8], outside [0, 8)"), ("x", -1, "[-1, "), ("y", V, "")],
)
def test_out_of_vocabulary_tokens_raise_in_an_eager_call(field, value, expected):
  teacher, rnn, params = _models()
  batch = _batch()
  bad = dict(batch, **{field: batch[field].at[1, 5].set(value)})
  for name, fn in _objectives(teacher, rnn).items():
    with pytest.raises(ValueError) as e:
      fn(params, bad, jax.random.key(0))
    msg = str(e.value)
    assert msg.startswith(f"{name}: batch['{field}'] holds tokens") and expected in msg, msg
  # y == -1 (no target) is in range; the same batch without the bad token passes.
  ok = dict(batch, y=batch["y"].at[1, 5].set(-1))
  smt_jax.check_tokens(ok, vocab_size=V)
  loss, _ = _objectives(teacher, rnn)["bptt_loss"](params, ok, None)
  assert np.isfinite(float(loss))


def test_read_and_write_check_the_contract_too():
  _, rnn, params = _models(flat_update=True)
  with pytest.raises(ValueError, match=r"^read: rnn.update\(p, m, x\) must return"):
    smt_jax.read(params, _batch(), rnn=rnn)
  _, rnn, params = _models()
  with pytest.raises(ValueError, match=r"^write: memory must be \[B, K, d\] = \[B, 2, 8\]"):
    smt_jax.write(params, jax.random.key(0), jnp.zeros((2, K * D)), rnn=rnn, num_steps=3)


# ---------------------------------------------------------------------------------------------
# The optimiser recipe.


def _step(tx, params, grads, n=3):
  """n optimiser steps with fixed gradients (one jitted program)."""

  def run(params):
    state = tx.init(params)
    for _ in range(n):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  return jax.jit(run)(params)


def test_a_frozen_teacher_stays_put_under_weight_decay_where_plain_adamw_moves_it():
  _, _, params = _models()
  grads = jax.tree.map(jnp.ones_like, params)
  grads["teacher"] = jax.tree.map(jnp.zeros_like, params["teacher"])  # DMT: no teacher gradient
  lr = 1e-2

  plain = _step(optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.01), params, grads)
  w0 = np.asarray(jax.tree.leaves(params["teacher"])[-1])
  assert not np.array_equal(np.asarray(jax.tree.leaves(plain["teacher"])[-1]), w0)

  frozen = _step(smt_jax.adamw_per_model(lr, frozen=("teacher",)), params, grads)
  chex.assert_trees_all_equal(frozen["teacher"], params["teacher"])
  # The RNN does train: with a unit gradient, Adam's first steps move each weight by about lr.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), frozen["rnn"], params["rnn"])
  assert all(2 * lr < m < 4 * lr for m in jax.tree.leaves(moved)), moved


def test_clipping_is_per_model_a_huge_teacher_gradient_leaves_the_rnn_step_alone():
  _, _, params = _models()
  grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)
  huge = dict(grads, teacher=jax.tree.map(lambda a: 1e6 * a, grads["teacher"]))
  tx = smt_jax.adamw_per_model(1e-3, clip_norm=1e-4)  # small: both models get clipped
  a, b = _step(tx, params, grads, 1), _step(tx, params, huge, 1)
  chex.assert_trees_all_equal(a["rnn"], b["rnn"])
  with pytest.raises(ValueError, match=r"^adamw_per_model: frozen=\['encoder'\] not among"):
    smt_jax.adamw_per_model(1e-3, frozen=("encoder",))


def test_the_runner_uses_the_public_recipe():
  import ml_collections

  from smt_jax.runner import experiment

  config = ml_collections.ConfigDict(
    {"optim": dict(b1=0.9, b2=0.95, weight_decay=0.01, decay_all=False, clip_norm=1.0)}
  )
  _, _, params = _models()
  grads = jax.tree.map(
    lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), params
  )
  for phase, frozen in (("smt", ()), ("dmt", ("teacher",)), ("bptt", ("teacher",))):
    runner = _step(
      experiment.make_optimizer(config, phase, optax.constant_schedule(1e-2)), params, grads
    )
    public = _step(smt_jax.adamw_per_model(1e-2, frozen=frozen), params, grads)
    chex.assert_trees_all_equal(runner, public)
    teacher_moved = not np.array_equal(
      np.asarray(jax.tree.leaves(runner["teacher"])[0]),
      np.asarray(jax.tree.leaves(params["teacher"])[0]),
    )
    assert teacher_moved == (phase == "smt"), phase
