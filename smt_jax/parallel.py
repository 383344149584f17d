"""The RNN's rollout solved in parallel over time: quasi-Newton fixed-point iterations (quasi-DEER).

The rollout s_i = f(s_{i-1}, x_i), i = 1..L, from s_0 is the fixed point of S -> F(S) with
F(S)_i = f(S_{i-1}, x_i). Newton's method on it (DEER, Lim et al. 2024) linearises f around the
current guess S^k and solves the linear recurrence

  s_i = A_i s_{i-1} + f(s^k_{i-1}, x_i) - A_i s^k_{i-1}

with `jax.lax.associative_scan` (depth log L). quasi-DEER (Gonzalez et al. 2024) takes A_i =
diag(df/ds at s^k_{i-1}): an elementwise scan. Each iteration evaluates f at every position at
once (one parallel application, no chain); the serial work per iteration is a few applications of
f, not L.

Whatever A is, iteration k leaves s_1 .. s_k exact (s_i depends only on s_{i-1}, which is exact
after k-1 iterations, and there the linear term cancels): L iterations always reach the
sequential rollout. A good A makes far fewer enough when f is contractive along the rollout.
`jacobian`:
  'diag'  the exact diagonal of the Jacobian (quasi-DEER): one JVP per state coordinate,
          independent of each other (parallel work, K*d times f's FLOPs in total);
  'none'  A = 0: Picard / Jacobi iterations (each iteration one application of f); the default:
          on the SMT-trained RNNs measured (docs/benchmarks.md) 'diag' saved few iterations, each
          3x the serial FLOPs.
`damping` (lambda >= 0) shrinks A to A / (1 + lambda): where f expands (|diagonal| > 1) the
products of A along the scan otherwise blow up. It is the trust-region effect of ELK's
Levenberg-Marquardt step (Gonzalez et al. 2024) in its simplest form, a scaled diagonal, not ELK's
Kalman smoother, and it keeps the L-iteration guarantee above. The diagonal is clipped to [-1, 1]
so that its products along the scan cannot overflow (at initialisation they do, and an inf breaks
the guarantee); the fixed point does not depend on A, only how fast it is reached.

Gradients (`parallel_rollout` is a `jax.custom_vjp`): the adjoint of the converged rollout,
lambda_i = g_i + J_{i+1}^T lambda_{i+1}, is a linear recurrence backwards in time, solved by the
same iterations (a VJP of f at every position in parallel, the diagonal scan in reverse); then
the parameters' gradient is one VJP of f at every position at once. It equals the sequential
rollout's gradient to the tolerance, and exactly after L iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

JACOBIANS = ("diag", "none")


class SolveInfo(NamedTuple):
  """How a solve ended: iterations taken, and the last iteration's largest change (relative to
  the largest |entry|)."""

  iterations: jax.Array  # int32 []
  change: jax.Array  # float32 []


def linear_recurrence(
  a: jax.Array, b: jax.Array, s0: jax.Array, reverse: bool = False
) -> jax.Array:
  """s_i = a_i * s_{i-1} + b_i for i = 1..L (elementwise), from s0, by an associative scan.

  a, b: [B, L, ...]; s0: [B, ...]. Returns s_1..s_L, [B, L, ...]. With `reverse`, the recurrence
  runs from the end: s_i = a_i * s_{i+1} + b_i, s_{L+1} = s0.
  """
  edge = 0 if not reverse else -1
  b = b.at[:, edge].add(a[:, edge] * s0)

  def combine(first, second):  # apply `first`, then `second`
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2

  _, s = jax.lax.associative_scan(combine, (a, b), axis=1, reverse=reverse)
  return s


def jacobian_diagonal(f: Callable[[jax.Array], jax.Array], m: jax.Array) -> jax.Array:
  """diag(df/dm) per row of a batched f: m [M, K, d] -> [M, K, d] (rows independent of each
  other). One JVP per coordinate of a row's state (K*d of them), all at once."""
  shape = m.shape[1:]
  basis = jnp.eye(math.prod(shape), dtype=m.dtype).reshape((-1, *shape))

  def tangent(e):  # d f / d m along e for every row; only the coordinate e points at survives
    _, t = jax.jvp(f, (m,), (jnp.broadcast_to(e, m.shape),))
    return t * e

  return jnp.sum(jax.vmap(tangent)(basis), axis=0)


