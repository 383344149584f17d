"""Study: the paper's central claim at the reference architecture, BPTT vs SMT->DMT vs teacher in T.

The claim (docs/method.md 9.1): BPTT degrades as the sequence length T grows, SMT->DMT does not. For
every probe, T and seed: one SMT->DMT run and one BPTT run of the same transformer RNN, with the
same batch and the same optimiser steps (SMT + DMT == BPTT), at the parity architecture (64-wide
heads, shared teacher embedding, the reference's init). The teacher is what the task needs:
  - an encoder of `teacher_depth` >= 2 layers, context Tc = T (every memory sees its whole prefix);
  - the one-pass causal teacher (`model.teacher_kind`), which encodes every memory of a sequence
    in one pass, so T = 256 is affordable (the windowed teacher would encode T windows of T tokens);
  - a decoder horizon Tf per task (`future`): T/2 for retrieval, which asks every memory from T/2
    on for the needle (placed before T/2; the memories between the needle and T/2 are tied to
    those by L_dyn), and for copy, whose separator's memory must hold the whole (T-1)//2-token
    string; 16 for stack, whose push-to-pop span does not grow with T (95% of pops within 17
    steps of their push at T = 256, 99% within 33), and for keys_values and modular, whose
    memories carry a fixed amount (8 pairs; the hidden (w, b)) from the start to T-1.
  - SMT trains min(T, `decoder_tokens` // Tf) transitions per batch (every one while that is >= T,
    else a random subset), so the decoder's work per step stays the same as T grows.
Reported per (task, T): held-out accuracy and NLL of the RNN read from its own initial memory
(after SMT, after SMT->DMT, after BPTT) and of the teacher; the drift of that rollout from the
teacher's memories (1 - R^2 over the sequence, `evaluation.evaluate`); SeqFLOPs per run
(`smt_jax.runner.experiment.seq_flops_per_step`) and the measured training time.
"""

from __future__ import annotations

import numpy as np

from experiments.studies import common, probes

METHODS = ("bptt", "smt", "smt_dmt", "teacher")
STYLE = {"bptt": "-", "smt": ":", "smt_dmt": "-", "teacher": "--"}


def run_name(task: str, length: int, seed: int, method: str) -> str:
  return f"length_parity/{task}_T{length}_s{seed}_{method}"


def future_length(spec, length: int) -> int:
  """Tf from the budget's per-task value: a float is a fraction of T, an int a horizon (<= T)."""
  if isinstance(spec, float):
    return max(1, int(length * spec))
  return max(1, min(int(spec), length))


