"""Analysis of trained SMT / BPTT models, as pure functions of arrays and model functions.

What the paper measures besides accuracy (docs/method.md 9), written so any JAX project can call it:
  - gradient flow: the norm of the loss gradient w.r.t. each memory m_t, along a BPTT unroll
    (`rollout_state_gradient_norms`) and inside the time-parallel SMT loss
    (`smt_memory_gradient_norms`);
  - drift: how far memories stray from the teacher's, per time step (`drift_along_time`), for the
    RNN's own rollout or for one-step predictions from teacher memories (`one_step_predictions`);
  - geometry: PCA of memory trajectories (`pca`) and their effective dimension
    (`participation_ratio`, a collapse diagnostic);
  - sequential compute: FLOPs of a function (`count_flops`, XLA's count or the matmuls), the
    updates on the serial critical path of one training step of each method (`serial_updates`)
    and its FLOPs (`seq_flops_per_step`).

Nothing here reads a config or touches files; models enter as `TeacherFns` / `RNNFns`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from smt_jax.contract import Params, RNNFns, TeacherFns

# -------------------------------------------------------------------------------------------------
# Gradient flow.


def rollout_state_gradient_norms(
  loss_of_states: Callable[[jax.Array], jax.Array],
  params: Params,
  memory: jax.Array,
  inputs: jax.Array,
  *,
  update: Callable,
) -> jax.Array:
  """||dL/dm_t|| for every state of a `lax.scan` unroll (the BPTT gradient path).

  The unroll is m_t = update(params, m_{t-1}, inputs[:, t]) + eps_t with eps = 0; the gradient
  w.r.t. eps_t is the gradient w.r.t. the state m_t, carrying every path from m_t to the loss
  (through all later updates).

  Args:
    loss_of_states: states [B, L, K, d] -> scalar loss (e.g. readout cross-entropy vs targets).
    params: the RNN's parameters. memory: [B, K, d], the state before inputs[:, 0].
    inputs: int [B, L]. update: (params, m, x) -> m'.

  Returns:
    float32 [B, L]: per-sequence gradient norm w.r.t. the state after reading inputs[:, t].
  """
  if memory.ndim != 3 or inputs.ndim != 2 or memory.shape[0] != inputs.shape[0]:
    raise ValueError(
      f"memory must be [B, K, d] and inputs int [B, L] with the same B; got "
      f"{memory.shape} and {inputs.shape}."
    )

  def loss_of_eps(eps):  # eps [L, B, K, d]
    def step(m, xs):
      x_t, e_t = xs
      m = update(params, m, x_t) + e_t
      return m, m

    _, states = jax.lax.scan(step, memory, (inputs.T, eps))
    return loss_of_states(jnp.swapaxes(states, 0, 1))

  eps = jnp.zeros((inputs.shape[1], *memory.shape), memory.dtype)
  g = jax.grad(loss_of_eps)(eps)  # [L, B, K, d]
  return jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=(-2, -1))).T


def window_fill(context: jax.Array) -> jax.Array:
  """Number of non-padding tokens of each context window: int [B] for context int [B, Tc].

  For an episode read with windows that cover it whole (Tc >= T, left-padded with -1), the window
  ending at time t holds t+1 tokens, so this is the memory's index t+1 in [0, T] (0: E(empty)).
  """
  return jnp.sum(context != -1, axis=-1)


def perturbable_teacher(teacher: TeacherFns) -> TeacherFns:
  """A teacher whose memories can be nudged per (sequence, memory index), for gradients.

  Its parameters are {'teacher': the teacher's params, 'delta': [B, T+1, K, d]}; encoding a
  window adds delta[b, window_fill(window_b)] to the memory. With delta = 0 it is the teacher;
  the gradient of any loss w.r.t. delta[b, t+1] is its gradient w.r.t. memory m_t of sequence b.
  Encodings of another batch size (e.g. the single E(empty) of the SMT loss's L_init) get no delta.
  Valid when every memory of interest comes from a window covering the episode (Tc >= T).
  """

  def encode(p, context):
    m = teacher.encode(p["teacher"], context)
    delta = p["delta"]
    if context.shape[0] != delta.shape[0]:
      return m
    return m + delta[jnp.arange(context.shape[0]), window_fill(context)].astype(m.dtype)

  def encode_all(p, x):  # a one-pass teacher: delta[:, t+1] nudges m_t directly
    m = teacher.encode_all(p["teacher"], x)
    return m + p["delta"].astype(m.dtype)

  return TeacherFns(
    encode=encode,
    decode=lambda p, m, xf: teacher.decode(p["teacher"], m, xf),
    encode_all=encode_all if teacher.encode_all is not None else None,
  )


def smt_memory_gradient_norms(
  loss_fn: Callable,
  params: Params,
  batch: dict[str, jax.Array],
  key: jax.Array | None,
  *,
  teacher: TeacherFns,
) -> jax.Array:
  """||dL/dm_t|| for every teacher memory m_t, t = -1 .. T-1, of a time-parallel SMT-style loss.

  Args:
    loss_fn: (params, batch, key, *, teacher: TeacherFns) -> (loss, aux), e.g.
      `functools.partial(smt_loss, rnn=..., context_length=T, future_length=...,
      num_transitions=T)`.
    params: {'teacher': ..., 'rnn': ...}. batch: x, y int [B, T] (an episode; Tc >= T).
    key: the loss's PRNG key. teacher: the teacher as pure functions.

  Returns:
    float32 [B, T+1]: column j is memory m_{j-1} (column 0 the initial memory E(empty)).
  """
  x = batch["x"]
  b, t = x.shape
  wrapped = perturbable_teacher(teacher)
  m_shape = jax.eval_shape(teacher.encode, params["teacher"], x[:, :1]).shape[1:]
  delta = jnp.zeros((b, t + 1, *m_shape), jnp.float32)

  def loss_of_delta(d):
    p = {"teacher": {"teacher": params["teacher"], "delta": d}, "rnn": params["rnn"]}
    return loss_fn(p, batch, key, teacher=wrapped)[0]

  g = jax.grad(loss_of_delta)(delta)
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1)))


# -------------------------------------------------------------------------------------------------
# Drift.


def drift_along_time(predicted: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
  """Drift of memories from their labels at each time step, over a batch.

    mse[t]          = mean over (b, k, d) of (predicted - target)^2
    one_minus_r2[t] = sum_b (predicted - target)^2 / sum_b (target - mean_b target)^2
                      (sums also over k, d; R^2 across the batch at time t: 0 is a perfect fit,
                      1 no better than the batch-mean memory at that time)

  Args:
    predicted, target: float [B, T, K, d].

  Returns:
    {'mse': float32 [T], 'one_minus_r2': float32 [T]}.
  """
  if predicted.shape != target.shape or predicted.ndim != 4:
    raise ValueError(
      f"predicted and target must both be [B, T, K, d]; got {predicted.shape} and {target.shape}."
    )
  p, t = predicted.astype(jnp.float32), target.astype(jnp.float32)
  sq = jnp.square(p - t)
  ss_tot = jnp.sum(jnp.square(t - jnp.mean(t, axis=0, keepdims=True)), axis=(0, 2, 3))
  return {
    "mse": jnp.mean(sq, axis=(0, 2, 3)),
    "one_minus_r2": jnp.sum(sq, axis=(0, 2, 3)) / jnp.maximum(ss_tot, 1e-12),
  }


def one_step_predictions(
  rnn: RNNFns, params: Params, memories: jax.Array, inputs: jax.Array
) -> jax.Array:
  """update(m_t, x_{t+1}) for every t at once (vmap over time): the SMT one-step transitions.

  Args:
    memories: [B, N, K, d], the states the RNN starts each step from (e.g. teacher memories).
    inputs: int [B, N], the input read at each step.

  Returns:
    [B, N, K, d].
  """
  return jax.vmap(rnn.update, in_axes=(None, 1, 1), out_axes=1)(params, memories, inputs)


# -------------------------------------------------------------------------------------------------
# Geometry.


def pca(x, num_components: int = 2) -> dict[str, np.ndarray]:
  """Principal components of the rows of x [N, F] (float64 NumPy, via SVD of the centred data).

  Returns:
    {'projection': [N, c], 'components': [c, F], 'mean': [F], 'explained_variance_ratio': [c]}.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"pca needs x [N >= 2, F], got shape {x.shape}.")
  if not 1 <= num_components <= min(x.shape):
    raise ValueError(f"num_components must be in [1, {min(x.shape)}], got {num_components}.")
  mean = x.mean(0)
  _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
  var = s**2
  return {
    "projection": (x - mean) @ vt[:num_components].T,
    "components": vt[:num_components],
    "mean": mean,
    "explained_variance_ratio": var[:num_components] / max(var.sum(), 1e-300),
  }


def participation_ratio(x) -> float:
  """Effective dimension of the rows of x [N, F]: (sum_i l_i)^2 / sum_i l_i^2 over the covariance
  eigenvalues l_i. 1 for points on a line; F for isotropic data. A collapsing memory has a small
  one.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"participation_ratio needs x [N >= 2, F], got shape {x.shape}.")
  s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
  return float(s.sum() ** 2 / max((s**2).sum(), 1e-300))


# -------------------------------------------------------------------------------------------------
# Sequential compute.


COUNTERS = ("xla", "matmul")


def count_flops(fn, *args, counter: str = "xla") -> float:
  """FLOPs of one call of `fn(*args)`: the one FLOP counter of the project.

  counter="xla": what XLA's HLO cost analysis counts (every op, elementwise included) for
    `jax.jit(fn).lower(*args)`; `fn` may also be a lowered or compiled function (no args), e.g.
    a train step as compiled, sharded. XLA counts a while loop's body once, so a `lax.scan` of n
    steps is undercounted n-fold, and on several devices it counts one device's share.
  counter="matmul": every `dot_general` of the traced jaxpr (2 x output size x contracted size),
    sub-jaxprs walked (jit, remat, custom rules), a scan body once per iteration, a cond's
    costliest branch, rematerialised recomputation included (it runs): the matmul work of a
    step, loops and all.

  Raises:
    ValueError: an unknown counter, or a backend whose XLA gives no cost analysis.
  """
  if counter == "matmul":
    return _matmul_flops(jax.make_jaxpr(fn)(*args))
  if counter != "xla":
    raise ValueError(f"counter must be one of {COUNTERS}, got {counter!r}.")
  stage = fn if isinstance(fn, (jax.stages.Lowered, jax.stages.Compiled)) else None
  try:
    cost = (stage or jax.jit(fn).lower(*args)).cost_analysis()
  except NotImplementedError:
    cost = None
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    raise ValueError(
      "count_flops: this backend's XLA gives no cost analysis; use counter='matmul'."
    )
  return float(cost["flops"])


def _matmul_flops(jaxpr) -> float:
  """`count_flops(counter="matmul")` of a (closed) jaxpr."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
      continue
    subs = [
      _matmul_flops(x)
      for v in eqn.params.values()
      for x in (v if isinstance(v, (list, tuple)) else [v])
      if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))
    ]
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    total += times * (max(subs, default=0.0) if eqn.primitive.name == "cond" else sum(subs))
  return float(total)


