"""Study: bytes, SMT->DMT vs BPTT (the paper's language-modelling data-efficiency claim,
docs/method.md 9.3).

The offline corpus (`experiments/configs/text.py:small,earlier` with no data path: the help pages
every Python ships, `pydoc_data.topics`), V = 256. One SMT->DMT run and one BPTT run of the same
RNN, the same batch and the same optimiser steps (SMT + DMT == BPTT), evaluated every
`eval_every_steps` on the held-out part of the corpus. The curves are the RNN's bits per byte (read
from its own initial memory, no teacher) against optimiser steps, training tokens seen and
SeqFLOPs, the x-axes the runner writes into every metrics row (`experiments.plot`).
"""

from __future__ import annotations

from experiments import plot as plot_lib
from experiments.configs import text
from experiments.studies import common, probes

METRIC = "eval/rnn_bits_per_byte"
AXES = ("steps", "tokens", "seqflops")


def config(ctx, *, phases: str, seed: int = 0):
  """text.py's CPU model at the study budget: SMT + DMT steps == BPTT steps, one batch size."""
  b = ctx.budget.text
  # the 2-transition recipe measured (text.py's default until 2026-12-06)
  c = text.get_config("smoke,earlier" if ctx.budget.name == "smoke" else "small,earlier")
  c.seed = seed
  c.phases = phases
  c.smt.steps, c.dmt.steps, c.bptt.steps = b.smt_steps, b.dmt_steps, b.smt_steps + b.dmt_steps
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = b.batch_size
  c.eval.every_steps = b.eval_every_steps
  c.eval.num_batches = b.eval_batches
  c.checkpoint_every_steps = 0
  c.samples.at_eval = False
  c.log_every_steps = max(1, min(50, b.eval_every_steps))
  return c


def run(ctx) -> dict:
  b = ctx.budget.text
  res, rows, workdirs = {}, [], {}
  for method, phases in (("smt_dmt", "smt,dmt"), ("bptt", "bptt")):
    cfg = config(ctx, phases=phases)
    rec = common.ensure_run(ctx, f"text/{method}", cfg)
    workdirs[method] = rec["workdir"]
    curves = {x: plot_lib.load_curve(rec["workdir"], metric=METRIC, x=x) for x in AXES}
    final = rec["summary"]["dmt" if method == "smt_dmt" else "bptt"]
    res[method] = {
      "curves": {x: {"x": c["x"], "y": c["y"]} for x, c in curves.items()},
      "bits_per_byte": final[METRIC],
      "steps": rec["steps"],
      "tokens": curves["tokens"]["x"][-1],
      "seq_flops": curves["seqflops"]["x"][-1],
      "train_s": float(sum(rec["train_s"].values())),
      "wall_s": rec["wall_s"],
    }
    if method == "smt_dmt":
      res[method]["bits_after_smt"] = rec["summary"]["smt"][METRIC]
      res[method]["teacher_nll"] = final.get("eval/teacher_full_nll", float("nan"))
    r = res[method]
    rows.append(
      [
        probes.LABELS[method],
        "+".join(str(v) for v in r["steps"].values()),
        f"{r['bits_per_byte']:.3f}",
        f"{r['bits_after_smt']:.3f}" if "bits_after_smt" in r else "-",
        f"{r['tokens']:.3g}",
        f"{r['seq_flops']:.3g}",
        f"{r['train_s']:.0f}",
        f"{r['wall_s']:.0f}",
      ]
    )
  md = (
    f"Offline byte corpus (pydoc_data.topics), text.py's CPU model, batch {b.batch_size}, seed 0; "
    f"held-out bits per byte of the RNN alone, evaluated every {b.eval_every_steps} steps on "
    f"{b.eval_batches} batches.\n\n"
  )
  md += common.markdown_table(
    [
      "method",
      "opt. steps",
      "bits/byte",
      "bits/byte after SMT",
      "tokens seen",
      "SeqFLOPs / run",
      "train s",
      "wall s",
    ],
    rows,
  )
  results = {"results": res, "markdown": md, "figures": [plot(ctx, res)]}
  return common.write_outputs(ctx, "text", results, md)


def plot(ctx, res) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(AXES), figsize=(4.2 * len(AXES), 3.3))
  for ax, x in zip(axes, AXES):
    for method, r in res.items():
      c = r["curves"][x]
      ax.plot(
        c["x"], c["y"], marker="o", ms=3, color=probes.COLORS[method], label=probes.LABELS[method]
      )
    ax.set_xlabel(plot_lib.X_LABELS[x])
    if x == "seqflops":
      ax.set_xscale("log")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("held-out bits per byte (RNN alone)")
  axes[0].legend(fontsize=7)
  fig.suptitle("Bytes: SMT->DMT vs BPTT at equal optimiser steps")
  return common.save_figure(ctx, fig, "text.png")