def config(ctx, task: str, length: int, *, seed: int, phases: str):
  """The probe config of one run of this study (see the module docstring)."""
  b = ctx.budget.length_parity
  c = common.probe_config(ctx, task, length, seed=seed, phases=phases)
  c.model.encoder_depth = b.teacher_depth
  c.model.teacher_kind = b.teacher_kind
  c.smt.context_length = length
  c.smt.future_length = future_length(b.future[task], length)
  c.smt.num_transitions = min(length, max(1, b.decoder_tokens // c.smt.future_length))
  c.smt.steps, c.dmt.steps, c.bptt.steps = b.smt_steps, b.dmt_steps, b.smt_steps + b.dmt_steps
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = b.batch_size
  c.eval.batch_size, c.eval.num_batches = b.eval_batch_size, b.eval_batches
  return c


def run(ctx) -> dict:
  b = ctx.budget.length_parity
  cells, rows = [], []
  for task in b.tasks:
    for length in b.lengths:
      per = {m: {"acc": [], "nll": []} for m in METHODS}
      cost = {"smt_dmt": {"train_s": [], "wall_s": []}, "bptt": {"train_s": [], "wall_s": []}}
      seq_flops, unit_flops, unigram, shape = {}, {}, [], {}
      seeds = tuple(b.seeds)
      for seed in seeds:
        recs = {}
        for method, phases in (("smt_dmt", "smt,dmt"), ("bptt", "bptt")):
          cfg = config(ctx, task, length, seed=seed, phases=phases)
          recs[method] = common.ensure_run(ctx, run_name(task, length, seed, method), cfg)
          if method not in seq_flops:
            per_phase, unit_flops = common.run_seq_flops(cfg)
            seq_flops[method] = float(sum(per_phase.values()))
          cost[method]["train_s"].append(float(sum(recs[method]["train_s"].values())))
          cost[method]["wall_s"].append(float(recs[method]["wall_s"]))
          if method == "smt_dmt":
            shape = {
              "teacher_kind": cfg.model.teacher_kind,
              "teacher_depth": cfg.model.encoder_depth,
              "context_length": cfg.smt.context_length,
              "future_length": cfg.smt.future_length,
              "num_transitions": cfg.smt.num_transitions,
            }
        ss, sb = recs["smt_dmt"]["summary"], recs["bptt"]["summary"]
        unigram.append(ss["baseline/unigram_nll"])
        for m, s, key in (
          ("bptt", sb["bptt"], "rnn"),
          ("smt", ss["smt"], "rnn"),
          ("smt_dmt", ss["dmt"], "rnn"),
          ("teacher", ss["dmt"], "teacher"),
        ):
          per[m]["acc"].append(float(s[f"eval/{key}_acc"]))
          per[m]["nll"].append(float(s[f"eval/{key}_nll"]))
          if m in ("smt", "smt_dmt"):  # the RNN's own rollout against the teacher's memories
            per[m].setdefault("drift_1mr2", []).append(float(s["eval/drift_1mr2"]))
      cells.append(
        dict(
          task=task,
          length=length,
          seeds=list(seeds),
          unigram_nll=float(np.mean(unigram)),
          methods=per,
          cost=cost,
          seq_flops=seq_flops,
          unit_flops=unit_flops,
          **shape,
        )
      )
      steps = {
        "bptt": str(b.smt_steps + b.dmt_steps),
        "smt": str(b.smt_steps),
        "smt_dmt": f"{b.smt_steps}+{b.dmt_steps}",
        "teacher": str(b.smt_steps),
      }
      for m in METHODS:
        rows.append(
          [
            task,
            length,
            f"{shape['teacher_kind']}, depth {shape['teacher_depth']}, Tc {shape['context_length']}"
            f", Tf {shape['future_length']}, {shape['num_transitions']} transitions",
            probes.LABELS[m],
            steps[m],
            common.fmt_ms(per[m]["acc"]),
            common.fmt_ms(per[m]["nll"]),
            f"{seq_flops[m]:.3g}" if m in seq_flops else "-",
            common.fmt_ms(per[m]["drift_1mr2"], 2) if "drift_1mr2" in per[m] else "-",
            f"{np.mean(cost[m]['train_s']):.0f}" if m in cost else "-",
            f"{np.mean(unigram):.3f}",
          ]
        )
  md = (
    f"Budget `{ctx.budget.name}`, parity architecture: width {ctx.budget.model.width}, "
    f"K {ctx.budget.model.num_memory_tokens}, {ctx.budget.model.num_heads} heads of 64, RNN depth "
    f"{ctx.budget.model.depth}; batch {b.batch_size}; SMT {b.smt_steps} + DMT {b.dmt_steps} steps "
    f"vs BPTT {b.smt_steps + b.dmt_steps}; seeds {list(b.seeds)} (mean ± std over seeds); "
    f"held-out: {b.eval_batches} x {b.eval_batch_size} episodes. The teacher column: its kind "
    f"(causal = one pass), encoder depth, context Tc, decoder horizon Tf and the SMT transitions "
    f"per sequence and step.\n\n"
  )
  md += common.markdown_table(
    [
      "task",
      "T",
      "teacher",
      "method",
      "opt. steps",
      "accuracy",
      "NLL (nats)",
      "SeqFLOPs / run",
      "rollout drift 1-R^2",
      "train s",
      "unigram NLL",
    ],
    rows,
  )
  results = {"cells": cells, "markdown": md}
  results["figures"] = [plot(ctx, cells)]
  return common.write_outputs(ctx, "length_parity", results, md)


def plot(ctx, cells) -> str:
  """Accuracy (top) and NLL (bottom) against T, one column per probe."""
  plt = common.pyplot()
  tasks = list(dict.fromkeys(c["task"] for c in cells))
  fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.4), squeeze=False)
  for j, task in enumerate(tasks):
    cs = sorted((c for c in cells if c["task"] == task), key=lambda c: c["length"])
    lengths = [c["length"] for c in cs]
    for i, key in enumerate(("acc", "nll")):
      ax = axes[i, j]
      for m in METHODS:
        stats = [common.mean_std(c["methods"][m][key]) for c in cs]
        ax.errorbar(
          lengths,
          [s[0] for s in stats],
          yerr=[s[1] for s in stats],
          color=probes.COLORS[m],
          ls=STYLE[m],
          marker="o",
          ms=3,
          capsize=2,
          label=probes.LABELS[m],
        )
      if key == "nll":
        ax.plot(lengths, [c["unigram_nll"] for c in cs], color="k", lw=0.7, ls=":", label="unigram")
      ax.set_xscale("log", base=2)
      ax.set_xticks(lengths, [str(t) for t in lengths])
      ax.grid(alpha=0.3)
      if key == "acc":
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
      else:
        ax.set_xlabel("sequence length T")
    axes[0, 0].set_ylabel("held-out accuracy")
    axes[1, 0].set_ylabel("held-out NLL (nats)")
  axes[1, -1].legend(fontsize=7, loc="best")
  fig.suptitle("Length at parity: same optimiser steps for BPTT and SMT->DMT (mean ± std)", y=1.0)
  return common.save_figure(ctx, fig, "length_parity.png")
