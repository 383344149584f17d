"""Study: the fair race. SMT->DMT against BPTT at equal training tokens, each at its best lr.

Every method trains on the same number of training tokens (batch x sequence length x steps,
summed over its phases: the same data), with its own learning rate picked from a small grid
(`race.lrs`, per workload: one grid for every method or one per method; DMT at
`race.dmt_lr_ratio` of SMT's), on the configs a user gets by default:
  smt_dmt   full supervision (`synthetic.py:TASK,T`, the probes' default; `pixels.py:digits,full`):
            every memory of a sequence trained from one causal-teacher pass, a few decoded;
  earlier   the windowed teacher on few memories (`pixels.py:digits,earlier` as measured: 2
            transitions per row, 64-wide heads, constant lr; `synthetic.py:TASK,T,earlier`:
            every transition, Tf = 8, on the authors' task sizes), at `race.earlier_lrs`, on
            the workloads in `race.earlier`;
  bptt      the baseline, the same model and batch.
Workloads: `digits`, `text` (bytes of the offline corpus: `text.py:small`, earlier
`text.py:small,earlier`) and the probes, at `race.length` (`stack`) or at a length of their
own (`stack32`). The streams race `,full` with Tf 16 and 8 memories decoded, its recipe when
raced (the recipe search's winner, Tf 8 with 16 decoded, is `,full`'s since).
SMT takes `race.smt_share` of a run's tokens and DMT the rest. Reported per run: the RNN's own
held-out NLL (and accuracy on a probe) after each phase, the teacher's, the tokens, the SeqFLOPs
(serial compute, `common.run_seq_flops`), and the train seconds on this machine (excluding compile
and evaluation: total work, what a CPU user pays); the figure draws each method's best-lr run
against tokens, SeqFLOPs and train seconds.
"""

from __future__ import annotations

from experiments.configs import pixels, synthetic, text
from experiments.studies import common
from smt_jax.runner import config as config_lib
from smt_jax.runner import metrics_io

METHODS = ("smt_dmt", "earlier", "bptt")
LABELS = {
  "smt_dmt": "SMT->DMT, every memory",
  "earlier": "SMT->DMT, windowed, few memories",
  "bptt": "BPTT",
}
COLORS = {"smt_dmt": "tab:blue", "earlier": "tab:gray", "bptt": "tab:red"}


def run_name(workload: str, method: str, lr: float, seed: int) -> str:
  return f"race/{workload}_{method}_lr{lr:g}_s{seed}"


def probe_length(ctx, workload: str) -> tuple[str, int] | None:
  """(task, T) of a probe workload ('stack': race.length; 'stack32': 32); None for a stream."""
  if workload in ("digits", "text"):
    return None
  task = workload.rstrip("0123456789")
  return task, int(workload[len(task) :] or ctx.budget.race.length)


def lr_grid(r, workload: str, method: str) -> tuple[float, ...]:
  """A method's lr grid on a workload: `race.lrs[workload]` is one grid for every method or a
  dict of one per method (`{'smt_dmt': (1e-2,), 'bptt': (3e-3,)}`, e.g. more seeds at each
  method's best); the earlier recipe's is `race.earlier_lrs`."""
  if method == "earlier":
    return tuple(r.earlier_lrs)
  grid = r.lrs[workload]
  if hasattr(grid, "keys"):
    if method not in grid:
      raise config_lib.ConfigError(
        f"race.lrs.{workload} has no grid for '{method}': add {method}=(...) or give one grid "
        f"for every method."
      )
    grid = grid[method]
  return tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)


