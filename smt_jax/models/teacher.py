"""The teacher: a Transformer encoder that writes predictive memories, and the decoder that reads them.

Encoder  E(context [B, Tc]) -> m [B, K, d]: embed the context, append K learned registers, run a
bidirectional Transformer with padding (-1) masked as keys, keep the register outputs, RMS-normalise.
Decoder  D(m [B, K, d], x_future [B, Tf]) -> logits [B, Tf, V]: causal Transformer over
[m, embed(x_future)]; output position K-1+j predicts future target j (K-1, the last memory token,
predicts the first target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from smt_jax.models import layers


class Encoder(nnx.Module):
  """E(context) -> memory. A context that is all padding gives the initial memory E(empty)."""

  def __init__(self, *, vocab_size: int, num_memory_tokens: int, width: int, depth: int,
               num_heads: int, dtype=jnp.float32, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
    self.registers = nnx.Param(jax.random.normal(rngs.params(), (num_memory_tokens, width)) * 0.02)
    self.transformer = layers.Transformer(width, depth, num_heads, dtype=dtype, rngs=rngs)

  def __call__(self, context: jax.Array) -> jax.Array:
    """context int [B, Tc] (-1 = padding) -> memory [B, K, d], every token RMS-normalised."""
    b, tc = context.shape
    k = self.registers.shape[0]
    x = jnp.concatenate([layers.embed_tokens(self.embed, context),
                         jnp.broadcast_to(self.registers[...].astype(self.embed.dtype or jnp.float32),
                                          (b, k, self.registers.shape[1]))], axis=1)
    valid = jnp.concatenate([context != -1, jnp.ones((b, k), bool)], axis=1)  # keys [B, Tc+K]
    # Only the K register rows are kept: the last block computes those alone.
    return layers.rms_normalize(self.transformer(x, valid[:, None, :], outputs=slice(tc, None)))


class Decoder(nnx.Module):
  """D(memory, future inputs) -> logits; also usable as an RNN readout (next-token only)."""

  def __init__(self, *, vocab_size: int, width: int, depth: int, num_heads: int,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
    self.transformer = layers.Transformer(width, depth, num_heads, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(width, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, memory: jax.Array, x_future: jax.Array) -> jax.Array:
    """memory [B, K, d], x_future int [B, Tf] -> logits [B, Tf, V] for targets y[t .. t+Tf-1]."""
    k, tf = memory.shape[1], x_future.shape[1]
    # Position K-1+j has seen the memory and x_future[:j]: it predicts future target j. The last
    # input x_future[Tf-1] would only feed its own (unused) output under the causal mask, so it
    # is dropped; the last block computes only the Tf predicting rows K-1 .. K+Tf-2.
    h = jnp.concatenate([memory.astype(self.embed.dtype or memory.dtype),
                         layers.embed_tokens(self.embed, x_future[:, :tf - 1])], axis=1)
    h = self.transformer(h, layers.causal_mask(k + tf - 1), outputs=slice(k - 1, None))
    return self.head(h).astype(jnp.float32)

  def next_logits(self, memory: jax.Array) -> jax.Array:
    """memory [B, K, d] -> logits [B, V] for the next target (the output at position K-1)."""
    k = memory.shape[1]
    h = self.transformer(memory.astype(self.embed.dtype or memory.dtype), layers.causal_mask(k),
                         outputs=slice(k - 1, k))
    return self.head(h[:, 0]).astype(jnp.float32)


class Teacher(nnx.Module):
  """Encoder + decoder, trained jointly by the SMT objective."""

  def __init__(self, *, vocab_size: int, num_memory_tokens: int, width: int, encoder_depth: int,
               decoder_depth: int, num_heads: int, dtype=jnp.float32, rngs: nnx.Rngs):
    self.encoder = Encoder(vocab_size=vocab_size, num_memory_tokens=num_memory_tokens, width=width,
                           depth=encoder_depth, num_heads=num_heads, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(vocab_size=vocab_size, width=width, depth=decoder_depth,
                           num_heads=num_heads, dtype=dtype, rngs=rngs)

  def encode(self, context: jax.Array) -> jax.Array:
    return self.encoder(context)

  def decode(self, memory: jax.Array, x_future: jax.Array) -> jax.Array:
    return self.decoder(memory, x_future)
