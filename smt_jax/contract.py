"""The memory contract: what a teacher and an RNN agree on, as function-set types and checks.

A model enters the objectives (and any other JAX code) as pure functions of its parameters:
`TeacherFns` (encode, decode, and optionally a one-pass `encode_all` / `encode_at`) and `RNNFns`
(update, readout, initial_memory). They agree on K memory tokens of width d and a vocabulary V
(`MemorySpec`): a memory is [B, K, d], every token of unit RMS (docs/method.md section 2). The
four checks run on shapes only (`jax.eval_shape`), before anything compiles, and name what is
wrong in one line: `check_models` (the functions' shapes and dtypes), `check_memory_contract`
(the RMS normalisation, on values), `check_tokens` (a batch's tokens against V) and
`check_batch_against_models` (a batch against both models, as every objective calls it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Batch = dict[str, jax.Array]


class TeacherFns(NamedTuple):
  """The teacher as pure functions of its parameters."""

  encode: Callable[[Params, jax.Array], jax.Array]  # (p, context [B, Tc]) -> memory [B, K, d]
  decode: Callable[
    [Params, jax.Array, jax.Array], jax.Array
  ]  # (p, m, x_future [B, Tf]) -> [B, Tf, V]
  # A one-pass teacher: (p, x [B, T]) -> memories [B, T+1, K, d] for t = -1 .. T-1, each of
  # x[0..t] alone. None: memories come from `encode` of windows (`teacher_memories`).
  encode_all: Callable[[Params, jax.Array], jax.Array] | None = None
  # Optional, a one-pass teacher's memories at some times only: (p, x [B, T], times int [N]) ->
  # [B, N, K, d] == encode_all(p, x)[:, times + 1], at the cost of N (not T+1) memories.
  encode_at: Callable[[Params, jax.Array, jax.Array], jax.Array] | None = None


class RNNFns(NamedTuple):
  """An RNN as pure functions of its parameters: any cell, in any JAX library.

  The memory contract (checked by every objective before anything compiles, `check_models`):
  a memory is [B, K, d], K tokens of width d equal to the teacher's, each token of unit RMS like
  the teacher's memories (end `update` with m / sqrt(mean(m**2, -1) + eps)); a cell with a flat
  state reshapes it to [B, K, d] (K*d = its state size; for an LSTM, h and c together).
  `initial_memory` returns one memory [K, d], no batch axis; `update` keeps m's shape and dtype.
  """

  update: Callable[[Params, jax.Array, jax.Array], jax.Array]  # (p, m [B, K, d], x [B]) -> m'
  readout: Callable[[Params, jax.Array], jax.Array]  # (p, m [B, K, d]) -> logits [B, V]
  initial_memory: Callable[[Params], jax.Array]  # (p) -> [K, d]


class MemorySpec(NamedTuple):
  """What the models agree on: K memory tokens of width d, vocabulary V."""

  num_memory_tokens: int  # K
  width: int  # d
  vocab_size: int  # V


def _shape_name(shape: tuple[int, ...], k: int, d: int) -> str:
  """A shape, named in the memory's terms where it is the common mistake (a flat state)."""
  return f"{tuple(shape)}{' ([B, K*d]: a flat state)' if tuple(shape[1:]) == (k * d,) else ''}"


def check_models(
  params: Params,
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  batch_size: int = 1,
  context_length: int = 1,
  token_dtype=jnp.int32,
  caller: str = "check_models",
) -> MemorySpec:
  """Checks the memory contract from shapes alone (`jax.eval_shape`: nothing runs or compiles).

  The contract every objective and inference loop relies on:
    rnn.initial_memory(p)   -> [K, d]       (one memory; the loops broadcast it over the batch)
    rnn.update(p, m, x)     -> [B, K, d]    for m [B, K, d] and x int [B], in m's dtype
    rnn.readout(p, m)       -> [B, V]       logits for the next target
    teacher.encode(p, ctx)  -> [B, K, d]    with the RNN's K and d
    teacher.decode(p, m, x) -> [B, Tf, V]   with the RNN's V
  Values are checked separately (`check_memory_contract`): memories are per-token unit RMS.

  Args:
    params: {'rnn': ..., and 'teacher': ... when `teacher` is given}.
    batch_size: B of the arrays the checks are traced with (the caller's, for its messages).
    context_length: Tc of the teacher windows traced.
    caller: the function named in the error.

  Returns:
    MemorySpec(K, d, V).

  Raises:
    ValueError: one line naming `caller`, what was expected and what to change.
  """
  rp = params["rnn"]
  m0 = jax.eval_shape(rnn.initial_memory, rp)
  if len(m0.shape) != 2:
    hint = " (drop the batch axis: return m[0])" if len(m0.shape) == 3 and m0.shape[0] == 1 else ""
    raise ValueError(
      f"{caller}: rnn.initial_memory must return one memory [K, d], got shape "
      f"{tuple(m0.shape)}{hint}."
    )
  k, d = m0.shape
  m_dtype = m0.dtype
  b = batch_size
  x_spec = jax.ShapeDtypeStruct((b,), token_dtype)
  if teacher is not None:
    tp = params["teacher"]
    context = jax.ShapeDtypeStruct((b, context_length), token_dtype)
    mt = jax.eval_shape(teacher.encode, tp, context)
    if tuple(mt.shape) != (b, k, d):
      raise ValueError(
        f"{caller}: the RNN's memory is [K, d] = {(k, d)} but the teacher's encoder gives "
        f"{tuple(mt.shape[1:])}: build the RNN with the teacher's num_memory_tokens and width."
      )
    m_dtype = mt.dtype  # the RNN's updates start from teacher memories
  m_spec = jax.ShapeDtypeStruct((b, k, d), m_dtype)
  new = jax.eval_shape(rnn.update, rp, m_spec, x_spec)
  if not hasattr(new, "shape") or tuple(new.shape) != (b, k, d):
    got = _shape_name(new.shape, k, d) if hasattr(new, "shape") else type(new).__name__
    raise ValueError(
      f"{caller}: rnn.update(p, m, x) must return the memory's shape [B, K, d] = {(b, k, d)}, "
      f"got {got}: reshape its output to m.shape."
    )
  if new.dtype != m_dtype:
    raise ValueError(
      f"{caller}: rnn.update must return the memory's dtype {m_dtype}, got {new.dtype} "
      f"(a lax.scan carry keeps its type): cast with .astype(m.dtype)."
    )
  logits = jax.eval_shape(rnn.readout, rp, m_spec)
  if len(logits.shape) != 2 or logits.shape[0] != b:
    raise ValueError(
      f"{caller}: rnn.readout(p, m) must return logits [B, V] for m [B, K, d] = {(b, k, d)}, "
      f"got {tuple(logits.shape)}."
    )
  v = logits.shape[1]
  if teacher is not None:
    dec = jax.eval_shape(
      teacher.decode, params["teacher"], m_spec, jax.ShapeDtypeStruct((b, 1), token_dtype)
    )
    if dec.shape[-1] != v:
      raise ValueError(
        f"{caller}: the RNN's readout has V = {v} logits but the teacher's decoder "
        f"{dec.shape[-1]}: build both with the same vocab_size."
      )
  return MemorySpec(k, d, v)


