"""Integration: every config's smoke variant trains end to end, and a crashed run resumes."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.configs import pixels, synthetic, text
from smt_jax import checkpoints, metrics_io, train


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
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
  c = text.get_config("smoke")
  c.data.path = str(corpus)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  _check_outputs(str(tmp_path / "run"), ["smt", "dmt"])
  assert "Samples from the RNN alone" in open(tmp_path / "run" / "samples.txt").read()


def _final_params(workdir, config):
  exp, params = train.build_experiment(config)
  mngr = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
  params = checkpoints.restore_latest(mngr, exp, params, train.make_optimizer)[0]
  mngr.close()
  return params


def test_crashed_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
  c = synthetic.get_config("parity,smoke")
  c.smt.steps, c.dmt.steps = 8, 4
  ref_dir, crash_dir = str(tmp_path / "ref"), str(tmp_path / "crash")
  train.train_and_evaluate(c, ref_dir)

  real_batch = train.global_batch

  def crashing(exp, source, *, split, step, batch_size):
    if split == "train" and step == 5:  # after the checkpoint at step 3, before the one at 6
      raise KeyboardInterrupt("simulated crash")
    return real_batch(exp, source, split=split, step=step, batch_size=batch_size)

  monkeypatch.setattr(train, "global_batch", crashing)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, crash_dir)
  assert max(r["step"] for r in _rows(crash_dir)) == 4  # logged up to step 4, then died
  monkeypatch.setattr(train, "global_batch", real_batch)

  calls = []
  monkeypatch.setattr(train, "global_batch", lambda *a, **k: calls.append(
      (k["split"], k["step"])) or real_batch(*a, **k))
  train.train_and_evaluate(c, crash_dir)
  train_steps = [s for split, s in calls if split == "train"]
  assert train_steps[0] == 3, "did not resume from the step-3 checkpoint"

  ref, got = _final_params(ref_dir, c), _final_params(crash_dir, c)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Metrics after the restart match the uninterrupted run's, with no step logged twice.
  strip = lambda rows: [{k: v for k, v in r.items() if "per_s" not in k} for r in rows]
  assert strip(_rows(crash_dir)) == strip(_rows(ref_dir))


def test_workdir_of_another_config_is_refused(tmp_path):
  c = synthetic.get_config("parity,smoke")
  c.smt.steps, c.dmt.steps = 2, 2
  train.train_and_evaluate(c, str(tmp_path))
  c2 = synthetic.get_config("parity,smoke")
  c2.smt.steps, c2.dmt.steps = 3, 2
  with pytest.raises(ValueError, match="smt.steps: 2 -> 3"):
    train.train_and_evaluate(c2, str(tmp_path))
