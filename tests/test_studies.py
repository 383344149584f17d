"""The study set (experiments/studies/) and the analysis functions it rests on (smt_jax.analysis).

Unit tests pin the math of `smt_jax.analysis` against independent computations. The smoke tests run
`python -m experiments.studies --budget=smoke` end to end through the real training runner (in a
subprocess, with XLA's cheaper CPU compile settings, since the time goes into compiling) and check
what it leaves: every figure and table, finite numbers, the expected rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smt_jax import analysis, objectives

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


# -------------------------------------------------------------------------------------------------
# smt_jax.analysis: the math.


def test_rollout_state_gradient_norms_match_the_linear_recurrence():
  # m_t = A m_{t-1} + e(x_t), L = <w, m_{L-1}> (only the last state): dL/dm_t = (A^T)^{L-1-t} w.
  rng = np.random.default_rng(0)
  k, d, length = 2, 3, 6
  a = rng.normal(size=(k * d, k * d)) * 0.5
  emb = rng.normal(size=(5, k * d))
  w = rng.normal(size=(k * d,))
  update = lambda p, m, x: (m.reshape(len(x), -1) @ p["a"].T + p["e"][x]).reshape(m.shape)
  params = {"a": jnp.asarray(a), "e": jnp.asarray(emb)}
  x = jnp.asarray(rng.integers(0, 5, (2, length)))
  m0 = jnp.asarray(rng.normal(size=(2, k, d)))
  loss = lambda states: jnp.sum(states[:, -1].reshape(2, -1) @ jnp.asarray(w))
  norms = np.asarray(analysis.rollout_state_gradient_norms(loss, params, m0, x, update=update))
  expected = [
    np.linalg.norm(np.linalg.matrix_power(a.T, length - 1 - t) @ w) for t in range(length)
  ]
  assert norms.shape == (2, length)
  np.testing.assert_allclose(norms, np.tile(expected, (2, 1)), rtol=1e-4)


def test_smt_memory_gradient_norms_find_each_windows_memory(tiny):
  # L = sum_t <c_t, E(window ending at t)> over t = -1..T-1: dL/dm_t = c_t exactly.
  tfns, tparams = tiny.teacher()
  b, t = 2, 4
  batch = tiny.batch(0, b, t)
  c = jax.random.normal(jax.random.key(1), (t + 1, tiny.num_memory_tokens, tiny.width))

  def loss_fn(params, batch, key, *, teacher):
    del key
    mem = objectives.encode_over_time(
      teacher, params["teacher"], objectives.windows(batch["x"], jnp.arange(-1, t), t)
    )  # [B, T+1, K, d]
    return jnp.sum(mem * c), {}

  norms = jax.jit(
    lambda p: analysis.smt_memory_gradient_norms(
      loss_fn, {"teacher": p, "rnn": {}}, batch, None, teacher=tfns
    )
  )(tparams)
  expected = np.linalg.norm(np.asarray(c).reshape(t + 1, -1), axis=-1)
  np.testing.assert_allclose(np.asarray(norms), np.tile(expected, (b, 1)), rtol=1e-5)


def test_perturbable_teacher_is_the_teacher_at_zero(tiny):
  tfns, tparams = tiny.teacher()
  x = tiny.batch(0, 3, 5)["x"]
  ctx = objectives.windows(x, jnp.arange(-1, 5), 5)[:, 2]  # window ending at t = 1: fill 2
  np.testing.assert_array_equal(np.asarray(analysis.window_fill(ctx)), [2, 2, 2])
  wrapped = analysis.perturbable_teacher(tfns)
  delta = jnp.zeros((3, 6, tiny.num_memory_tokens, tiny.width)).at[:, 2].set(1.0)
  got, plain = jax.jit(
    lambda p: (wrapped.encode({"teacher": p, "delta": delta}, ctx), tfns.encode(p, ctx))
  )(tparams)
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain) + 1.0, rtol=1e-6)


def test_drift_along_time_matches_numpy():
  rng = np.random.default_rng(0)
  p, t = rng.normal(size=(5, 4, 2, 3)), rng.normal(size=(5, 4, 2, 3))
  out = analysis.drift_along_time(jnp.asarray(p), jnp.asarray(t))
  mse = ((p - t) ** 2).mean(axis=(0, 2, 3))
  r = ((p - t) ** 2).sum(axis=(0, 2, 3)) / ((t - t.mean(0)) ** 2).sum(axis=(0, 2, 3))
  np.testing.assert_allclose(np.asarray(out["mse"]), mse, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["one_minus_r2"]), r, rtol=1e-5)
  zero = analysis.drift_along_time(jnp.asarray(t), jnp.asarray(t))["one_minus_r2"]
  np.testing.assert_allclose(np.asarray(zero), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match=r"\[B, T, K, d\]"):
    analysis.drift_along_time(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)))


def test_one_step_predictions_are_vmapped_updates(tiny):
  rfns, rparams = tiny.rnn("gru")
  rng = np.random.default_rng(0)
  mem = jnp.asarray(rng.normal(size=(2, 3, tiny.num_memory_tokens, tiny.width)), jnp.float32)
  x = jnp.asarray(rng.integers(0, tiny.vocab_size, (2, 3)))
  got, loop = jax.jit(
    lambda p: (
      analysis.one_step_predictions(rfns, p, mem, x),
      jnp.stack([rfns.update(p, mem[:, i], x[:, i]) for i in range(3)], axis=1),
    )
  )(rparams)
  np.testing.assert_allclose(np.asarray(got), np.asarray(loop), atol=1e-5)


def test_pca_and_participation_ratio():
  rng = np.random.default_rng(0)
  line = np.outer(rng.normal(size=50), [3.0, 4.0, 0.0]) + 1.0
  p = analysis.pca(line, 2)
  np.testing.assert_allclose(p["explained_variance_ratio"], [1.0, 0.0], atol=1e-9)
  np.testing.assert_allclose(np.abs(p["components"][0]), [0.6, 0.8, 0.0], atol=1e-9)
  np.testing.assert_allclose(
    p["projection"][:, 0] ** 2, ((line - line.mean(0)) ** 2).sum(1), rtol=1e-9
  )
  assert analysis.participation_ratio(line) == pytest.approx(1.0)
  iso = rng.normal(size=(20000, 4))
  assert analysis.participation_ratio(iso) == pytest.approx(4.0, rel=0.02)
  with pytest.raises(ValueError, match="num_components"):
    analysis.pca(line, 4)


def test_geometry_turns_and_depth_correlation():
  from experiments.studies import geometry

  t = np.linspace(0.0, 1.0, 200)
  r = 1.0 + 0.3 * np.sin(7 * t)  # 2.5 turns one way, 1 the other; any radius
  xy = np.stack([r * np.cos(5 * np.pi * t), r * np.sin(5 * np.pi * t)], -1)
  back = np.stack([np.cos(-2 * np.pi * t), np.sin(-2 * np.pi * t)], -1)
  np.testing.assert_allclose(geometry.turns(np.stack([xy, back])), [2.5, -1.0], atol=1e-9)

  x = np.array([[3, 5, 0, 2, 0, 0], [1, 0, 4, 4, 4, 0]])  # 0 pops, else pushes
  depth = np.array([[1, 2, 1, 2, 1, 0], [1, 0, 1, 2, 3, 2]])
  np.testing.assert_array_equal(geometry.stack_depth(x), depth)
  rng = np.random.default_rng(0)
  pcs = np.stack([2.0 * depth + 1.0, -depth, rng.normal(size=depth.shape)], -1)
  c = geometry.depth_correlations(pcs, x)
  np.testing.assert_allclose(c[:2], [1.0, -1.0], atol=1e-12)
  expected = np.corrcoef(pcs[..., 2].ravel(), depth.ravel())[0, 1]
  assert c[2] == pytest.approx(expected) and abs(c[2]) < 0.9


def test_count_flops_and_seq_flops():
  f = analysis.count_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 16)))
  assert f == 2 * 4 * 8 * 16
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((4, 8)), jnp.ones((8, 16))).compile()
  assert analysis.count_flops(compiled) == f
  with pytest.raises(ValueError, match="counter"):
    analysis.count_flops(lambda a: a, jnp.ones(2), counter="hlo")
  kw = dict(f_update=10.0, f_readout=2.0, f_encode=100.0, f_decode=50.0, rollout_length=8)
  bptt = [analysis.seq_flops_per_step("bptt", seq_len=t, **kw) for t in (16, 32)]
  smt = [analysis.seq_flops_per_step("smt", seq_len=t, **kw) for t in (16, 32)]
  assert bptt == [3 * (16 * 10 + 2), 3 * (32 * 10 + 2)]  # grows with T
  assert smt == [3 * (100 + 50)] * 2  # does not
  assert analysis.seq_flops_per_step("dmt", seq_len=16, **kw) == 100 + 8 * 10 + 2 + 2 * 12
  # Gradients through the rollout chain the backward too; truncation cuts BPTT's backward only.
  assert analysis.seq_flops_per_step("dmt", seq_len=16, carry_grad=True, **kw) == 100 + 3 * 82
  tbptt = analysis.seq_flops_per_step("bptt", seq_len=32, truncation=4, **kw)
  assert tbptt == 32 * 10 + 2 + 2 * (4 * 10 + 2)
  assert analysis.seq_flops_per_step("bptt", seq_len=32, truncation=32, **kw) == bptt[1]
  with pytest.raises(ValueError, match="method"):
    analysis.seq_flops_per_step("tbptt", seq_len=4, **kw)
  depth = lambda m: analysis.serial_updates(m, seq_len=32, rollout_length=8)
  assert (depth("smt"), depth("dmt"), depth("bptt")) == (1, 8, 32)


@pytest.mark.parametrize("phases", ["smt,dmt", "bptt"])
def test_a_runs_seq_flops_are_the_runners_with_a_length_curriculum(phases):
  """The studies' SeqFLOPs of a run are what its own metrics log at its last step, where the
  length curriculum runs the first phase's first steps on shorter episodes."""
  from experiments.configs import synthetic
  from experiments.studies import common
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import experiment

  c = synthetic.get_config("retrieval,64,smoke")
  c.phases, c.smt.steps, c.bptt.steps = phases, 5, 6
  assert config_lib.warmup(c) == (2, 8)
  exp = experiment.build_experiment(c)
  steps = [experiment.make_phase(exp, p) for p in exp.phases]
  costs = experiment.step_costs(steps, experiment.unit_flops(exp))
  want = experiment.progress(c, costs, len(steps) - 1, c[steps[-1].name].steps)["seqflops"]
  got = sum(common.run_seq_flops(c)[0].values())
  assert got == pytest.approx(want, rel=1e-12)
  c.data.warmup_steps = c.data.warmup_seq_len = 0
  assert got < sum(common.run_seq_flops(c)[0].values())


