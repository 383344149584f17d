"""Parity with the authors' PyTorch implementation, output for output.

The fixtures (tests/fixtures/parity_{a,b}.npz, made by tests/fixtures/make_parity_fixtures.py with
the reference and x-transformers) hold the reference's weights under their state_dict names, its
inputs and the outputs of every reference function (and, for config A, the gradients of the SMT
loss). The weights are loaded through `smt_jax.reference.from_state_dicts`; every output of ours
must equal the reference's to ~1e-5. No torch is needed here.

Config A: vocab 10, d 16, K 3, 2 heads, encoder 2, decoder 1, RNN 1, readout 1 (with gradients).
Config B: vocab 7, d 12, K 2, 2 heads, encoder 1, decoder 2, RNN 2, readout 2.
Both have 64-wide heads (4x and ~10x the width) and perturbed norm gains, so a dropped gain,
a wrong head split or a wrong rotary pairing changes the outputs far beyond the tolerance (pinned
by the mutation tests at the end).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smt_jax
from smt_jax import losses, objectives, reference
from smt_jax.models import layers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 2e-5


class Case:
  """One fixture: the reference's arrays, and our models holding its weights."""

  def __init__(self, name: str):
    z = np.load(FIXTURES / f"parity_{name}.npz")
    self.z = {k: z[k] for k in z.files}
    cfg = {k[len("config/") :]: self.z[k] for k in self.z if k.startswith("config/")}
    self.cfg = {k: (v.tolist() if v.ndim else v.item()) for k, v in cfg.items()}
    c = self.cfg
    self.dims = dict(
      vocab_size=c["vocab"],
      width=c["d_model"],
      num_heads=c["n_heads"],
      num_memory_tokens=c["mem_tokens"],
      encoder_depth=c["encoder_depth"],
      decoder_depth=c["decoder_depth"],
      rnn_depth=c["rnn_depth"],
      readout_depth=c["readout_depth"],
    )
    self.teacher_state = self.state("teacher")
    self.rnn_state = self.state("rnn")
    self.teacher, self.rnn = reference.from_state_dicts(
      self.teacher_state, self.rnn_state, **self.dims
    )
    tg, self.tp = nnx.split(self.teacher)
    rg, self.rp = nnx.split(self.rnn)
    self.tfns, self.rfns = smt_jax.teacher_fns(tg), smt_jax.rnn_fns(rg)
    self.params = {"teacher": self.tp, "rnn": self.rp}

  def state(self, model: str) -> dict[str, np.ndarray]:
    p = f"{model}/"
    return {k[len(p) :]: v for k, v in self.z.items() if k.startswith(p)}

  def __getitem__(self, key: str) -> np.ndarray:
    return self.z[key]

  def memory(self, key: str) -> jax.Array:
    """A reference memory (B, K*d) as ours (B, K, d)."""
    v = self.z[key]
    return jnp.asarray(v.reshape(*v.shape[:-1], self.cfg["mem_tokens"], self.cfg["d_model"]))

  def flat(self, m: jax.Array) -> np.ndarray:
    return np.asarray(m).reshape(*m.shape[:-2], -1)


@functools.cache
def case(name: str) -> Case:
  return Case(name)


CASES = ["a", "b"]


def close(ours, ref, atol=ATOL, rtol=1e-5):
  np.testing.assert_allclose(
    np.asarray(ours, np.float64), np.asarray(ref, np.float64), atol=atol, rtol=rtol
  )


# ------------------------------------------------------------------------ models, call by call


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
  "call, inp", [("enc", "x_ctx"), ("enc_leftpad", "x_ctx_leftpad"), ("enc_allpad", "x_ctx_allpad")]
)
def test_encoder_memory(name, call, inp):
  c = case(name)
  m = c.teacher.encode(jnp.asarray(c[f"in/{inp}"]))
  close(c.flat(m), c[f"out/{call}/value"])


