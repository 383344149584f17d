"""Transformer building blocks shared by the teacher and the transformer updater.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual) with rotary position
embedding. Shapes: B batch, L sequence (Q of them queries), H heads, D model width.

Speed notes (the models are small, so op count and wasted rows matter more than FLOP/s):
- `Transformer(..., outputs=slice)` computes only the rows a caller keeps in the LAST block: every
  position still serves as a key and value there, but queries, the MLP and the final norm run on
  the kept rows alone (the encoder keeps K of Tc+K rows, the readout 1 of K). Same math, exactly.
- Rotary tables are built once per call and shared by all blocks; the 1/sqrt(Dh) scale is folded
  into q; an all-True mask is passed as None and costs nothing.
- Small vocabularies embed with a one-hot matmul: its gradient is a matmul too, where `take`'s
  gradient is a serial scatter-add (the same values, summed in a different order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Vocabularies up to this size embed with a one-hot matmul (see the module docstring).
ONE_HOT_MAX_VOCAB = 64


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Scale every token (last axis) to unit root-mean-square, with no learned scale."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
          ).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, base: float = 10_000.0
                ) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each float32 [L, Dh/2], of the rotary angles positions * base^(-i/(Dh/2))."""
  half = head_dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [L, Dh/2]
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies rotary tables [L, Dh/2] to x [B, L, H, Dh] (halves rotated as pairs)."""
  half = x.shape[-1] // 2
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding on x [B, L, H, Dh] for integer positions [L] (Dh even)."""
  return rotate(x, *rope_tables(positions, x.shape[-1], base))


def _dense(layer: nnx.Linear, x: jax.Array, columns: slice | None = None) -> jax.Array:
  """`layer(x)` (no bias) for a slice of its output columns only, the others never computed."""
  kernel = layer.kernel[...]
  if columns is not None:
    kernel = kernel[:, columns]
  x, kernel = layer.promote_dtype((x, kernel), dtype=layer.dtype)
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                             precision=layer.precision)


class Attention(nnx.Module):
  """Multi-head self-attention with rotary positions and an optional boolean mask."""

  def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if width % num_heads or (width // num_heads) % 2:
      raise ValueError(f"width ({width}) must be a multiple of 2 * num_heads ({num_heads}).")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(width, 3 * width, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, *, queries: slice | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Self-attention of x [B, L, D].

    Args:
      mask: bool, broadcastable to [B, L, L] (True: query may attend to key), or None (all).
      queries: only these rows are queries (every row is still a key and value); None: all.
      rope: (cos, sin) tables [L, Dh/2] for positions 0..L-1 (built here when None).

    Returns:
      [B, Q, D], Q the number of query rows.
    """
    b, l, d = x.shape
    h = self.num_heads
    dh = d // h
    cos, sin = rope if rope is not None else rope_tables(jnp.arange(l), dh)
    if queries is None:
      q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3 * h, dh), 3, axis=2)  # each [B, L, H, Dh]
      q_cos, q_sin = cos, sin
    else:
      xq = x[:, queries]
      q = _dense(self.qkv, xq, slice(0, d)).reshape(b, xq.shape[1], h, dh)  # [B, Q, H, Dh]
      k, v = jnp.split(_dense(self.qkv, x, slice(d, 3 * d)).reshape(b, l, 2 * h, dh), 2, axis=2)
      q_cos, q_sin = cos[queries], sin[queries]
      if mask is not None and mask.shape[-2] != 1:
        mask = mask[..., queries, :]
    q = rotate(q, q_cos, q_sin) * jnp.asarray(dh ** -0.5, q.dtype)
    k = rotate(k, cos, sin)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)  # [B, H, Q, L]
    if mask is not None:
      scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.out(out.reshape(b, out.shape[1], d))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, width: int, num_heads: int, *, mlp_ratio: int = 4, dtype, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, *, queries: slice | None = None,
               rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """x [B, L, D] -> [B, Q, D]: the block's output at the query rows (all rows when None)."""
    attended = self.attn(self.norm1(x), mask, queries=queries, rope=rope)
    x = (x if queries is None else x[:, queries]) + attended
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class Transformer(nnx.Module):
  """A stack of pre-norm blocks followed by a final RMSNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.blocks = nnx.List([Block(width, num_heads, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, *,
               outputs: slice | None = None) -> jax.Array:
    """x [B, L, D] -> [B, L, D], or [B, Q, D] for the rows `outputs` (a slice) alone.

    With `outputs`, the last block computes only those rows (identical values, less work).
    """
    rope = rope_tables(jnp.arange(x.shape[1]), x.shape[2] // self.num_heads)
    last = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      x = block(x, mask, queries=outputs if i == last else None, rope=rope)
    return self.norm(x)


def causal_mask(length: int) -> jax.Array:
  """[1, L, L] lower-triangular mask."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


def embed_tokens(embed: nnx.Embed, tokens: jax.Array) -> jax.Array:
  """Embed ids, mapping the padding id -1 to token 0 (callers mask those positions)."""
  tokens = jnp.maximum(tokens, 0)
  if embed.num_embeddings > ONE_HOT_MAX_VOCAB:
    return embed(tokens)
  (table,) = embed.promote_dtype((embed.embedding[...],), dtype=embed.dtype, inexact=False)
  return jax.nn.one_hot(tokens, embed.num_embeddings, dtype=table.dtype) @ table
