"""Transformer building blocks shared by the teacher and the transformer updater.

The architecture is the reference implementation's (x-transformers' `Encoder` / `Decoder` at their
defaults, as the authors use them; `docs/parity.md`), weight for weight:
- pre-norm residual blocks, attention then feed-forward, and one more norm at the end of the stack;
- norms `x / max(||x||, 1e-12) * sqrt(d) * (1 + g)`, g initialised to 0;
- attention with `head_dim` per head (64 whatever the width), q/k/v/out projections without bias
  (no output projection with one head), scale head_dim^-0.5, softmax in float32;
- rotary embedding on the first half of every head's dims, on interleaved pairs (x_2i, x_2i+1),
  frequencies base^(-2i / (head_dim / 2)), positions 0..L-1 over the whole input;
- with a key mask, the attention branch's output is zeroed at masked query positions;
- feed-forward Linear(d, 4d) -> exact GELU -> Linear(4d, d), with biases;
- PyTorch's default initialisation: linear weights and biases U(+-1/sqrt(fan_in)), embeddings
  N(0, 1).
Shapes: B batch, L sequence (Q of them queries), H heads, Dh head width, D model width.

Speed notes (the models are small, so op count and wasted rows matter more than FLOP/s):
- `Transformer(..., outputs=slice)` computes only the rows a caller keeps in the LAST block: every
  position still serves as a key and value there, but queries, the MLP and the final norm run on
  the kept rows alone (the encoder keeps K of Tc+K rows, the readout 1 of K). Same math, exactly.
- q, k and v are one fused matmul; rotary tables are built once per call and shared by all blocks;
  an all-True mask is passed as None and costs nothing.
- Small vocabularies embed with a one-hot matmul: its gradient is a matmul too, where `take`'s
  gradient is a serial scatter-add (the same values, summed in a different order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# Vocabularies up to this size embed with a one-hot matmul (see the module docstring).
ONE_HOT_MAX_VOCAB = 64
# The reference's memory normalisation eps (torch.finfo(float32).eps, inside the square root).
MEMORY_EPS = float(jnp.finfo(jnp.float32).eps)
ROPE_BASE = 10_000.0


def rms_normalize(x: jax.Array, eps: float = MEMORY_EPS) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) over the last axis, no learned scale (the memory normalisation)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(
    x.dtype
  )


def torch_uniform(key, shape, dtype=jnp.float32, *, fan_in: int):
  """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases."""
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def linear(din: int, dout: int, *, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with PyTorch's default initialisation (kernel [din, dout] = weight.T)."""
  init = lambda key, shape, dtype=jnp.float32: torch_uniform(key, shape, dtype, fan_in=din)
  return nnx.Linear(
    din, dout, use_bias=use_bias, dtype=dtype, kernel_init=init, bias_init=init, rngs=rngs
  )


def embedding(num: int, width: int, *, dtype, rngs: nnx.Rngs) -> nnx.Embed:
  """nnx.Embed with PyTorch's default N(0, 1) initialisation."""
  return nnx.Embed(num, width, dtype=dtype, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)


class RMSNorm(nnx.Module):
  """x / max(||x||_2, 1e-12) * sqrt(d) * (1 + g), computed in float32; g starts at 0."""

  def __init__(self, width: int, *, dtype):
    self.g = nnx.Param(jnp.zeros((width,), jnp.float32))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)
    y = x32 / norm * math.sqrt(x.shape[-1]) * (1.0 + self.g[...])
    return y.astype(self.dtype or x.dtype)


def rotary_inv_freq(head_dim: int, base: float = ROPE_BASE) -> jax.Array:
  """The rotary frequencies base^(-2i / R), i < R/2, for R = head_dim // 2 rotated dims."""
  rot = head_dim // 2
  return 1.0 / (base ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))


