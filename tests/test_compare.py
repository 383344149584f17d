"""experiments.compare: SMT->DMT and BPTT on one config at equal training tokens, and one plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import run_helpers

from experiments import compare
from experiments.configs import pixels, synthetic
from smt_jax.runner import config as config_lib


def test_bptt_gets_the_tokens_of_smt_and_dmt():
  c = synthetic.get_config("retrieval,32")
  c.smt.steps, c.dmt.steps = 500, 150
  runs = compare.configs(c)
  assert (runs["smt_dmt"].phases, runs["bptt"].phases) == ("smt,dmt", "bptt")
  # An episode is one T for every phase: the same batch makes equal steps equal tokens.
  assert runs["bptt"].bptt.steps == 650
  assert (
    config_lib.training_tokens(runs["bptt"])
    == config_lib.training_tokens(runs["smt_dmt"])
    == 650 * 32 * 32
  )

  d = pixels.get_config("digits")
  d.smt.steps, d.dmt.steps = 600, 150
  runs = compare.configs(d)
  # SMT rows are Tc + Tf = 72 tokens, DMT's Td = 64 (its rollout from the RNN's initial memory;
  # from the teacher's memory Tc + Td + Tf = 136), BPTT's 128 (batch 32, 16, 32).
  smt_dmt = 600 * 32 * 72 + 150 * 16 * 64
  assert config_lib.training_tokens(runs["smt_dmt"]) == smt_dmt
  assert runs["bptt"].bptt.steps == round(smt_dmt / (32 * 128)) == 375
  d.dmt.streams_from_rnn_initial_memory = False
  assert config_lib.training_tokens(compare.configs(d)["smt_dmt"]) == smt_dmt + 150 * 16 * 72
  assert d.bptt.steps == 1500  # the caller's config is left as it was


def test_one_command_trains_both_and_plots(tmp_path_factory):
  wd = tmp_path_factory.mktemp("compare") / "run"
  env = run_helpers.subprocess_env(tmp_path_factory, JAX_NUM_CPU_DEVICES="1")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.compare",
      "--config=experiments/configs/synthetic.py:parity,smoke",
      f"--workdir={wd}",
    ],
    cwd=run_helpers.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  last = {}
  for name in ("smt_dmt", "bptt"):
    with open(wd / name / "metrics.jsonl") as f:
      last[name] = json.loads(f.read().splitlines()[-1])
  assert last["smt_dmt"]["tokens"] == last["bptt"]["tokens"] == 10 * 4 * 16
  assert last["bptt"]["step"] == 10 and last["bptt"]["phase"] == "bptt"
  out = proc.stdout
  for line in ("SMT->DMT: RNN alone accuracy", "BPTT: RNN alone accuracy", "unigram baseline"):
    assert line in out, out
  assert (wd / "compare.png").stat().st_size > 5_000
  # The table's numbers are the runs' own summaries.
  with open(wd / "bptt" / "summary.json") as f:
    acc = json.load(f)["bptt"]["eval/rnn_acc"]
  assert f"BPTT: RNN alone accuracy {acc:.3f};" in out


@pytest.mark.parametrize("flag", ["--config.smt.steps=1e3", "--config.smt.stepz=10"])
def test_a_bad_override_is_one_line(flag):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.compare", flag],
    cwd=run_helpers.ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
  assert proc.stderr.startswith("error: --config.smt.") and "Traceback" not in proc.stderr
