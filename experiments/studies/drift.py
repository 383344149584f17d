"""Study: drift of the RNN's memories from the teacher's (docs/method.md 9.6).

Along the sequence: on held-out episodes, the RNN's own rollout from its initial memory
(`smt_jax.read`) against the teacher memories m_t = E(x[..t]), per time step, after SMT and after
SMT->DMT (the probe study's run, seed 0). One-step drift: update(m_t, x[t+1]) from the TEACHER's
memory against m_{t+1}, the quantity SMT regresses. Rollout drift compounds one-step errors; DMT
trains on the RNN's own rollout to remove that.

Across SMT settings: SMT-only runs with other dynamics / uniformity weights (c_dyn, c_unif), same
steps; one-step vs rollout drift (1 - R^2) at the end of SMT.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.studies import common, probes
from smt_jax import analysis, inference, objectives

DEFAULT = (0.1, 1e-3)  # (c_dyn, c_unif) of the probe runs (docs/method.md 5.1's defaults)


@functools.partial(jax.jit, static_argnames=("rnn", "teacher", "context_length"))
def drift_curves(params, batch, *, rnn, teacher, context_length):
  """Per-time drift [T] of the rollout and of one-step predictions vs the teacher's memories."""
  x = batch["x"]
  t = x.shape[1]
  mem = objectives.teacher_memories(
    teacher, params["teacher"], x, jnp.arange(-1, t), context_length
  )  # [B, T+1, K, d]: m_{-1} .. m_{T-1}
  states = inference.read(params, batch, rnn=rnn)["states"]  # [B, T, K, d]: m_0 .. m_{T-1}
  one_step = analysis.one_step_predictions(rnn, params["rnn"], mem[:, :-1], x)
  r = analysis.drift_along_time(states, mem[:, 1:])
  o = analysis.drift_along_time(one_step, mem[:, 1:])
  return {
    "rollout_mse": r["mse"],
    "rollout_1mr2": r["one_minus_r2"],
    "one_step_mse": o["mse"],
    "one_step_1mr2": o["one_minus_r2"],
  }


def curves_for(exp, config, params, batch):
  tfns, rfns = exp.fns
  out = drift_curves(
    params, batch, rnn=rfns, teacher=tfns, context_length=config.smt.context_length
  )
  return {k: np.asarray(v) for k, v in out.items()}