@pytest.mark.parametrize("name", CASES)
def test_decoder_logits_and_teacher_readout(name):
  c = case(name)
  m = c.memory("out/enc/value")
  close(c.teacher.decode(m, jnp.asarray(c["in/x_fut"])), c["out/dec/value"])
  close(c.teacher.next_logits(m), c["out/teacher_readout/value"])


@pytest.mark.parametrize("name", CASES)
def test_rnn_update_and_readout(name):
  c = case(name)
  x = jnp.asarray(c["in/x_tok"][:, 0])
  m = c.memory("in/m_given")
  close(c.flat(c.rnn.update(m, x)), c["out/rnn_update/value"])
  close(c.flat(c.rnn.update(jnp.zeros_like(m), x)), c["out/rnn_update_zero/value"])
  close(
    c.flat(c.rnn.update(c.memory("out/enc/value"), jnp.asarray(c["in/x_fut"][:, 0]))),
    c["out/rnn_update_from_enc/value"],
  )
  close(c.rnn.readout(m), c["out/rnn_readout/value"])
  close(c.rnn.initial_memory(), np.zeros((c.cfg["mem_tokens"], c.cfg["d_model"])))


@pytest.mark.parametrize("name", CASES)
def test_rnn_rollouts_read_and_encode_with_rnn(name):
  c = case(name)
  x_ctx = jnp.asarray(c["in/x_ctx"])
  zeros = smt_jax.initial_memories(c.rfns, c.rp, x_ctx.shape[0])
  states = smt_jax.rollout(c.rp, zeros, x_ctx, update=c.rfns.update)
  close(c.flat(states[:, -1]), c["out/encode_with_rnn/value"])
  # read_with_teacher_rnn: z = E(x[:Tc]), then readout / update over the next Tf tokens.
  tc, tf = c.cfg["Tc"], c.cfg["Tf"]
  x = jnp.asarray(c["in/x_smt"])
  out = smt_jax.read(
    c.params,
    {"x": x, "y": jnp.concatenate([x[:, 1:], x[:, :1]], axis=1)},
    rnn=c.rfns,
    teacher=c.tfns,
    context_length=tc,
    prompt_length=tc,
  )
  # Our read scores y[t] after reading x[t]: y[P-1] from E(x[:P]) ... as the reference's logits.
  ref_logits = c["out/read_with_teacher_rnn/logits"]
  ref_nll = c["out/read_with_teacher_rnn/loss_eval_"]
  assert ref_logits.shape[1] == tf
  close(np.asarray(out["nll"])[:, tc - 1 : tc - 1 + tf], ref_nll)


@pytest.mark.parametrize("name", CASES)
def test_uniformity_loss(name):
  c = case(name)
  close(losses.uniformity_loss(c.memory("out/enc/value")), c["out/unif/value"])


# ------------------------------------------------------------------------ the objectives


def smt(c: Case, batch, params=None, gamma=1.0):
  """The reference's forward_smt: our SMT loss with c_init = c_readout = 0 (jitted)."""
  loss = functools.partial(
    smt_jax.smt_loss,
    teacher=c.tfns,
    rnn=c.rfns,
    context_length=c.cfg["Tc"],
    future_length=c.cfg["Tf"],
    num_transitions=1,
    c_init=0.0,
    c_readout=0.0,
    gamma=gamma,
  )
  return jax.jit(loss)(params or c.params, batch, None)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("call, inputs, gamma", [("smt", "smt", 1.0), ("smt_masked", "pad", None)])
def test_smt_loss_terms(name, call, inputs, gamma):
  c = case(name)
  batch = {"x": jnp.asarray(c[f"in/x_{inputs}"]), "y": jnp.asarray(c[f"in/y_{inputs}"])}
  loss, m = smt(c, batch, gamma=gamma if gamma is not None else c.cfg["gamma_masked"])
  ref = lambda f: c[f"out/{call}/{f}"]
  close(m["decoding_loss"], ref("loss_decoder"))
  close(m["dynamics_loss"], ref("loss_dyn"))
  close(m["uniformity_loss"], ref("loss_unif"))
  close(loss, ref("loss"))
  assert float(m["init_loss"]) == 0.0


