"""Study: BPTT vs SMT->DMT vs the teacher on the five synthetic probes (docs/method.md 9.1, 9.3).

For every task, sequence length T and seed: one SMT->DMT run and one BPTT run of the same
transformer RNN, with the same batch and the same number of optimiser steps (SMT + DMT == BPTT).
Reported: held-out RNN accuracy / NLL after SMT, after SMT->DMT and for BPTT; the teacher's; the
sequential compute of each run (SeqFLOPs, see `smt_jax.analysis.seq_flops_per_step`) and its wall
time on this machine.
"""

from __future__ import annotations

import numpy as np

from experiments.studies import common

METHODS = ("bptt", "smt", "smt_dmt", "teacher")
LABELS = {"bptt": "BPTT", "smt": "SMT (before DMT)", "smt_dmt": "SMT->DMT", "teacher": "teacher"}
# What is measured for each method ("smt" shares its run, hence its wall time, with "smt_dmt").
KEYS = {
  "bptt": ("acc", "nll", "wall_s", "train_s", "seq_flops"),
  "smt": ("acc", "nll", "train_s", "seq_flops"),
  "smt_dmt": ("acc", "nll", "wall_s", "train_s", "seq_flops"),
  "teacher": ("acc", "nll"),
}
COLORS = {"bptt": "tab:red", "smt": "tab:cyan", "smt_dmt": "tab:blue", "teacher": "tab:gray"}


def run_name(task: str, length: int, seed: int, method: str, kind: str = "transformer") -> str:
  suffix = "" if kind == "transformer" else f"_{kind}"
  return f"probes/{task}_T{length}_s{seed}_{method}{suffix}"


def ensure_pair(ctx, task: str, length: int, seed: int, kind: str = "transformer"):
  """The SMT->DMT run and the BPTT run of one (task, T, seed, RNN kind): (rec, cfg) for each."""
  out = {}
  for method, phases in (("smt_dmt", "smt,dmt"), ("bptt", "bptt")):
    cfg = common.probe_config(ctx, task, length, seed=seed, phases=phases, rnn_kind=kind)
    out[method] = (common.ensure_run(ctx, run_name(task, length, seed, method, kind), cfg), cfg)
  return out


def run(ctx) -> dict:
  b = ctx.budget.probes
  results = {"cells": []}
  table = []
  for task in b.tasks:
    for length in b.lengths:
      per = {m: {k: [] for k in KEYS[m]} for m in METHODS}
      unigram = []
      for seed in b.seeds:
        pair = ensure_pair(ctx, task, length, seed)
        (rs, cs), (rb, cb) = pair["smt_dmt"], pair["bptt"]
        (sf_s, flops), (sf_b, _) = common.run_seq_flops(cs), common.run_seq_flops(cb)
        ss, sb = rs["summary"], rb["summary"]
        unigram.append(ss["baseline/unigram_nll"])
        vals = {
          "bptt": (
            sb["bptt"]["eval/rnn_acc"],
            sb["bptt"]["eval/rnn_nll"],
            rb["wall_s"],
            rb["train_s"]["bptt"],
            sf_b["bptt"],
          ),
          "smt": (
            ss["smt"]["eval/rnn_acc"],
            ss["smt"]["eval/rnn_nll"],
            None,
            rs["train_s"]["smt"],
            sf_s["smt"],
          ),
          "smt_dmt": (
            ss["dmt"]["eval/rnn_acc"],
            ss["dmt"]["eval/rnn_nll"],
            rs["wall_s"],
            rs["train_s"]["smt"] + rs["train_s"]["dmt"],
            sf_s["smt"] + sf_s["dmt"],
          ),
          "teacher": (ss["dmt"]["eval/teacher_acc"], ss["dmt"]["eval/teacher_nll"]),
        }
        for m, v in vals.items():
          for key, x in zip(("acc", "nll", "wall_s", "train_s", "seq_flops"), v):
            if key in per[m]:
              per[m][key].append(float(x))
      cell = {
        "task": task,
        "length": length,
        "seeds": list(b.seeds),
        "unit_flops": flops,
        "unigram_nll": float(np.mean(unigram)),
        "methods": per,
      }
      results["cells"].append(cell)
      steps = {
        "bptt": b.smt_steps + b.dmt_steps,
        "smt": b.smt_steps,
        "smt_dmt": f"{b.smt_steps}+{b.dmt_steps}",
        "teacher": b.smt_steps,
      }
      for m in METHODS:
        p = per[m]
        opt = lambda k, f: f.format(np.mean(p[k])) if k in p else "-"
        table.append(
          [
            task,
            length,
            LABELS[m],
            steps[m],
            common.fmt_ms(p["acc"]),
            common.fmt_ms(p["nll"]),
            opt("seq_flops", "{:.3g}"),
            opt("train_s", "{:.0f}"),
            opt("wall_s", "{:.0f}"),
            f"{np.mean(unigram):.3f}",
          ]
        )
  md = (
    f"Budget `{ctx.budget.name}`: batch {b.batch_size}, SMT {b.smt_steps} + DMT {b.dmt_steps}"
    f" steps vs BPTT {b.smt_steps + b.dmt_steps} steps; seeds {list(b.seeds)} "
    f"(mean ± std over seeds); held-out: {b.eval_batches} x {b.eval_batch_size} sequences.\n\n"
  )
  md += common.markdown_table(
    [
      "task",
      "T",
      "method",
      "opt. steps",
      "accuracy",
      "NLL (nats)",
      "SeqFLOPs / run",
      "train s",
      "wall s",
      "unigram NLL",
    ],
    table,
  )
  results["markdown"] = md
  results["figures"] = [plot_accuracy(ctx, results), plot_compute(ctx, results)]
  return common.write_outputs(ctx, "probes", results, md)


