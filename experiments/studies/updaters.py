"""Study: updater kinds, transformer vs mlp vs gru on the same probe, SMT->DMT and BPTT.

The paper reports that a GRU updater collapses under SMT. Here every kind gets the same teacher
size, memory shape (K x d), batch and optimiser steps (SMT + DMT == BPTT), seed 0. Besides accuracy
we report the drift of the RNN's own rollout from the teacher's memories (1 - R^2 per time step
across episodes, averaged over t, as in the drift study; 1 means no better than the mean memory),
the one-step drift, and the effective dimension of the RNN's rollout states against the teacher's
memories (a collapsed memory has a small one).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.studies import common, drift, probes
from smt_jax import analysis, inference, objectives


def run(ctx) -> dict:
  u = ctx.budget.updaters
  res, rows = {}, []
  for kind in u.kinds:
    pair = probes.ensure_pair(ctx, u.task, u.length, 0, kind)
    (rs, cs), (rb, _) = pair["smt_dmt"], pair["bptt"]
    ss, sb = rs["summary"], rb["summary"]
    exp, p_smt = common.restore(cs, rs["workdir"], step=common.phase_end_step(cs, "smt"))
    _, p_dmt = common.restore(cs, rs["workdir"], step=None)
    batch = common.eval_batch(exp, batch_size=cs.eval.batch_size)
    cv = drift.curves_for(exp, cs, p_smt, batch)
    cv_dmt = drift.curves_for(exp, cs, p_dmt, batch)
    tfns, rfns = exp.fns
    states = np.asarray(inference.read(p_smt, batch, rnn=rfns)["states"])
    teach = np.asarray(
      objectives.teacher_memories(
        tfns, p_smt["teacher"], batch["x"], jnp.arange(batch["x"].shape[1]), cs.smt.context_length
      )
    )
    res[kind] = {
      "smt_acc": ss["smt"]["eval/rnn_acc"],
      "smt_dmt_acc": ss["dmt"]["eval/rnn_acc"],
      "bptt_acc": sb["bptt"]["eval/rnn_acc"],
      "teacher_acc": ss["dmt"]["eval/teacher_acc"],
      "smt_nll": ss["smt"]["eval/rnn_nll"],
      "smt_dmt_nll": ss["dmt"]["eval/rnn_nll"],
      "bptt_nll": sb["bptt"]["eval/rnn_nll"],
      "rollout_1mr2_smt": float(np.mean(cv["rollout_1mr2"])),
      "rollout_1mr2_dmt": float(np.mean(cv_dmt["rollout_1mr2"])),
      "one_step_1mr2_smt": float(np.mean(cv["one_step_1mr2"])),
      "eff_dim_rnn": analysis.participation_ratio(states.reshape(-1, states[0, 0].size)),
      "eff_dim_teacher": analysis.participation_ratio(teach.reshape(-1, teach[0, 0].size)),
      "wall_s_smt_dmt": rs["wall_s"],
      "wall_s_bptt": rb["wall_s"],
    }
    r = res[kind]
    rows.append(
      [
        kind,
        f"{r['smt_acc']:.3f}",
        f"{r['smt_dmt_acc']:.3f}",
        f"{r['bptt_acc']:.3f}",
        f"{r['teacher_acc']:.3f}",
        f"{r['one_step_1mr2_smt']:.3f}",
        f"{r['rollout_1mr2_smt']:.3f}",
        f"{r['rollout_1mr2_dmt']:.3f}",
        f"{r['eff_dim_rnn']:.1f} / {r['eff_dim_teacher']:.1f}",
      ]
    )
  p = ctx.budget.probes
  md = (
    f"{u.task} probe, T = {u.length}, seed 0, SMT {p.smt_steps} + DMT {p.dmt_steps} vs BPTT "
    f"{p.smt_steps + p.dmt_steps} steps, batch {p.batch_size}; memory "
    f"{ctx.budget.model.num_memory_tokens}"
    f" x {ctx.budget.model.width} for every kind.\n\n"
  )
  md += common.markdown_table(
    [
      "updater",
      "acc after SMT",
      "acc SMT->DMT",
      "acc BPTT",
      "teacher acc",
      "one-step 1-R^2 (SMT)",
      "rollout 1-R^2 (SMT)",
      "rollout 1-R^2 (DMT)",
      "eff. dim RNN / teacher (SMT)",
    ],
    rows,
  )
  fig = plot(ctx, res, u)
  return common.write_outputs(
    ctx, "updaters", {"results": res, "figures": [fig], "markdown": md}, md
  )


def plot(ctx, res, u) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.6))
  kinds = list(res)
  keys = [
    ("smt_acc", "SMT (before DMT)", "tab:cyan"),
    ("smt_dmt_acc", "SMT->DMT", "tab:blue"),
    ("bptt_acc", "BPTT", "tab:red"),
    ("teacher_acc", "teacher", "tab:gray"),
  ]
  w = 0.8 / len(keys)
  for i, (k, lab, col) in enumerate(keys):
    axes[0].bar(
      np.arange(len(kinds)) + (i - 1.5) * w, [res[kd][k] for kd in kinds], w, color=col, label=lab
    )
  axes[0].set_xticks(range(len(kinds)), kinds)
  axes[0].set_ylabel("held-out accuracy")
  axes[0].set_ylim(0, 1.3)
  axes[0].legend(fontsize=7, ncol=2, loc="upper left")
  axes[0].set_title(f"Updater kinds ({u.task}, T={u.length})")
  keys = [
    ("one_step_1mr2_smt", "one-step (after SMT)", "tab:green"),
    ("rollout_1mr2_smt", "rollout (after SMT)", "tab:cyan"),
    ("rollout_1mr2_dmt", "rollout (after DMT)", "tab:blue"),
  ]
  w = 0.8 / len(keys)
  for i, (k, lab, col) in enumerate(keys):
    axes[1].bar(
      np.arange(len(kinds)) + (i - 1) * w, [res[kd][k] for kd in kinds], w, color=col, label=lab
    )
  axes[1].set_xticks(range(len(kinds)), kinds)
  top = max(max(res[kd][k] for kd in kinds) for k, _, _ in keys)
  axes[1].set_ylim(0, 1.35 * top)
  axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
  axes[1].set_ylabel("1 - R^2 vs teacher memories (mean over t)")
  axes[1].legend(fontsize=7, ncol=3, loc="upper left")
  axes[1].set_title("Drift from the teacher's memories")
  for ax in axes:
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return common.save_figure(ctx, fig, "updaters.png")
