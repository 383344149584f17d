"""Overlay runs: one metric of several workdirs against steps, tokens seen or SeqFLOPs.

  python -m experiments.plot runs/pixels_digits runs/pixels_digits_bptt \\
      --metric=eval/rnn_nll --x=seqflops --out=compare.png
  python -m experiments.plot RUN [RUN ...] --x=steps,tokens,seqflops   # one panel per x-axis

Reads each run's `metrics.jsonl` (the rows `experiments.run` writes: `step`, `phase`, `tokens`,
`seqflops`, the metrics) and draws one line per run through every row that has the metric, in
step order; a dotted vertical line marks where a run's next phase starts (e.g. SMT -> DMT).
x-axes:
  steps     the run's global step (phase offsets added: DMT's step 1 follows SMT's last)
  tokens    training tokens seen, over every phase so far (batch x sequence length per step)
  seqflops  FLOPs on the serial critical path of training so far, per sequence
            (`smt_jax.analysis.seq_flops_per_step`: BPTT's grows with T, SMT's does not);
            drawn on a log axis unless --nologx
  seconds   training seconds so far on the run's machine (each logged step interval at its
            logged steps/s; compiles and evals left out)
A dashed line marks the unigram baseline (from the first run's summary.json) for an NLL metric.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

from experiments import cli

X_KEYS = {"steps": "step", "tokens": "tokens", "seqflops": "seqflops", "seconds": "seconds"}
X_LABELS = {
  "steps": "global step",
  "tokens": "training tokens seen",
  "seqflops": "SeqFLOPs (serial critical path, per sequence)",
  "seconds": "training seconds (wall-clock, this machine)",
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing the module
  (tests, notebooks) does not collide with other tools' flags of the same names (--out)."""
  flags.DEFINE_string("metric", "eval/rnn_nll", "The metrics.jsonl key to plot (y-axis).")
  flags.DEFINE_list(
    "x", ["steps"], f"The x-axis, one of {', '.join(X_KEYS)}; several: one panel each."
  )
  flags.DEFINE_string("out", "compare.png", "Where to write the picture.")
  flags.DEFINE_list("labels", None, "One legend label per run (default: the workdir's name).")
  flags.DEFINE_bool("logx", None, "Log x-axis (default: on for --x=seqflops only).")
  flags.DEFINE_string("title", None, "The figure's title (default: the metric).")


class PlotError(ValueError):
  """A run or metric that cannot be plotted; the message says which and what to do."""


def load_curve(workdir: str, *, metric: str, x: str) -> dict:
  """One run's curve: {'label', 'x', 'y', 'phases', 'phase_starts'} from its metrics.jsonl.

  'x', 'y': the metric against the x-axis, one point per row holding the metric (later rows of
  the same step win, as for a resumed run's rewritten rows). 'phase_starts': [(phase, x)] for
  each phase after the first, x that of the previous phase's last point (where it starts).
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isdir(workdir):
    raise PlotError(f"{workdir}: no such run directory; pass the --workdir of a run.")
  if not os.path.exists(path):
    raise PlotError(f"{workdir}: no metrics.jsonl; it has not logged yet (or is not a workdir).")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if x == "seconds":
    rows = _with_seconds(rows)
  by_step = {r["step"]: r for r in rows if metric in r}
  if not by_step:
    have = sorted({k for r in rows for k in r if "/" in k})
    raise PlotError(f"{workdir}: no rows with {metric!r}; its metrics: {', '.join(have)}.")
  key = X_KEYS[x]
  points = [by_step[s] for s in sorted(by_step)]
  if any(key not in r for r in points):
    raise PlotError(
      f"{workdir}: its metrics.jsonl has no {key!r} (written by an older version); use --x=steps."
    )
  xs = [float(r[key]) for r in points]
  ys = [float(r[metric]) for r in points]
  starts, seen = [], []
  for i, r in enumerate(points):
    if r["phase"] not in seen:
      if seen:  # the boundary: the previous phase's last point (its final eval)
        starts.append((r["phase"], xs[i - 1]))
      seen.append(r["phase"])
  return {
    "label": os.path.basename(os.path.normpath(workdir)),
    "x": xs,
    "y": ys,
    "phases": seen,
    "phase_starts": starts,
  }


def _with_seconds(rows: list[dict]) -> list[dict]:
  """The rows with 'seconds': training time up to their step. Each step is counted at the
  steps/s logged at the end of its interval (an eval between two logs falls inside one), steps
  after the last logged rate at that rate; an interval without a rate (a run that never logged
  one) counts nothing."""
  rows = sorted(rows, key=lambda r: r["step"])
  logged = [(r["step"], r["steps_per_s"]) for r in rows if r.get("steps_per_s")]

  def seconds(step: int) -> float:
    total, last = 0.0, 0
    for end, rate in logged:
      total += (min(step, end) - last) / rate
      if step <= end:
        return total
      last = end
    return total + ((step - last) / logged[-1][1] if logged else 0.0)

  return [dict(r, seconds=seconds(r["step"])) for r in rows]


def baseline(workdir: str, metric: str) -> float | None:
  """The unigram baseline in `metric`'s unit (nats or bits) from the run's summary.json."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path) or not metric.startswith("eval/"):
    return None
  key = "baseline/unigram_nll" if metric.endswith("_nll") else None
  if "_bits_per_" in metric:
    key = "baseline/unigram_bits_per_" + metric.split("_bits_per_", 1)[1]
  with open(path) as f:
    return json.load(f).get(key) if key else None