def check_memory_contract(
  params: Params,
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  key: jax.Array | None = None,
  batch_size: int = 4,
  context_length: int = 1,
  rtol: float = 0.02,
) -> MemorySpec:
  """Checks the whole memory contract once, eagerly: the shapes (`check_models`), then the values.

  Runs `update` on random unit-RMS memories and random tokens and requires every output token to
  have RMS 1 (within `rtol`; 3x that in 16-bit dtypes), the scale of the teacher's memories that
  the dynamics loss regresses onto; with a teacher, checks its memories the same way. Call it
  once on a new cell, before training (it reads the values, so not inside `jax.jit`).

  Returns:
    MemorySpec(K, d, V).
  """
  spec = check_models(
    params,
    rnn=rnn,
    teacher=teacher,
    batch_size=batch_size,
    context_length=context_length,
    caller="check_memory_contract",
  )
  k, d, v = spec
  k_m, k_x = jax.random.split(jax.random.key(0) if key is None else key)
  m = jax.random.normal(k_m, (batch_size, k, d))
  m = m * jax.lax.rsqrt(jnp.mean(m**2, -1, keepdims=True))
  x = jax.random.randint(k_x, (batch_size,), 0, v)
  outputs = {"rnn.update": lambda m: rnn.update(params["rnn"], m, x)}
  if teacher is not None:
    ctx = jax.random.randint(k_x, (batch_size, context_length), 0, v)
    outputs["teacher.encode"] = lambda m: teacher.encode(params["teacher"], ctx)
    m = m.astype(jax.eval_shape(outputs["teacher.encode"], m).dtype)
  for name, fn in outputs.items():
    out = jax.jit(fn)(m)  # one compile, not one per op
    tol = rtol * (3 if jnp.finfo(out.dtype).bits <= 16 else 1)
    rms = np.asarray(jnp.sqrt(jnp.mean(jnp.square(out.astype(jnp.float32)), -1)))  # [B, K]
    if not np.all(np.abs(rms - 1) <= tol):
      raise ValueError(
        f"check_memory_contract: {name} gives memory tokens of RMS in [{rms.min():.3g}, "
        f"{rms.max():.3g}], not 1 (the teacher's memory scale): end it with a per-token RMS "
        f"normalisation, m / sqrt(mean(m**2, -1, keepdims=True) + 1e-6)."
      )
  return spec


def check_tokens(batch: Batch, *, vocab_size: int, caller: str = "check_tokens") -> None:
  """Out-of-vocabulary tokens raise here instead of giving a silent NaN (or a zero embedding).

  x must hold tokens in [0, V) and y in [0, V) or -1 (no target). Reading the values needs them
  on the host: under `jax.jit` the batch is abstract and this does nothing (the objectives call
  it, so an eager call of the loss checks a batch; call it on your data pipeline's batches).
  """
  for name, lo in (("x", 0), ("y", -1)):
    v = batch[name]
    if isinstance(v, jax.core.Tracer):
      return
    v = np.asarray(v)
    if v.size and (v.min() < lo or v.max() >= vocab_size):
      raise ValueError(
        f"{caller}: batch['{name}'] holds tokens in [{v.min()}, {v.max()}], outside "
        f"[{lo}, {vocab_size}) (V = {vocab_size}"
        f"{'; -1 marks no target' if name == 'y' else ''}): build the models with a larger "
        f"vocab_size or remap the data."
      )


def check_batch_against_models(
  params: Params,
  batch: Batch,
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  context_length: int = 1,
  caller: str,
) -> MemorySpec:
  """`check_models` at the batch's size and token dtype, then `check_tokens` against its V."""
  x = batch["x"]
  spec = check_models(
    params,
    rnn=rnn,
    teacher=teacher,
    batch_size=x.shape[0],
    context_length=context_length,
    token_dtype=x.dtype,
    caller=caller,
  )
  check_tokens(batch, vocab_size=spec.vocab_size, caller=caller)
  return spec


__all__ = [
  "Batch",
  "MemorySpec",
  "Params",
  "RNNFns",
  "TeacherFns",
  "check_batch_against_models",
  "check_memory_contract",
  "check_models",
  "check_tokens",
]
