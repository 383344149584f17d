"""The optimiser recipe of the runner, for any project: AdamW per model, frozen models untouched.

    tx = adamw_per_model(3e-4)                          # SMT: teacher and RNN train together
    tx = adamw_per_model(3e-5, frozen=("teacher",))     # DMT: only the RNN trains
    state = tx.init(params)                             # params = {'teacher': ..., 'rnn': ...}

Why not one `optax.adamw` over the whole tree:
  - A frozen model must get zero updates, not only zero gradients. The objectives stop the
    teacher's gradient in DMT, but AdamW's decoupled weight decay adds -lr * wd * p to every
    update whatever the gradient, so the "frozen" teacher would shrink by a factor (1 - lr * wd)
    per step (and its Adam moments would still be carried). `optax.set_to_zero()` on it instead.
  - Clipping is by global norm per model (docs/method.md 6): the teacher's gradient, large early
    in SMT, must not scale down the RNN's step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax


def adamw_per_model(
  learning_rate: float | optax.Schedule,
  *,
  frozen: Sequence[str] = (),
  models: Sequence[str] = ("teacher", "rnn"),
  b1: float = 0.9,
  b2: float = 0.95,
  weight_decay: float = 0.01,
  clip_norm: float = 1.0,
  decay_all: bool = False,
) -> optax.GradientTransformation:
  """AdamW with global-norm clipping for each model of a {name: params} tree; frozen ones fixed.

  Args:
    learning_rate: a float or an optax schedule (the runner: linear warm-up over the first 1% of
      steps, then constant for SMT and BPTT, cosine decay for DMT).
    frozen: the models whose updates are zero (DMT: ("teacher",)); their parameters stay
      bit-identical and they hold no optimiser state.
    models: the top-level keys of the parameter tree, each its own clip and AdamW.
    b1, b2, weight_decay, clip_norm: the published defaults (0.9, 0.95, 0.01, 1.0).
    decay_all: False decays matrices only (ndim >= 2, not biases or norm gains); True decays
      every parameter (the reference's `torch.optim.AdamW`).

  Returns:
    An optax transformation over {name: params for name in models}.
  """
  unknown = sorted(set(frozen) - set(models))
  if unknown:
    raise ValueError(f"adamw_per_model: frozen={unknown} not among models={list(models)}.")
  decayed = None if decay_all else (lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))

  def one_model():
    return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=decayed),
    )

  transforms = {name: optax.set_to_zero() if name in frozen else one_model() for name in models}
  return optax.multi_transform(transforms, {name: name for name in models})
