"""Does the parallel rollout pay? Iterations, serial FLOPs and wall time against `lax.scan`'s.

For each run (--workdirs) at each checkpoint (--steps; default: the initial parameters, the end of
SMT and the end of DMT), the RNN rolls out for Td = --lengths steps from its own initial memory
over held-out tokens (a stream's eval split; episodes are laid end to end past their length),
and the table gives, per Td and Jacobian approximation:
  fwd iters   iterations of `smt_jax.parallel.solve_rollout` to --tol (at most Td)
  bwd iters   iterations of the adjoint (`solve_adjoint`) for a DMT-like gradient (labels every
              dmt.label_every states)
  max error   the parallel states against the sequential rollout
  SeqFLOPs    sequential / parallel serial FLOPs of DMT's rollout with its backward: sequential
              3 Td f_update; parallel, per forward iteration f_update (+ 2 f_update for the
              diagonal's JVPs, all at once), per adjoint iteration 2 f_update, then 4 f_update
              (the parameters' VJP, the diagonal), and 3 n log2(Td) per scan (n = K d)
and, per checkpoint, the largest Lyapunov exponent along the rollout (mean log growth of a tangent
per step: below 0 the rollout forgets perturbations, which is when few iterations suffice), and
the wall time of the DMT loss's value and gradient both ways at the config's own Td, alternated.
With --drift_rows, also the RNN's drift from its teacher along held-out rows (the eval split at
the source's length T): the MSE of the rollout from the RNN's own initial memory against the
teacher's memories m_t, per quarter of T, and of the one-step predictions update(m_{t-1}, x[t])
from the teacher's memories (what SMT regresses).

  python -m experiments.rollout_check --workdirs=runs/pixels_digits --out=docs/rollout_check
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from experiments.studies import common, drift
from smt_jax import objectives, parallel
from smt_jax.models import layers
from smt_jax.runner import config as config_lib
from smt_jax.runner import experiment


def define_flags() -> None:
  """The command line's flags; defined only when run as a program (tests import the module)."""
  flags.DEFINE_list("workdirs", [], "Runs to read (their config.json and checkpoints).")
  flags.DEFINE_list("steps", [], "Checkpoint steps (default: 0, the end of smt, the end of dmt).")
  flags.DEFINE_list("lengths", ["32", "64", "128", "256", "512"], "Rollout lengths Td.")
  flags.DEFINE_list("jacobians", list(parallel.JACOBIANS), "Jacobian approximations.")
  flags.DEFINE_integer("rows", 2, "Rows rolled out (and in the timed DMT batch).")
  flags.DEFINE_integer(
    "diag_max_length", 128, "Longest Td for jacobian=diag (K d JVPs per state: slow on a CPU)."
  )
  flags.DEFINE_float("tol", 1e-5, "The iterations' relative change to stop at.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats of each DMT loss (alternated).")
  flags.DEFINE_integer(
    "dmt_length", 0, "Td of the DMT loss check (0: the run's dmt.rollout_length)."
  )
  flags.DEFINE_integer("drift_rows", 0, "Held-out rows for the drift from the teacher (0: none).")
  flags.DEFINE_string("out", "", "Folder for rollout_check.json and .md ('' = print only).")


FLAGS = flags.FLAGS