def run(ctx) -> dict:
  d = ctx.budget.drift
  pair = probes.ensure_pair(ctx, d.task, d.length, seed=0)
  rec, cfg = pair["smt_dmt"]
  exp, p_smt = common.restore(cfg, rec["workdir"], step=common.phase_end_step(cfg, "smt"))
  _, p_dmt = common.restore(cfg, rec["workdir"], step=None)
  batch = common.eval_batch(exp, batch_size=d.num_sequences)
  along = {
    "after SMT": curves_for(exp, cfg, p_smt, batch),
    "after SMT->DMT": curves_for(exp, cfg, p_dmt, batch),
  }

  settings = []
  for c_dyn, c_unif in [DEFAULT] + [tuple(s) for s in d.settings]:
    if (c_dyn, c_unif) == DEFAULT:
      r, c, params, e = rec, cfg, p_smt, exp
      summary = rec["summary"]["smt"]
    else:
      c = common.probe_config(
        ctx, d.task, d.length, seed=0, phases="smt", c_dyn=c_dyn, c_unif=c_unif
      )
      r = common.ensure_run(ctx, f"drift/{d.task}_T{d.length}_cdyn{c_dyn:g}_cunif{c_unif:g}", c)
      e, params = common.restore(c, r["workdir"], step=None)
      summary = r["summary"]["smt"]
    cv = curves_for(e, c, params, batch)
    settings.append(
      {
        "c_dyn": c_dyn,
        "c_unif": c_unif,
        **{k: float(np.mean(v)) for k, v in cv.items()},
        "rnn_acc": summary["eval/rnn_acc"],
        "teacher_acc": summary["eval/teacher_acc"],
      }
    )

  t = batch["x"].shape[1]
  rows = []
  for name, cv in along.items():
    rows.append(
      [name]
      + [
        f"{np.mean(cv[k]):.3f}"
        for k in ("one_step_1mr2", "rollout_1mr2", "one_step_mse", "rollout_mse")
      ]
      + [f"{cv['rollout_1mr2'][0]:.3f}", f"{cv['rollout_1mr2'][-1]:.3f}"]
    )
  md = (
    f"{d.task} probe, T = {t}, seed 0, {batch['x'].shape[0]} held-out episodes. Means over "
    f"time steps; 1 - R^2 per time step across episodes (0: the teacher's memory exactly, "
    f"1: no better than the mean memory at that step).\n\n"
  )
  md += common.markdown_table(
    [
      "model",
      "one-step 1-R^2",
      "rollout 1-R^2",
      "one-step MSE",
      "rollout MSE",
      "rollout 1-R^2 at t=0",
      f"at t={t - 1}",
    ],
    rows,
  )
  md += "\nAcross SMT settings (end of SMT, same steps; the (0.1, 0.001) row is the probe run):\n\n"
  md += common.markdown_table(
    [
      "c_dyn",
      "c_unif",
      "one-step 1-R^2",
      "rollout 1-R^2",
      "one-step MSE",
      "rollout MSE",
      "RNN acc (SMT)",
      "teacher acc",
    ],
    [
      [
        f"{s['c_dyn']:g}",
        f"{s['c_unif']:g}",
        f"{s['one_step_1mr2']:.3f}",
        f"{s['rollout_1mr2']:.3f}",
        f"{s['one_step_mse']:.4f}",
        f"{s['rollout_mse']:.4f}",
        f"{s['rnn_acc']:.3f}",
        f"{s['teacher_acc']:.3f}",
      ]
      for s in settings
    ],
  )
  fig = plot(ctx, along, settings, d.task, t)
  return common.write_outputs(
    ctx, "drift", {"along": along, "settings": settings, "figures": [fig], "markdown": md}, md
  )


def plot(ctx, along, settings, task, t) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  colors = {"after SMT": "tab:cyan", "after SMT->DMT": "tab:blue"}
  for name, cv in along.items():
    ts = np.arange(len(cv["rollout_1mr2"]))
    for ax, key in zip(axes[:2], ("1mr2", "mse")):
      ax.plot(ts, cv[f"rollout_{key}"], color=colors[name], label=f"{name}: rollout")
      ax.plot(ts, cv[f"one_step_{key}"], color=colors[name], ls=":", label=f"{name}: one-step")
  axes[0].set_ylabel("1 - R^2 vs teacher memory")
  axes[1].set_ylabel("MSE vs teacher memory")
  for ax in axes[:2]:
    ax.set_xlabel("time step t")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  axes[0].set_title(f"Drift along the sequence ({task}, T={t})")
  axes[1].set_title("Drift along the sequence (MSE)")
  ax = axes[2]
  labels = [f"c_dyn={st['c_dyn']:g}\nc_unif={st['c_unif']:g}" for st in settings]
  xs = np.arange(len(settings))
  ax.bar(
    xs - 0.2, [st["one_step_1mr2"] for st in settings], 0.4, color="tab:green", label="one-step"
  )
  ax.bar(
    xs + 0.2,
    [st["rollout_1mr2"] for st in settings],
    0.4,
    color="tab:cyan",
    label="rollout (RNN alone)",
  )
  ax.set_xticks(xs, labels, fontsize=7)
  ax.set_ylabel("1 - R^2 vs teacher (mean over t)")
  ax.set_title("End of SMT, several (c_dyn, c_unif)")
  ax.axhline(1.0, color="gray", lw=0.8, ls="--")
  ax.legend(fontsize=7)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return common.save_figure(ctx, fig, "drift.png")
