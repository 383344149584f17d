"""The benchmark harness runs end to end on a tiny config and writes the JSON it promises.

Only the schema and the bookkeeping are checked (sequential depths, token counts, FLOP counts
against a hand count); wall-clock times are never asserted, the machine is shared and noisy.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
  "--config=experiments/configs/bench.py",
  "--config.model.width=16",
  "--config.model.num_heads=2",
  "--config.model.num_memory_tokens=2",
  "--config.model.encoder_depth=1",
  "--config.model.rnn.transformer.depth=1",
  "--config.model.decoder_depth=1",
  "--config.model.rnn.transformer.readout_depth=1",
  "--config.smt.batch_size=4",
  "--config.dmt.batch_size=4",
  "--config.bptt.batch_size=4",
  "--config.smt.context_length=8",
  "--config.smt.future_length=4",
  "--config.dmt.rollout_length=8",
  "--config.dmt.label_every=4",
  "--config.bptt.seq_len=8",
]
PER_OBJECTIVE = {
  "median_s",
  "min_s",
  "p90_s",
  "cpu_s",
  "tokens_per_s",
  "compile_s",
  "seq_depth",
  "seq_len",
  "batch_size",
  "flops",
  "xla_flops",
  "flops_per_s",
  "mfu",
  "dtype",
  "loss",
}
pytestmark = pytest.mark.xdist_group("benchmark")  # one worker: the module fixture runs once


def _run(tmp_path, *args) -> dict:
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA's cheap compile comes with it (conftest)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.benchmark",
      *TINY,
      "--steps=2",
      "--warmup=1",
      f"--out={out}",
      *args,
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "objective" in proc.stdout  # the table was printed
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
  # The reference's vocabulary, on uniform tokens (a stand-in for data not on the machine); the
  # sweeps below read the config's own data.
  # One device (the default would split the batch over the cores): XLA's FLOP count, checked
  # below, is per device.
  return _run(
    tmp_path_factory.mktemp("bench"), "--vocab_size=16", "--op_split=2", "--host_devices=1"
  )


def test_one_entry_per_objective_with_the_promised_fields(main_run):
  assert {"smt", "dmt", "bptt", "meta"} <= set(main_run)
  for phase in ("smt", "dmt", "bptt"):
    r = main_run[phase]
    assert PER_OBJECTIVE <= set(r), PER_OBJECTIVE - set(r)
    assert r["median_s"] > 0 and r["compile_s"] > 0 and np.isfinite(r["loss"])
    assert r["tokens_per_s"] == pytest.approx(r["batch_size"] * r["seq_len"] / r["median_s"])
    assert r["mfu"] is None  # CPU: no peak to compare against
  assert main_run["meta"]["platform"] == "cpu" and main_run["meta"]["dtype"] == "float32"


def test_op_split_reads_the_traced_steps(main_run):
  for phase in ("smt", "dmt", "bptt"):
    split = main_run[phase]["op_split"]
    assert split["matmul"] > 0, split
    assert split["collective"] == 0, split  # one device: nothing to wait for
    assert split["top"] and all(ms > 0 for _, ms in split["top"]), split


def test_parameter_counts_are_the_reference_formula(main_run):
  # PARITY.md: a stack of depth L has L (4 H 64 d + 8 d^2 + 7 d) + d parameters; teacher
  # V d + enc + dec + (d V + V) + K d; RNN the same without registers (zero initial memory).
  v, d, h, k = 16, 16, 2, 2
  stack = lambda depth: depth * (4 * h * 64 * d + 8 * d * d + 7 * d) + d
  assert main_run["n_params_teacher"] == v * d + stack(1) + stack(1) + d * v + v + k * d
  assert main_run["n_params_rnn"] == v * d + stack(1) + stack(1) + d * v + v


def test_sequential_depths_and_lengths(main_run):
  # SMT: one update deep; DMT: Td updates; BPTT: T. Sequence lengths Tc+Tf, Tc+Td+Tf, T.
  assert main_run["smt"]["seq_depth"] == 1 and main_run["smt"]["seq_len"] == 8 + 4
  assert main_run["dmt"]["seq_depth"] == 8 and main_run["dmt"]["seq_len"] == 8 + 8 + 4
  assert main_run["bptt"]["seq_depth"] == 8 and main_run["bptt"]["seq_len"] == 8


def test_flops_count_every_scan_iteration(main_run):
  # XLA's cost analysis counts a while-loop body once; the jaxpr count runs it T times, so for
  # BPTT (a scan of T = 8 updates) it is above XLA's, which includes elementwise FLOPs too.
  assert main_run["bptt"]["flops"] > main_run["bptt"]["xla_flops"]
  # SMT has no loop: the two counts agree up to XLA's elementwise FLOPs.
  assert 0.5 < main_run["smt"]["flops"] / main_run["smt"]["xla_flops"] <= 1.0


def test_peak_table_names_the_dtype():
  from experiments.benchmark import PEAK_FLOPS, peak_flops

  assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == (
    "H100 SXM",
    PEAK_FLOPS["H100 SXM"]["bfloat16"],
  )
  assert peak_flops("NVIDIA H200", "float32")[0] == "H200"
  assert peak_flops("NVIDIA A100-SXM4-40GB", "float32")[1] == PEAK_FLOPS["A100"]["float32"]
  assert peak_flops("cpu", "float32") == (None, None)


def test_sweeps(tmp_path):
  r = _run(
    tmp_path, "--objectives=smt,bptt", "--sweep=seq_len", "--seq_lens=4,8", "--sweep_batch_size=2"
  )
  rows = r["sweep_seq_len"]["rows"]
  assert [row["seq_len"] for row in rows] == [4, 8]
  for row in rows:
    assert row["bptt_seq_depth"] == row["seq_len"] and row["smt_seq_depth"] == 1
    assert row["smt_per_transition_s"] == pytest.approx(row["smt_s"] / row["seq_len"])
    assert row["bptt_per_token_s"] == pytest.approx(row["bptt_s"] / row["seq_len"])

  r = _run(tmp_path, "--objectives=bptt", "--sweep=devices", "--device_counts=1,2")
  rows = r["sweep_devices"]["rows"]
  assert r["sweep_devices"]["axis"] == "data"
  assert [row["devices"] for row in rows] == [1, 2] and all(row["bptt_s"] > 0 for row in rows)


def test_step_breakdown_times_every_part_of_the_full_supervision_step(tmp_path):
  """`experiments.breakdown` on the smoke digits config (full supervision): every part is timed."""
  out = tmp_path / "breakdown.json"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.breakdown",
      "--config=experiments/configs/pixels.py:smoke",
      "--steps=1",
      f"--out={out}",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  result = json.loads(out.read_text())
  parts = {"encoder", "decoder", "rnn update", "readout", "uniformity", "optimiser", "step"}
  assert set(result) == parts
  assert all(v > 0 for v in result.values())