def serial_updates(method: str, *, seq_len: int, rollout_length: int = 0) -> int:
  """RNN updates on the serial critical path of one training step (the sequential depth):
  BPTT unrolls the whole sequence (T), DMT rolls out Td, SMT regresses every transition in
  parallel (1). `seq_flops_per_step` weighs them in FLOPs."""
  depth = {"bptt": seq_len, "dmt": rollout_length, "smt": 1}
  if method not in depth:
    raise ValueError(f"method must be 'bptt', 'smt' or 'dmt', got {method!r}.")
  return depth[method]


def seq_flops_per_step(
  method: str,
  *,
  seq_len: int,
  f_update: float,
  f_readout: float,
  f_encode: float = 0.0,
  f_decode: float = 0.0,
  rollout_length: int = 0,
  carry_grad: bool = False,
  truncation: int = 0,
) -> float:
  """FLOPs on the serial critical path of ONE training step, per sequence ("SeqFLOPs").

  Work that is independent (batch rows, the time positions SMT vmaps over, the readouts hanging
  off a rollout) runs in parallel and is counted once, at its longest branch; work that depends on
  the previous result is summed. A backward pass costs twice its forward pass.
    bptt: T chained updates forward and backward:            3 (T f_update + f_readout)
    smt:  encoder -> {update | decoder | readout} -> loss:   3 (f_encode + max(f_update, f_decode,
                                                             f_readout)); independent of T
    bptt, truncated every k steps: the forward is still T chained updates, but the backward
          of each k-step segment is independent of the others' (its carry is cut):
                                                             T f_update + f_readout
                                                             + 2 (k f_update + f_readout)
    dmt:  labels (parallel encoder), Td chained updates forward; the carried state is
          stop-gradient'ed, so the backward of every step is independent:
                                                             f_encode + Td f_update + f_readout
                                                             + 2 (f_update + f_readout)
    dmt with gradients through the rollout (`carry_grad`, the reference's default): the
          backward is chained too:                           f_encode + 3 (Td f_update + f_readout)
  Args:
    method: 'bptt', 'smt' or 'dmt'. seq_len: T (BPTT). rollout_length: Td (DMT).
    f_update / f_readout / f_encode / f_decode: FLOPs of one application for one sequence
      (encoder: one context window; decoder: the memory and its Tf future inputs).
    carry_grad: DMT's gradients flow through the rollout (`dmt_loss(stop_carry_grad=False)`).
    truncation: BPTT's truncation length k (0: full BPTT).
  """
  n = serial_updates(method, seq_len=seq_len, rollout_length=rollout_length)
  if method == "bptt":
    if 0 < truncation < seq_len:
      return n * f_update + f_readout + 2.0 * (truncation * f_update + f_readout)
    return 3.0 * (n * f_update + f_readout)
  if method == "smt":  # n = 1: the updates run beside the decoder and the readout
    return 3.0 * (f_encode + max(f_update, f_decode, f_readout))
  if carry_grad:
    return f_encode + 3.0 * (n * f_update + f_readout)
  return f_encode + n * f_update + f_readout + 2.0 * (f_update + f_readout)


__all__ = [
  "COUNTERS",
  "count_flops",
  "drift_along_time",
  "one_step_predictions",
  "participation_ratio",
  "pca",
  "perturbable_teacher",
  "rollout_state_gradient_norms",
  "seq_flops_per_step",
  "serial_updates",
  "smt_memory_gradient_norms",
  "window_fill",
]
