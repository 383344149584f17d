"""Study: the recipe search. SMT->DMT's recipe varied one axis at a time, at equal tokens.

Per workload (`recipe.workloads`), the first variant is the recipe a user gets and every other
changes one or two of its fields (`recipe.variants[workload]`: a label and 'field=python literal'
overrides, e.g. ("Tf 8", ("smt.future_length=8",))); BPTT runs the same model and batch under its
own variants (`recipe.bptt[workload]`: e.g. truncation). The base config of a probe ('stack32':
stack at T = 32) is its default (`synthetic.py:stack,32`, its budget and learning rates); that of
a stream ('digits', 'text') is the fair race's (`race.config`: the race's tokens and SMT share,
each method at `recipe.lrs[workload]`), a variant's lengths setting its steps, and the race's own
runs reused for the default and BPTT. Every run of a workload trains on the same tokens (within
1%: the steps are whole): the study refuses a variant that does not, before anything trains,
unless `recipe.more_tokens[workload]` names it (a row on another axis on purpose, e.g. a cheaper
recipe given a dearer one's train seconds; the table gives its tokens). The verdict's axis is the
data, with SeqFLOPs (serial compute) and this machine's train seconds beside every row.
"""

from __future__ import annotations

import numpy as np

from experiments.configs import synthetic
from experiments.studies import common, race
from smt_jax.runner import config as config_lib


def config(ctx, workload: str, label: str, overrides, seed: int, method: str):
  """(run name, config) of one run of the search."""
  b = ctx.budget.recipe
  name = f"recipe/{workload}_{method}_{_slug(label)}_s{seed}"
  probe = race.probe_length(ctx, workload)
  if probe is None:
    lr = b.lrs[workload][method]
    c = race.config(ctx, workload, method, lr, seed, overrides)
    return (race.run_name(workload, method, lr, seed) if not overrides else name), c
  smoke = ",smoke" if ctx.budget.name == "smoke" else ""
  c = synthetic.get_config(f"{probe[0]},{probe[1]}{smoke}")
  c.seed = seed
  c.phases = "bptt" if method == "bptt" else "smt,dmt"
  c.bptt.steps = c.smt.steps + c.dmt.steps  # the same tokens (the smoke config cuts them apart)
  c.samples.at_eval = False
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 2
  common.apply_overrides(c, overrides)
  return name, c


def run(ctx) -> dict:
  b = ctx.budget.recipe
  cells, md = [], ""
  for workload in b.workloads:
    (default_label, default_overrides), *others = b.variants[workload]
    # The baselines first (the default recipe, then BPTT), so a stopped search has its reference.
    plan = [("smt_dmt", default_label, default_overrides)]
    plan += [("bptt", label, o) for label, o in b.bptt[workload]]
    plan += [("smt_dmt", label, o) for label, o in others]
    # Every config built, checked and its tokens counted before anything trains.
    runs = [
      [config(ctx, workload, lab, o, seed, m) for seed in b.seeds[workload]] for m, lab, o in plan
    ]
    tokens = config_lib.training_tokens(runs[0][0][1])
    exempt = b.more_tokens.get(workload, ())
    for (_, label, _), named in zip(plan, runs):
      for _, cfg in named:
        config_lib.validate(cfg)
        n = config_lib.training_tokens(cfg)
        if abs(n - tokens) > 0.01 * tokens and label not in exempt:
          raise config_lib.ConfigError(
            f"recipe.variants: {label!r} trains on {n} tokens, the default on {tokens}; keep "
            f"the sum of the phases' steps x batch x length equal (e.g. move steps from SMT to "
            f"DMT), or name it in recipe.more_tokens.{workload} to race it at other tokens."
          )
    cell, table = _measure(ctx, workload, plan, runs)
    cells.append(cell)
    md += table
  results = {"cells": cells, "markdown": md, "figures": [plot(ctx, cells)]}
  return common.write_outputs(ctx, "recipe", results, md)


