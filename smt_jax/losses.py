"""The loss terms of Supervised Memory Training, as pure functions of arrays.

Nothing here imports Flax: arrays in, values out, so any JAX project can use these. Every function
checks its inputs' ranks, dtypes and shapes while tracing (cheap, before any compile) and raises a
`ValueError` saying what it expected; nothing broadcasts silently.

Conventions: a target of -1 means "no target here" and is masked out of every loss; memories have
the layout [..., K, d] (K memory tokens of width d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smt_jax.data.base import IGNORE  # the target value that marks "no target here"


def _check_ndim(name: str, x: jax.Array, min_ndim: int) -> None:
  if x.ndim < min_ndim:
    raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {x.shape}.")


def _check_int(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must hold integer token ids (dtype int), got dtype {x.dtype}.")


def _check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}.")


def _check_bool(name: str, x: jax.Array) -> None:
  if x.dtype != jnp.bool_:
    raise ValueError(
      f"{name} must be a boolean array (True = counts), got dtype {x.dtype}; "
      f"for weights, multiply the values instead."
    )


def _check_same_shape(a_name: str, a: jax.Array, b_name: str, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
      f"{a_name} and {b_name} must have the same shape (no broadcasting), got "
      f"{a.shape} and {b.shape}."
    )


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask` is true; 0 when nothing is selected (never NaN).

  Args: values float [...]; mask bool [...], the same shape (no broadcasting, no weights).
  """
  _check_float("values", values)
  _check_bool("mask", mask)
  _check_same_shape("values", values, "mask", mask)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross-entropy, zero where there is no target.

  Args:
    logits: float [..., V].
    targets: int [...], values in [0, V) or -1 (no target).

  Returns:
    (ce, mask): ce float32 [...] with `-log softmax(logits)[target]` (0 where target == -1), and the
    boolean mask [...] of positions that have a target.
  """
  _check_float("logits", logits)
  _check_int("targets", targets)
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
      f"logits must be targets.shape + (V,): got logits {logits.shape} for targets {targets.shape}."
    )
  mask = targets != IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(mask, targets, 0)
  ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.where(mask, ce, 0.0), mask


def decoding_loss(logits: jax.Array, targets: jax.Array, *, gamma: float = 1.0) -> jax.Array:
  """The predictive-state loss L_dec: discounted cross-entropy over the future window.

  L_dec = sum_{n,j} gamma^j * CE(logits[n, j], y[n, j]) * [y[n, j] != -1] / #{(n, j): y[n, j] != -1}

  Args:
    logits: float [..., Tf, V], the decoder's predictions for future steps j = 0..Tf-1.
    targets: int [..., Tf], -1 where there is no target.
    gamma: discount of future step j (gamma ** j); 1 weighs every step equally.

  Returns:
    Scalar loss: the gamma-weighted sum divided by the number of targets.
  """
  _check_ndim("logits", logits, 2)
  if not gamma > 0:
    raise ValueError(f"gamma must be > 0, got {gamma}.")
  ce, mask = masked_cross_entropy(logits, targets)
  weights = gamma ** jnp.arange(targets.shape[-1], dtype=jnp.float32)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(mask), 1)


def dynamics_loss(
  predicted: jax.Array, target: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """The transition loss L_dyn: mean squared error between predicted and label memories.

  Args:
    predicted: float [..., K, d], e.g. update(m_t, x_{t+1}).
    target: float [..., K, d], e.g. m_{t+1} from the teacher (same shape).
    mask: optional bool [...] (the leading dims), which transitions count.

  Returns:
    Scalar: mean over K, d and the selected transitions of (predicted - target)^2.
  """
  _check_float("predicted", predicted)
  _check_float("target", target)
  _check_same_shape("predicted", predicted, "target", target)
  _check_ndim("predicted", predicted, 2)
  per = jnp.mean(
    jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32)), axis=(-2, -1)
  )
  if mask is None:
    return jnp.mean(per)
  _check_bool("mask", mask)
  if mask.shape != per.shape:
    raise ValueError(f"mask must have the memories' leading shape {per.shape}, got {mask.shape}.")
  return masked_mean(per, mask)


def uniformity_loss(
  tokens: jax.Array,
  *,
  key: jax.Array | None = None,
  max_samples: int = 512,
  temperature: float = 2.0,
) -> jax.Array:
  """The uniformity loss L_unif, which keeps memories from collapsing (Wang & Isola, 2020).

  z_i = tokens_i / (||tokens_i|| + eps) (eps = float32's, as the reference), over at most
  `max_samples` tokens (a random subset when `key` is given, else the first ones), and

    L_unif = log( mean_{i != j} exp(-t * ||z_i - z_j||^2) ),

  evaluated with logsumexp for stability.

  Args:
    tokens: float [..., d]; every leading index is one memory token.
    key: PRNG key for the random subset (None: the first `max_samples` tokens).
    max_samples: at most this many tokens enter the pairwise sum.
    temperature: t.

  Returns:
    Scalar in [-4t, 0]: 0 when every token is the same direction.
  """
  _check_float("tokens", tokens)
  _check_ndim("tokens", tokens, 2)
  if max_samples < 2:
    raise ValueError(f"max_samples must be >= 2, got {max_samples}.")
  z = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
  n = z.shape[0]
  if n < 2:
    raise ValueError(f"uniformity_loss needs at least 2 tokens, got {n}.")
  if n > max_samples:
    idx = (
      jax.random.permutation(key, n)[:max_samples] if key is not None else jnp.arange(max_samples)
    )
    z = z[idx]
    n = max_samples
  z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + jnp.finfo(jnp.float32).eps)
  # ||z_i - z_j||^2 = |z_i|^2 + |z_j|^2 - 2 <z_i, z_j> (clipped against rounding below zero).
  n2 = jnp.sum(jnp.square(z), axis=-1)
  sq = jnp.maximum(n2[:, None] + n2[None, :] - 2.0 * z @ z.T, 0.0)
  logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, -temperature * sq)
  return jax.nn.logsumexp(logits) - jnp.log(n * (n - 1.0))


def drift(predicted: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
  """How far memories stray from their labels: MSE and 1 - R^2.

  1 - R^2 = sum (predicted - target)^2 / sum (target - mean(target))^2, the mean taken per feature
  over every leading index (samples, times); 0 is a perfect fit, 1 is no better than the mean
  memory.

  Args:
    predicted: float [..., K, d] (e.g. the RNN's own rollout).
    target: float [..., K, d] (e.g. the teacher's memories), same shape.

  Returns:
    {'mse': scalar, 'one_minus_r2': scalar}.
  """
  _check_float("predicted", predicted)
  _check_float("target", target)
  _check_same_shape("predicted", predicted, "target", target)
  _check_ndim("predicted", predicted, 2)
  p = predicted.reshape(-1, *predicted.shape[-2:]).astype(jnp.float32)
  t = target.reshape(-1, *target.shape[-2:]).astype(jnp.float32)
  ss_res = jnp.sum(jnp.square(p - t))
  ss_tot = jnp.sum(jnp.square(t - jnp.mean(t, axis=0, keepdims=True)))
  return {"mse": jnp.mean(jnp.square(p - t)), "one_minus_r2": ss_res / jnp.maximum(ss_tot, 1e-12)}
