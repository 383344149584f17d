"""Study: the c_dyn x c_unif grid (paper Fig. 16), SMT->DMT on one probe.

SMT's loss is c_dec L_dec + c_dyn L_dyn + c_unif L_unif (docs/method.md 5.1; defaults 1, 0.1,
0.001). Every cell of the grid is one SMT->DMT run of the length study's config (same teacher, batch
and steps; the default cell is the length study's own run), seeds as the budget says. Reported per
cell: held-out accuracy and NLL of the RNN after SMT and after SMT->DMT, the teacher's, and the
drift of the RNN's rollout from the teacher's memories (1 - R^2) after SMT and after DMT.
"""

from __future__ import annotations

import numpy as np

from experiments.studies import common, length_parity

DEFAULT = (0.1, 1e-3)
SHOWN = (
  ("smt", "rnn_acc", "RNN accuracy after SMT"),
  ("dmt", "rnn_acc", "RNN accuracy after SMT->DMT"),
  ("dmt", "teacher_acc", "teacher accuracy"),
  ("smt", "drift_1mr2", "rollout drift 1-R^2 after SMT"),
)


def run(ctx) -> dict:
  s = ctx.budget.sweep
  cells, rows = [], []
  for c_dyn in s.c_dyn:
    for c_unif in s.c_unif:
      per = {}
      for seed in s.seeds:
        cfg = length_parity.config(ctx, s.task, s.length, seed=seed, phases="smt,dmt")
        if (c_dyn, c_unif) == DEFAULT:
          name = length_parity.run_name(s.task, s.length, seed, "smt_dmt")
        else:
          cfg.smt.c_dyn, cfg.smt.c_unif = c_dyn, c_unif
          name = f"sweep/{s.task}_T{s.length}_s{seed}_cdyn{c_dyn:g}_cunif{c_unif:g}"
        summary = common.ensure_run(ctx, name, cfg)["summary"]
        for phase in ("smt", "dmt"):
          for key in ("rnn_acc", "rnn_nll", "teacher_acc", "teacher_nll", "drift_1mr2"):
            per.setdefault(f"{phase}/{key}", []).append(float(summary[phase][f"eval/{key}"]))
      cells.append({"c_dyn": c_dyn, "c_unif": c_unif, "seeds": list(s.seeds), "metrics": per})
      rows.append(
        [f"{c_dyn:g}", f"{c_unif:g}"]
        + [
          common.fmt_ms(per[k], 2 if "drift" in k else 3)
          for k in (
            "smt/rnn_acc",
            "dmt/rnn_acc",
            "dmt/teacher_acc",
            "dmt/rnn_nll",
            "smt/drift_1mr2",
            "dmt/drift_1mr2",
          )
        ]
      )
  md = (
    f"{s.task}, T = {s.length}, the length study's config (SMT then DMT steps as there), seeds "
    f"{list(s.seeds)}; the default cell (c_dyn, c_unif) = {DEFAULT} is the length study's run.\n\n"
  )
  md += common.markdown_table(
    [
      "c_dyn",
      "c_unif",
      "RNN acc after SMT",
      "RNN acc after SMT->DMT",
      "teacher acc",
      "RNN NLL after SMT->DMT",
      "drift after SMT",
      "drift after DMT",
    ],
    rows,
  )
  results = {"cells": cells, "markdown": md, "figures": [plot(ctx, cells, s)]}
  return common.write_outputs(ctx, "sweep", results, md)


def plot(ctx, cells, s) -> str:
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(SHOWN), figsize=(3.4 * len(SHOWN), 3.0))
  for ax, (phase, key, title) in zip(axes, SHOWN):
    grid = np.full((len(s.c_dyn), len(s.c_unif)), np.nan)
    for c in cells:
      i, j = list(s.c_dyn).index(c["c_dyn"]), list(s.c_unif).index(c["c_unif"])
      grid[i, j] = np.mean(c["metrics"][f"{phase}/{key}"])
    drift = "drift" in key
    im = ax.imshow(
      np.log10(grid) if drift else grid, origin="lower", cmap="magma_r" if drift else "viridis"
    )
    shade = im.norm(np.log10(grid) if drift else grid)  # 0..1 along the colour map
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        dark = shade[i, j] > 0.5 if drift else shade[i, j] < 0.5
        ax.text(
          j,
          i,
          f"{grid[i, j]:.2f}",
          ha="center",
          va="center",
          fontsize=7,
          color="w" if dark else "k",
        )
    ax.set_xticks(range(len(s.c_unif)), [f"{v:g}" for v in s.c_unif])
    ax.set_yticks(range(len(s.c_dyn)), [f"{v:g}" for v in s.c_dyn])
    ax.set_xlabel("c_unif")
    ax.set_title(title + (" (log10 colour)" if drift else ""), fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
  axes[0].set_ylabel("c_dyn")
  fig.suptitle(f"c_dyn x c_unif (Fig. 16): {s.task}, T = {s.length}, SMT->DMT")
  return common.save_figure(ctx, fig, "sweep.png")