def plot_runs(
  workdirs: list[str],
  *,
  metric: str,
  x: str | list[str],
  out: str | None = None,
  labels: list[str] | None = None,
  logx: bool | None = None,
  title: str | None = None,
):
  """Draws the runs' curves into one figure (written to `out` when given); returns the figure.

  One panel (axes) per x-axis in `x`. Each run's line is labelled '<label> (<phase>-><phase>)';
  a panel's lines are in the order of `workdirs` (the phase markers are vertical lines after
  them)."""
  axes_x = [x] if isinstance(x, str) else list(x)
  for name in axes_x:
    if name not in X_KEYS:
      raise PlotError(f"--x={name}: use one of {', '.join(X_KEYS)}.")
  if labels is not None and len(labels) != len(workdirs):
    raise PlotError(f"--labels has {len(labels)} names for {len(workdirs)} runs; give one each.")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(axes_x), figsize=(6.4 * len(axes_x), 4.0), squeeze=False)
  for ax, name in zip(axes[0], axes_x):
    curves = [load_curve(w, metric=metric, x=name) for w in workdirs]
    _draw(ax, curves, metric=metric, x=name, labels=labels, logx=logx)
    base = baseline(workdirs[0], metric)
    if base is not None:
      ax.axhline(base, color="gray", ls="--", lw=1.0, label="unigram baseline")
      ax.legend(fontsize=8)
  fig.suptitle(title or metric, fontsize=10)
  fig.tight_layout()
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130)
  return fig


def _draw(ax, curves, *, metric, x, labels, logx):
  lines = []
  for i, c in enumerate(curves):
    name = labels[i] if labels else c["label"]
    (line,) = ax.plot(
      c["x"], c["y"], marker="o", ms=2.5, lw=1.4, label=f"{name} ({'->'.join(c['phases'])})"
    )
    lines.append(line)
  for c, line in zip(curves, lines):
    for phase, xv in c["phase_starts"]:
      ax.axvline(xv, color=line.get_color(), ls=":", lw=1.0)
      ax.annotate(
        phase,
        (xv, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -10),
        textcoords="offset points",
        color=line.get_color(),
        fontsize=8,
      )
  if logx if logx is not None else x == "seqflops":
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # decades only: minor labels overlap
  ax.set_xlabel(X_LABELS[x])
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def main(argv):
  runs = argv[1:]
  if not runs:
    raise SystemExit("error: name at least one run: python -m experiments.plot RUN [RUN ...]")
  try:
    fig = plot_runs(
      runs,
      metric=FLAGS.metric,
      x=FLAGS.x,
      out=FLAGS.out,
      labels=FLAGS.labels,
      logx=FLAGS.logx,
      title=FLAGS.title,
    )
  except PlotError as e:
    raise SystemExit(f"error: {e}") from None
  for line in fig.axes[0].get_lines():  # the first panel: the same points in every panel
    if line.get_label().startswith("_"):  # the phase markers
      continue
    best = min(y for y in line.get_ydata() if not math.isnan(y))
    print(f"{line.get_label()}: {len(line.get_xdata())} points, lowest {best:.4f}")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
