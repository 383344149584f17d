"""Where an SMT train step's time goes: each part of the step timed alone, forward and backward.

  python -m experiments.breakdown --config=experiments/configs/pixels.py
  python -m experiments.breakdown --config=experiments/configs/pixels.py:digits,reference \\
      --out=breakdown.json

The parts are those of `smt_jax.objectives.smt_loss`, on the config's shapes and a batch of its
vocabulary's uniform tokens: the teacher's encoder (every memory the step labels), its decoder (the
decoded memories), the RNN's update (every transition), its readout (L_readout), the uniformity
term, and the optimiser's update. Each is jitted alone as the gradient of a fixed random projection
of its output (so forward and backward are both timed) and its median over `--steps` calls is
reported beside the whole train step (`experiment.make_phase(...).step`, the runner's own). The
parts do not add up to the step exactly: XLA fuses across them inside the step, and the step has
its gathers, losses and bookkeeping besides. Wall-clock numbers on a shared machine are noisy:
compare the shares measured in one run.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from smt_jax import losses, objectives
from smt_jax.runner import experiment

config_flags.DEFINE_config_file(
  "config", "experiments/configs/pixels.py", "Path to a config file (and :arg).", lock_config=False
)
flags.DEFINE_integer("steps", 10, "Timed calls per part (the median is reported).")
flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
FLAGS = flags.FLAGS


def _median_s(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _projected(fn):
  """fn(*args) -> array, as the gradient of <fn(*args), r> for a fixed random r (fwd + bwd)."""

  def scalar(*args):
    out = fn(*args)
    r = jax.random.normal(jax.random.key(0), out.shape, jnp.float32)
    return jnp.vdot(out.astype(jnp.float32), r)

  return jax.jit(jax.grad(scalar, argnums=tuple(range(fn.__code__.co_argcount))))


def parts(config) -> dict[str, tuple]:
  """{part: (jitted fn, args)} for the SMT step of `config`, and 'step' for the whole."""
  exp = experiment.build_experiment(config)
  phase = experiment.make_phase(exp, "smt")
  s = exp.config.smt
  tfns, rfns = exp.fns
  params = exp.init_params()
  tp, rp = params["teacher"], params["rnn"]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, exp.source.vocab_size, (phase.batch_size, phase.source.seq_len + 1))
  batch = {"x": tokens[:, :-1].astype(np.int32), "y": tokens[:, 1:].astype(np.int32)}
  x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
  seq_len, key = x.shape[1], jax.random.key(0)
  src = objectives.transition_positions(seq_len, s.num_transitions, s.context_length, key)
  n = src.shape[0]
  times = jnp.arange(-1, seq_len) if n == seq_len else jnp.concatenate([src, src + 1])
  mem = jax.jit(lambda tp: objectives.teacher_memories(tfns, tp, x, times, s.context_length))(tp)
  m_src, m_tgt = (mem[:, :-1], mem[:, 1:]) if n == seq_len else (mem[:, :n], mem[:, n:])
  nd = s.num_decoded
  if nd:
    cand = times if n == seq_len else src  # the memories smt_loss picks from
    pick = objectives.decoded_memories(y, cand, s.future_length, nd, key)
    dec_t = cand[pick]
    m_dec = jnp.take_along_axis(mem if n == seq_len else m_src, pick[:, :, None, None], axis=1)
  else:
    dec_t, m_dec = src, m_src
  x_future = objectives.shifted(x, dec_t + 1, s.future_length)
  x_next = x[:, src + 1]

  def over_time(fn, in_axes):
    return jax.vmap(fn, in_axes=in_axes, out_axes=1)

  out = {
    "encoder": (
      _projected(lambda tp: objectives.teacher_memories(tfns, tp, x, times, s.context_length)),
      (tp,),
    ),
    "decoder": (
      _projected(lambda tp, m: over_time(tfns.decode, (None, 1, 1))(tp, m, x_future)),
      (tp, m_dec),
    ),
    "rnn update": (
      _projected(lambda rp, m: over_time(rfns.update, (None, 1, 1))(rp, m, x_next)),
      (rp, m_src),
    ),
  }
  if s.c_readout:  # as smt_loss: the decoded memories with num_decoded, else every target memory
    m_read = m_dec if nd else m_tgt
    out["readout"] = (_projected(lambda rp: over_time(rfns.readout, (None, 1))(rp, m_read)), (rp,))
  if s.c_unif:
    unif = lambda m: losses.uniformity_loss(m, key=key, max_samples=s.uniformity_max_samples)  # noqa: E731
    out["uniformity"] = (jax.jit(jax.grad(unif)), (m_src,))
  optimizer = experiment.make_optimizer(config, "smt", experiment.make_schedule(config, "smt"))
  opt_state = optimizer.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  out["optimiser"] = (
    jax.jit(lambda g, o, p: optimizer.update(g, o, p)),
    (grads, opt_state, params),
  )
  with jax.set_mesh(exp.mesh):
    state = phase.init_state(exp.init_params())
  sharded = {k: jax.device_put(v, exp.batch_sharding) for k, v in batch.items()}
  step = phase.step.lower(state, sharded, key).compile()

  def whole(state):
    new, _ = step(state, sharded, key)
    return new

  out["step"] = (whole, (state,))
  return out


def measure(config, steps: int) -> dict[str, float]:
  """{part: median seconds}, the whole step under 'step'."""
  result = {}
  for name, (fn, args) in parts(config).items():
    if name == "step":  # donates its state: thread it through the calls
      (st,) = args
      times = []
      for _ in range(steps + 1):
        t0 = time.perf_counter()
        st = jax.block_until_ready(fn(st))
        times.append(time.perf_counter() - t0)
      result[name] = float(np.median(times[1:]))
    else:
      result[name] = _median_s(fn, args, steps)
  return result


def format_table(result: dict[str, float]) -> str:
  whole = result["step"]
  rows = [f"{'part':<12} {'ms':>8} {'of step':>8}"]
  for name, s in result.items():
    rows.append(f"{name:<12} {1e3 * s:8.1f} {s / whole:8.0%}")
  parts_sum = sum(v for k, v in result.items() if k != "step")
  rows.append(f"{'sum of parts':<12} {1e3 * parts_sum:8.1f} {parts_sum / whole:8.0%}")
  return "\n".join(rows)


def main(argv):
  del argv
  config = FLAGS.config
  result = measure(config, FLAGS.steps)
  print(format_table(result))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
