"""Study: scaling with model width / depth (paper Fig. 8) and memory size vs compute (Fig. 9).

docs/method.md 9.4: loss improves with model width and depth; a smaller memory costs more
compute for a given loss. One probe (the length study's config at one T, a longer budget,
held-out evals every `eval_every` steps), SMT->DMT and BPTT at equal optimiser steps, for:
  - widths: the model width d (teacher and RNN) at K memory tokens and RNN depth 1;
  - depths: the RNN's update depth at the base width (the teacher keeps its encoder depth);
  - memory tokens: K at the base width, so the memory holds K x d numbers.
Reported: final held-out NLL / accuracy against parameters and SeqFLOPs; and, per memory size,
the SeqFLOPs a run needed to first reach a fixed held-out NLL (the worst final NLL among that
method's memory sizes, so every run reaches it; linear between evals).
"""

from __future__ import annotations

import jax
import numpy as np

from experiments import plot as plot_lib
from experiments.configs import common as recipes
from experiments.studies import common, length_parity, probes
from smt_jax.runner import experiment

METHODS = ("smt_dmt", "bptt")


def variants(s) -> list[tuple[int, int, int]]:
  """The (width, K, depth) points of the sweep, base first, each once."""
  pts = [(s.width, s.memory_tokens, s.depth)]
  pts += [(w, s.memory_tokens, s.depth) for w in s.widths]
  pts += [(s.width, s.memory_tokens, d) for d in s.depths]
  pts += [(s.width, k, s.depth) for k in s.memory_tokens_sweep]
  return list(dict.fromkeys(pts))


def config(ctx, width: int, tokens: int, depth: int, phases: str):
  s = ctx.budget.scaling
  c = length_parity.config(ctx, s.task, s.length, seed=0, phases=phases)
  c.model.width, c.model.num_memory_tokens = width, tokens
  recipes.rnn_depth(c, depth)
  c.smt.steps, c.dmt.steps, c.bptt.steps = s.smt_steps, s.dmt_steps, s.smt_steps + s.dmt_steps
  c.eval.every_steps = s.eval_every
  c.log_every_steps = max(1, min(25, s.eval_every))
  return c


def num_params(cfg, part: str) -> int:
  exp = experiment.build_experiment(cfg)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(exp.abstract_params[part])))


def flops_to_reach(xs, ys, target: float) -> float:
  """The first x at which y <= target, linear between points; nan if never."""
  for i, (x, y) in enumerate(zip(xs, ys)):
    if y <= target:
      if i == 0:
        return float(x)
      x0, y0 = xs[i - 1], ys[i - 1]
      return float(x0 + (x - x0) * (y0 - target) / (y0 - y)) if y0 != y else float(x)
  return float("nan")