def test_smt_gradients_equal_the_reference():
  c = case("a")
  batch = {"x": jnp.asarray(c["in/x_smt"]), "y": jnp.asarray(c["in/y_smt"])}
  grads = jax.jit(jax.grad(lambda p: smt(c, batch, p)[0]))(c.params)
  teacher, rnn = reference.build(**c.dims)
  nnx.update(teacher, grads["teacher"])
  nnx.update(rnn, grads["rnn"])
  g_teacher, g_rnn = reference.to_state_dicts(teacher, rnn)
  for model, ours in (("teacher", g_teacher), ("rnn", g_rnn)):
    ref_keys = {k[len(f"grad/smt/{model}/") :] for k in c.z if k.startswith(f"grad/smt/{model}/")}
    params = {k for k in ours if not k.endswith("inv_freq")}
    # The reference's SMT loss never reaches the RNN's readout: no gradient recorded there.
    assert ref_keys <= params and all(not np.any(ours[k]) for k in params - ref_keys), sorted(
      params - ref_keys
    )
    for k in sorted(ref_keys):
      ref = c[f"grad/smt/{model}/{k}"]
      scale = max(float(np.max(np.abs(ref))), 1e-3)
      np.testing.assert_allclose(ours[k], ref, atol=1e-5 * scale, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("stop_carry_grad", [False, True])
def test_dmt_loss_terms(name, stop_carry_grad):
  c = case(name)
  tc, td, k = c.cfg["Tc"], c.cfg["Td"], c.cfg["k"]
  batch = {"x": jnp.asarray(c["in/x_dmt"]), "y": jnp.asarray(c["in/y_dmt"])}
  loss, m = jax.jit(
    functools.partial(
      smt_jax.dmt_loss,
      teacher=c.tfns,
      rnn=c.rfns,
      context_length=tc,
      rollout_length=td,
      label_every=k,
      reference_labels=True,
      stop_carry_grad=stop_carry_grad,
    )
  )(c.params, batch)
  close(m["dynamics_loss"], c["out/dmt/loss_dyn"])
  close(m["readout_loss"], c["out/dmt/loss_readout"])
  # The reference's total adds the frozen teacher's decoding and uniformity terms (constants for
  # the RNN): ours from the same labels.
  z_enc = c.memory("out/dmt/z_enc")
  starts = np.arange(0, td, k)
  x, y = c["in/x_dmt"], c["in/y_dmt"]
  tf = c.cfg["Tf"]
  logits = jnp.stack(
    [
      c.teacher.decode(z_enc[:, i], jnp.asarray(x[:, s + tc : s + tc + tf]))
      for i, s in enumerate(starts)
    ],
    axis=1,
  )
  y_fut = jnp.asarray(np.stack([y[:, s + tc - 1 : s + tc + tf - 1] for s in starts], axis=1))
  dec = losses.decoding_loss(logits, y_fut)
  close(dec, c["out/dmt/loss_decoder"])
  unif = losses.uniformity_loss(z_enc.reshape(*z_enc.shape[:2], -1))
  close(unif, c["out/dmt/loss_unif"])
  close(dec + 10.0 * m["dynamics_loss"] + 0.01 * unif + m["readout_loss"], c["out/dmt/loss"])
  close(loss, 10.0 * c["out/dmt/loss_dyn"] + c["out/dmt/loss_readout"])


@pytest.mark.parametrize("name", CASES)
def test_dmt_labels_and_rollout(name):
  c = case(name)
  tc, td, k = c.cfg["Tc"], c.cfg["Td"], c.cfg["k"]
  x = jnp.asarray(c["in/x_dmt"])
  starts = jnp.arange(0, td, k)
  labels = smt_jax.encode_over_time(c.tfns, c.tp, objectives.windows(x, starts + tc - 1, tc))
  close(c.flat(labels), c["out/dmt/z_enc"])
  states = smt_jax.rollout(c.rp, labels[:, 0], x[:, tc : tc + td], update=c.rfns.update)
  states = jnp.concatenate([labels[:, :1], states], axis=1)[:, :td:k]
  close(c.flat(states), c["out/dmt/z_rnn"])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("call, y", [("bptt", "y_smt"), ("bptt_masked", "y_pad")])
def test_bptt_loss_from_a_zero_memory(name, call, y):
  c = case(name)
  batch = {"x": jnp.asarray(c["in/x_smt"]), "y": jnp.asarray(c[f"in/{y}"])}
  loss, _ = jax.jit(functools.partial(smt_jax.bptt_loss, rnn=c.rfns))(c.params, batch)
  close(loss, c[f"out/{call}/loss"])
  if call == "bptt":
    zeros = smt_jax.initial_memories(c.rfns, c.rp, batch["x"].shape[0])
    states = smt_jax.rollout(c.rp, zeros, batch["x"], update=c.rfns.update)
    close(c.flat(states), c["out/bptt/m_rnn"])


# ------------------------------------------------------------------------ the weights


@pytest.mark.parametrize("name", CASES)
def test_state_dicts_round_trip_exactly(name):
  c = case(name)
  t, r = reference.to_state_dicts(c.teacher, c.rnn)
  for ours, ref in ((t, c.teacher_state), (r, c.rnn_state)):
    assert set(ours) == set(ref)
    for k in ref:
      assert ours[k].shape == ref[k].shape and np.array_equal(ours[k], ref[k]), k


@pytest.mark.parametrize("name", CASES)
def test_parameter_counts_equal_the_reference(name):
  c = case(name)
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  ref = lambda state: sum(v.size for k, v in state.items() if not k.endswith("inv_freq"))
  assert count(c.teacher) == ref(c.teacher_state)
  assert count(c.rnn) == ref(c.rnn_state)


def test_bad_state_dicts_are_refused_by_name():
  c = case("a")
  t = dict(c.teacher_state)
  t.pop("encoder.layers.0.1.to_k.weight")
  with pytest.raises(ValueError, match="to_k.weight"):
    reference.from_state_dicts(t, None, **c.dims)
  with pytest.raises(ValueError, match="shape"):
    reference.from_state_dicts(c.teacher_state, None, **{**c.dims, "vocab_size": 11})
  with pytest.raises(ValueError, match="does not have"):
    reference.from_state_dicts(c.teacher_state, None, **{**c.dims, "encoder_depth": 1})
  t = dict(c.teacher_state)
  t["encoder.rotary_pos_emb.inv_freq"] = t["encoder.rotary_pos_emb.inv_freq"] * 2
  with pytest.raises(ValueError, match="rotary"):
    reference.from_state_dicts(t, None, **c.dims)


# ------------------------------------------------------------------------ the tolerance bites


def _encode_error(c: Case, teacher_state) -> float:
  t, _ = reference.from_state_dicts(teacher_state, None, **c.dims)
  m = t.encode(jnp.asarray(c["in/x_ctx_leftpad"]))
  return float(np.max(np.abs(c.flat(m) - c["out/enc_leftpad/value"])))


def test_a_port_with_one_gain_wrong_fails():
  c = case("a")
  t = dict(c.teacher_state)
  t["encoder.layers.1.0.0.g"] = np.zeros_like(t["encoder.layers.1.0.0.g"])  # gain 1, not 1 + g
  assert _encode_error(c, t) > 100 * ATOL


def test_a_port_with_the_heads_split_wrong_fails():
  c = case("a")
  t = dict(c.teacher_state)
  w = t["encoder.layers.0.1.to_q.weight"]  # (H * 64, d), head-major rows
  hd = c.cfg["head_dim"]
  # 'b n (d h)' instead of 'b n (h d)': the rows interleaved across heads.
  t["encoder.layers.0.1.to_q.weight"] = (
    w.reshape(-1, hd, w.shape[1]).transpose(1, 0, 2).reshape(w.shape)
  )
  k = t["encoder.layers.0.1.to_k.weight"]
  t["encoder.layers.0.1.to_k.weight"] = (
    k.reshape(-1, hd, k.shape[1]).transpose(1, 0, 2).reshape(k.shape)
  )
  assert _encode_error(c, t) > 100 * ATOL


def test_a_port_with_the_rotary_pairs_wrong_fails(monkeypatch):
  c = case("a")
  assert _encode_error(c, c.teacher_state) < ATOL

  def half_split(x, cos, sin):  # NeoX: (x_i, x_{i+R/2}) pairs instead of (x_2i, x_2i+1)
    rot = cos.shape[-1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x[..., :rot] * cos + rotated * sin, x[..., rot:]], axis=-1)

  monkeypatch.setattr(layers, "rotate", half_split)
  assert _encode_error(c, c.teacher_state) > 100 * ATOL

  def full_width(x, cos, sin):  # every head dim rotated, not the first half
    hd = x.shape[-1]
    cos, sin = layers.rope_tables(jnp.arange(x.shape[1]), 2 * hd)
    pairs = x.reshape(*x.shape[:-1], hd // 2, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]

  monkeypatch.setattr(layers, "rotate", full_width)
  assert _encode_error(c, c.teacher_state) > 100 * ATOL


def reference_param_counts(v, d, h, k, enc, dec, rnn, readout, head_dim=64):
  """PARITY.md's formula (x-transformers leaves out the output projection with one head)."""
  attn = (3 if h == 1 else 4) * h * head_dim * d
  stack = lambda depth: depth * (attn + 8 * d * d + 7 * d) + d
  return (
    v * d + stack(enc) + stack(dec) + d * v + v + k * d,
    v * d + stack(rnn) + stack(readout) + d * v + v,
  )


@pytest.mark.parametrize(
  "dims",
  [
    (16, 64, 4, 4, 2, 1, 2, 1),  # the bench shape at vocab 16: 298,704 and 298,448
    (17, 64, 4, 4, 2, 1, 2, 1),  # experiments/configs/bench.py: 298,833 and 298,577
    (256, 256, 8, 16, 8, 4, 8, 4),  # the paper's
    (11, 32, 4, 3, 1, 2, 3, 1),
    (7, 64, 1, 2, 1, 1, 1, 1),  # one head: no output projection
  ],
)
@pytest.mark.parametrize("initial_memory", ["zeros", "learned"])
def test_runner_models_have_the_reference_parameter_counts(dims, initial_memory):
  from experiments.configs import common
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import experiment

  v, d, h, k, enc, dec, rnn, readout = dims
  c = config_lib.default()
  common.reference_recipe(c)
  c.model.update(
    width=d,
    num_heads=h,
    num_memory_tokens=k,
    encoder_depth=enc,
    decoder_depth=dec,
    rnn_initial_memory=initial_memory,
  )
  c.model.rnn.transformer.update(depth=rnn, readout_depth=readout)
  teacher, rnn_model = nnx.eval_shape(lambda: experiment.build_models(c, v))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  ref_teacher, ref_rnn = reference_param_counts(*dims)
  assert count(teacher) == ref_teacher
  # A learned initial memory is the one parameter beyond the reference's: K x d.
  assert count(rnn_model) == ref_rnn + (k * d if initial_memory == "learned" else 0)
  if dims[:4] == (16, 64, 4, 4):
    assert (ref_teacher, ref_rnn) == (298_704, 298_448)
  if dims[:4] == (17, 64, 4, 4):
    assert (ref_teacher, ref_rnn) == (298_833, 298_577)