def _flat_update(update: Callable, params, inputs: jax.Array) -> Callable:
  """f(S_prev) at every position at once: S_prev [B, L, K, d] with inputs [B, L]."""
  b, n = inputs.shape

  def f(prev):
    out = update(params, prev.reshape((b * n, *prev.shape[2:])), inputs.reshape(-1))
    return out.reshape(prev.shape)

  return f


def _shift(s0: jax.Array, states: jax.Array) -> jax.Array:
  """(s_0 .. s_{L-1}): the state each position's update reads."""
  return jnp.concatenate([s0[:, None], states[:, :-1]], axis=1)


def _iterate(step: Callable, guess: jax.Array, *, tol: float, max_iters: int):
  """guess <- step(guess) until the largest change is <= tol x the largest |entry| (the states
  have unit RMS; an adjoint has the loss's scale), or max_iters iterations."""

  def cond(carry):
    _, k, change = carry
    return (k < max_iters) & (change > tol)

  def body(carry):
    s, k, _ = carry
    new = step(s)
    change = jnp.max(jnp.abs(new - s)) / jnp.maximum(jnp.max(jnp.abs(new)), 1e-30)
    return new, k + 1, change.astype(jnp.float32)

  s, k, change = jax.lax.while_loop(
    cond, body, (guess, jnp.int32(0), jnp.array(jnp.inf, jnp.float32))
  )
  return s, SolveInfo(k, change)


def _diagonal(jacobian: str, f: Callable, prev: jax.Array, damping: float) -> jax.Array:
  if jacobian == "none":
    return jnp.zeros_like(prev)
  flat = prev.reshape((-1, *prev.shape[2:]))
  fflat = lambda m: f(m.reshape(prev.shape)).reshape(flat.shape)  # noqa: E731
  a = jacobian_diagonal(fflat, flat).reshape(prev.shape) / (1.0 + damping)
  # |a| <= 1: a product of diagonals along the scan cannot overflow (an inf would break the
  # L-iteration guarantee); the fixed point does not depend on a.
  return jnp.clip(a, -1.0, 1.0)


def solve_rollout(
  params,
  memory: jax.Array,
  inputs: jax.Array,
  *,
  update: Callable,
  jacobian: str = "none",
  damping: float = 0.0,
  tol: float = 1e-6,
  max_iters: int | None = None,
  guess: jax.Array | None = None,
) -> tuple[jax.Array, SolveInfo]:
  """The rollout's states [B, L, K, d] by quasi-Newton iterations, and how the solve ended.

  Forward only (no gradient: `parallel_rollout` differentiates it). `guess` (default: s_0 at
  every position) starts the iterations; `max_iters` (default L) caps them.
  """
  _check(memory, inputs, jacobian, damping, tol)
  num = inputs.shape[1]
  max_iters = num if max_iters is None else max_iters
  f = _flat_update(update, params, inputs)
  if guess is None:
    guess = jnp.broadcast_to(memory[:, None], (memory.shape[0], num, *memory.shape[1:]))

  def step(states):
    prev = _shift(memory, states)
    a = _diagonal(jacobian, f, prev, damping)
    return linear_recurrence(a, f(prev) - a * prev, memory)

  return _iterate(step, guess, tol=tol, max_iters=max_iters)


