"""The teacher: a Transformer encoder that writes predictive memories,
and the decoder that reads them.

Encoder  E(context [B, Tc]) -> m [B, K, d]: embed the context, append K learned registers, run a
bidirectional Transformer with padding (-1) masked as keys (and the attention output zeroed at
padded positions), keep the register outputs, RMS-normalise each memory token.
Decoder  D(m [B, K, d], x_future [B, Tf]) -> logits [B, Tf, V]: causal Transformer over
[m, embed(x_future)]; output position K-1+j predicts future target j (K-1, the last memory token,
predicts the first target).
One token embedding serves the encoder's context and the decoder's future inputs; the output layer
`to_logits` is its own (untied, with bias). This is the reference's teacher (`docs/parity.md`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from smt_jax.models import layers

DEFAULT_HEAD_DIM = 64  # the reference's (x-transformers') head width, whatever the model width


class Decoder(nnx.Module):
  """A causal Transformer over memory tokens (and future inputs) and the output layer: the
  teacher's decoder and the transformer RNN's readout have this one shape."""

  def __init__(
    self,
    *,
    vocab_size: int,
    width: int,
    depth: int,
    num_heads: int,
    head_dim: int,
    attention: str | None = None,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.transformer = layers.Transformer(
      width, depth, num_heads, head_dim, attention=attention, dtype=dtype, rngs=rngs
    )
    self.to_logits = layers.linear(width, vocab_size, use_bias=True, dtype=dtype, rngs=rngs)

  def decode(self, memory: jax.Array, future: jax.Array) -> jax.Array:
    """memory [B, K, d], embedded future inputs [B, Tf, d] -> logits [B, Tf, V]."""
    k, tf = memory.shape[1], future.shape[1]
    # Position K-1+j has seen the memory and x_future[:j]: it predicts future target j. The last
    # input x_future[Tf-1] would only feed its own (unused) output under the causal mask, so it
    # is dropped; the last block computes only the Tf predicting rows K-1 .. K+Tf-2.
    h = jnp.concatenate([memory.astype(future.dtype), future[:, : tf - 1]], axis=1)
    h = self.transformer(h, layers.causal_mask(k + tf - 1), outputs=slice(k - 1, None))
    return self.to_logits(h).astype(jnp.float32)

  def next_logits(self, memory: jax.Array, dtype=None) -> jax.Array:
    """memory [B, K, d] -> logits [B, V] for the next target (the output at position K-1)."""
    k = memory.shape[1]
    h = self.transformer(
      memory.astype(dtype or memory.dtype), layers.causal_mask(k), outputs=slice(k - 1, k)
    )
    return self.to_logits(h[:, 0]).astype(jnp.float32)


class Teacher(nnx.Module):
  """Encoder + decoder with one shared token embedding, trained jointly by the SMT objective."""

  def __init__(
    self,
    *,
    vocab_size: int,
    num_memory_tokens: int,
    width: int,
    encoder_depth: int,
    decoder_depth: int,
    num_heads: int,
    head_dim: int = DEFAULT_HEAD_DIM,
    attention: str | None = None,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.embed = layers.embedding(vocab_size, width, dtype=dtype, rngs=rngs)
    self.encoder = layers.Transformer(
      width, encoder_depth, num_heads, head_dim, attention=attention, dtype=dtype, rngs=rngs
    )
    self.decoder = Decoder(
      vocab_size=vocab_size,
      width=width,
      depth=decoder_depth,
      num_heads=num_heads,
      head_dim=head_dim,
      attention=attention,
      dtype=dtype,
      rngs=rngs,
    )
    self.registers = nnx.Param(jax.random.normal(rngs.params(), (num_memory_tokens, width)))

  @property
  def compute_dtype(self):
    return self.embed.dtype or jnp.float32

  def _encoder_input(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[embed(context), registers] [B, L+K, d] and its validity [B, L+K] (padding: False)."""
    b = context.shape[0]
    k, d = self.registers.shape
    x = jnp.concatenate(
      [
        layers.embed_tokens(self.embed, context),
        jnp.broadcast_to(self.registers[...].astype(self.compute_dtype), (b, k, d)),
      ],
      axis=1,
    )
    return x, jnp.concatenate([context != -1, jnp.ones((b, k), bool)], axis=1)

  def encode(self, context: jax.Array) -> jax.Array:
    """context int [B, Tc] (-1 = padding) -> memory [B, K, d], every token RMS-normalised.

    A context that is all padding gives the initial memory E(empty): only the registers are keys.
    """
    tc = context.shape[1]
    x, valid = self._encoder_input(context)
    # Only the K register rows are kept: the last block computes those alone.
    h = self.encoder(x, None, outputs=slice(tc, None), key_valid=valid)
    return layers.rms_normalize(h)

  def decode(self, memory: jax.Array, x_future: jax.Array) -> jax.Array:
    """memory [B, K, d], x_future int [B, Tf] -> logits [B, Tf, V] for targets y[t .. t+Tf-1]."""
    return self.decoder.decode(memory, layers.embed_tokens(self.embed, x_future))

  def next_logits(self, memory: jax.Array) -> jax.Array:
    """memory [B, K, d] -> logits [B, V]: the decoder's next-token prediction (no future input)."""
    return self.decoder.next_logits(memory, self.compute_dtype)


