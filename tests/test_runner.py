"""Integration: every config's smoke variant trains end to end, and a crashed run resumes."""

import json
import os

import numpy as np
import pytest

from experiments.configs import pixels, synthetic, text
from smt_jax import metrics_io, train


def _rows(workdir):
  return metrics_io.read_metrics(workdir)


def _check_outputs(workdir, phases):
  rows = _rows(workdir)
  assert rows and all({"step", "phase"} <= set(r) for r in rows)
  assert {r["phase"] for r in rows} == set(phases)
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  assert evals, "no eval lines"
  train_rows = [r for r in rows if "loss" in r]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  for p in phases:
    assert np.isfinite(summary[p]["eval/rnn_nll"])
  assert summary["baseline/unigram_nll"] > 0
  assert all(summary[f"{p}/tokens_per_s"] > 0 for p in phases)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  return summary


def test_pixels_smoke_smt_dmt(tmp_path):
  c = pixels.get_config("smoke")
  summary = train.train_and_evaluate(c, str(tmp_path))
  _check_outputs(str(tmp_path), ["smt", "dmt"])
  assert {"eval/teacher_nll", "eval/rnn_prompted_nll", "eval/drift_1mr2"} <= set(summary["smt"])
  # DMT freezes the teacher: its eval NLL is unchanged by the DMT phase.
  assert summary["dmt"]["eval/teacher_nll"] == pytest.approx(summary["smt"]["eval/teacher_nll"])
  assert os.path.getsize(tmp_path / "samples.png") > 1000


def test_synthetic_smoke_bptt_only(tmp_path):
  c = synthetic.get_config("stack,smoke")
  c.phases = "bptt"
  summary = train.train_and_evaluate(c, str(tmp_path))
  _check_outputs(str(tmp_path), ["bptt"])
  assert "eval/teacher_nll" not in summary["bptt"]  # no teacher trained: none reported
  assert "| bptt |" in open(tmp_path / "accuracy.md").read()


def test_text_smoke(tmp_path):
  c = text.get_config("smoke")  # no data.path: the built-in corpus (pydoc_data.topics)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  _check_outputs(str(tmp_path / "run"), ["smt", "dmt"])
  assert "Samples from the RNN alone" in open(tmp_path / "run" / "samples.txt").read()


def test_quickdraw_smoke_writes_samples(tmp_path):
  """A sketch source trains and draws like digits: samples.png of 28x28 images."""
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (20, 784), dtype=np.uint8))
  c = pixels.get_config("quickdraw,smoke")  # 2 x 2 eval drawings: samples.num = 4
  c.data.path = str(tmp_path)
  c.data.options.levels = 8
  c.phases = "smt"
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(summary["smt"]["eval/rnn_nll"])
  assert os.path.getsize(tmp_path / "run" / "samples.png") > 1000


def test_itstime_periods_and_zero_means_never():
  due = lambda every, total, last: [
    s for s in range(1, total + 1) if train.itstime(s, every, total, last=last)
  ]
  assert due(3, 10, last=False) == [3, 6, 9]
  assert due(3, 9, last=False) == [3, 6]  # the final step is the phase's own (eval, checkpoint)
  assert due(3, 9, last=True) == [3, 6, 9]
  assert due(0, 10, last=True) == []


def test_periods_of_zero_never_fire(tmp_path):
  c = synthetic.get_config("parity,smoke")  # BPTT 6 steps; logs every 2, checkpoints every 3
  c.phases, c.model.rnn_kind = "bptt", "elman"
  c.checkpoint_every_steps = c.eval.every_steps = c.log_every_steps = 0
  train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["6"]  # the phase boundary's only
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [6] and "eval/rnn_nll" in rows[0] and "loss" not in rows[0]


def test_a_stream_trains_with_the_causal_teacher(tmp_path):
  # Streams: the causal teacher's attention is windowed to smt.context_length; DMT's labels and
  # the prompted eval come from one pass too.
  c = pixels.get_config("smoke")
  c.model.teacher_kind, c.model.encoder_depth = "causal", 2
  summary = train.train_and_evaluate(c, str(tmp_path))
  _check_outputs(str(tmp_path), ["smt", "dmt"])
  assert np.isfinite(summary["dmt"]["eval/rnn_prompted_nll"])
