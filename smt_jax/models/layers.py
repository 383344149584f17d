"""Transformer building blocks shared by the teacher and the transformer updater.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> MLP -> residual) with rotary position
embedding. Shapes: B batch, L sequence, H heads, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Scale every token (last axis) to unit root-mean-square, with no learned scale."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
          ).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding on x [B, L, H, Dh] for integer positions [L] (Dh even)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [L, Dh/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with rotary positions and an explicit boolean mask."""

  def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if width % num_heads or (width // num_heads) % 2:
      raise ValueError(f"width ({width}) must be a multiple of 2 * num_heads ({num_heads}).")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(width, 3 * width, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(width, width, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D]; mask bool [B or 1, L, L] (True: query may attend to key)."""
    b, l, d = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3 * self.num_heads, d // self.num_heads), 3,
                        axis=2)  # each [B, L, H, Dh]
    pos = jnp.arange(l)
    q, k = apply_rope(q, pos), apply_rope(k, pos)
    scores = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhlm,bmhd->blhd", probs, v).reshape(b, l, d))


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, width: int, num_heads: int, *, mlp_ratio: int = 4, dtype, rngs: nnx.Rngs):
    self.norm1 = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)
    self.fc1 = nnx.Linear(width, mlp_ratio * width, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * width, width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), mask)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class Transformer(nnx.Module):
  """A stack of pre-norm blocks followed by a final RMSNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(width, num_heads, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.RMSNorm(width, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x)


def causal_mask(length: int) -> jax.Array:
  """[1, L, L] lower-triangular mask."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


def embed_tokens(embed: nnx.Embed, tokens: jax.Array) -> jax.Array:
  """Embed ids, mapping the padding id -1 to token 0 (callers mask those positions)."""
  return embed(jnp.maximum(tokens, 0))