def rope_tables(
  positions: jax.Array, head_dim: int, base: float = ROPE_BASE
) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each float32 [L, head_dim/2]: angle p * inv_freq[j // 2] for rotated dim j."""
  angles = positions.astype(jnp.float32)[:, None] * rotary_inv_freq(head_dim, base)[None, :]
  angles = jnp.repeat(angles, 2, axis=-1)  # f0 f0 f1 f1 ...: one frequency per adjacent pair
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary embedding on x [B, L, H, Dh] with tables [L, R]: dims j < R rotate in adjacent pairs
  (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i+1 cos + x_2i sin); dims >= R pass through.

  Computed as one elementwise expression over the whole head, x * C + swap(x) * S, with the tables
  widened to Dh (C = 1, S = 0 past R) and swap(x)_2i = -x_2i+1, swap(x)_2i+1 = x_2i (each pair
  reversed and signed): the same values as rotating the first R dims and concatenating the rest,
  without materialising the slices, the interleave and the concatenation (and their gradients).
  """
  rot, dh = cos.shape[-1], x.shape[-1]
  width = lambda t, fill: jnp.pad(t, ((0, 0), (0, dh - rot)), constant_values=fill)
  cos, sin = width(cos, 1.0)[None, :, None, :], width(sin, 0.0)[None, :, None, :]
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(*x.shape[:-1], dh // 2, 2)
  swapped = (pairs[..., ::-1] * jnp.array([-1.0, 1.0], jnp.float32)).reshape(x.shape)
  return (x32 * cos + swapped * sin).astype(x.dtype)


def _dense(layer: nnx.Linear, x: jax.Array, columns: slice | None = None) -> jax.Array:
  """`layer(x)` (no bias) for a slice of its output columns only, the others never computed."""
  kernel = layer.kernel[...]
  if columns is not None:
    kernel = kernel[:, columns]
  x, kernel = layer.promote_dtype((x, kernel), dtype=layer.dtype)
  return jax.lax.dot_general(
    x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision
  )


def resolve_attention(implementation: str | None) -> str:
  """`model.attention` as used here: "xla" or "explicit"; "auto" / None is "explicit" on CPU,
  where it measured faster (docs/benchmarks.md), "xla" elsewhere."""
  if implementation in (None, "auto"):
    return "explicit" if jax.default_backend() == "cpu" else "xla"
  if implementation not in ("explicit", "xla"):
    raise ValueError(
      f"attention implementation must be 'auto', 'xla' or 'explicit', got {implementation!r}."
    )
  return implementation


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None,
  *,
  implementation: str | None = None,
) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v with float32 logits and softmax.

  Args:
    q [B, Q, H, Dh]; k, v [B, L, H, Dh]; mask bool broadcastable to [B, Q, L] (True: may attend),
      or None.
    implementation (`model.attention`): "xla" (`jax.nn.dot_product_attention`: cuDNN flash
      attention on GPUs where it applies, XLA elsewhere), "explicit" (two einsums and a softmax),
      or "auto" / None: explicit on CPU, where it measured faster (docs/benchmarks.md),
      `dot_product_attention` elsewhere.
  Returns:
    [B, Q, H, Dh].
  """
  implementation = resolve_attention(implementation)
  scale = q.shape[-1] ** -0.5
  if implementation == "xla":
    return jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None], scale=scale
    )
  scores = jnp.einsum(
    "bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32
  )  # [B, H, Q, L]
  if mask is not None:
    scores = jnp.where(mask[:, None], scores, -jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
  """Multi-head self-attention: fused q/k/v projections to H * head_dim, partial rotary, output
  projection back to the width (absent with one head, as in x-transformers)."""

  def __init__(
    self,
    width: int,
    num_heads: int,
    head_dim: int,
    *,
    attention: str | None = None,
    dtype,
    rngs: nnx.Rngs,
  ):
    if head_dim % 4:
      raise ValueError(
        f"head_dim ({head_dim}) must be a multiple of 4 (rotary embedding turns "
        f"pairs within the first half of every head)."
      )
    self.num_heads, self.head_dim, self.implementation = num_heads, head_dim, attention
    inner = num_heads * head_dim
    if num_heads == 1 and inner != width:
      raise ValueError(
        f"one head has no output projection: head_dim ({head_dim}) must equal the width ({width})."
      )
    # One kernel [width, 3 * inner]: columns [q | k | v], each head-major ('(h dh)'). Its init
    # U(+-1/sqrt(width)) is that of three separate Linear(width, inner) layers.
    self.qkv = linear(width, 3 * inner, use_bias=False, dtype=dtype, rngs=rngs)
    self.out = (
      linear(inner, width, use_bias=False, dtype=dtype, rngs=rngs) if num_heads > 1 else None
    )

  def project(self, x: jax.Array, which: int) -> jax.Array:
    """x [..., D] -> the queries (which = 0), keys (1) or values (2), [..., H, Dh], before rotary.

    Each its own product with its third of the fused kernel: one product split three ways costs a
    concatenation of the three gradients in the backward pass (measured: docs/benchmarks.md)."""
    inner = self.num_heads * self.head_dim
    out = _dense(self.qkv, x, slice(which * inner, (which + 1) * inner))
    return out.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [..., D] -> q, k, v [..., H, Dh] (before rotary)."""
    return self.project(x, 0), self.project(x, 1), self.project(x, 2)

  def merge_heads(self, out: jax.Array) -> jax.Array:
    """[..., H, Dh] -> [..., D]: the heads concatenated, then the output projection (if any)."""
    out = out.reshape(*out.shape[:-2], self.num_heads * self.head_dim)
    return out if self.out is None else self.out(out)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    queries: slice | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    query_valid: jax.Array | None = None,
  ) -> jax.Array:
    """Self-attention of x [B, L, D].

    Args:
      mask: bool, broadcastable to [B, L, L] (True: query may attend to key), or None (all).
      queries: only these rows are queries (every row is still a key and value); None: all.
      rope: (cos, sin) tables for positions 0..L-1 (built here when None).
      query_valid: bool [B, L] or None: the output is zeroed at query rows where it is False.

    Returns:
      [B, Q, D], Q the number of query rows.
    """
    seq_len, dh = x.shape[1], self.head_dim
    cos, sin = rope if rope is not None else rope_tables(jnp.arange(seq_len), dh)
    if queries is None:
      q, k, v = self.heads(x)  # each [B, L, H, Dh]
      q_cos, q_sin = cos, sin
    else:
      q, k, v = self.project(x[:, queries], 0), self.project(x, 1), self.project(x, 2)
      q_cos, q_sin = cos[queries], sin[queries]
      if mask is not None and mask.shape[-2] != 1:
        mask = mask[..., queries, :]
      if query_valid is not None:
        query_valid = query_valid[:, queries]
    out = attend(
      rotate(q, q_cos, q_sin), rotate(k, cos, sin), v, mask, implementation=self.implementation
    )
    out = self.merge_heads(out)
    if query_valid is not None:
      out = jnp.where(query_valid[..., None], out, jnp.zeros((), out.dtype))
    return out


class Block(nnx.Module):
  """Pre-norm block: x + Attn(norm(x)), then x + FF(norm(x))."""

  def __init__(
    self,
    width: int,
    num_heads: int,
    head_dim: int,
    *,
    mlp_ratio: int = 4,
    attention: str | None = None,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.attn_norm = RMSNorm(width, dtype=dtype)
    self.attn = Attention(width, num_heads, head_dim, attention=attention, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(width, dtype=dtype)
    self.fc1 = linear(width, mlp_ratio * width, use_bias=True, dtype=dtype, rngs=rngs)
    self.fc2 = linear(mlp_ratio * width, width, use_bias=True, dtype=dtype, rngs=rngs)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    queries: slice | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
    query_valid: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, L, D] -> [B, Q, D]: the block's output at the query rows (all rows when None)."""
    attended = self.attn(
      self.attn_norm(x), mask, queries=queries, rope=rope, query_valid=query_valid
    )
    return self.feed_forward((x if queries is None else x[:, queries]) + attended)

  def feed_forward(self, x: jax.Array) -> jax.Array:
    """x + FF(norm(x)), the block's second half."""
    h = self.fc1(self.mlp_norm(x))
    return x + self.fc2(0.5 * h * (1.0 + jax.lax.erf(h * (0.5**0.5))))


class Transformer(nnx.Module):
  """A stack of pre-norm blocks followed by a final norm."""

  def __init__(
    self,
    width: int,
    depth: int,
    num_heads: int,
    head_dim: int,
    *,
    attention: str | None = None,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.head_dim = head_dim
    self.blocks = nnx.List(
      [
        Block(width, num_heads, head_dim, attention=attention, dtype=dtype, rngs=rngs)
        for _ in range(depth)
      ]
    )
    self.final_norm = RMSNorm(width, dtype=dtype)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    *,
    outputs: slice | None = None,
    key_valid: jax.Array | None = None,
  ) -> jax.Array:
    """x [B, L, D] -> [B, L, D], or [B, Q, D] for the rows `outputs` (a slice) alone.

    Args:
      mask: bool broadcastable to [B, L, L], or None.
      outputs: with it, the last block computes only those rows (identical values, less work).
      key_valid: bool [B, L] or None: the padding mask. Invalid rows are masked as keys and
        their attention outputs are zeroed (x-transformers' `mask=`); combined with `mask`.
    """
    rope = rope_tables(jnp.arange(x.shape[1]), self.head_dim)
    if key_valid is not None:
      keys = key_valid[:, None, :]
      mask = keys if mask is None else mask & keys
    last = len(self.blocks) - 1
    for i, block in enumerate(self.blocks):
      x = block(x, mask, queries=outputs if i == last else None, rope=rope, query_valid=key_valid)
    return self.final_norm(x)


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
