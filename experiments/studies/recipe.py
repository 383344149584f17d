"""Study: the recipe search. SMT->DMT's recipe varied one axis at a time, at equal tokens.

The probe's default recipe (`synthetic.py:TASK,T`: every memory trained from one causal-teacher
pass, `smt.num_decoded` of them decoded, Tf and Tc as the config says, SMT then DMT) is the first
variant; every other variant changes one or two fields of it (`recipe.variants`: a label and
'field=python literal' overrides, e.g. ("Tf 8", ("smt.future_length=8",))), and BPTT runs the same
model and batch under its own variants (`recipe.bptt`: e.g. truncation). Every run trains on the
same tokens (the study refuses a variant that changes them): the verdict's axis is the data, with
SeqFLOPs (serial compute) and this machine's train seconds beside every row. Each method keeps the
config's learning rate (the tuned one, docs/results.md section 0a).
"""

from __future__ import annotations

import ast

import numpy as np

from experiments.configs import synthetic
from experiments.studies import common
from smt_jax.runner import config as config_lib


def apply(c, overrides) -> None:
  """Sets 'field.path=python literal' overrides on a run config (the runner validates them)."""
  for item in overrides:
    key, _, text = item.partition("=")
    *parents, leaf = key.strip().split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = ast.literal_eval(text.strip())


def config(ctx, overrides, seed: int, method: str):
  b = ctx.budget.recipe
  smoke = ",smoke" if ctx.budget.name == "smoke" else ""
  c = synthetic.get_config(f"{b.task},{b.length}{smoke}")
  c.seed = seed
  c.phases = "bptt" if method == "bptt" else "smt,dmt"
  c.bptt.steps = c.smt.steps + c.dmt.steps  # the same tokens (the smoke config cuts them apart)
  c.samples.at_eval = False
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 2
  apply(c, overrides)
  return c


def run(ctx) -> dict:
  b = ctx.budget.recipe
  (default_label, default_overrides), *others = b.variants
  # The baselines first (the default recipe, then BPTT), so a stopped search has its reference.
  plan = [("smt_dmt", default_label, default_overrides)]
  plan += [("bptt", label, o) for label, o in b.bptt]
  plan += [("smt_dmt", label, o) for label, o in others]
  # Every config built, checked and its tokens counted before anything trains.
  configs = [[config(ctx, o, seed, method) for seed in b.seeds] for method, _, o in plan]
  tokens = config_lib.training_tokens(configs[0][0])
  for (_, label, _), cfgs in zip(plan, configs):
    for cfg in cfgs:
      config_lib.validate(cfg)
      if config_lib.training_tokens(cfg) != tokens:
        raise ValueError(
          f"recipe.variants: {label!r} trains on {config_lib.training_tokens(cfg)} tokens, the "
          f"default on {tokens}; keep the sum of the phases' steps x batch x length equal (e.g. "
          f"move steps from SMT to DMT)."
        )
  rows, cells = [], []
  for (method, label, overrides), cfgs in zip(plan, configs):
    per = {k: [] for k in ("nll", "acc", "smt_acc", "teacher_nll", "teacher_acc", "train_s")}
    for seed, cfg in zip(b.seeds, cfgs):
      name = f"recipe/{b.task}{b.length}_{method}_{_slug(label)}_s{seed}"
      rec = common.ensure_run(ctx, name, cfg)
      s = rec["summary"]
      last = s[config_lib.phase_names(cfg)[-1]]
      per["nll"].append(float(last["eval/rnn_nll"]))
      per["acc"].append(float(last["eval/rnn_acc"]))
      per["train_s"].append(float(sum(rec["train_s"].values())))
      if method != "bptt":
        per["smt_acc"].append(float(s["smt"]["eval/rnn_acc"]))
        per["teacher_nll"].append(float(last["eval/teacher_nll"]))
        per["teacher_acc"].append(float(last["eval/teacher_acc"]))
    seqflops = float(sum(common.run_seq_flops(cfg)[0].values()))
    steps = {p: int(cfg[p].steps) for p in config_lib.phase_names(cfg)}
    cells.append(
      dict(
        method=method,
        label=label,
        overrides=list(overrides),
        steps=steps,
        tokens=tokens,
        seqflops=seqflops,
        seeds=list(b.seeds),
        **per,
      )
    )
    rows.append(
      [
        label,
        ", ".join(f"`{o}`" for o in overrides) or "-",
        "+".join(str(v) for v in steps.values()),
        f"{common.fmt_ms(per['acc'])}",
        f"{common.fmt_ms(per['nll'])}",
        common.fmt_ms(per["smt_acc"]) if per["smt_acc"] else "-",
        common.fmt_ms(per["teacher_acc"]) if per["teacher_acc"] else "-",
        common.fmt_ms(per["teacher_nll"]) if per["teacher_nll"] else "-",
        f"{seqflops:.3g}",
        f"{np.mean(per['train_s']):.0f}",
      ]
    )
  md = (
    f"`synthetic.py:{b.task},{b.length}`, every run on {tokens:.3g} training tokens, seeds "
    f"{list(b.seeds)} (mean ± std); each variant changes the default recipe (first row) as its "
    f"overrides say. RNN: alone, from its own initial memory, held out; after SMT: before DMT. "
    f"Train s: this machine's seconds of training (no compile, no evaluation).\n\n"
  )
  md += common.markdown_table(
    [
      "variant",
      "overrides",
      "steps",
      "RNN acc",
      "RNN NLL",
      "RNN acc after SMT",
      "teacher acc",
      "teacher NLL",
      "SeqFLOPs",
      "train s",
    ],
    rows,
  )
  results = {"cells": cells, "markdown": md, "figures": [plot(ctx, cells)]}
  return common.write_outputs(ctx, "recipe", results, md)


def _slug(label: str) -> str:
  return "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")


def plot(ctx, cells) -> str:
  """Held-out accuracy per variant (the RNN, its teacher; BPTT's variants beside) and train s."""
  plt = common.pyplot()
  fig, (ax, tax) = plt.subplots(1, 2, figsize=(11, 0.5 + 0.35 * len(cells)), sharey=True)
  y = np.arange(len(cells))[::-1]
  for yi, cell in zip(y, cells):
    color = "tab:red" if cell["method"] == "bptt" else "tab:blue"
    ax.barh(
      yi,
      np.mean(cell["acc"]),
      xerr=np.std(cell["acc"]) if len(cell["acc"]) > 1 else 0,
      color=color,
      height=0.6,
    )
    if cell["teacher_acc"]:
      ax.plot([np.mean(cell["teacher_acc"])] * 2, [yi - 0.35, yi + 0.35], color="k", lw=1.5)
    tax.barh(yi, np.mean(cell["train_s"]), color=color, height=0.6)
  ax.set_yticks(y, [c["label"] for c in cells])
  lo = min(min(c["acc"]) for c in cells)
  ax.set_xlim(max(0.0, lo - 0.05), 1.0)
  ax.set_xlabel("held-out accuracy of the RNN alone (black: its teacher)")
  tax.set_xlabel("train seconds on this machine")
  for a in (ax, tax):
    a.grid(axis="x", alpha=0.3)
  fig.suptitle("Recipe search at equal tokens: SMT->DMT (blue) against BPTT (red)")
  fig.tight_layout()
  return common.save_figure(ctx, fig, "recipe.png")