def test_matmul_flops_of_a_scan_by_hand():
  def f(x, w):  # 5 iterations of [4, 8] @ [8, 16] and [4, 16] @ [16, 8]
    def body(c, _):
      return jnp.tanh(c @ w) @ w.T, None

    return jax.lax.scan(body, x, None, length=5)[0].sum()

  x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
  forward = 5 * 2 * (2 * 4 * 8 * 16)
  assert analysis.count_flops(f, x, w, counter="matmul") == forward
  # Gradient in x and w: the forward, and two matmuls (input and weight) per forward matmul.
  assert analysis.count_flops(jax.grad(f, argnums=(0, 1)), x, w, counter="matmul") == 3 * forward
  # XLA's count runs the loop body once.
  assert analysis.count_flops(f, x, w) < forward


# -------------------------------------------------------------------------------------------------
# The smoke study, end to end.

# Compile time dominates a smoke run on CPU (XLA's cheap settings come from conftest). The suite
# runs the studies behind the race and the probes' tables (one process); the others (new model
# shapes, so new compiles: 157 s against the core's 135 s in a cold suite), the c_dyn x c_unif
# sweep and the text study (32 s of the core's 86 s warm, moved out when CI reached 581 s of its
# 600) are `slow`: `pytest -m slow tests/test_studies.py` runs them.
CORE = "probes,steps,gradients,drift,length,updaters,race,length_parity"
REST = ("scaling,sweep,text", "samples,geometry,teachers,curves")  # two processes, side by side
FIGURES = {
  "probes": ["probes.png", "probes_compute.png"],
  "steps": ["steps.png"],
  "gradients": ["gradients.png"],
  "drift": ["drift.png"],
  "length": ["length.png"],
  "updaters": ["updaters.png"],
  "samples": ["samples.png"],
  "geometry": ["geometry.png"],
  "teachers": ["teachers.png"],
  "length_parity": ["length_parity.png"],
  "text": ["text.png"],
  "curves": ["curves.png"],
  "scaling": ["scaling.png"],
  "sweep": ["sweep.png"],
  "race": ["race.png"],
}


