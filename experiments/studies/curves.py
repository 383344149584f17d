"""Study: long budgets, SMT->DMT vs BPTT against optimiser steps, tokens and SeqFLOPs
(docs/method.md 9.3).

The length study compares methods after one short budget (200 steps). Here probes (the length
study's config, at a longer budget) and the digits (pixels) model train long enough for their
held-out curves to flatten: one SMT->DMT run and one BPTT run each, the same batch and the same
optimiser steps (SMT + DMT == BPTT), evaluated every `eval_every` steps. The curves are the
RNN's own held-out NLL (read from its initial memory, no teacher) and, for a probe, accuracy,
against the three x-axes the runner writes into every metrics row (`experiments.plot`).

"Flat" is measured, not assumed: for each run, the change of its held-out NLL over the last
quarter of its steps (DMT's own quarter for SMT->DMT, whose phases differ; BPTT's last quarter).
"""

from __future__ import annotations

from experiments import plot as plot_lib
from experiments.studies import common, length_parity, probes

AXES = ("steps", "tokens", "seqflops")
METHODS = (("smt_dmt", "smt,dmt"), ("bptt", "bptt"))  # (run-name suffix, phases)


def configs(ctx, workload: str, phases: str):
  """The config of one curve run: the probe (length_parity's) or digits at this budget."""
  w = ctx.budget.curves[workload]
  if workload == "digits":
    c = common.digits_config(ctx, phases=phases)
  else:
    c = length_parity.config(ctx, w.task, w.length, seed=0, phases=phases)
  c.smt.steps, c.dmt.steps, c.bptt.steps = w.smt_steps, w.dmt_steps, w.smt_steps + w.dmt_steps
  c.eval.every_steps = w.eval_every
  c.log_every_steps = max(1, min(50, w.eval_every))
  return c


def ensure(ctx, workload: str, method: str) -> tuple[dict, object]:
  """(record, config) of one curve run, `curves/<workload>_<method>`, trained unless cached.

  The samples and geometry studies read the digits (and stack) runs from here too.
  """
  cfg = configs(ctx, workload, dict(METHODS)[method])
  return common.ensure_run(ctx, f"curves/{workload}_{method}", cfg), cfg


def metrics(workload: str) -> dict[str, str]:
  """{short name: metrics key} plotted for a workload."""
  out = {"nll": "eval/rnn_nll"}
  if workload != "digits":
    out["acc"] = "eval/rnn_acc"
  return out


def last_quarter_change(xs, ys, start: float) -> float:
  """NLL at the end minus NLL at the last eval at or before 3/4 of the way from `start`."""
  end = xs[-1]
  cut = start + 0.75 * (end - start)
  before = [y for x, y in zip(xs, ys) if x <= cut]
  return float(ys[-1] - before[-1]) if before else float("nan")


def run(ctx) -> dict:
  res, rows = {}, []
  for workload in ctx.budget.curves.workloads:
    w = ctx.budget.curves[workload]
    res[workload] = {}
    for method, _ in METHODS:
      rec, _ = ensure(ctx, workload, method)
      curves = {
        (name, x): plot_lib.load_curve(rec["workdir"], metric=key, x=x)
        for name, key in metrics(workload).items()
        for x in AXES
      }
      steps = curves[("nll", "steps")]
      start = dict(steps["phase_starts"]).get("dmt", 0.0) if method == "smt_dmt" else 0.0
      final = rec["summary"]["dmt" if method == "smt_dmt" else "bptt"]
      r = {
        "curves": {f"{n}/{x}": {"x": c["x"], "y": c["y"]} for (n, x), c in curves.items()},
        "nll": final["eval/rnn_nll"],
        "acc": final.get("eval/rnn_acc", float("nan")),
        "last_quarter_nll_change": last_quarter_change(steps["x"], steps["y"], start),
        "steps": rec["steps"],
        "tokens": curves[("nll", "tokens")]["x"][-1],
        "seq_flops": curves[("nll", "seqflops")]["x"][-1],
        "train_s": float(sum(rec["train_s"].values())),
        "wall_s": rec["wall_s"],
      }
      if method == "smt_dmt":
        r["nll_after_smt"] = rec["summary"]["smt"]["eval/rnn_nll"]
        r["teacher_nll"] = final.get("eval/teacher_nll", float("nan"))
      res[workload][method] = r
      rows.append(
        [
          workload if workload == "digits" else f"{w.task}, T = {w.length}",
          probes.LABELS[method],
          "+".join(str(v) for v in r["steps"].values()),
          f"{r['nll']:.3f}",
          f"{r['nll_after_smt']:.3f}" if "nll_after_smt" in r else "-",
          f"{r['acc']:.3f}" if workload != "digits" else "-",
          f"{r['last_quarter_nll_change']:+.3f}",
          f"{r['tokens']:.3g}",
          f"{r['seq_flops']:.3g}",
          f"{r['train_s']:.0f}",
        ]
      )
  md = (
    "Long budgets, seed 0, SMT + DMT steps == BPTT steps, the same batch; held-out NLL (nats per "
    "token) of the RNN alone. 'last quarter': the NLL's change over the last quarter of BPTT's "
    "steps, or of DMT's steps for SMT->DMT (near 0: the curve has flattened).\n\n"
  )
  md += common.markdown_table(
    [
      "workload",
      "method",
      "opt. steps",
      "NLL",
      "NLL after SMT",
      "accuracy",
      "last quarter",
      "tokens seen",
      "SeqFLOPs / run",
      "train s",
    ],
    rows,
  )
  results = {"results": res, "markdown": md, "figures": [plot(ctx, res)]}
  return common.write_outputs(ctx, "curves", results, md)


def plot(ctx, res) -> str:
  """One row per (workload, metric), one column per x-axis."""
  plt = common.pyplot()
  panels = [(wl, name) for wl in res for name in metrics(wl)]
  fig, axes = plt.subplots(
    len(panels), len(AXES), figsize=(4.0 * len(AXES), 2.6 * len(panels)), squeeze=False
  )
  for i, (wl, name) in enumerate(panels):
    for j, x in enumerate(AXES):
      ax = axes[i, j]
      for method, r in res[wl].items():
        c = r["curves"][f"{name}/{x}"]
        ax.plot(c["x"], c["y"], color=probes.COLORS[method], label=probes.LABELS[method], lw=1.2)
      if x == "seqflops":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # every range here spans a decade
      elif x == "tokens":
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
      ax.grid(alpha=0.3)
      if i == len(panels) - 1:
        ax.set_xlabel(plot_lib.X_LABELS[x])
      if j == 0:
        w = ctx.budget.curves[wl]
        what = "digits" if wl == "digits" else f"{w.task} T={w.length}"
        ax.set_ylabel(f"{what}\nheld-out {'NLL' if name == 'nll' else 'accuracy'}")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle("Long budgets: SMT->DMT vs BPTT at equal optimiser steps (RNN alone, held out)")
  fig.tight_layout(rect=(0, 0, 1, 0.98))
  return common.save_figure(ctx, fig, "curves.png")
