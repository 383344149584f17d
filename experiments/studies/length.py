"""Study: length generalisation (docs/method.md 9.7).

The probe study's runs on a state-tracking probe (stack), trained on episodes of length T, are
evaluated on held-out episodes of length T, 2T and 4T: the RNN after SMT->DMT and after BPTT (both
read from their own initial memory, no teacher) and the teacher. The teacher's encoder only saw
windows of at most T tokens in training; to score it on longer episodes its context window is set
to the eval length (context_length = factor * T), which works because padding is masked and
positions are rotary (relative): m_t = E(x[0..t]) for every t < factor * T.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments.studies import common, probes
from smt_jax import data
from smt_jax.runner import evaluation


def score(exp, params, source, *, num_batches: int, batch_size: int, with_teacher: bool):
  tfns, rfns = exp.fns
  tot = {}
  for i in range(num_batches):
    batch = common.eval_batch(exp, batch_size=batch_size, step=i, source=source)
    out = evaluation.evaluate(
      params, batch, rnn=rfns, teacher=tfns if with_teacher else None, context_length=source.seq_len
    )
    for k, v in jax.device_get(out).items():
      tot[k] = tot.get(k, 0.0) + float(v)
  res = {
    "rnn_acc": tot["rnn_correct_sum"] / tot["count"],
    "rnn_nll": tot["rnn_nll_sum"] / tot["count"],
  }
  if with_teacher:
    res["teacher_acc"] = tot["teacher_correct_sum"] / tot["count"]
    res["teacher_nll"] = tot["teacher_nll_sum"] / tot["count"]
  return res


def run(ctx) -> dict:
  L = ctx.budget.length
  seeds = ctx.budget.probes.seeds
  lengths = [f * L.length for f in L.factors]
  per = {
    n: {"acc": {ln: [] for ln in lengths}, "nll": {ln: [] for ln in lengths}}
    for n in ("smt_dmt", "bptt", "teacher")
  }
  for seed in seeds:
    pair = probes.ensure_pair(ctx, L.task, L.length, seed)
    for method, (rec, cfg) in pair.items():
      exp, params = common.restore(cfg, rec["workdir"], step=None)
      for ln in lengths:
        src = data.make_source(L.task, seq_len=ln, **dict(cfg.data.options[L.task]))
        r = score(
          exp,
          params,
          src,
          num_batches=cfg.eval.num_batches,
          batch_size=cfg.eval.batch_size,
          with_teacher=method == "smt_dmt",
        )
        per[method]["acc"][ln].append(r["rnn_acc"]), per[method]["nll"][ln].append(r["rnn_nll"])
        if method == "smt_dmt":
          per["teacher"]["acc"][ln].append(r["teacher_acc"])
          per["teacher"]["nll"][ln].append(r["teacher_nll"])
  names = {
    "smt_dmt": "SMT->DMT RNN",
    "bptt": "BPTT RNN",
    "teacher": "teacher (context = eval length)",
  }
  rows = [
    [names[n]]
    + [f"{common.fmt_ms(per[n]['acc'][ln])} / {common.fmt_ms(per[n]['nll'][ln])}" for ln in lengths]
    for n in per
  ]
  md = (
    f"{L.task} probe trained at T = {L.length} (probe-study runs, seeds {list(seeds)}), "
    f"evaluated on held-out episodes; accuracy / NLL, mean ± std over seeds.\n\n"
  )
  md += common.markdown_table(
    ["model"] + [f"T={ln}" + (" (train)" if ln == L.length else "") for ln in lengths], rows
  )
  fig = plot(ctx, per, lengths, names, L)
  return common.write_outputs(
    ctx, "length", {"lengths": lengths, "results": per, "figures": [fig], "markdown": md}, md
  )


def plot(ctx, per, lengths, names, L) -> str:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  colors = {"smt_dmt": "tab:blue", "bptt": "tab:red", "teacher": "tab:gray"}
  for n in per:
    m = [np.mean(per[n]["acc"][ln]) for ln in lengths]
    s = [np.std(per[n]["acc"][ln]) for ln in lengths]
    ax.errorbar(lengths, m, yerr=s, color=colors[n], marker="o", capsize=3, label=names[n])
  ax.axvline(L.length, color="k", lw=0.6, ls=":")
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(x) for x in lengths])
  ax.set_xlabel(f"eval sequence length (trained at T={L.length:d})")
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_title(f"Length generalisation ({L.task})")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return common.save_figure(ctx, fig, "length.png")
