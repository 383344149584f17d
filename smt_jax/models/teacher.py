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

  def encode(self, context: jax.Array) -> jax.Array:
    """context int [B, Tc] (-1 = padding) -> memory [B, K, d], every token RMS-normalised.

    A context that is all padding gives the initial memory E(empty): only the registers are keys.
    """
    b, tc = context.shape
    k, d = self.registers.shape
    x = jnp.concatenate(
      [
        layers.embed_tokens(self.embed, context),
        jnp.broadcast_to(self.registers[...].astype(self.compute_dtype), (b, k, d)),
      ],
      axis=1,
    )
    valid = jnp.concatenate([context != -1, jnp.ones((b, k), bool)], axis=1)  # [B, Tc+K]
    # Only the K register rows are kept: the last block computes those alone.
    h = self.encoder(x, None, outputs=slice(tc, None), key_valid=valid)
    return layers.rms_normalize(h)

  def decode(self, memory: jax.Array, x_future: jax.Array) -> jax.Array:
    """memory [B, K, d], x_future int [B, Tf] -> logits [B, Tf, V] for targets y[t .. t+Tf-1]."""
    return self.decoder.decode(memory, layers.embed_tokens(self.embed, x_future))

  def next_logits(self, memory: jax.Array) -> jax.Array:
    """memory [B, K, d] -> logits [B, V]: the decoder's next-token prediction (no future input)."""
    return self.decoder.next_logits(memory, self.compute_dtype)