def _near(query_pos: jax.Array, key_pos: jax.Array, window: int) -> jax.Array:
  """Whether a query at `query_pos` may read the context token at `key_pos`: causal, and within
  the last `window` tokens (0: all of them). Broadcasts."""
  ok = key_pos <= query_pos
  return ok & (query_pos - key_pos < window) if window else ok


def _attend_registers(q, k, v, k_ctx, v_ctx, ctx_mask):
  """Every memory time's registers attend to the context and to their own group, one softmax.

  q, k, v [B, G, K, H, Dh] (the registers of G memory times); k_ctx, v_ctx [B, T, H, Dh];
  ctx_mask bool [G, T]. The [G K, T + G K] matrix of one sequence is never formed: the context
  logits are [G, K, T] and the group logits [G, K, K], normalised together.
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  to_ctx = jnp.einsum("bgkhd,bjhd->bhgkj", q, k_ctx, preferred_element_type=jnp.float32)
  to_ctx = jnp.where(ctx_mask[:, None, :], to_ctx, -jnp.finfo(jnp.float32).max)
  to_group = jnp.einsum("bgkhd,bglhd->bhgkl", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(jnp.concatenate([to_ctx, to_group], axis=-1), axis=-1).astype(v.dtype)
  t = k_ctx.shape[1]
  return jnp.einsum("bhgkj,bjhd->bgkhd", probs[..., :t], v_ctx) + jnp.einsum(
    "bhgkl,bglhd->bgkhd", probs[..., t:], v
  )


# Memory times whose registers read the context together in the fused path (`_read_in_chunks`):
# its logits are [B, H, REGISTER_CHUNK K, T + REGISTER_CHUNK K] at a time, never [G K, T].
REGISTER_CHUNK = 8


def _attend_context(q, k, v, window: int, implementation: str | None):
  """The context tokens' causal self-attention (within the last `window` tokens; 0: all), q, k,
  v [B, T, H, Dh]: through `jax.nn.dot_product_attention` with `is_causal` and
  `local_window_size` (no mask array; cuDNN's fused kernel on GPUs) when the implementation is
  "xla", else the explicit form with its [T, T] mask."""
  if layers.resolve_attention(implementation) == "xla":
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      scale=q.shape[-1] ** -0.5,
      is_causal=True,
      local_window_size=(window - 1, 0) if window else None,
    )
  pos = jnp.arange(q.shape[1])
  mask = _near(pos[:, None], pos[None, :], window)[None]
  return layers.attend(q, k, v, mask, implementation="explicit")


def _read_in_chunks(q, k, v, k_ctx, v_ctx, ctx_mask):
  """`_attend_registers`, REGISTER_CHUNK memory times at a time: each chunk's registers attend
  to the context and to their own group through `jax.nn.dot_product_attention`, with the chunk's
  [C K, T + C K] mask; each chunk is rematerialised in the backward pass, so neither pass holds
  more than one chunk's logits. The same values and gradients as `_attend_registers`."""
  b, g, kk, h, dh = q.shape
  t, c = k_ctx.shape[1], min(REGISTER_CHUNK, g)
  pad = -g % c
  padded = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
  chunks = lambda a: jnp.moveaxis(a.reshape(b, (g + pad) // c, c * kk, *a.shape[3:]), 1, 0)
  masks = jnp.pad(ctx_mask, ((0, pad), (0, 0))).reshape((g + pad) // c, c, 1, t)
  group = jnp.arange(c * kk) // kk
  own_group = group[:, None] == group[None, :]  # [C K, C K]: registers of one memory time

  @jax.checkpoint
  def read(xs):
    qc, kc, vc, mc = xs  # [B, C K, H, Dh] x 3, [C, 1, T]
    to_ctx = jnp.broadcast_to(mc, (c, kk, t)).reshape(c * kk, t)
    mask = jnp.concatenate([to_ctx, own_group], axis=1)  # [C K, T + C K]
    return jax.nn.dot_product_attention(
      qc,
      jnp.concatenate([k_ctx, kc], axis=1),
      jnp.concatenate([v_ctx, vc], axis=1),
      mask=mask[None, None],
      scale=dh**-0.5,
    )

  flat = lambda a: chunks(padded(a))
  out = jax.lax.map(read, (flat(q), flat(k), flat(v), masks))  # [G / C, B, C K, H, Dh]
  out = jnp.moveaxis(out, 0, 1).reshape(b, g + pad, kk, h, dh)
  return out[:, :g]


class CausalTeacher(Teacher):
  """A teacher whose encoder is causal, so that one pass labels every memory of a sequence.

  The parameters are the windowed teacher's, in the same layout; only who attends to whom
  differs. Context tokens attend to earlier context tokens (within the last `window`; 0: all)
  and never to registers. The K registers of memory time t sit at positions t+1 .. t+K (right
  after x[t], as after a windowed encoder's context) and attend to the context tokens <= t
  (within the window) and to each other. So m_t depends on x[0..t] alone:

    encode_all(x)[:, t + 1] == encode(x[:, :t + 1])   for every t = -1 .. T-1,

  where `encode` runs the prefix as one input (the definition) and `encode_all` computes all
  T+1 memories from T + (T+1) K tokens in one pass (instead of (T+1)(Tc+K) for the windowed
  teacher's T+1 windows).
  """

  one_pass = True  # teacher_fns gives the objectives `encode_all`

  def __init__(self, *, window: int = 0, **kwargs):
    super().__init__(**kwargs)
    if window < 0:
      raise ValueError(f"window must be >= 0 (0: unbounded), got {window}.")
    self.window = window

  def encode(self, context: jax.Array) -> jax.Array:
    """The memory after a prefix: context int [B, L] (left-padded with -1) -> [B, K, d]."""
    n, k = context.shape[1], self.registers.shape[0]
    x, valid = self._encoder_input(context)
    pos = jnp.arange(n + k)
    is_ctx = pos < n
    reads_like = jnp.where(is_ctx, pos, n - 1)[:, None]  # registers read as x[L-1] does
    mask = jnp.where(
      is_ctx[None, :], _near(reads_like, pos[None, :], self.window), ~is_ctx[:, None]
    )  # [L+K, L+K]: context keys causally (windowed); register keys by registers only
    h = self.encoder(x, mask[None], outputs=slice(n, None), key_valid=valid)
    return layers.rms_normalize(h)

  def encode_all(self, x: jax.Array, times: jax.Array | None = None) -> jax.Array:
    """Memories of a sequence, one pass: x int [B, T] -> [B, G, K, d].

    times: int [G], memory times in [-1, T-1] (None: all of them, -1 .. T-1, G = T+1). Only the
    registers of those times are computed, so a few memories of a long sequence cost a pass over
    the context and G K register tokens: encode_all(x, times) == encode_all(x)[:, times + 1].
    """
    b, t = x.shape
    k, d = self.registers.shape
    times = jnp.arange(-1, t) if times is None else jnp.asarray(times)
    g = times.shape[0]
    enc = self.encoder
    dh, h = enc.head_dim, enc.blocks[0].attn.num_heads
    ctx = layers.embed_tokens(self.embed, x)  # [B, T, D]
    reg = jnp.broadcast_to(self.registers[...].astype(self.compute_dtype), (b, g, k, d))
    pos = jnp.arange(t)
    cos_c, sin_c = layers.rope_tables(pos, dh)
    # The registers of time t sit at positions t+1 .. t+K and read the context as x[t] does.
    cos_r, sin_r = layers.rope_tables((times[:, None] + 1 + jnp.arange(k)).reshape(-1), dh)
    reg_mask = _near(times[:, None], pos[None, :], self.window)  # [G, T]

    def rotate_registers(a):
      return layers.rotate(a.reshape(b, g * k, h, dh), cos_r, sin_r).reshape(b, g, k, h, dh)

    last = len(enc.blocks) - 1
    # "xla" attention: the registers read the context a chunk of memory times at a time.
    fused = layers.resolve_attention(enc.blocks[0].attn.implementation) == "xla"
    read = _read_in_chunks if fused else _attend_registers
    for i, block in enumerate(enc.blocks):
      attn = block.attn
      q_c, k_c, v_c = attn.heads(block.attn_norm(ctx))  # [B, T, H, Dh]
      q_r, k_r, v_r = attn.heads(block.attn_norm(reg))  # [B, G, K, H, Dh]
      k_c = layers.rotate(k_c, cos_c, sin_c)
      out = read(rotate_registers(q_r), rotate_registers(k_r), v_r, k_c, v_c, reg_mask)
      reg = block.feed_forward(reg + attn.merge_heads(out))
      if i < last:  # the last block's context outputs would feed nothing
        q_c = layers.rotate(q_c, cos_c, sin_c)
        out = _attend_context(q_c, k_c, v_c, self.window, attn.implementation)
        ctx = block.feed_forward(ctx + attn.merge_heads(out))
    return layers.rms_normalize(enc.final_norm(reg))


# The teacher kinds (`model.teacher_kind`): name -> constructor.
TEACHER_KINDS = {"windowed": Teacher, "causal": CausalTeacher}