def run(ctx) -> dict:
  s = ctx.budget.scaling
  points = []
  for width, tokens, depth in variants(s):
    pt = {"width": width, "memory_tokens": tokens, "depth": depth, "memory_size": width * tokens}
    for method, phases in (("smt_dmt", "smt,dmt"), ("bptt", "bptt")):
      cfg = config(ctx, width, tokens, depth, phases)
      name = f"scaling/{s.task}_T{s.length}_w{width}_K{tokens}_d{depth}_{method}"
      rec = common.ensure_run(ctx, name, cfg)
      final = rec["summary"]["dmt" if method == "smt_dmt" else "bptt"]
      curve = plot_lib.load_curve(rec["workdir"], metric="eval/rnn_nll", x="seqflops")
      pt[method] = {
        "nll": final["eval/rnn_nll"],
        "acc": final["eval/rnn_acc"],
        "curve": {"x": curve["x"], "y": curve["y"]},
        "seq_flops": curve["x"][-1],
        "train_s": float(sum(rec["train_s"].values())),
      }
      if method == "smt_dmt":
        pt["teacher_nll"] = final["eval/teacher_nll"]
        pt["rnn_params"] = num_params(cfg, "rnn")
        pt["teacher_params"] = num_params(cfg, "teacher")
    points.append(pt)
  base = (s.width, s.memory_tokens, s.depth)
  memory = [p for p in points if (p["width"], p["depth"]) == (base[0], base[2])]
  memory.sort(key=lambda p: p["memory_tokens"])
  targets = {m: max(p[m]["nll"] for p in memory) for m in METHODS}
  for p in memory:
    for m in METHODS:
      c = p[m]["curve"]
      p[m]["flops_to_target"] = flops_to_reach(c["x"], c["y"], targets[m])

  rows = []
  for p in points:
    sweep = []
    if p["memory_tokens"] == base[1] and p["depth"] == base[2]:
      sweep.append("width")
    if p["width"] == base[0] and p["memory_tokens"] == base[1]:
      sweep.append("depth")
    if p["width"] == base[0] and p["depth"] == base[2]:
      sweep.append("memory")
    for m in METHODS:
      r = p[m]
      rows.append(
        [
          "/".join(sweep),
          p["width"],
          p["memory_tokens"],
          p["depth"],
          p["memory_size"],
          f"{p['rnn_params']:,}",
          probes.LABELS[m],
          f"{r['nll']:.3f}",
          f"{r['acc']:.3f}",
          f"{r['seq_flops']:.3g}",
          f"{r['flops_to_target']:.3g}" if "flops_to_target" in r else "-",
          f"{r['train_s']:.0f}",
        ]
      )
  md = (
    f"{s.task}, T = {s.length}, seed 0; the length study's teacher and batch; SMT {s.smt_steps} + "
    f"DMT {s.dmt_steps} vs BPTT {s.smt_steps + s.dmt_steps} steps; base point width {base[0]}, "
    f"K {base[1]}, RNN depth {base[2]}. 'to target': SeqFLOPs until the held-out NLL first reached "
    f"{targets['smt_dmt']:.3f} (SMT->DMT) / {targets['bptt']:.3f} (BPTT), the worst final NLL "
    "among that method's memory sizes.\n\n"
  )
  md += common.markdown_table(
    [
      "sweep",
      "width d",
      "K",
      "RNN depth",
      "memory K x d",
      "RNN params",
      "method",
      "NLL",
      "accuracy",
      "SeqFLOPs / run",
      "SeqFLOPs to target",
      "train s",
    ],
    rows,
  )
  results = {"points": points, "targets": targets, "markdown": md}
  results["figures"] = [plot(ctx, points, memory, base, targets)]
  return common.write_outputs(ctx, "scaling", results, md)


def plot(ctx, points, memory, base, targets) -> str:
  """Final NLL vs RNN params (width, depth); NLL vs SeqFLOPs per memory size; flops to target."""
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
  for m in METHODS:
    for ax, key, label in ((axes[0], "width", "width"), (axes[1], "depth", "RNN depth")):
      fixed = [k for k in ("width", "memory_tokens", "depth") if k != key]
      ref = dict(zip(("width", "memory_tokens", "depth"), base))
      pts = sorted(
        (p for p in points if all(p[k] == ref[k] for k in fixed)), key=lambda p: p["rnn_params"]
      )
      ax.plot(
        [p["rnn_params"] for p in pts],
        [p[m]["nll"] for p in pts],
        marker="o",
        color=probes.COLORS[m],
        label=probes.LABELS[m],
      )
      for p in pts:
        ax.annotate(f"{p[key]}", (p["rnn_params"], p[m]["nll"]), fontsize=7)
      ax.set_xscale("log")  # the width sweep spans 5x in parameters
      ax.set_xlabel(f"RNN parameters ({label} sweep; points labelled by {label})")
  axes[0].set_ylabel("final held-out NLL")
  axes[0].legend(fontsize=7)
  cmap = plt.get_cmap("viridis")
  for i, p in enumerate(memory):
    for m, ls in (("smt_dmt", "-"), ("bptt", "--")):
      c = p[m]["curve"]
      axes[2].plot(
        c["x"],
        c["y"],
        ls=ls,
        color=cmap(i / max(1, len(memory) - 1)),
        label=f"K x d = {p['memory_size']}" if m == "smt_dmt" else None,
      )
  axes[2].set_xscale("log")
  axes[2].set_xlabel("SeqFLOPs (solid SMT->DMT, dashed BPTT)")
  axes[2].set_ylabel("held-out NLL")
  axes[2].legend(fontsize=7)
  for m in METHODS:
    axes[3].plot(
      [p["memory_size"] for p in memory],
      [p[m]["flops_to_target"] for p in memory],
      marker="o",
      color=probes.COLORS[m],
      label=f"{probes.LABELS[m]} (NLL {targets[m]:.2f})",
    )
  axes[3].set_xscale("log", base=2)
  axes[3].set_yscale("log")
  axes[3].set_xlabel("memory size K x d")
  axes[3].set_ylabel("SeqFLOPs to reach the target NLL")
  axes[3].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle("Scaling: width and depth (Fig. 8); memory size vs compute at fixed loss (Fig. 9)")
  fig.tight_layout()
  return common.save_figure(ctx, fig, "scaling.png")
