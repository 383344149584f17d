"""What a run says on its console: compile lines, an ETA over every phase and eval, one line per
eval against the unigram baseline, a verdict at the end; summary.json results first."""

import json
import re
import types

import pytest

from experiments.configs import synthetic
from smt_jax.runner import config as config_lib
from smt_jax.runner import console, experiment, train


def test_durations_read_at_a_glance():
  assert [console.format_duration(s) for s in (0.4, 42, 185, 3599.6, 7620)] == [
    "0s",
    "42s",
    "3m05s",
    "1h00m",
    "2h07m",
  ]


def test_eval_steps_every_first_and_last():
  assert console.eval_steps(10, 4, 0) == [4, 8, 10]
  assert console.eval_steps(10, 4, 1) == [1, 4, 8, 10]
  assert console.eval_steps(10, 4, 4) == [4, 8, 10]  # already due
  assert console.eval_steps(10, 0, 12) == [10]  # past the end: only the final eval
  assert console.eval_steps(8, 4, 0) == [4, 8]


def _fake_console(steps: dict, work: dict, every: int) -> console.Console:
  exp = types.SimpleNamespace(steps=dict(steps), phases=list(steps), source=None)
  con = console.Console.__new__(console.Console)
  con.exp, con.say, con.work, con.unit = exp, lambda line: None, work, "token"
  con.evals = {p: console.eval_steps(n, every, 0) for p, n in steps.items()}
  con.clock = console.Clock()
  return con


def test_eta_adds_phases_left_and_their_evals():
  con = _fake_console({"smt": 100, "dmt": 20}, {"smt": 1.0, "dmt": 3.0}, every=50)
  con.compiled("smt", 7.0)
  assert con.eta("smt", 10) == ""  # not timed yet
  con.timed("smt", 0.5)
  # smt: 90 steps x 0.5 s + 2 evals (50, 100) at 2 steps' time (no eval measured yet);
  # dmt: a compile (7 s) + 20 steps x 3 x 0.5 s + 1 eval: 45 + 2 + 7 + 30 + 1 = 85 s.
  assert con.eta("smt", 10) == "eta ~1m25s"
  con.clock.eval_s += [9.0, 4.0]  # the first eval compiled; the last says what one costs
  # smt at 60: 40 x 0.5 + 1 eval (100) x 4 + dmt 7 + 30 + 4 = 65 s.
  assert con.eta("smt", 60) == "eta ~1m05s"
  con.compiled("dmt", 5.0)
  con.timed("dmt", 2.0)
  assert con.eta("dmt", 10) == "eta 24s"  # 10 x 2 + the final eval: no '~' in the last phase


def test_work_per_step_counts_each_phase():
  config = synthetic.get_config("stack,16,smoke")
  exp = types.SimpleNamespace(config=config)
  f = {"update": 2.0, "readout": 3.0, "encode": 5.0, "decode": 7.0}
  c = config
  t = config_lib.phase_seq_len(c, "bptt")
  assert experiment.work_per_step(exp, "bptt", f) == c.bptt.batch_size * 3 * t * 5.0
  td, k = c.dmt.rollout_length, c.dmt.label_every
  assert experiment.work_per_step(exp, "dmt", f) == c.dmt.batch_size * (
    (td // k + 1) * 5.0 + 3 * td * 5.0
  )
  n, d = c.smt.num_transitions, c.smt.num_decoded
  assert c.model.teacher_kind == "causal" and d > 0
  assert experiment.work_per_step(exp, "smt", f) == c.smt.batch_size * 3 * (5 + 2 * n + 10 * d)
  c.model.teacher_kind, c.smt.num_decoded = "windowed", 0  # n + 1 windows, all decoded
  assert experiment.work_per_step(exp, "smt", f) == c.smt.batch_size * 3 * (
    5 * (n + 1) + 2 * n + 10 * (n + 1)
  )


def test_a_run_says_what_it_does(tmp_path, capsys):
  c = synthetic.get_config("parity,smoke")  # BPTT 6 steps, logs every 2
  c.phases, c.model.rnn_kind = "bptt", "elman"
  c.eval.every_steps, c.eval.first_step = 4, 1
  summary = train.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "bptt: compiling its train step..."
  assert re.fullmatch(r"bptt: compiled and ran its first step in \d+\.\ds", out[1])
  evals = [line for line in out if line.startswith("eval ")]
  assert [line.split(":")[0] for line in evals] == [
    "eval bptt 1/6",
    "eval bptt 4/6",
    "eval bptt 6/6",
  ]
  unigram = summary["baseline/unigram_nll"]
  assert all(f"unigram {unigram:.3f} nats/token" in line for line in evals)
  assert "compile included" in evals[0] and "compile included" not in evals[1]
  assert f"RNN {summary['bptt']['eval/rnn_nll']:.3f}" in evals[-1]
  progress = [line for line in out if line.startswith("bptt step ")]
  assert re.search(r"  eta \d+s$", progress[1])  # timed since step 2; one phase: no '~'
  assert "eta" not in progress[-1]  # the run's last step
  done = out.index(next(line for line in out if line.startswith("Done in ")))
  assert "nats per token" in out[done]
  assert out[done + 1].split()[-3:] == [
    f"{summary['bptt']['eval/rnn_nll']:.3f}",
    "acc",
    f"{summary['bptt']['eval/rnn_acc']:.3f}",
  ]
  assert out[done + 2].split()[-1] == f"{unigram:.3f}"
  saved = json.load(open(tmp_path / "summary.json"))
  assert list(saved)[:3] == ["bptt", "baseline/unigram_bits_per_token", "baseline/unigram_nll"]
  assert "eval/drift_1mr2" in " ".join(saved["about"])
  assert list(saved)[-1] == "about"
  assert "about" not in train.metrics_io.read_summary(str(tmp_path))


def test_eval_first_step_checked():
  c = synthetic.get_config("parity,smoke")
  c.eval.first_step = -1
  with pytest.raises(train.config_lib.ConfigError, match="eval.first_step"):
    train.config_lib.validate(c)
