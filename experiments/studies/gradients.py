"""Study: gradient flow, ||dL/dm_t|| against distance from the loss (docs/method.md 9.5).

On the retrieval probe (the only target is the needle, asked for at the last step T-1), for held-out
sequences:
  BPTT  the gradient of the BPTT loss w.r.t. the RNN state m_t after reading x[t], through the
        unroll (`analysis.rollout_state_gradient_norms`);
  SMT   the gradient of the SMT loss w.r.t. the teacher memory m_t (`smt_memory_gradient_norms`):
        every memory gets its own decoding / dynamics terms, nothing is unrolled.
Both at initialisation and after training (BPTT: the end of the BPTT run; SMT: the end of the SMT
phase of the SMT->DMT run), plotted against the distance T-1-t to the retrieval target.
Both losses are batch means; norms are multiplied by the batch size, i.e. per-sequence gradients.
Absolute levels of the two losses are not comparable (different terms and normalisations): the
slope with distance is the finding.
"""

from __future__ import annotations

import jax
import numpy as np

from experiments.studies import common, probes
from smt_jax import analysis, inference, losses, objectives
from smt_jax.runner import experiment


def bptt_gradient_norms(exp, params, batch):
  _, rfns = exp.fns
  rp = params["rnn"]
  b = batch["x"].shape[0]

  def loss_of_states(states):
    ce, mask = losses.masked_cross_entropy(
      objectives.readout_over_time(rfns, rp, states), batch["y"]
    )
    return b * losses.masked_mean(ce, mask)

  m0 = inference.initial_memories(rfns, rp, b)
  return jax.jit(
    lambda p, m, x: analysis.rollout_state_gradient_norms(
      loss_of_states, p, m, x, update=rfns.update
    )
  )(rp, m0, batch["x"])


def smt_gradient_norms(exp, config, params, batch):
  tfns, _ = exp.fns
  loss_fn = experiment.make_loss(config, "smt", exp.fns)
  b = batch["x"].shape[0]
  fn = jax.jit(
    lambda p: (
      b * analysis.smt_memory_gradient_norms(loss_fn, p, batch, jax.random.key(0), teacher=tfns)
    )
  )
  return fn(params)


def run(ctx) -> dict:
  g = ctx.budget.gradients
  pair = probes.ensure_pair(ctx, g.task, g.length, seed=0)
  (rs, cs), (rb, cb) = pair["smt_dmt"], pair["bptt"]
  exp, p_init = common.restore(cs, rs["workdir"], step=0)
  _, p_smt = common.restore(cs, rs["workdir"], step=common.phase_end_step(cs, "smt"))
  exp_b, p_bptt = common.restore(cb, rb["workdir"], step=None)
  batch = common.eval_batch(exp, batch_size=g.num_sequences)
  t = batch["x"].shape[1]
  curves = {  # name -> (distance [n], norms [B, n])
    "BPTT, init": (t - 1 - np.arange(t), bptt_gradient_norms(exp_b, p_init, batch)),
    "BPTT, trained": (t - 1 - np.arange(t), bptt_gradient_norms(exp_b, p_bptt, batch)),
    "SMT, init": (t - 1 - np.arange(-1, t), smt_gradient_norms(exp, cs, p_init, batch)),
    "SMT, trained": (t - 1 - np.arange(-1, t), smt_gradient_norms(exp, cs, p_smt, batch)),
  }
  rows, out = [], {}
  for name, (dist, norms) in curves.items():
    norms = np.asarray(norms)
    med = np.median(norms, axis=0)
    near, far = med[dist == 0][0], med[dist == dist.max()][0]
    out[name] = {
      "distance": dist,
      "median": med,
      "q25": np.quantile(norms, 0.25, axis=0),
      "q75": np.quantile(norms, 0.75, axis=0),
    }
    rows.append(
      [
        name,
        f"{near:.3g}",
        f"{far:.3g}",
        f"{far / max(near, 1e-30):.3g}",
        f"{med.min():.3g}",
        f"{med.max():.3g}",
      ]
    )
  md = (
    f"Retrieval probe, T = {t}, seed 0, {batch['x'].shape[0]} held-out sequences; median over "
    f"sequences of the per-sequence gradient norm ||dL/dm_t||.\n\n"
  )
  md += common.markdown_table(
    [
      "curve",
      "at the target (d=0)",
      "farthest memory",
      "farthest / at target",
      "min over t",
      "max over t",
    ],
    rows,
  )
  fig = plot(ctx, out, t)
  return common.write_outputs(
    ctx, "gradients", {"curves": out, "figures": [fig], "markdown": md}, md
  )


def plot(ctx, curves, t) -> str:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 3.6))
  style = {
    "BPTT, init": ("tab:red", "--"),
    "BPTT, trained": ("tab:red", "-"),
    "SMT, init": ("tab:blue", "--"),
    "SMT, trained": ("tab:blue", "-"),
  }
  for name, c in curves.items():
    color, ls = style[name]
    ax.plot(c["distance"], c["median"], color=color, ls=ls, label=name)
    ax.fill_between(c["distance"], c["q25"], c["q75"], color=color, alpha=0.12)
  ax.set_yscale("log")
  ax.set_xlabel("distance from the retrieval target, T-1-t (steps)")
  ax.set_ylabel("||dL / dm_t|| per sequence")
  ax.set_title(f"Gradient w.r.t. each memory m_t (retrieval, T={t}; median, IQR band)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return common.save_figure(ctx, fig, "gradients.png")