def _measure(ctx, workload, plan, runs):
  """Trains (or reuses) a workload's runs: ({workload, probe, rows: per variant}, its table)."""
  b = ctx.budget.recipe
  probe = race.probe_length(ctx, workload) is not None
  rows, table = [], []
  for (method, label, overrides), named in zip(plan, runs):
    per = {k: [] for k in ("nll", "acc", "smt_nll", "teacher_nll", "teacher_acc", "train_s")}
    for name, cfg in named:
      rec = common.ensure_run(ctx, name, cfg)
      s = rec["summary"]
      last = s[config_lib.phase_names(cfg)[-1]]
      per["nll"].append(float(last["eval/rnn_nll"]))
      per["train_s"].append(float(sum(rec["train_s"].values())))
      if probe:
        per["acc"].append(float(last["eval/rnn_acc"]))
      if method != "bptt":
        per["smt_nll"].append(float(s["smt"]["eval/rnn_nll"]))
        per["teacher_nll"].append(float(last["eval/teacher_nll"]))
        if probe:
          per["teacher_acc"].append(float(last["eval/teacher_acc"]))
    cfg = named[0][1]
    seqflops = float(sum(common.run_seq_flops(cfg)[0].values()))
    steps = {p: int(cfg[p].steps) for p in config_lib.phase_names(cfg)}
    tokens = config_lib.training_tokens(cfg)
    rows.append(
      dict(
        method=method,
        label=label,
        overrides=list(overrides),
        steps=steps,
        tokens=tokens,
        seqflops=seqflops,
        lr=float(cfg[config_lib.phase_names(cfg)[0]].lr),
        **per,
      )
    )
    ms = lambda v: common.fmt_ms(v) if v else "-"  # noqa: E731
    table.append(
      [
        label,
        ", ".join(f"`{o}`" for o in overrides) or "-",
        "+".join(str(v) for v in steps.values()),
        f"{tokens:.4g}",
        ms(per["acc"]),
        ms(per["nll"]),
        ms(per["smt_nll"]),
        ms(per["teacher_acc"]),
        ms(per["teacher_nll"]),
        f"{seqflops:.3g}",
        f"{np.mean(per['train_s']):.0f}",
      ]
    )
  md = (
    f"**{workload}**, seeds {list(b.seeds[workload])} (mean ± std); each variant changes the "
    f"default recipe (first row) as its overrides say. RNN: alone, from its own initial memory, "
    f"held out; after SMT: before DMT. Train s: this machine's seconds of training (no compile, "
    f"no evaluation).\n\n"
  )
  md += common.markdown_table(
    [
      "variant",
      "overrides",
      "steps",
      "tokens",
      "RNN acc",
      "RNN NLL",
      "RNN NLL after SMT",
      "teacher acc",
      "teacher NLL",
      "SeqFLOPs",
      "train s",
    ],
    table,
  )
  return dict(workload=workload, probe=probe, seeds=list(b.seeds[workload]), rows=rows), md + "\n"


def _slug(label: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")


def plot(ctx, cells) -> str:
  """Per workload: the RNN's held-out accuracy (a probe) or NLL (a stream) per variant, its
  teacher's beside it (black), BPTT's variants in red; and each run's train seconds."""
  plt = common.pyplot()
  n = max(len(c["rows"]) for c in cells)
  fig, axes = plt.subplots(len(cells), 2, figsize=(11, (0.6 + 0.3 * n) * len(cells)), squeeze=False)
  for (ax, tax), cell in zip(axes, cells):
    key = "acc" if cell["probe"] else "nll"
    y = np.arange(len(cell["rows"]))[::-1]
    for yi, row in zip(y, cell["rows"]):
      color = "tab:red" if row["method"] == "bptt" else "tab:blue"
      v = row[key]
      ax.barh(yi, np.mean(v), xerr=np.std(v) if len(v) > 1 else 0, color=color, height=0.6)
      if row[f"teacher_{key}"]:
        ax.plot([np.mean(row[f"teacher_{key}"])] * 2, [yi - 0.35, yi + 0.35], color="k", lw=1.5)
      tax.barh(yi, np.mean(row["train_s"]), color=color, height=0.6)
    for a in (ax, tax):
      a.set_yticks(y, [r["label"] for r in cell["rows"]])
      a.grid(axis="x", alpha=0.3)
    values = [x for r in cell["rows"] for x in r[key] + r[f"teacher_{key}"]]
    lo, hi = min(values), max(values)
    pad = 0.1 * (hi - lo) + 1e-3
    ax.set_xlim(lo - pad, min(1.0, hi + pad) if cell["probe"] else hi + pad)
    what = "accuracy" if cell["probe"] else "NLL"
    ax.set_xlabel(f"{cell['workload']}: held-out {what} of the RNN alone (black: its teacher)")
    tax.set_xlabel("train seconds on this machine")
  fig.suptitle(
    "Recipe search: SMT->DMT (blue) against BPTT (red); equal tokens unless a label says otherwise"
  )
  fig.tight_layout()
  return common.save_figure(ctx, fig, "recipe.png")