def _run_smoke(tmp_path, *groups: str) -> dict:
  """Runs the studies at the smoke budget, a process per group side by side; returns {study:
  results json + its table as 'md'}."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    # One CPU device: the two test workers already take both cores (the studies' default of one
    # device per core is tested in test_cpu_devices.py).
    JAX_NUM_CPU_DEVICES="1",
    # Every program into the shared cache: runs of one study rebuild the same steps (new jits).
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  procs = []
  for i, studies in enumerate(groups):
    out, runs, log = tmp_path / f"docs{i}", tmp_path / f"runs{i}", tmp_path / f"log{i}.txt"
    with open(log, "w") as f:  # a file, not a pipe: neither process can block on a full pipe
      procs.append(
        (
          studies,
          out,
          log,
          subprocess.Popen(
            [
              sys.executable,
              "-m",
              "experiments.studies",
              f"--study={studies}",
              "--budget=smoke",
              f"--out={out}",
              f"--runs={runs}",
            ],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
          ),
        )
      )
  results = {}
  for studies, out, log, proc in procs:
    proc.wait(timeout=900)
    assert proc.returncode == 0, log.read_text()[-5000:]
    for name in studies.split(","):
      for fig in FIGURES[name]:
        assert (out / fig).stat().st_size > 5_000, fig
      with open(out / "studies" / f"{name}.json") as f:
        results[name] = json.load(f)
      results[name]["md"] = (out / "studies" / f"{name}.md").read_text()
      _assert_finite(results[name], name)
  return results


def _assert_finite(x, where):
  if isinstance(x, dict):
    for k, v in x.items():
      _assert_finite(v, f"{where}.{k}")
  elif isinstance(x, list):
    for i, v in enumerate(x):
      _assert_finite(v, f"{where}[{i}]")
  elif isinstance(x, float):
    assert math.isfinite(x), where


def _table_rows(md: str, first_header: str) -> list[list[str]]:
  """Body rows of the markdown table whose header starts with `| first_header |`."""
  lines = md.splitlines()
  start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
  rows = []
  for ln in lines[start + 2 :]:
    if not ln.startswith("|"):
      break
    rows.append([c.strip() for c in ln.strip("|").split("|")])
  return rows


def test_smoke_core_studies(tmp_path):
  """`experiments.studies --study=<CORE> --budget=smoke`: their figures and expected tables."""
  from experiments.studies import budgets

  b = budgets.get_config("smoke")
  res = _run_smoke(tmp_path, CORE)
  assert set(res) == set(CORE.split(","))

  rows = _table_rows(res["probes"]["md"], "task")
  assert len(rows) == len(b.probes.tasks) * len(b.probes.lengths) * 4
  assert {r[2] for r in rows} == {"BPTT", "SMT (before DMT)", "SMT->DMT", "teacher"}
  for cell in res["probes"]["cells"]:
    assert 0.0 <= np.mean(cell["methods"]["smt_dmt"]["acc"]) <= 1.0
    # SeqFLOPs: BPTT's serial path is the unrolled sequence, SMT's one transition.
    f = cell["unit_flops"]
    assert cell["methods"]["bptt"]["seq_flops"][0] > cell["length"] * f["update"]
    # ... and each run's SeqFLOPs are what the runner counted along it (its metrics' x-axis).
    for m in ("smt_dmt", "bptt"):
      name = f"{cell['task']}_T{cell['length']}_s{cell['seeds'][0]}_{m}"
      rows = (tmp_path / "runs0" / "probes" / name / "metrics.jsonl").read_text().splitlines()
      counted = json.loads(rows[-1])["seqflops"]
      assert cell["methods"][m]["seq_flops"][0] == pytest.approx(counted, rel=1e-6), (name, m)

  # The race: every method trains on the same tokens, and the runner counted those tokens and
  # SeqFLOPs along each run (its metrics' x-axes).
  for cell in res["race"]["cells"]:
    assert {x["method"] for x in cell["runs"]} == {"smt_dmt", "bptt"}
    assert len({x["tokens"] for x in cell["runs"]}) == 1, cell["runs"]
    for x in cell["runs"]:
      with open(os.path.join(x["workdir"], "metrics.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
      assert last["tokens"] == x["tokens"] and last["seqflops"] == pytest.approx(x["seqflops"])

  rows = _table_rows(res["steps"]["md"], "total steps")
  assert len(rows) == 2 * len(b.steps.totals)

  rows = _table_rows(res["gradients"]["md"], "curve")
  assert [r[0] for r in rows] == ["BPTT, init", "BPTT, trained", "SMT, init", "SMT, trained"]
  t = b.gradients.length
  assert len(res["gradients"]["curves"]["SMT, init"]["median"]) == t + 1
  assert len(res["gradients"]["curves"]["BPTT, init"]["median"]) == t

  assert [r[0] for r in _table_rows(res["drift"]["md"], "model")] == ["after SMT", "after SMT->DMT"]
  assert len(_table_rows(res["drift"]["md"], "c_dyn")) == 1 + len(b.drift.settings)
  assert len(res["drift"]["along"]["after SMT"]["rollout_1mr2"]) == b.drift.length

  rows = _table_rows(res["length"]["md"], "model")
  assert len(rows) == 3 and all(len(r) == 1 + len(b.length.factors) for r in rows)
  assert res["length"]["lengths"] == [f * b.length.length for f in b.length.factors]

  assert [r[0] for r in _table_rows(res["updaters"]["md"], "updater")] == list(b.updaters.kinds)

  lp = b.length_parity
  rows = _table_rows(res["length_parity"]["md"], "task")
  assert len(rows) == len(lp.tasks) * len(lp.lengths) * 4
  assert {r[3] for r in rows} == {"BPTT", "SMT (before DMT)", "SMT->DMT", "teacher"}
  assert all(r[2].startswith("causal, depth 2") for r in rows)
  for cell in res["length_parity"]["cells"]:
    t, tf = cell["length"], cell["future_length"]
    assert cell["teacher_kind"] == "causal" and cell["teacher_depth"] >= 2
    spec = lp.future[cell["task"]]
    assert cell["context_length"] == t
    assert tf == (int(t * spec) if isinstance(spec, float) else min(spec, t))
    assert cell["num_transitions"] == min(t, lp.decoder_tokens // tf)
    assert len(cell["methods"]["smt_dmt"]["acc"]) == len(lp.seeds) == len(cell["seeds"])
    # BPTT's serial path is the whole unroll, forward and backward, every step.
    f, steps = cell["unit_flops"], lp.smt_steps + lp.dmt_steps
    expected = steps * 3 * (t * f["update"] + f["readout"])
    assert cell["seq_flops"]["bptt"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_smoke_other_studies(tmp_path):
  """`experiments.studies --study=<REST> --budget=smoke`: their figures and expected tables."""
  from experiments.studies import budgets

  b = budgets.get_config("smoke")
  res = _run_smoke(tmp_path, *REST)
  assert set(res) == set(",".join(REST).split(","))

  rows = _table_rows(res["teachers"]["md"], "task")
  cells = len(b.teachers.tasks) * len(b.teachers.lengths)
  assert [r[2] for r in rows] == ["windowed", "causal"] * cells
  assert all(0.0 <= float(r[3].split()[0]) <= 1.0 for r in rows)  # teacher accuracy

  assert [r[0] for r in _table_rows(res["samples"]["md"], "method")] == ["SMT->DMT", "BPTT"]
  assert set(res["samples"]["results"]) == {"smt_dmt", "bptt"}
  for m in ("smt_dmt", "bptt"):  # samples and geometry read the curves study's digits runs
    digits = res["curves"]["results"]["digits"][m]
    assert res["samples"]["results"][m]["rnn_nll"] == digits["nll"]
    assert res["samples"]["results"][m]["seq_flops"] == pytest.approx(digits["seq_flops"], rel=1e-6)
  rows = _table_rows(res["geometry"]["md"], "trajectory")
  assert len(rows) == 3 and rows[0][0] == "digit" and rows[1][0].startswith("stack")
  assert rows[2][0].startswith(f"stack, T={b.curves.stack.length},")  # the curves' stack run
  acc = res["curves"]["results"]["stack"]["smt_dmt"]["acc"]
  assert float(rows[2][-1]) == pytest.approx(acc, abs=5e-4)
  ev = res["geometry"]["pca"]["digit"]["explained_variance_ratio"]
  assert len(ev) == 3 and 0.0 < sum(ev) <= 1.0 + 1e-6

  rows = _table_rows(res["curves"]["md"], "workload")
  assert len(rows) == 2 * len(b.curves.workloads)
  for wl, per in res["curves"]["results"].items():
    w = b.curves[wl]
    for r in per.values():
      c = r["curves"]
      assert c["nll/steps"]["x"][-1] == w.smt_steps + w.dmt_steps  # the last eval ends the run
      assert c["nll/steps"]["y"] == c["nll/tokens"]["y"] == c["nll/seqflops"]["y"]
      assert r["nll"] == pytest.approx(c["nll/steps"]["y"][-1])
    assert per["smt_dmt"]["nll_after_smt"] in per["smt_dmt"]["curves"]["nll/steps"]["y"]

  rows = _table_rows(res["text"]["md"], "method")
  assert [r[0] for r in rows] == ["SMT->DMT", "BPTT"]
  steps = b.text.smt_steps + b.text.dmt_steps
  for r in res["text"]["results"].values():
    c = r["curves"]
    assert c["steps"]["x"][-1] == steps  # the last eval is the end of the run
    assert c["steps"]["y"] == c["tokens"]["y"] == c["seqflops"]["y"]  # one eval, three x-axes
    assert all(v > u for u, v in zip(c["tokens"]["x"], c["tokens"]["x"][1:]))
    assert r["bits_per_byte"] == pytest.approx(c["steps"]["y"][-1])

  rows = _table_rows(res["sweep"]["md"], "c_dyn")
  assert [(float(r[0]), float(r[1])) for r in rows] == [
    (d, u) for d in b.sweep.c_dyn for u in b.sweep.c_unif
  ]

  from experiments.studies import scaling

  rows = _table_rows(res["scaling"]["md"], "sweep")
  assert len(rows) == 2 * len(scaling.variants(b.scaling))
  pts = {(p["width"], p["memory_tokens"], p["depth"]): p for p in res["scaling"]["points"]}
  base = (b.scaling.width, b.scaling.memory_tokens, b.scaling.depth)
  deeper = (base[0], base[1], b.scaling.depths[-1])
  assert pts[deeper]["rnn_params"] > pts[base]["rnn_params"]
  for p in pts.values():  # every memory size reaches the worst final NLL, by the end at the latest
    if p["width"] == base[0] and p["depth"] == base[2]:
      for m in ("smt_dmt", "bptt"):
        assert 0 < p[m]["flops_to_target"] <= p[m]["seq_flops"]


def test_flops_to_reach_is_the_first_crossing_linear_between_evals():
  from experiments.studies import scaling

  xs, ys = [10.0, 20.0, 30.0, 40.0], [3.0, 2.0, 1.0, 1.5]
  assert scaling.flops_to_reach(xs, ys, 3.5) == 10.0  # already there at the first eval
  assert scaling.flops_to_reach(xs, ys, 1.5) == pytest.approx(25.0)  # halfway from 2.0 to 1.0
  assert scaling.flops_to_reach(xs, ys, 1.0) == 30.0
  assert math.isnan(scaling.flops_to_reach(xs, ys, 0.5))


def test_last_quarter_change_measures_the_end_of_the_curve():
  from experiments.studies import curves

  xs = [0, 100, 200, 300, 400, 500, 600, 700, 800]
  ys = [5.0, 3.0, 2.0, 1.8, 1.7, 1.6, 1.5, 1.45, 1.4]
  assert curves.last_quarter_change(xs, ys, 0) == pytest.approx(1.4 - 1.5)  # from step 600
  assert curves.last_quarter_change(xs, ys, 400) == pytest.approx(1.4 - 1.45)  # DMT's: from 700


def test_budget_overrides_merge_and_name_the_bad_field():
  from experiments.studies import budgets

  b = budgets.get_config("cpu")
  c = budgets.apply_overrides(
    b, ["length_parity.tasks=('copy',)", "length_parity.future={'copy': 0.25}", "text.smt_steps=9"]
  )
  assert c.length_parity.tasks == ("copy",) and c.text.smt_steps == 9
  assert c.length_parity.future.copy == 0.25 and c.length_parity.future.stack == 16  # merged
  assert b.length_parity.tasks != ("copy",)  # the budget itself is left alone
  for bad, match in (
    ("length_parity.nosuch=1", "no field 'length_parity.nosuch'"),
    ("nosuch.seeds=(0,)", "no field 'nosuch'"),
    ("length_parity.seeds=zero", "not a Python literal"),
    ("length_parity.seeds='0'", "is a tuple"),
    ("length_parity.seeds", "expected field=value"),
  ):
    with pytest.raises(ValueError, match=match):
      budgets.apply_overrides(b, [bad])


@pytest.mark.parametrize(
  "study, override, error",
  [
    ("text", "text.nosuch=1", "error: --set: the budget has no field 'text.nosuch'."),
    # The race's own check, before its first run trains.
    (
      "race",
      "race.lrs={'stack': {'bptt': (1e-3,)}}",
      "error: race.lrs.stack has no grid for 'smt_dmt': add smt_dmt=(...) or give one grid for "
      "every method.",
    ),
  ],
)
def test_studies_cli_refuses_bad_input_in_one_line(tmp_path, study, override, error):
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.studies",
      f"--study={study}",
      "--budget=smoke",
      f"--set={override}",
      f"--out={tmp_path}",
      f"--runs={tmp_path}",
      "--compile_cache=none",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1
  assert out.stderr.strip() == error
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_the_run_cache_keys_on_what_a_run_computes():
  from experiments.configs import synthetic
  from experiments.studies import common

  def cfg(phases, **lrs):
    c = synthetic.get_config("stack,32")
    c.phases = phases
    for p, lr in lrs.items():
      c[p].lr = lr
    return json.loads(c.to_json())

  same = lambda a, b: common.same_settings(common._computed(a), common._computed(b))
  # The lr of a phase the run does not train changes nothing it computes; its own lr does.
  assert same(cfg("bptt", smt=1e-3, dmt=3e-4), cfg("bptt", smt=3e-3, dmt=9e-4))
  assert not same(cfg("bptt", bptt=1e-3), cfg("bptt", bptt=3e-3))
  assert not same(cfg("smt,dmt", smt=1e-3), cfg("smt,dmt", smt=3e-3))
  assert same(cfg("smt,dmt", bptt=1e-3), cfg("smt,dmt", bptt=3e-3))
  # A run cached by an older version (model.rnn_depth) is the same run as today's config.
  old = cfg("smt,dmt")
  rnn = old["model"].pop("rnn")
  old["model"].update(rnn_depth=rnn["transformer"]["depth"], readout_depth=1, rnn_hidden=0)
  assert same(old, cfg("smt,dmt"))
  old["model"]["rnn_depth"] += 1
  assert not same(old, cfg("smt,dmt"))


def test_a_checkpoint_inside_a_phase_restores_its_parameters(tmp_path):
  # It also holds the phase's optimiser state, which the studies (and rollout_check --steps) do
  # not want: its parameters come back all the same, and a phase end's as before.
  import optax

  from experiments.configs import pixels
  from experiments.studies import common
  from smt_jax.runner import checkpoints, experiment

  cfg = pixels.get_config("smoke")
  exp = experiment.build_experiment(cfg)
  params = exp.init_params()
  mid = jax.tree.map(lambda a: a + 1.0, params)
  mngr = checkpoints.make_manager(str(tmp_path), keep=5)
  checkpoints.save(mngr, 3, mid, optax.adam(1e-3).init(mid), phase_index=0, phase_step=3)
  checkpoints.save(mngr, 6, params, None, phase_index=1, phase_step=0)
  mngr.wait_until_finished()
  mngr.close()
  for step, want in [(3, mid), (6, params)]:
    _, got = common.restore(cfg, str(tmp_path), step)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_race_takes_a_grid_per_method_and_refuses_a_missing_one(tmp_path):
  from experiments.studies import budgets, common, race

  b = budgets.get_config("cpu")
  ctx = common.Context(budget=b, out=str(tmp_path), runs=str(tmp_path), quiet=True)
  b.race.lrs = {"stack": {"smt_dmt": (1e-2,), "bptt": 3e-3}, "digits": (1e-3, 3e-3)}
  assert race.lr_grid(b.race, "stack", "smt_dmt") == (1e-2,)
  assert race.lr_grid(b.race, "stack", "bptt") == (3e-3,)
  assert race.lr_grid(b.race, "digits", "bptt") == (1e-3, 3e-3)
  assert race.lr_grid(b.race, "digits", "earlier") == tuple(b.race.earlier_lrs)
  # A grid missing for a later workload's method is refused before the first run trains.
  b.race.workloads = ("digits", "stack")
  b.race.lrs = {"digits": (1e-3,), "stack": {"bptt": (3e-3,)}}
  with pytest.raises(ValueError, match="race.lrs.stack has no grid for 'smt_dmt'"):
    race.run(ctx)
  assert not any(tmp_path.iterdir())


def test_the_recipe_search_holds_the_tokens_and_names_the_field(tmp_path, monkeypatch):
  from experiments.studies import budgets, common, race, recipe
  from smt_jax.runner import config as config_lib

  b = budgets.get_config("cpu")
  ctx = common.Context(budget=b, out=str(tmp_path), runs=str(tmp_path), quiet=True)
  for workload in b.recipe.workloads:
    _, default = recipe.config(ctx, workload, "default", (), 0, "smt_dmt")
    want = config_lib.training_tokens(default)
    if race.probe_length(ctx, workload) is None:  # the streams' recipe raced, not `,full`'s today
      smt = default.smt
      assert (smt.future_length, smt.num_transitions, smt.num_decoded) == (16, 80, 8), workload
      assert config_lib.dmt_start(default) == (None, False), workload  # the published start
    for method, variants in (("smt_dmt", b.recipe.variants), ("bptt", b.recipe.bptt)):
      for label, overrides in variants[workload]:
        name, c = recipe.config(ctx, workload, label, overrides, 0, method)
        config_lib.validate(c)
        ratio = config_lib.training_tokens(c) / want
        if label in b.recipe.more_tokens.get(workload, ()):  # the equal wall-clock rows
          assert ratio > 1.1, (workload, label)
        else:
          assert abs(ratio - 1) <= 0.01, (workload, label)
        if not overrides and race.probe_length(ctx, workload) is None:
          assert name.startswith("race/"), name  # the race's own run, reused
  # A variant's lengths set a stream's steps at the race's tokens; explicit steps win.
  _, c = recipe.config(ctx, "digits", "x", ("smt.future_length=32", "dmt.steps=50"), 0, "smt_dmt")
  assert c.smt.future_length == 32 and c.dmt.steps == 50
  assert c.smt.steps < default.smt.steps  # longer rows, fewer steps for the same tokens
  # A variant that changes the data is refused before anything trains, naming the fix.
  ctx.budget.recipe.variants.stack32 = (("default", ()), ("longer DMT", ("dmt.steps=500",)))
  with pytest.raises(ValueError, match="'longer DMT' trains on .* keep the sum"):
    recipe.run(ctx)
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written
  # ... unless recipe.more_tokens names it (it gets as far as training: stopped there)
  ctx.budget.recipe.more_tokens.stack32 = ("longer DMT",)
  ctx.budget.recipe.workloads = ("stack32",)
  trained = []

  def stop(ctx, name, cfg):
    trained.append(name)
    raise KeyboardInterrupt

  monkeypatch.setattr(common, "ensure_run", stop)
  with pytest.raises(KeyboardInterrupt):
    recipe.run(ctx)
  assert trained == ["recipe/stack32_smt_dmt_default_s0"]


def test_the_recipe_search_tables_each_variant_over_its_seeds(tmp_path, monkeypatch):
  from experiments.studies import budgets, common, recipe

  b = budgets.get_config("smoke")
  b.recipe.seeds = {"stack8": (0, 1)}
  ctx = common.Context(budget=b, out=str(tmp_path), runs=str(tmp_path), quiet=True)
  trained = []

  def fake_run(ctx, name, cfg):  # accuracy 0.5 + 0.1 x seed, +0.2 for every memory decoded
    trained.append(name)
    acc = 0.5 + 0.1 * cfg.seed + (0.2 if cfg.smt.num_decoded == 9 else 0.0)
    last = {"eval/rnn_nll": 1 - acc, "eval/rnn_acc": acc}
    last.update({"eval/teacher_nll": 0.9 - acc, "eval/teacher_acc": acc + 0.05})
    phases = cfg.phases.split(",")
    s = {p: dict(last, **{"eval/rnn_nll": 2.0}) for p in phases}
    s[phases[-1]] = last
    return {"summary": s, "train_s": {p: 10.0 for p in phases}}

  monkeypatch.setattr(common, "ensure_run", fake_run)
  monkeypatch.setattr(common, "run_seq_flops", lambda cfg: ({"x": 1e9}, {}))
  res = recipe.run(ctx)
  # The default first, then BPTT, then the variants; every seed of each.
  assert [n.split("/")[1] for n in trained] == [
    "stack8_smt_dmt_default_s0",
    "stack8_smt_dmt_default_s1",
    "stack8_bptt_bptt_s0",
    "stack8_bptt_bptt_s1",
    "stack8_smt_dmt_every_memory_decoded_s0",
    "stack8_smt_dmt_every_memory_decoded_s1",
  ]
  rows = {r["label"]: r for r in res["cells"][0]["rows"]}
  assert rows["every memory decoded"]["acc"] == pytest.approx([0.7, 0.8])
  assert rows["BPTT"]["teacher_acc"] == [] and rows["default"]["smt_nll"] == [2.0, 2.0]
  assert (
    "| every memory decoded | `smt.num_decoded=9` | 6+4 | 320 | 0.750 ± 0.071 |"
    in (res["markdown"])
  )
  assert os.path.exists(tmp_path / "recipe.png")
  assert os.path.exists(tmp_path / "studies" / "recipe.md")
