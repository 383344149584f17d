"""Flax NNX models, and their conversion into the pure functions the objectives take."""

from __future__ import annotations

import functools

from flax import nnx

from smt_jax.contract import RNNFns, TeacherFns
from smt_jax.models.rnn import RNN, RNN_KINDS, SHARED_ARGS, make_rnn, rnn_options
from smt_jax.models.teacher import (
  DEFAULT_HEAD_DIM,
  TEACHER_KINDS,
  CausalTeacher,
  Decoder,
  Teacher,
)


def head_width(width: int, num_heads: int, head_dim: int) -> int:
  """The attention head width: `head_dim` (64, the reference's), or width // num_heads when 0."""
  return head_dim or width // num_heads


@functools.cache
def teacher_fns(graphdef: nnx.GraphDef) -> TeacherFns:
  """Pure functions of the teacher's state, for `graphdef, state = nnx.split(teacher)`.

  A one-pass teacher (`CausalTeacher`) also gives `encode_all` and `encode_at` (only the memories
  asked for), which the objectives then use.
  """
  one_pass = getattr(graphdef.nodes[0].type, "one_pass", False)  # the module's class
  return TeacherFns(
    encode=lambda p, context: nnx.merge(graphdef, p).encode(context),
    decode=lambda p, m, x_future: nnx.merge(graphdef, p).decode(m, x_future),
    encode_all=(lambda p, x: nnx.merge(graphdef, p).encode_all(x)) if one_pass else None,
    encode_at=(lambda p, x, times: nnx.merge(graphdef, p).encode_all(x, times))
    if one_pass
    else None,
  )


@functools.cache
def rnn_fns(graphdef: nnx.GraphDef) -> RNNFns:
  """Pure functions of an RNN's state, for `graphdef, state = nnx.split(rnn)`.

  `rnn` may be any NNX module with three methods, not only the kinds of `make_rnn`:
    update(m [B, K, d], x int [B]) -> [B, K, d]   (per-token unit RMS, like the teacher's)
    readout(m [B, K, d]) -> logits [B, V]
    initial_memory() -> [K, d]
  e.g. a wrapper of `nnx.GRUCell` that reshapes its [B, K*d] state to [B, K, d]
  (`docs/quickstart.ipynb`). The objectives check this contract before compiling
  (`smt_jax.check_models`; `smt_jax.check_memory_contract` also checks the RMS, eagerly).
  """
  return RNNFns(
    update=lambda p, m, x: nnx.merge(graphdef, p).update(m, x),
    readout=lambda p, m: nnx.merge(graphdef, p).readout(m),
    initial_memory=lambda p: nnx.merge(graphdef, p).initial_memory(),
  )


__all__ = [
  "CausalTeacher",
  "DEFAULT_HEAD_DIM",
  "Decoder",
  "RNN",
  "Teacher",
  "RNN_KINDS",
  "SHARED_ARGS",
  "TEACHER_KINDS",
  "head_width",
  "make_rnn",
  "rnn_fns",
  "rnn_options",
  "teacher_fns",
]
