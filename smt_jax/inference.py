"""Inference with a trained RNN: `read` (teacher-forced per-token loss) and `write` (sampling).

Both are `lax.scan` loops with constant per-token cost and memory, jitted. They start either from a
memory the teacher encodes from a prompt, or from the RNN alone (its initial memory, no teacher).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from smt_jax import losses
from smt_jax.contract import Params, RNNFns, TeacherFns, check_batch_against_models, check_models
from smt_jax.objectives import readout_over_time, rollout, teacher_memories


def initial_memories(rnn: RNNFns, params: Params, batch_size: int) -> jax.Array:
  """The RNN's own initial memory for a batch: [B, K, d]."""
  m = rnn.initial_memory(params)
  return jnp.broadcast_to(m, (batch_size, *m.shape))


@functools.partial(jax.jit, static_argnames=("rnn", "teacher", "context_length"))
def prompt_memory(
  params: Params,
  prompt: jax.Array,
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  context_length: int | None = None,
) -> jax.Array:
  """The memory after reading `prompt` int [B, P]: [B, K, d].

  With a teacher: its memory at the prompt's last token (E(last Tc prompt tokens) for the windowed
  teacher). Without: the RNN's own rollout from its initial memory.
  """
  check_models(params, rnn=rnn, teacher=teacher, batch_size=prompt.shape[0], caller="prompt_memory")
  if teacher is not None:
    if context_length is None:
      raise ValueError("context_length is needed to encode a prompt with the teacher.")
    last = jnp.array([prompt.shape[1] - 1])
    return teacher_memories(teacher, params["teacher"], prompt, last, context_length)[:, 0]
  m0 = initial_memories(rnn, params["rnn"], prompt.shape[0])
  return rollout(params["rnn"], m0, prompt, update=rnn.update)[:, -1]


@functools.partial(jax.jit, static_argnames=("rnn", "teacher", "context_length", "prompt_length"))
def read(
  params: Params,
  batch: dict[str, jax.Array],
  *,
  rnn: RNNFns,
  teacher: TeacherFns | None = None,
  context_length: int | None = None,
  prompt_length: int = 0,
) -> dict[str, jax.Array]:
  """Teacher-forced evaluation of the RNN: per-token negative log-likelihood.

  prompt_length P == 0: start from the RNN's initial memory and read x[0..T-1]; readout of the state
  after x[t] scores y[t]. P > 0 (needs `teacher`): start from m_{P-1} = E(x[..P-1]) and read x[P..];
  targets before t = P-1 are not scored.

  Returns:
    {'nll': [B, T], 'correct': [B, T] (argmax == target), 'mask': [B, T] bool (scored targets),
     'states': the RNN's memories [B, T, K, d] (P > 0: [B, T-P+1, K, d], from t = P-1)}.
  """
  x, y = batch["x"], batch["y"]
  rp = params["rnn"]
  check_batch_against_models(
    params, batch, rnn=rnn, teacher=teacher if prompt_length else None, caller="read"
  )
  if prompt_length == 0:
    states = rollout(rp, initial_memories(rnn, rp, x.shape[0]), x, update=rnn.update)
    logits = readout_over_time(rnn, rp, states)  # [B, T, V]
    y_scored = y
  else:
    if teacher is None:
      raise ValueError("prompt_length > 0 starts from a teacher-encoded prompt: pass `teacher`.")
    m = prompt_memory(
      params, x[:, :prompt_length], rnn=rnn, teacher=teacher, context_length=context_length
    )
    states = rollout(rp, m, x[:, prompt_length:], update=rnn.update)
    states = jnp.concatenate([m[:, None], states], axis=1)  # t = P-1 .. T-1
    logits = readout_over_time(rnn, rp, states)
    logits = jnp.concatenate(
      [jnp.zeros((x.shape[0], prompt_length - 1, logits.shape[-1]), logits.dtype), logits], 1
    )
    y_scored = jnp.where(jnp.arange(x.shape[1]) >= prompt_length - 1, y, -1)
  nll, mask = losses.masked_cross_entropy(logits, y_scored)
  correct = (jnp.argmax(logits, -1) == y_scored) & mask
  return {"nll": nll, "correct": correct, "mask": mask, "states": states}


@functools.partial(jax.jit, static_argnames=("rnn", "num_steps"))
def write(
  params: Params,
  key: jax.Array,
  memory: jax.Array,
  *,
  rnn: RNNFns,
  num_steps: int,
  temperature: float = 1.0,
) -> jax.Array:
  """Samples tokens from the RNN, feeding each back: tokens int32 [B, num_steps].

  Starting from `memory` [B, K, d] (see `prompt_memory` / `initial_memories`), each step samples
  x ~ softmax(readout(m) / temperature) (argmax when temperature == 0) and sets m = update(m, x).
  """
  rp = params["rnn"]
  k, d, _ = check_models(params, rnn=rnn, batch_size=memory.shape[0], caller="write")
  if memory.shape[1:] != (k, d):
    raise ValueError(
      f"write: memory must be [B, K, d] = [B, {k}, {d}] (the RNN's), got {memory.shape}."
    )

  def step(m, k):
    logits = rnn.readout(rp, m)
    greedy = jnp.argmax(logits, -1)
    sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    tok = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
    return rnn.update(rp, m, tok), tok

  _, tokens = jax.lax.scan(step, memory, jax.random.split(key, num_steps))
  return tokens.T