def solve_adjoint(
  params,
  memory: jax.Array,
  inputs: jax.Array,
  states: jax.Array,
  g: jax.Array,
  *,
  update: Callable,
  jacobian: str = "none",
  damping: float = 0.0,
  tol: float = 1e-6,
  max_iters: int | None = None,
) -> tuple[jax.Array, SolveInfo]:
  """The rollout's adjoint lambda [B, L, K, d] (the loss's total gradient w.r.t. each state) from
  its direct gradient g, by the same iterations run backwards in time, and how the solve ended:

    lambda_i = g_i + J_{i+1}^T lambda_{i+1},  J_{i+1} = d f(s_i, x_{i+1}) / d s_i.
  """
  cap = inputs.shape[1] if max_iters is None else max_iters
  prev = _shift(memory, states)
  f = _flat_update(update, params, inputs)
  _, vjp_state = jax.vjp(f, prev)  # vjp_state(v)[:, j] = J_j^T v_j: J_j reads prev[:, j]
  a = _diagonal(jacobian, f, prev, damping)  # diag(J^T) = diag(J)
  later = lambda v: jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)  # noqa: E731
  a_next = later(a)  # the last state feeds no update

  def step(lam):
    back = later(vjp_state(lam)[0])
    return linear_recurrence(a_next, g + back - a_next * later(lam), jnp.zeros_like(memory), True)

  return _iterate(step, g, tol=tol, max_iters=cap)


def parallel_rollout(
  params,
  memory: jax.Array,
  inputs: jax.Array,
  *,
  update: Callable,
  jacobian: str = "none",
  damping: float = 0.0,
  tol: float = 1e-6,
  max_iters: int | None = None,
) -> tuple[jax.Array, SolveInfo]:
  """`objectives.rollout`'s states [B, L, K, d] (states[:, i] has read inputs[:, :i+1]), solved
  in parallel over time, with the forward solve's `SolveInfo`. Differentiable in `params` and
  `memory` (the adjoint solved in parallel too; module docstring)."""
  _check(memory, inputs, jacobian, damping, tol)
  num = inputs.shape[1]
  cap = num if max_iters is None else max_iters
  opts = dict(jacobian=jacobian, damping=damping, tol=tol, max_iters=cap)

  @jax.custom_vjp
  def run(params, memory):
    return solve_rollout(params, memory, inputs, update=update, **opts)

  def fwd(params, memory):
    states, info = solve_rollout(params, memory, inputs, update=update, **opts)
    return (states, info), (params, memory, states)

  def bwd(res, cotangents):
    params, memory, states = res
    lam, _ = solve_adjoint(params, memory, inputs, states, cotangents[0], update=update, **opts)
    f = lambda p, prev: _flat_update(update, p, inputs)(prev)  # noqa: E731
    _, vjp = jax.vjp(f, params, _shift(memory, states))
    d_params, d_prev = vjp(lam)  # d_prev[:, 0]: the initial memory's
    return d_params, d_prev[:, 0]

  run.defvjp(fwd, bwd)
  return run(params, memory)


def check_rollout_inputs(memory: jax.Array, inputs: jax.Array) -> None:
  """A rollout's inputs are int [B, L] and its memory [B, K, d] with the same B (one line each)."""
  if inputs.ndim != 2 or not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f"inputs must be int [B, L], got {inputs.dtype} {inputs.shape}.")
  if memory.ndim < 2 or memory.shape[0] != inputs.shape[0]:
    raise ValueError(
      f"memory must be [B, K, d] with the inputs' batch size B = {inputs.shape[0]} "
      f"(no broadcasting), got {memory.shape}."
    )


def _check(memory, inputs, jacobian, damping, tol) -> None:
  check_rollout_inputs(memory, inputs)
  if jacobian not in JACOBIANS:
    raise ValueError(f"jacobian must be one of {JACOBIANS}, got {jacobian!r}.")
  if damping < 0 or not tol > 0:
    raise ValueError(f"damping must be >= 0 and tol > 0, got damping={damping}, tol={tol}.")