def tokens(exp, rows: int, length: int) -> jax.Array:
  """Held-out tokens [rows, length]: a stream's, or eval episodes laid end to end."""
  if not exp.config.data.episodic:
    return common.eval_batch(exp, seq_len=length, batch_size=rows)["x"].astype(jnp.int32)
  seq = config_lib.phase_seq_len(exp.config, "eval")
  parts = [
    np.asarray(common.eval_batch(exp, batch_size=rows, step=i)["x"])
    for i in range(-(-length // seq))
  ]
  return jnp.asarray(np.concatenate(parts, axis=1)[:, :length], jnp.int32)


def lyapunov(update, p, m0, x) -> dict:
  """The largest Lyapunov exponent along the rollout (mean log growth per step of a tangent, past
  a transient), split into its two factors: the update before the memory's RMS normalisation
  (`pre_norm`) and the normalisation itself (`norm`: its tangential scale 1 / rms(h) and the
  radial direction it removes), with `rms_h`, the mean rms of the pre-normalised memory h.

  The pre-normalised update is the RNN's own with `layers.rms_normalize`, its last op (for every
  kind), traced as the identity; the normalisation is then applied here, so `exponent` is the
  update's own.
  """
  v0 = jax.random.normal(jax.random.key(0), m0.shape)
  v0 = v0 / jnp.linalg.norm(v0.reshape(v0.shape[0], -1), axis=1)[:, None, None]
  row_norm = lambda v: jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=1)

  def step(carry, x_t):
    m, v = carry
    h, u = jax.jvp(lambda m: update(p, m, x_t), (m,), (v,))
    m, w = jax.jvp(normalize, (h,), (u,))
    rms = jnp.mean(jnp.sqrt(jnp.mean(jnp.square(h), axis=-1)))  # per memory token
    return (m, w / row_norm(w)[:, None, None]), (jnp.log(row_norm(u)), jnp.log(row_norm(w)), rms)

  normalize = layers.rms_normalize
  with mock.patch.object(layers, "rms_normalize", lambda h: h):
    _, (pre, full, rms) = jax.lax.scan(step, (m0, v0), x.T)
  past = slice(x.shape[1] // 4, None)  # past a transient
  return dict(
    exponent=float(jnp.mean(full[past])),
    pre_norm=float(jnp.mean(pre[past])),
    norm=float(jnp.mean(full[past] - pre[past])),
    rms_h=float(jnp.mean(rms[past])),
  )


def seq_flops(fu: float, n: int, td: int, fwd: int, bwd: int, jacobian: str) -> tuple[float, float]:
  """(sequential, parallel) serial FLOPs of DMT's rollout with its backward, per row."""
  scan = 3.0 * n * math.log2(td)
  per_fwd = fu * (3.0 if jacobian == "diag" else 1.0) + scan
  return 3.0 * td * fu, fwd * per_fwd + bwd * (2.0 * fu + scan) + 4.0 * fu


def check(
  workdir: str,
  steps: list[int],
  *,
  lengths: list[int],
  jacobians: list[str],
  rows: int,
  tol: float,
  repeats: int,
  diag_max_length: int,
  dmt_length: int = 0,
  drift_rows: int = 0,
) -> dict:
  """The measures of the module docstring for one run: {'rows': per (step, Td, jacobian),
  'lyapunov': per step, 'dmt': the DMT loss both ways per step, 'drift': per step (with
  drift_rows)}."""
  cfg = config_lib.complete(
    ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  )
  if dmt_length:
    cfg.dmt.rollout_length = dmt_length
  if not steps:
    steps = [0] + [common.phase_end_step(cfg, p) for p in config_lib.phase_names(cfg)]
  rows_out, lyap, timing, drifts, exp = [], {}, {}, {}, None
  for step in steps:
    restored, params = common.restore(cfg, workdir, step)
    if exp is None:  # one experiment, so each function below compiles once per shape
      exp = restored
      _, rnn = exp.fns
      fu = experiment.unit_flops(exp)["update"]
      sequential = jax.jit(lambda p, m, x: objectives.rollout(p, m, x, update=rnn.update))
      solve, adjoint = (
        jax.jit(functools.partial(f, update=rnn.update, tol=tol), static_argnames="jacobian")
        for f in (parallel.solve_rollout, parallel.solve_adjoint)
      )
      dmt = dmt_losses(
        cfg,
        exp,
        [j for j in jacobians if j != "diag" or cfg.dmt.rollout_length <= diag_max_length],
        tol,
      )
      dmt_batch = common.eval_batch(exp, source=exp.source_at("dmt"), batch_size=rows)
    p = params["rnn"]
    n = cfg.model.num_memory_tokens * cfg.model.width
    x_all = tokens(exp, rows, max(lengths))
    m0 = jnp.broadcast_to(rnn.initial_memory(p), (rows, *rnn.initial_memory(p).shape))
    lyap[step] = lyapunov(rnn.update, p, m0, x_all)
    if drift_rows:
      drifts[step] = drift_from_teacher(exp, cfg, params, drift_rows)
    for td in lengths:
      x = x_all[:, :td]
      want = sequential(p, m0, x)
      k = cfg.dmt.label_every
      g = jax.random.normal(jax.random.key(1), want.shape)
      g = g * (jnp.arange(1, td + 1) % k == 0)[None, :, None, None]
      for jac in jacobians:
        if jac == "diag" and td > diag_max_length:
          continue
        states, info = solve(p, m0, x, jacobian=jac)
        _, binfo = adjoint(p, m0, x, states, g, jacobian=jac)
        fwd, bwd = int(info.iterations), int(binfo.iterations)
        seq, par = seq_flops(fu, n, td, fwd, bwd, jac)
        rows_out.append(
          dict(
            step=step,
            td=td,
            jacobian=jac,
            fwd_iters=fwd,
            bwd_iters=bwd,
            max_error=float(jnp.max(jnp.abs(states - want))),
            seqflops_ratio=seq / par,
          )
        )
        print(json.dumps(rows_out[-1]), flush=True)
    timing[step] = time_dmt(dmt, params, dmt_batch, repeats)
    timing[step]["td"] = int(cfg.dmt.rollout_length)
  return dict(
    workdir=workdir, kind=cfg.model.rnn_kind, rows=rows_out, lyapunov=lyap, dmt=timing, drift=drifts
  )


def drift_from_teacher(exp, cfg, params, rows: int) -> dict:
  """The RNN's rollout and one-step MSE against the teacher's memories on held-out rows:
  {'t': T, 'rollout': [4] (per quarter of T), 'one_step': the mean over T}."""
  c = drift.curves_for(exp, cfg, params, common.eval_batch(exp, batch_size=rows))
  roll = c["rollout_mse"]
  return dict(
    t=len(roll),
    rollout=[float(q.mean()) for q in np.array_split(roll, 4)],
    one_step=float(c["one_step_mse"].mean()),
  )


def dmt_losses(cfg, exp, jacobians, tol) -> dict:
  """The DMT loss's value and gradient, jitted: sequential, and parallel with each Jacobian."""
  fns = {}
  for solver in ["sequential"] + [f"parallel_{j}" for j in jacobians]:
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.dmt.rollout = solver.split("_")[0]
    c.dmt.parallel_jacobian = solver.split("_")[-1]
    c.dmt.parallel_tol = tol
    fns[solver] = jax.jit(jax.value_and_grad(experiment.make_loss(c, "dmt", exp.fns), has_aux=True))
  return fns


def time_dmt(fns, params, batch, repeats) -> dict:
  """Each DMT loss at the run's Td on held-out rows: its value, the difference to the sequential
  one, its rollout's iterations and its seconds per call (alternated, median)."""
  out = {}
  for solver, fn in fns.items():
    (value, metrics), _ = jax.block_until_ready(fn(params, batch, None))
    out[solver] = dict(loss=float(value), iters=float(metrics.get("rollout_iters", 0)), s=[])
  for _ in range(repeats):
    for solver, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, batch, None))
      out[solver]["s"].append(time.perf_counter() - t0)
  for v in out.values():
    v["s"] = float(np.median(v["s"]))
    v["loss_difference"] = abs(v["loss"] - out["sequential"]["loss"])
  return out


