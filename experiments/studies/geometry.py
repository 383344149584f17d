"""Study: memory geometry, a 2-D PCA of the RNN's memory trajectory (docs/method.md 9.8).

Trajectories of the SMT->DMT RNN read from its own initial memory (no teacher): over a held-out
8x8 digit (BOS then 64 pixels; the curves study's digits run, as in the samples study) and over
held-out stack-probe episodes, from the probe study's run (seed 0) and from the curves study's
long-budget stack run (the length study's config at a longer T and 1500 steps). The
PCA basis is fitted on the RNN states of many held-out sequences; the teacher's memories of the same
sequence are projected into the same basis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.studies import common, curves, probes
from smt_jax import analysis, inference, objectives


def trajectories(exp, config, params, x):
  """RNN states and teacher memories after each token of x [N, L]: two [N, L, K*d] arrays."""
  tfns, rfns = exp.fns

  @jax.jit
  def f(params, x):
    rp = params["rnn"]
    states = objectives.rollout(
      rp, inference.initial_memories(rfns, rp, x.shape[0]), x, update=rfns.update
    )
    mem = objectives.teacher_memories(
      tfns, params["teacher"], x, jnp.arange(x.shape[1]), config.smt.context_length
    )
    return states.reshape(*x.shape, -1), mem.reshape(*x.shape, -1)

  s, m = f(params, jnp.asarray(x))
  return np.asarray(s), np.asarray(m)


def digit_sequences(exp, n: int) -> tuple[np.ndarray, np.ndarray]:
  src = exp.source
  imgs = src.images("eval")[:n].reshape(n, -1).astype(np.int32)
  return np.concatenate([np.full((n, 1), src.bos, np.int32), imgs], 1), imgs


def stack_depth(x: np.ndarray) -> np.ndarray:
  """Stack depth after each step of a stack episode (x == 0 pops, else pushes)."""
  return np.cumsum(np.where(x == 0, -1, 1), axis=-1)


def turns(xy: np.ndarray) -> np.ndarray:
  """Signed turns of 2-D trajectories [..., L, 2] around the origin (the PCA mean): [...]."""
  angle = np.unwrap(np.arctan2(xy[..., 1], xy[..., 0]), axis=-1)
  return (angle[..., -1] - angle[..., 0]) / (2 * np.pi)


def depth_correlations(pcs: np.ndarray, x: np.ndarray) -> list[float]:
  """Pearson correlation of each principal coordinate [N, L, k] with the stack depth of x [N, L]."""
  depth = stack_depth(x).reshape(-1)
  return [float(np.corrcoef(pcs[..., i].reshape(-1), depth)[0, 1]) for i in range(pcs.shape[-1])]


def _steps(cfg) -> str:
  return "+".join(str(cfg[p].steps) for p in cfg.phases.split(","))


def _probe(rec, cfg, g):
  """(exp, config, params, held-out x [N, T], RNN acc) of a finished probe run."""
  exp, params = common.restore(cfg, rec["workdir"], step=None)
  x = np.asarray(common.eval_batch(exp, batch_size=g.num_sequences)["x"])
  return exp, cfg, params, x, rec["summary"]["dmt"]["eval/rnn_acc"]


def run(ctx) -> dict:
  g = ctx.budget.geometry
  rec, cfg = curves.ensure(ctx, "digits", "smt_dmt")
  exp, params = common.restore(cfg, rec["workdir"], step=None)
  x_dig, imgs = digit_sequences(exp, g.num_sequences)

  pcfg = common.probe_config(ctx, g.probe_task, g.probe_length, seed=0, phases="smt,dmt")
  prec = common.ensure_run(ctx, probes.run_name(g.probe_task, g.probe_length, 0, "smt_dmt"), pcfg)
  seqs = [  # (name, task, experiment, config, params, held-out x, RNN accuracy)
    ("digit", "digits", exp, cfg, params, x_dig, rec["summary"]["dmt"]["eval/rnn_acc"]),
    (
      f"{g.probe_task}, T={g.probe_length}, {_steps(pcfg)} steps",
      g.probe_task,
      *_probe(prec, pcfg, g),
    ),
  ]
  # The same probe family after the curves study's long budget (a better-trained RNN).
  w = ctx.budget.curves.stack
  srec, scfg = curves.ensure(ctx, "stack", "smt_dmt")
  seqs.append((f"{w.task}, T={w.length}, {_steps(scfg)} steps", w.task, *_probe(srec, scfg, g)))

  out, rows = {}, []
  for name, task, e, c, p_, x, acc in seqs:
    s, m = trajectories(e, c, p_, x)
    p = analysis.pca(s.reshape(-1, s.shape[-1]), 3)
    pcs = (s - p["mean"]) @ p["components"].T  # [N, L, 3]
    tpcs = (m - p["mean"]) @ p["components"].T
    out[name] = {
      "x": x[0],
      "rnn": pcs[0, :, :2],
      "teacher": tpcs[0, :, :2],
      "others": pcs[1:, :, :2],
      "explained_variance_ratio": p["explained_variance_ratio"],
      "pr_rnn": analysis.participation_ratio(s.reshape(-1, s.shape[-1])),
      "pr_teacher": analysis.participation_ratio(m.reshape(-1, m.shape[-1])),
      "rnn_acc": acc,
      # Over a digit: how many times the state circles the mean (8 would be one per pixel row).
      "turns_rnn": float(np.mean(np.abs(turns(pcs[..., :2])))),
      "turns_teacher": float(np.mean(np.abs(turns(tpcs[..., :2])))),
      # Over a stack episode: how linearly PC1..3 read out the stack depth.
      "depth_corr": depth_correlations(pcs, x) if task == "stack" else None,
    }
    ev = p["explained_variance_ratio"]
    dc = out[name]["depth_corr"]
    rows.append(
      [
        name,
        s.shape[0],
        s.shape[1],
        f"{ev[0]:.2f}, {ev[1]:.2f}, {ev[2]:.2f}",
        f"{out[name]['pr_rnn']:.1f}",
        f"{out[name]['pr_teacher']:.1f}",
        s.shape[-1],
        f"{out[name]['turns_rnn']:.1f} / {out[name]['turns_teacher']:.1f}",
        "-" if dc is None else ", ".join(f"{v:+.2f}" for v in dc),
        f"{acc:.3f}",
      ]
    )
  md = (
    "PCA of the SMT->DMT RNN's own memory states (flattened K x d). Participation ratio = "
    "effective dimension (sum l)^2 / sum l^2 of the state covariance. Turns: how many times a "
    "trajectory circles the mean in the PC1-PC2 plane (mean |winding| over sequences; the "
    "teacher's memories in the same basis). Depth corr.: Pearson correlation of PC1, PC2, PC3 "
    "with the stack depth after each token, over all sequences.\n\n"
  )
  md += common.markdown_table(
    [
      "trajectory",
      "sequences",
      "tokens each",
      "variance in PC1, PC2, PC3",
      "eff. dim (RNN)",
      "eff. dim (teacher)",
      "state size",
      "turns (RNN / teacher)",
      "depth corr. PC1, PC2, PC3",
      "RNN acc (held-out)",
    ],
    rows,
  )
  fig = plot(ctx, out, imgs[0], exp.source.image_shape)
  res = {k: {kk: vv for kk, vv in v.items() if kk not in ("others", "x")} for k, v in out.items()}
  return common.write_outputs(ctx, "geometry", {"pca": res, "figures": [fig], "markdown": md}, md)


def plot(ctx, out, image, image_shape) -> str:
  plt = common.pyplot()
  names = list(out)
  fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    d = out[name]
    for o in d["others"][:16]:
      ax.plot(o[:, 0], o[:, 1], color="0.85", lw=0.5, zorder=0)
    ax.plot(
      d["teacher"][:, 0],
      d["teacher"][:, 1],
      color="tab:orange",
      lw=0.8,
      alpha=0.6,
      label="teacher memories (same basis)",
    )
    ax.plot(d["rnn"][:, 0], d["rnn"][:, 1], color="k", lw=0.6)
    ev = d["explained_variance_ratio"]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})"), ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    if name == "digit":  # colour = pixel index (raster order)
      sc = ax.scatter(
        d["rnn"][:, 0],
        d["rnn"][:, 1],
        c=np.arange(len(d["rnn"])),
        cmap="viridis",
        s=14,
        zorder=3,
        label="RNN state after each token",
      )
      fig.colorbar(sc, ax=ax, label="token index (0 = BOS, then pixels in raster order)")
      ax.set_title(f"RNN memory over one held-out digit (RNN pixel acc {d['rnn_acc']:.2f})")
      ins = ax.inset_axes([0.78, 0.74, 0.2, 0.24])
      ins.imshow(image.reshape(image_shape), cmap="gray")
      ins.set_xticks([]), ins.set_yticks([])
    else:  # a stack episode: colour = stack depth after the token
      x = d["x"]
      depth = stack_depth(x)
      pushes = x != 0
      for mask, marker, lab in ((pushes, "o", "after a push"), (~pushes, "s", "after a pop")):
        sc = ax.scatter(
          d["rnn"][mask, 0],
          d["rnn"][mask, 1],
          c=depth[mask],
          cmap="plasma",
          s=20,
          marker=marker,
          vmin=0,
          vmax=max(depth.max(), 1),
          zorder=3,
          label=lab,
        )
      fig.colorbar(sc, ax=ax, label="stack depth after the token")
      ax.set_title(f"RNN memory over one held-out episode\n({name}; RNN acc {d['rnn_acc']:.2f})")
    ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  return common.save_figure(ctx, fig, "geometry.png")
