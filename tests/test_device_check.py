"""The accelerator check (`python -m experiments.device_check`) at the paper config's tiny CPU
version: every objective timed, its memory planned and the largest batch estimated, one JSON and
one markdown table."""

import json

import jax
import pytest

from experiments import benchmark, device_check
from experiments.configs import bench

# One worker: the module fixture (every objective timed, 17 s) runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("device_check")


@pytest.fixture(scope="module")
def results():
  return device_check.run(
    bench.paper(tiny=True),
    device_check.OBJECTIVES,
    steps=2,
    warmup=1,
    vocab_size=256,
    fit=device_check.OBJECTIVES,
  )


def test_every_objective_is_timed_with_its_memory_and_largest_batch(results):
  assert results["meta"]["dtype"] == "bfloat16" and results["meta"]["vocab_size"] == 256
  for name in device_check.OBJECTIVES:
    r = results[name]
    assert r["median_s"] > 0 and r["compile_s"] > 0 and r["flops"] > 0, name
    assert r["planned_bytes"] > 0 and r["bytes_per_row"] > 0, name
    # The fitted plan reproduces the measured one, and the estimate is a batch the devices split.
    assert r["fixed_bytes"] + r["bytes_per_row"] * r["batch_size"] == pytest.approx(
      r["planned_bytes"]
    )
    assert r["largest_batch"] >= r["batch_size"], name
  # SMT as the fair race trains it: every transition, more work per step than one transition.
  assert results["smt_full"]["flops"] > 2 * results["smt"]["flops"]
  assert results["smt"]["num_transitions"] == 1
  assert results["smt_full"]["num_transitions"] == 24  # T = Tc + Tf
  assert results["dmt"]["seq_depth"] == 8 and results["bptt"]["seq_depth"] == 24


def test_the_table_has_a_row_per_objective(results, tmp_path):
  table = device_check.markdown(results)
  for name in device_check.OBJECTIVES:
    assert f"\n| {name} | 4 |" in table
  assert "estimate, not a run" in table
  json.dumps(results)  # the JSON the command writes


def test_smt_full_is_the_fair_race_recipe():
  c, phase = device_check.objective_config(bench.paper(tiny=True), "smt_full")
  assert phase == "smt" and c.model.teacher_kind == "causal" and c.smt.num_decoded == 8


def test_a_step_that_does_not_fit_is_reported_with_its_plan(monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory allocating 27213105600 bytes."
    )

  monkeypatch.setattr(benchmark, "time_objective", out_of_memory)
  r = device_check.run(bench.paper(tiny=True), ["bptt"], steps=1, warmup=0, vocab_size=256)
  assert r["bptt"]["error"].startswith("RESOURCE_EXHAUSTED") and r["bptt"]["planned_bytes"] > 0
  assert "| bptt | 4 | - | out of memory |" in device_check.markdown(r)
