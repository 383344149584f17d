"""The models: encoder padding and normalisation, decoder alignment and causality, every RNN kind's
update/readout contract, the Elman and LSTM equations, and transformer readout = decoder at K-1."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import KINDS, get_leaf, with_leaf
from flax import nnx

import smt_jax
from smt_jax.models import Teacher
from smt_jax.models.layers import rms_normalize


def _rms(m):
  return np.sqrt(np.mean(np.square(np.asarray(m, np.float64)), axis=-1))


# ---------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def encoder(tiny):
  """A 2-layer encoder (so padding would also leak through hidden keys if it leaked at all)."""
  tfns, tp = tiny.teacher(seed=3, encoder_depth=2)
  return jax.jit(tfns.encode), tp


def test_left_padding_equals_the_shorter_context(encoder):
  # RoPE is relative, so masking the padding makes E([-1, -1, a, b]) = E([a, b]) exactly (up to
  # rounding): the padding contributes nothing, not even through positions.
  encode, tp = encoder
  padded = encode(tp, jnp.array([[-1, -1, 3, 5], [-1, 4, 1, 2]], jnp.int32))
  short = encode(tp, jnp.array([[3, 5]], jnp.int32))
  short3 = encode(tp, jnp.array([[4, 1, 2]], jnp.int32))
  np.testing.assert_allclose(padded[0], short[0], atol=2e-5)
  np.testing.assert_allclose(padded[1], short3[0], atol=2e-5)
  # Padding embeds as token 0 before masking: an unmasked 0 must give a different memory.
  zeros = encode(tp, jnp.array([[0, 0, 3, 5]], jnp.int32))
  assert np.max(np.abs(zeros[0] - padded[0])) > 1e-3


def test_padding_ignores_the_embedding_it_is_mapped_to(encoder):
  encode, tp = encoder
  ctx = jnp.array([[-1, -1, 3, 5]], jnp.int32)
  tp2 = with_leaf(tp, "embed/embedding", lambda e: e.at[0].set(7.0))
  np.testing.assert_allclose(encode(tp2, ctx), encode(tp, ctx), atol=1e-6)
  ctx0 = jnp.array([[0, 2, 3, 5]], jnp.int32)  # a real token 0 does use that row
  assert np.max(np.abs(encode(tp2, ctx0) - encode(tp, ctx0))) > 1e-3


def test_rows_are_independent_and_all_padding_is_the_initial_memory(encoder):
  encode, tp = encoder
  ctx = jnp.array([[-1, -1, 3, 5], [1, 2, 3, 4], [-1, -1, -1, -1], [-1, 4, 4, 1]], jnp.int32)
  together = encode(tp, ctx)
  for i in range(ctx.shape[0]):
    np.testing.assert_allclose(together[i], encode(tp, ctx[i : i + 1])[0], atol=1e-5)
  # E(empty) does not depend on how many padding tokens stand for "empty".
  m_init = encode(tp, jnp.full((1, 1), -1, jnp.int32))[0]
  np.testing.assert_allclose(together[2], m_init, atol=2e-5)
  np.testing.assert_allclose(encode(tp, jnp.full((1, 9), -1, jnp.int32))[0], m_init, atol=2e-5)
  assert np.max(np.abs(together[0] - m_init)) > 1e-3
  # Memory tokens have unit RMS.
  assert together.shape == (4, 2, 8)
  np.testing.assert_allclose(_rms(together), 1.0, atol=1e-4)


# ---------------------------------------------------------------- decoder


def test_decoder_is_causal_and_position_k_minus_1_reads_only_memory(tiny):
  tfns, tp = tiny.teacher(seed=4)
  decode = jax.jit(tfns.decode)
  tf = 4
  rng = np.random.default_rng(0)
  m = rms_normalize(
    jnp.asarray(rng.normal(size=(3, tiny.num_memory_tokens, tiny.width)), jnp.float32)
  )
  xf = rng.integers(0, tiny.vocab_size, (3, tf)).astype(np.int32)
  base = np.asarray(decode(tp, m, jnp.asarray(xf)))
  assert base.shape == (3, tf, tiny.vocab_size)
  for j in range(tf):
    x2 = xf.copy()
    x2[:, j] = (x2[:, j] + 1 + np.arange(3)) % tiny.vocab_size  # a different token in every row
    out = np.asarray(decode(tp, m, jnp.asarray(x2)))
    # Output j predicts future target j: it has seen x_future[:j], never x_future[j] or later.
    np.testing.assert_allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-6)
    if j + 1 < tf:
      assert np.all(np.max(np.abs(out[:, j + 1] - base[:, j + 1]), axis=-1) > 1e-4)
  # Output 0 (position K-1) depends only on the memory, and it does depend on it.
  other_x = (xf + 2) % tiny.vocab_size
  np.testing.assert_allclose(decode(tp, m, jnp.asarray(other_x))[:, 0], base[:, 0], atol=1e-6)
  assert np.max(np.abs(decode(tp, m[::-1], jnp.asarray(xf))[:, 0] - base[::-1, 0])) < 1e-6
  assert np.max(np.abs(decode(tp, -m, jnp.asarray(xf))[:, 0] - base[:, 0])) > 1e-3


@jax.jit
def _fit_decoder(leak: jax.Array, steps: int = 120):
  """Trains a tiny decoder; returns its accuracy per future position on fresh data.

  Target 0 is the class the memory encodes. Target j >= 1 is x_future[j-1] (leak False: visible
  at position K-1+j) or x_future[j] (leak True: the token at its own position, not yet seen).
  `leak` is traced, so both variants share one compilation.
  """
  v, k, d, tf = 5, 2, 16, 4
  graphdef, params = nnx.split(
    Teacher(
      vocab_size=v,
      num_memory_tokens=k,
      width=d,
      encoder_depth=1,
      decoder_depth=1,
      num_heads=2,
      head_dim=8,
      rngs=nnx.Rngs(0),
    )
  )
  decode = lambda p, m, x: nnx.merge(graphdef, p).decode(m, x)
  classes = rms_normalize(jax.random.normal(jax.random.key(1), (v, k, d)))

  def data(key, b):
    k1, k2 = jax.random.split(key)
    c = jax.random.randint(k1, (b,), 0, v)
    xf = jax.random.randint(k2, (b, tf), 0, v)
    y = jnp.concatenate([c[:, None], jnp.where(leak, xf[:, 1:], xf[:, :-1])], axis=1)
    return classes[c], xf, y

  def loss(p, key):
    m, xf, y = data(key, 64)
    return optax.softmax_cross_entropy_with_integer_labels(decode(p, m, xf), y).mean()

  opt = optax.adam(1e-2)

  def step(carry, key):
    p, s = carry
    u, s = opt.update(jax.grad(loss)(p, key), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(
    step, (params, opt.init(params)), jax.random.split(jax.random.key(2), steps)
  )
  m, xf, y = data(jax.random.key(9), 512)
  return jnp.mean(jnp.argmax(decode(params, m, xf), -1) == y, axis=0)


def test_decoder_alignment_fits_only_what_it_may_see():
  # Position K-1+j has seen x_future[:j]: copying x_future[j-1] is learnable to 100%...
  acc = np.asarray(_fit_decoder(jnp.array(False)))
  assert np.all(acc > 0.97), acc
  # ...copying x_future[j] (the token at its own position, not yet seen) stays at chance (1/5),
  # while target 0 (from the memory) is still learnt.
  acc = np.asarray(_fit_decoder(jnp.array(True)))
  assert acc[0] > 0.97 and np.all(acc[1:] < 0.4), acc


# ---------------------------------------------------------------- RNN kinds


@pytest.mark.parametrize("kind", KINDS)
def test_rnn_contract(tiny, kind):
  rfns, rp = tiny.rnn(kind, seed=5)
  rng = np.random.default_rng(1)
  b, k, d, v = 3, tiny.num_memory_tokens, tiny.width, tiny.vocab_size
  m = jnp.asarray(rng.normal(size=(b, k, d)) * 3.0, jnp.float32)
  x = jnp.array([0, 3, v - 1], jnp.int32)

  @jax.jit
  def run(rp, m, x):
    m2 = rfns.update(rp, m, x)
    return {
      "m2": m2,
      "m0": rfns.initial_memory(rp),
      "logits": rfns.readout(rp, m2),
      "other_x": rfns.update(rp, m, (x + 1) % v),
      "other_m": rfns.update(rp, m[::-1], x),
      "row_by_row": jax.vmap(lambda mi, xi: rfns.update(rp, mi[None], xi[None])[0])(m, x),
    }

  out = run(rp, m, x)
  assert out["m2"].shape == (b, k, d) and out["m2"].dtype == jnp.float32
  np.testing.assert_allclose(_rms(out["m2"]), 1.0, atol=1e-4)
  assert out["m0"].shape == (k, d)
  np.testing.assert_allclose(_rms(out["m0"]), 1.0, atol=1e-4)
  assert out["logits"].shape == (b, v) and out["logits"].dtype == jnp.float32
  # The update really reads both its inputs, and rows are independent.
  assert np.all(np.max(np.abs(out["other_x"] - out["m2"]), axis=(1, 2)) > 1e-3)
  assert np.max(np.abs(out["other_m"] - out["m2"])) > 1e-3
  np.testing.assert_allclose(out["row_by_row"], out["m2"], atol=1e-5)


def test_elman_update_equation(tiny):
  rfns, rp = tiny.rnn("elman", seed=6)
  rng = np.random.default_rng(2)
  m = rng.normal(size=(2, tiny.num_memory_tokens, tiny.width)).astype(np.float32)
  x = np.array([1, 4], np.int32)
  w = np.asarray(get_leaf(rp, "recurrent/kernel"), np.float64)
  u = np.asarray(get_leaf(rp, "inp/kernel"), np.float64)
  bias = np.asarray(get_leaf(rp, "inp/bias"), np.float64)
  emb = np.asarray(get_leaf(rp, "embed/embedding"), np.float64)
  pre = np.tanh(m.reshape(2, -1) @ w + emb[x] @ u + bias).reshape(m.shape)
  want = pre / np.sqrt(np.mean(pre**2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(rfns.update(rp, jnp.asarray(m), jnp.asarray(x)), want, atol=1e-5)


def test_lstm_update_equation_and_state_layout(tiny):
  """The flat state is [h, c] (first half h); one LSTM step (sigmoid gates i, f, o; tanh g)."""
  rfns, rp = tiny.rnn("lstm", seed=9)
  rng = np.random.default_rng(4)
  m = rng.normal(size=(2, tiny.num_memory_tokens, tiny.width)).astype(np.float32)
  x = np.array([2, 5], np.int32)
  leaf = lambda path: np.asarray(get_leaf(rp, path), np.float64)
  e = leaf("embed/embedding")[x]
  flat = m.reshape(2, -1).astype(np.float64)
  h, c = np.split(flat, 2, axis=-1)
  # nnx names the input kernels ii, if_, ig, io and the hidden ones (with bias) hi, hf, hg, ho.
  gate = lambda inp, hid: (
    e @ leaf(f"cell/{inp}/kernel") + h @ leaf(f"cell/{hid}/kernel") + leaf(f"cell/{hid}/bias")
  )
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
  i, f = sigmoid(gate("ii", "hi")), sigmoid(gate("if_", "hf"))
  g, o = np.tanh(gate("ig", "hg")), sigmoid(gate("io", "ho"))
  c_new = f * c + i * g
  h_new = o * np.tanh(c_new)
  pre = np.concatenate([h_new, c_new], axis=-1).reshape(m.shape)
  want = pre / np.sqrt(np.mean(pre**2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(rfns.update(rp, jnp.asarray(m), jnp.asarray(x)), want, atol=1e-5)


def test_transformer_readout_is_the_decoder_at_position_k_minus_1(tiny):
  tfns, tp = tiny.teacher(seed=7)
  rfns, rp = tiny.rnn("transformer", seed=8)
  m = rms_normalize(
    jnp.asarray(
      np.random.default_rng(3).normal(size=(3, tiny.num_memory_tokens, tiny.width)), jnp.float32
    )
  )
  xf = jnp.array([[1, 2, 3], [0, 0, 0], [5, 4, 3]], jnp.int32)
  rnn_graphdef = nnx.graphdef(
    smt_jax.make_rnn(
      "transformer",
      vocab_size=tiny.vocab_size,
      num_memory_tokens=tiny.num_memory_tokens,
      width=tiny.width,
      depth=1,
      num_heads=tiny.num_heads,
      readout_depth=1,
      rngs=nnx.Rngs(0),
    )
  )

  @jax.jit
  def run(rp, tp, m):
    # The end-of-SMT transfer: the RNN readout takes the teacher decoder's weights.
    rp_t = dict(rp)
    rp_t["decoder"] = tp["decoder"]
    return {
      "readout": rfns.readout(rp, m),
      "next_logits": nnx.merge(rnn_graphdef, rp).decoder.next_logits(m),
      "readout_t": rfns.readout(rp_t, m),
      "teacher_first": tfns.decode(tp, m, xf)[:, 0],
    }

  out = run(rp, tp, m)
  # readout = Decoder.next_logits of the RNN's own decoder...
  np.testing.assert_allclose(out["readout"], out["next_logits"], atol=1e-6)
  # ...and with the teacher decoder's weights it is the teacher's prediction of the first future
  # target (position K-1), whatever the future inputs.
  np.testing.assert_allclose(out["readout_t"], out["teacher_first"], atol=1e-5)
  assert np.max(np.abs(out["readout"] - out["readout_t"])) > 1e-3


def test_make_rnn_rejects_unknown_kind_and_lists_the_valid_ones(tiny):
  with pytest.raises(ValueError) as err:
    smt_jax.make_rnn(
      "nope",
      vocab_size=5,
      num_memory_tokens=2,
      width=8,
      depth=1,
      num_heads=2,
      readout_depth=1,
      rngs=nnx.Rngs(0),
    )
  for kind in ("transformer", "mlp", "gru", "elman", "lstm"):
    assert kind in str(err.value)
  assert set(smt_jax.RNN_KINDS) >= {"transformer", "mlp", "gru", "elman", "lstm"}


@pytest.mark.parametrize("masked", [False, True])
def test_dot_product_attention_equals_the_explicit_form(masked):
  """Both attention paths (accelerators use jax.nn.dot_product_attention): values and grads."""
  from smt_jax.models import layers

  q, k, v = (jax.random.normal(key, (2, 5, 3, 8)) for key in jax.random.split(jax.random.key(0), 3))
  mask = (
    jnp.tril(jnp.ones((5, 5), bool))[None] & (jnp.arange(5) != 1)[None, None] if masked else None
  )

  def f(impl):
    out = lambda q, k, v: layers.attend(q, k, v, mask, implementation=impl)
    return out(q, k, v), jax.grad(lambda *a: jnp.sum(jnp.sin(out(*a))), argnums=(0, 1, 2))(q, k, v)

  (o1, g1), (o2, g2) = f("explicit"), f("xla")
  np.testing.assert_allclose(o1, o2, atol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="implementation"):
    layers.attend(q, k, v, mask, implementation="flash")


def test_rotary_and_gelu_equal_their_textbook_forms():
  """`rotate` (one elementwise expression over the head) against rotary written out pair by pair
  with a loop, values and gradients; the feed-forward's GELU against 0.5 x (1 + erf(x / sqrt 2))
  evaluated in float64."""
  from smt_jax.models import layers

  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))  # [B, L, H, Dh], rotated dims R = 4
  cos, sin = layers.rope_tables(jnp.arange(5), 8)

  def by_pairs(x):
    out = [x[..., j] for j in range(8)]
    for i in range(2):  # pairs (0, 1), (2, 3); dims 4..7 pass through
      a, b = x[..., 2 * i], x[..., 2 * i + 1]
      c, s = cos[None, :, None, 2 * i], sin[None, :, None, 2 * i]
      out[2 * i], out[2 * i + 1] = a * c - b * s, b * c + a * s
    return jnp.stack(out, axis=-1)

  np.testing.assert_allclose(layers.rotate(x, cos, sin), by_pairs(x), rtol=1e-6, atol=1e-6)
  w = jax.random.normal(jax.random.key(1), x.shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * w))(x)
  np.testing.assert_allclose(
    grad(lambda x: layers.rotate(x, cos, sin)), grad(by_pairs), rtol=1e-6, atol=1e-6
  )

  block = layers.Block(4, 1, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
  block.mlp_norm = lambda h: h  # the feed-forward alone: x + fc2(gelu(fc1(x)))
  h = jax.random.normal(jax.random.key(2), (3, 4)) * 3
  k1, b1 = np.float64(block.fc1.kernel[...]), np.float64(block.fc1.bias[...])
  k2, b2 = np.float64(block.fc2.kernel[...]), np.float64(block.fc2.bias[...])
  z = np.float64(h) @ k1 + b1
  gelu = 0.5 * z * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
  np.testing.assert_allclose(block.feed_forward(h), np.float64(h) + gelu @ k2 + b2, atol=2e-6)