def plot_accuracy(ctx, results) -> str:
  plt = common.pyplot()
  tasks = list(dict.fromkeys(c["task"] for c in results["cells"]))
  lengths = list(dict.fromkeys(c["length"] for c in results["cells"]))
  fig, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 2.8), squeeze=False)
  width = 0.8 / len(METHODS)
  for ax, task in zip(axes[0], tasks):
    for i, m in enumerate(METHODS):
      means, stds = [], []
      for length in lengths:
        cell = next(c for c in results["cells"] if c["task"] == task and c["length"] == length)
        mu, sd = common.mean_std(cell["methods"][m]["acc"])
        means.append(mu), stds.append(sd)
      xs = np.arange(len(lengths)) + (i - (len(METHODS) - 1) / 2) * width
      ax.bar(xs, means, width, yerr=stds, color=COLORS[m], label=LABELS[m], capsize=2)
    ax.set_xticks(range(len(lengths)), [f"T={t}" for t in lengths])
    ax.set_ylim(0, 1.05)
    ax.set_title(task)
    ax.grid(axis="y", alpha=0.3)
  axes[0, 0].set_ylabel("held-out accuracy")
  axes[0, -1].legend(fontsize=7, loc="upper right")
  fig.suptitle("Probes: same optimiser steps for BPTT and SMT->DMT (mean ± std over seeds)", y=1.04)
  return common.save_figure(ctx, fig, "probes.png")


def plot_compute(ctx, results) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  markers = dict(zip(dict.fromkeys(c["task"] for c in results["cells"]), "osD^v"))
  for cell in results["cells"]:
    for m in ("bptt", "smt_dmt"):
      p = cell["methods"][m]
      acc = np.mean(p["acc"])
      for ax, key in zip(axes, ("seq_flops", "wall_s")):
        ax.scatter(
          np.mean(p[key]),
          acc,
          color=COLORS[m],
          marker=markers[cell["task"]],
          s=18 + cell["length"],
          alpha=0.8,
        )
  for ax, label in zip(axes, ("SeqFLOPs per run (serial critical path)", "wall time per run (s)")):
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
  handles = [
    plt.Line2D([], [], color=COLORS[m], marker="o", ls="", label=LABELS[m])
    for m in ("bptt", "smt_dmt")
  ]
  handles += [plt.Line2D([], [], color="k", marker=mk, ls="", label=t) for t, mk in markers.items()]
  axes[1].legend(handles=handles, fontsize=7, loc="best")
  fig.suptitle("Accuracy vs sequential compute and wall time (marker size grows with T)")
  return common.save_figure(ctx, fig, "probes_compute.png")
