"""experiments.plot: the curves it draws are the runs' metrics.jsonl rows, on the asked x-axis."""

import json
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from experiments import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(path, rows):
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _row(step, phase, tokens, seqflops, **metrics):
  return dict(step=step, phase=phase, phase_step=step, tokens=tokens, seqflops=seqflops, **metrics)


@pytest.fixture
def runs(tmp_path):
  smt_dmt = _run(
    tmp_path / "smt_dmt",
    [
      _row(2, "smt", 100, 10.0, loss=3.0),  # a train row: no eval metric, not drawn
      _row(2, "smt", 100, 10.0, **{"eval/rnn_nll": 2.5}),
      _row(4, "smt", 200, 20.0, **{"eval/rnn_nll": 2.0}),
      _row(6, "dmt", 500, 320.0, **{"eval/rnn_nll": 1.5}),
      _row(8, "dmt", 800, 620.0, **{"eval/rnn_nll": 1.25}),
    ],
  )
  bptt = _run(
    tmp_path / "bptt",
    [
      _row(4, "bptt", 400, 4000.0, **{"eval/rnn_nll": 2.25}),
      _row(2, "bptt", 200, 2000.0, **{"eval/rnn_nll": 2.75}),  # out of order: sorted by step
      _row(4, "bptt", 400, 4000.0, **{"eval/rnn_nll": 2.2}),  # a rewritten row: the last wins
    ],
  )
  return smt_dmt, bptt


@pytest.mark.parametrize(
  "x, smt_dmt_x, bptt_x, dmt_start",
  [
    ("steps", [2, 4, 6, 8], [2, 4], 4),  # DMT starts where SMT's last eval is
    ("tokens", [100, 200, 500, 800], [200, 400], 200),
    ("seqflops", [10, 20, 320, 620], [2000, 4000], 20),
  ],
)
def test_plotted_data_are_the_rows(runs, tmp_path, x, smt_dmt_x, bptt_x, dmt_start):
  out = tmp_path / f"{x}.png"
  fig = plot.plot_runs(list(runs), metric="eval/rnn_nll", x=x, out=str(out), labels=["a", "b"])
  ax = fig.axes[0]
  a, b, marker = ax.get_lines()  # two runs, then SMT->DMT's phase marker
  assert a.get_label() == "a (smt->dmt)" and b.get_label() == "b (bptt)"
  np.testing.assert_array_equal(a.get_xdata(), smt_dmt_x)
  np.testing.assert_array_equal(a.get_ydata(), [2.5, 2.0, 1.5, 1.25])
  np.testing.assert_array_equal(b.get_xdata(), bptt_x)
  np.testing.assert_array_equal(b.get_ydata(), [2.75, 2.2])
  assert list(marker.get_xdata()) == [dmt_start, dmt_start]
  assert ax.get_xscale() == ("log" if x == "seqflops" else "linear")
  assert ax.get_ylabel() == "eval/rnn_nll" and x.rstrip("s") in ax.get_xlabel().lower()
  img = matplotlib.image.imread(out)
  assert img.shape[0] > 300 and img[..., :3].std() > 0.05  # a picture, not a blank file


def test_seconds_axis_and_the_baseline(tmp_path):
  run = _run(
    tmp_path / "r",
    [
      _row(2, "smt", 0, 0.0, loss=3.0),  # after the compile: no rate, counted with the next
      _row(4, "smt", 0, 0.0, loss=2.0, steps_per_s=2.0),  # 4 steps at 2/s: 2 s
      _row(4, "smt", 0, 0.0, **{"eval/rnn_nll": 2.0, "eval/rnn_bits_per_dim": 2.9}),
      _row(5, "dmt", 0, 0.0, **{"eval/rnn_nll": 1.75, "eval/rnn_bits_per_dim": 2.5}),  # 4 s
      _row(6, "dmt", 0, 0.0, loss=1.0, steps_per_s=0.5),  # + 2 steps at 0.5/s: 6 s
      _row(6, "dmt", 0, 0.0, **{"eval/rnn_nll": 1.5, "eval/rnn_bits_per_dim": 2.2}),
      _row(8, "dmt", 0, 0.0, **{"eval/rnn_nll": 1.4, "eval/rnn_bits_per_dim": 2.0}),  # 10 s
    ],
  )
  with open(os.path.join(run, "summary.json"), "w") as f:
    json.dump({"baseline/unigram_nll": 2.5, "baseline/unigram_bits_per_dim": 3.6}, f)
  for metric, base in (("eval/rnn_nll", 2.5), ("eval/rnn_bits_per_dim", 3.6)):
    ax = plot.plot_runs([run], metric=metric, x="seconds").axes[0]
    curve, _marker, baseline = ax.get_lines()
    np.testing.assert_array_equal(curve.get_xdata(), [2.0, 4.0, 6.0, 10.0])
    assert list(baseline.get_ydata()) == [base, base]
    assert baseline.get_label() == "unigram baseline"
  assert plot.baseline(run, "eval/rnn_acc") is None


def test_one_panel_per_x_axis(runs):
  fig = plot.plot_runs(list(runs), metric="eval/rnn_nll", x=["steps", "seqflops"])
  steps, seqflops = fig.axes
  np.testing.assert_array_equal(steps.get_lines()[1].get_xdata(), [2, 4])
  np.testing.assert_array_equal(seqflops.get_lines()[1].get_xdata(), [2000, 4000])
  assert (steps.get_xscale(), seqflops.get_xscale()) == ("linear", "log")
  with pytest.raises(
    plot.PlotError, match="--x=flops: use one of steps, tokens, seqflops, seconds"
  ):
    plot.plot_runs(list(runs), metric="eval/rnn_nll", x=["steps", "flops"])


def test_unplottable_runs_say_why(runs, tmp_path):
  with pytest.raises(plot.PlotError, match=r"no rows with 'eval/bits'; its metrics: eval/rnn_nll"):
    plot.load_curve(runs[0], metric="eval/bits", x="steps")
  with pytest.raises(plot.PlotError, match="no such run directory"):
    plot.load_curve(str(tmp_path / "nope"), metric="eval/rnn_nll", x="steps")
  old = _run(tmp_path / "old", [{"step": 2, "phase": "smt", "eval/rnn_nll": 1.0}])
  with pytest.raises(plot.PlotError, match="no 'seqflops'.*use --x=steps"):
    plot.load_curve(old, metric="eval/rnn_nll", x="seqflops")
  with pytest.raises(plot.PlotError, match="--labels has 1 names for 2 runs"):
    plot.plot_runs(list(runs), metric="eval/rnn_nll", x="steps", labels=["a"])


def test_command_line(runs, tmp_path):
  out = tmp_path / "cli.png"
  cmd = [sys.executable, "-m", "experiments.plot", *runs, "--x=tokens", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "smt_dmt (smt->dmt): 4 points, lowest 1.2500" in proc.stdout and out.exists()
  proc = subprocess.run(
    [*cmd[:3], str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
    f"error: {tmp_path / 'nope'}: no such run directory; pass the --workdir of a run."
  ]