def config(ctx, workload: str, method: str, lr: float, seed: int, overrides=()):
  """The config of one race run: the workload's default (or earlier) recipe at the token budget.

  `overrides` ('field=literal', the recipe study's variants) apply before the phases' steps are
  set from the token budget (a variant's lengths set its steps), and an override of a phase's
  `steps` after it (an explicit split wins)."""
  r = ctx.budget.race
  smoke = ",smoke" if ctx.budget.name == "smoke" else ""
  flags = (",earlier" if method == "earlier" else "") + smoke
  if workload == "digits":
    # BPTT takes the full-supervision config's schedule (cosine decay after a 5% warm-up).
    c = pixels.get_config("digits" + (",earlier" if method == "earlier" else ",full") + smoke)
    c.model.head_dim = 64  # the model the race was measured on (the default until 2026-12-03)
    if method == "earlier":
      c.smt.schedule = "constant"
  elif workload == "text":  # `,earlier`: 2 transitions, constant lr (the default until 2026-12-06)
    c = text.get_config(
      ("small" if smoke == "" else "smoke") + (",earlier" if method == "earlier" else "")
    )
    c.dmt.streams_from_rnn_initial_memory = False  # as raced (text's default until 2026-12-06)
  else:
    task, length = probe_length(ctx, workload)
    c = synthetic.get_config(f"{task},{length}{flags}")
    c.data.options[task].update(synthetic.TASK_OPTIONS[task])  # the authors' task, every method
  if probe_length(ctx, workload) is None and method != "earlier" and not smoke:
    # the streams' full supervision as raced (`,full`'s recipe until 2026-12-04)
    c.smt.future_length, c.smt.num_transitions, c.smt.num_decoded = 16, 80, 8
  c.seed = seed
  c.phases = "bptt" if method == "bptt" else "smt,dmt"
  common.apply_overrides(c, overrides)
  tokens = r.tokens[workload]
  per_step = {p: c[p].batch_size * config_lib.phase_seq_len(c, p) for p in ("smt", "dmt", "bptt")}
  if method == "bptt":
    c.bptt.steps = max(1, round(tokens / per_step["bptt"]))
    c.bptt.lr = lr
  else:
    c.smt.steps = max(1, round(r.smt_share * tokens / per_step["smt"]))
    c.dmt.steps = max(1, round((1 - r.smt_share) * tokens / per_step["dmt"]))
    c.smt.lr, c.dmt.lr = lr, lr * r.dmt_lr_ratio
  common.apply_overrides(
    c, [o for o in overrides if o.partition("=")[0].strip().endswith(".steps")]
  )
  total = sum(c[p].steps for p in config_lib.phase_names(c))
  c.eval.every_steps = max(1, total // r.evals)
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 2
  c.samples.at_eval = False
  c.log_every_steps = max(1, min(25, total // 8))
  return c


def curve(workdir: str, key: str) -> dict[str, list[float]]:
  """Held-out `key` against tokens, SeqFLOPs and train seconds (the logged step rates summed)."""
  out = {"tokens": [], "seqflops": [], "train_s": [], "value": []}
  seconds, last = 0.0, {}
  for row in metrics_io.read_metrics(workdir):
    phase = row.get("phase")
    if row.get("steps_per_s"):
      seconds += (row["phase_step"] - last.get(phase, 0)) / row["steps_per_s"]
      last[phase] = row["phase_step"]
    if key in row and "tokens" in row:
      out["tokens"].append(row["tokens"])
      out["seqflops"].append(row["seqflops"])
      out["train_s"].append(seconds)
      out["value"].append(row[key])
  return out


def run(ctx) -> dict:
  r = ctx.budget.race
  methods = {w: [m for m in METHODS if m != "earlier" or w in r.earlier] for w in r.workloads}
  grids = {(w, m): lr_grid(r, w, m) for w in r.workloads for m in methods[w]}  # before training
  cells, rows = [], []
  for workload in r.workloads:
    probe = probe_length(ctx, workload) is not None
    runs = []
    for method in methods[workload]:
      for lr in grids[workload, method]:
        for seed in r.seeds:
          cfg = config(ctx, workload, method, lr, seed)
          rec = common.ensure_run(ctx, run_name(workload, method, lr, seed), cfg)
          s = rec["summary"]
          last = s["bptt" if method == "bptt" else "dmt"]
          result = dict(
            method=method,
            lr=lr,
            seed=seed,
            workdir=rec["workdir"],
            nll=float(last["eval/rnn_nll"]),
            acc=float(last["eval/rnn_acc"]) if probe else None,
            tokens=config_lib.training_tokens(cfg),
            seqflops=float(sum(common.run_seq_flops(cfg)[0].values())),
            train_s=float(sum(rec["train_s"].values())),
            steps={p: int(cfg[p].steps) for p in rec["steps"]},
            unigram_nll=float(s["baseline/unigram_nll"]),
          )
          if method != "bptt":
            result["smt_nll"] = float(s["smt"]["eval/rnn_nll"])
            result["teacher_nll"] = float(last["eval/teacher_nll"])
            if probe:
              result["teacher_acc"] = float(last["eval/teacher_acc"])
          runs.append(result)
    best = {}
    for method in methods[workload]:
      mine = [x for x in runs if x["method"] == method]
      by_lr = {}
      for x in mine:
        by_lr.setdefault(x["lr"], []).append(x["nll"])
      best[method] = min(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
    cells.append(dict(workload=workload, runs=runs, best_lr=best))
    for x in runs:
      star = " *" if x["lr"] == best[x["method"]] else ""
      rows.append(
        [
          workload,
          LABELS[x["method"]],
          f"{x['lr']:g}{star}",
          "+".join(str(v) for v in x["steps"].values()),
          f"{x['tokens']:.3g}",
          f"{x['nll']:.3f}",
          f"{x['acc']:.3f}" if probe else "-",
          f"{x['smt_nll']:.3f}" if "smt_nll" in x else "-",
          f"{x['teacher_nll']:.3f}" if "teacher_nll" in x else "-",
          f"{x['teacher_acc']:.3f}" if "teacher_acc" in x else "-",
          f"{x['seqflops']:.3g}",
          f"{x['train_s']:.0f}",
          f"{x['unigram_nll']:.3f}",
        ]
      )
  md = (
    f"Budget `{ctx.budget.name}`: equal training tokens per workload ({dict(r.tokens)}), SMT "
    f"{r.smt_share:.0%} of SMT->DMT's; lrs {r.lrs.to_dict()} (DMT at {r.dmt_lr_ratio:g} x "
    f"SMT's; the earlier recipe at {list(r.earlier_lrs)}); seeds {list(r.seeds)}; * the best lr "
    f"of a method (lowest final RNN NLL). NLL and accuracy: the RNN alone, from its own initial "
    f"memory, held out; after SMT: before DMT. Train s: this machine's seconds of training (no "
    f"compile, no evaluation).\n\n"
  )
  md += common.markdown_table(
    [
      "workload",
      "method",
      "lr",
      "steps",
      "tokens",
      "RNN NLL",
      "RNN acc",
      "RNN NLL after SMT",
      "teacher NLL",
      "teacher acc",
      "SeqFLOPs",
      "train s",
      "unigram NLL",
    ],
    rows,
  )
  results = {"cells": cells, "markdown": md, "figures": [plot(ctx, cells)]}
  return common.write_outputs(ctx, "race", results, md)


def plot(ctx, cells) -> str:
  """Each method's best-lr held-out RNN NLL against tokens, SeqFLOPs and train seconds."""
  plt = common.pyplot()
  axes_x = (("tokens", "training tokens"), ("seqflops", "SeqFLOPs"), ("train_s", "train seconds"))
  fig, axes = plt.subplots(len(cells), 3, figsize=(10, 3.0 * len(cells)), squeeze=False)
  for i, cell in enumerate(cells):
    for method in cell["best_lr"]:
      for x in cell["runs"]:
        if x["method"] != method or x["lr"] != cell["best_lr"][method] or x["seed"] != 0:
          continue
        c = curve(x["workdir"], "eval/rnn_nll")
        for j, (key, label) in enumerate(axes_x):
          ax = axes[i, j]
          ax.plot(
            c[key],
            c["value"],
            marker="o",
            ms=3,
            color=COLORS[method],
            label=f"{LABELS[method]} (lr {x['lr']:g})",
          )
          if "teacher_nll" in x and method == "smt_dmt":
            ax.axhline(x["teacher_nll"], color=COLORS[method], ls="--", lw=0.8)
          ax.set_xlabel(label)
          ax.set_xscale("log" if key == "seqflops" else "linear")
          ax.grid(alpha=0.3)
    unigram = cell["runs"][0]["unigram_nll"]
    for ax in axes[i]:
      ax.axhline(unigram, color="k", ls=":", lw=0.7)
    axes[i, 0].set_ylabel(f"{cell['workload']}: held-out RNN NLL")
  axes[0, -1].legend(fontsize=7, loc="best")
  fig.suptitle("The fair race: best lr per method, equal tokens (dashed: SMT's teacher)", y=1.0)
  fig.tight_layout()
  return common.save_figure(ctx, fig, "race.png")
