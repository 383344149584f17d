"""Study: are the one-pass causal teacher's labels as good as the windowed teacher's?

For every probe task, length T and seed: one SMT->DMT run with each teacher kind
(`model.teacher_kind` = windowed, the paper's; causal, every memory of a sequence in one pass), the
same model, batch and steps. With Tc = T both teachers see x[0..t] for m_t; they differ in the
encoder's attention (bidirectional over a window, or causal over the sequence), which only shows
from two layers on, so the study's teachers have `depth` layers. Reported: the teacher's and the
RNN's held-out accuracy after SMT and after SMT->DMT, and the SMT training time.
"""

from __future__ import annotations

import numpy as np

from experiments.studies import common

KINDS = ("windowed", "causal")


def run(ctx) -> dict:
  b = ctx.budget.teachers
  rows, cells = [], []
  for task in b.tasks:
    for length in b.lengths:
      per = {kind: {"teacher": [], "smt": [], "smt_dmt": [], "smt_train_s": []} for kind in KINDS}
      for seed in b.seeds:
        for kind in KINDS:
          cfg = common.probe_config(ctx, task, length, seed=seed, phases="smt,dmt")
          cfg.model.teacher_kind = kind
          cfg.model.encoder_depth = b.depth
          rec = common.ensure_run(ctx, f"teachers/{task}_T{length}_s{seed}_{kind}", cfg)
          s = rec["summary"]
          per[kind]["teacher"].append(s["dmt"]["eval/teacher_acc"])
          per[kind]["smt"].append(s["smt"]["eval/rnn_acc"])
          per[kind]["smt_dmt"].append(s["dmt"]["eval/rnn_acc"])
          per[kind]["smt_train_s"].append(rec["train_s"]["smt"])
      cells.append({"task": task, "length": length, "seeds": list(b.seeds), "kinds": per})
      for kind in KINDS:
        p = per[kind]
        rows.append(
          [
            task,
            length,
            kind,
            common.fmt_ms(p["teacher"]),
            common.fmt_ms(p["smt"]),
            common.fmt_ms(p["smt_dmt"]),
            f"{np.mean(p['smt_train_s']):.1f}",
          ]
        )
  header = ["task", "T", "teacher kind", "teacher acc", "SMT acc", "SMT->DMT acc", "SMT train s"]
  p = ctx.budget.probes
  markdown = (
    f"Windowed vs one-pass causal teacher, SMT {p.smt_steps} + DMT {p.dmt_steps} steps: held-out "
    f"accuracy (mean ± std over seeds {list(b.seeds)}); encoder depth {b.depth}.\n\n"
    + common.markdown_table(header, rows)
  )
  fig = plot(ctx, cells)
  results = common.write_outputs(ctx, "teachers", {"cells": cells, "figures": [fig]}, markdown)
  results["markdown"] = markdown
  return results


MEASURES = (("teacher", "teacher"), ("smt", "RNN after SMT"), ("smt_dmt", "RNN after SMT->DMT"))


def plot(ctx, cells) -> str:
  """Per (task, T): held-out accuracy by teacher kind (bars, mean ± std); SMT training time."""
  plt = common.pyplot()
  fig, (ax, tax) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
  width = 0.8 / (len(KINDS) * len(MEASURES))
  shades = {"windowed": ("tab:gray", "tab:cyan", "tab:blue"), "causal": ("0.3", "teal", "navy")}
  for i, cell in enumerate(cells):
    for j, kind in enumerate(KINDS):
      for k, (key, label) in enumerate(MEASURES):
        v = cell["kinds"][kind][key]
        ax.bar(
          i + (j * len(MEASURES) + k - (len(KINDS) * len(MEASURES) - 1) / 2) * width,
          np.mean(v),
          width,
          yerr=np.std(v, ddof=1) if len(v) > 1 else 0.0,
          color=shades[kind][k],
          hatch="" if kind == "windowed" else "//",
          edgecolor="white",
          label=f"{label} ({kind})" if i == 0 else None,
        )
  ax.set_xticks(range(len(cells)), [f"{c['task']}, T={c['length']}" for c in cells])
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7, ncol=2, loc="upper right")
  ax.grid(axis="y", alpha=0.3)
  for kind, marker in zip(KINDS, ("o", "s")):
    for task in dict.fromkeys(c["task"] for c in cells):
      pts = [c for c in cells if c["task"] == task]
      tax.plot(
        [c["length"] for c in pts],
        [np.mean(c["kinds"][kind]["smt_train_s"]) for c in pts],
        marker=marker,
        label=f"{kind} ({task})",
      )
  tax.set_xscale("log", base=2)
  tax.set_yscale("log")
  tax.set_xlabel("sequence length T")
  tax.set_ylabel("SMT training time (s, no compile)")
  tax.legend(fontsize=7)
  tax.grid(alpha=0.3)
  fig.suptitle("Windowed vs one-pass causal teacher: label quality and SMT cost")
  fig.tight_layout()
  return common.save_figure(ctx, fig, "teachers.png")