def run_name(workdir: str) -> str:
  """A run's name in the tables: its folder's, or for a compare's method (`runs/x/smt_dmt`) both
  folders' (`x/smt_dmt`)."""
  parts = os.path.normpath(workdir).split(os.sep)
  return "/".join(parts[-2:]) if parts[-1] in ("smt_dmt", "bptt") else parts[-1]


def markdown(results: list[dict]) -> str:
  lines = [
    "| run (RNN) | checkpoint | Lyapunov exp. | Td | jacobian | fwd iters | bwd iters | max error "
    "| SeqFLOPs seq/par |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    for row in r["rows"]:
      lines.append(
        f"| {run_name(r['workdir'])} ({r['kind']}) | {row['step']} | "
        f"{r['lyapunov'][row['step']]['exponent']:+.3f} | {row['td']} | {row['jacobian']} "
        f"| {row['fwd_iters']} | {row['bwd_iters']} | {row['max_error']:.1e} "
        f"| {row['seqflops_ratio']:.2f} |"
      )
  lines += [
    "",
    "| run | checkpoint | Lyapunov exp. | = update before the norm | + the RMS norm | rms(h) |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    for step, v in r["lyapunov"].items():
      lines.append(
        f"| {run_name(r['workdir'])} | {step} | {v['exponent']:+.3f} "
        f"| {v['pre_norm']:+.3f} | {v['norm']:+.3f} | {v['rms_h']:.3f} |"
      )
  if any(r["drift"] for r in results):
    lines += [
      "",
      "| run | checkpoint | T | rollout MSE, quarters of T | one-step MSE |",
      "|---|---|---|---|---|",
    ]
    for r in results:
      for step, v in r["drift"].items():
        lines.append(
          f"| {run_name(r['workdir'])} | {step} | {v['t']} "
          f"| {', '.join(f'{q:.3f}' for q in v['rollout'])} | {v['one_step']:.4f} |"
        )
  lines += [
    "",
    "| run | checkpoint | Td | rollout | DMT loss | - sequential's | iters | s per call |",
  ]
  lines.append("|---|---|---|---|---|---|---|---|")
  for r in results:
    for step, t in r["dmt"].items():
      for solver, v in t.items():
        if solver == "td":
          continue
        lines.append(
          f"| {run_name(r['workdir'])} | {step} | {t['td']} | {solver} | {v['loss']:.5f} "
          f"| {v['loss_difference']:.1e} | {v['iters']:.0f} | {v['s']:.3f} |"
        )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not FLAGS.workdirs:
    raise app.UsageError("--workdirs: give at least one run, e.g. --workdirs=runs/pixels_digits.")
  opts = dict(
    lengths=[int(v) for v in FLAGS.lengths],
    jacobians=FLAGS.jacobians,
    rows=FLAGS.rows,
    tol=FLAGS.tol,
    repeats=FLAGS.repeats,
    diag_max_length=FLAGS.diag_max_length,
    dmt_length=FLAGS.dmt_length,
    drift_rows=FLAGS.drift_rows,
  )
  results = [check(w, [int(s) for s in FLAGS.steps], **opts) for w in FLAGS.workdirs]
  md = markdown(results)
  print(md)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "rollout_check.json"), "w") as f:
      json.dump(results, f, indent=1, default=str)
    with open(os.path.join(FLAGS.out, "rollout_check.md"), "w") as f:
      f.write(md)


if __name__ == "__main__":
  define_flags()
  app.run(main)
