"""Study: accuracy against training budget, sequential compute and wall time (docs/method.md 9.3).

One probe (stack, the shorter length, seed 0), BPTT and SMT->DMT at several optimiser-step budgets
(SMT : DMT split as in the probe study; BPTT gets SMT + DMT steps). The budget of the probe study is
one of the points (its runs are reused). Accuracy is plotted against optimiser steps, against
SeqFLOPs (the serial critical path, `smt_jax.analysis.seq_flops_per_step`) and against training wall
time on this CPU (excluding compilation).
"""

from __future__ import annotations

from experiments.studies import common, probes


def ensure_budget_run(ctx, total: int, method: str):
  """(record, config) of the `method` ('smt_dmt' or 'bptt') run with `total` optimiser steps."""
  s, p = ctx.budget.steps, ctx.budget.probes
  base_total = p.smt_steps + p.dmt_steps
  n_smt = int(round(total * p.smt_steps / base_total))
  cfg = common.probe_config(
    ctx, s.task, s.length, seed=0, phases="smt,dmt" if method == "smt_dmt" else "bptt"
  )
  cfg.smt.steps, cfg.dmt.steps, cfg.bptt.steps = n_smt, total - n_smt, total
  name = (
    probes.run_name(s.task, s.length, 0, method)
    if total == base_total
    else f"steps/{s.task}_T{s.length}_s0_n{total}_{method}"
  )
  return common.ensure_run(ctx, name, cfg), cfg


def run(ctx) -> dict:
  s = ctx.budget.steps
  p = ctx.budget.probes
  points = []
  for total in s.totals:
    for method in ("smt_dmt", "bptt"):
      rec, cfg = ensure_budget_run(ctx, total, method)
      per_phase, _ = common.run_seq_flops(cfg)
      sf = sum(per_phase.values())
      summ = rec["summary"]
      final = summ["dmt"] if method == "smt_dmt" else summ["bptt"]
      point = {
        "total_steps": total,
        "method": method,
        "acc": final["eval/rnn_acc"],
        "nll": final["eval/rnn_nll"],
        "seq_flops": sf,
        "train_s": float(sum(rec["train_s"].values())),
        "wall_s": rec["wall_s"],
        "steps": rec["steps"],
      }
      if method == "smt_dmt":
        point.update(teacher_acc=final["eval/teacher_acc"], smt_acc=summ["smt"]["eval/rnn_acc"])
      points.append(point)
  rows = [
    [
      pt["total_steps"],
      probes.LABELS[pt["method"]],
      "+".join(str(v) for v in pt["steps"].values()),
      f"{pt['acc']:.3f}",
      f"{pt['nll']:.3f}",
      f"{pt.get('smt_acc', float('nan')):.3f}" if "smt_acc" in pt else "-",
      f"{pt['teacher_acc']:.3f}" if "teacher_acc" in pt else "-",
      f"{pt['seq_flops']:.3g}",
      f"{pt['train_s']:.0f}",
    ]
    for pt in points
  ]
  md = (
    f"{s.task} probe, T = {s.length}, seed 0, batch {p.batch_size}; SMT : DMT steps = "
    f"{p.smt_steps} : {p.dmt_steps}.\n\n"
  )
  md += common.markdown_table(
    [
      "total steps",
      "method",
      "steps per phase",
      "RNN acc",
      "RNN NLL",
      "RNN acc after SMT",
      "teacher acc",
      "SeqFLOPs / run",
      "train s (no compile)",
    ],
    rows,
  )
  fig = plot(ctx, points, s)
  return common.write_outputs(
    ctx, "steps", {"points": points, "figures": [fig], "markdown": md}, md
  )


def plot(ctx, points, s) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for method in ("bptt", "smt_dmt"):
    pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["total_steps"])
    for ax, key in zip(axes, ("total_steps", "seq_flops", "train_s")):
      ax.plot(
        [p[key] for p in pts],
        [p["acc"] for p in pts],
        marker="o",
        color=probes.COLORS[method],
        label=probes.LABELS[method],
      )
      if method == "smt_dmt":
        ax.plot(
          [p[key] for p in pts],
          [p["teacher_acc"] for p in pts],
          marker="s",
          ls="--",
          color=probes.COLORS["teacher"],
          label="teacher",
        )
  for ax, label in zip(
    axes,
    (
      "optimiser steps (SMT + DMT = BPTT)",
      "SeqFLOPs per run (serial critical path)",
      "training wall time on this CPU (s, no compile)",
    ),
  ):
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(label)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, which="both")
  totals = sorted({p["total_steps"] for p in points})
  axes[0].set_xticks(totals, [str(t) for t in totals])
  axes[0].legend(fontsize=7)
  fig.suptitle(f"Accuracy vs budget ({s.task}, T={s.length}, seed 0)")
  return common.save_figure(ctx, fig, "steps.png")
