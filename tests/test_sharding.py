"""Sharded training equals unsharded training, on 8 fake CPU devices.

The device count must be fixed before JAX starts, so the checks run in a subprocess: this file
executed as a script (`python tests/test_sharding.py OUTDIR` with
XLA_FLAGS=--xla_force_host_platform_device_count=8) prints one JSON line of results, and the tests
below assert on it. What is checked:
- SMT, DMT and BPTT train steps (the runner's own, `experiment.make_phase(...).step`: sharded,
  donated) on meshes (data, fsdp, time) = (8,1,1), (2,4,1), (2,1,4) give the loss, metrics,
  parameters and optimiser state of the same steps on one device (the phase's unconstrained loss
  and optimiser, plainly jitted; two steps of each program, as the warm-up's first learning rate
  is 0);
- the parameters and optimiser state are laid out as the fsdp rule says (arrays of at least
  mesh.fsdp_min_size elements split along their largest dimension that divides evenly, the rest
  replicated: the (2, 4, 1) steps above train with both kinds), parameters created sharded equal
  those created on one device, and the time axis really constrains SMT's transitions;
- a checkpoint saved on one mesh restores onto a different mesh with identical values, in the
  restoring mesh's layout;
- on the mesh, SMT's uniformity term is computed whole on every device (fewer collectives than
  the partitioner's split, the same values) and `sharding.start_together` keeps its batch-wide
  count live in the compiled step (and is the loss itself on one device).
The model is the synthetic smoke config's (transformer teacher); its RNN is an Elman cell, which
halves the compile time. SHARDING_TEST_RNN=transformer checks the paper's updater instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = ((8, 1, 1), (2, 4, 1), (2, 1, 4))  # (data, fsdp, time)
PHASES = ("smt", "dmt", "bptt")
ACCUM_PHASES = ("smt", "bptt")  # with optim.grad_accum_steps = 2 on the (8, 1, 1) mesh
RNN_KIND = os.environ.get("SHARDING_TEST_RNN", "elman")
RTOL, ATOL = 1e-5, 1e-6
# Of the smoke model's 31 parameter arrays (9 to 12,288 elements), 12 have at least 256 elements:
# the fsdp steps train with sharded and replicated parameters side by side.
FSDP_MIN_SIZE = 256


# ------------------------------------------------------------------------------------------------
# The worker (runs in the subprocess, with 8 fake devices).


def _config(mesh):
  from experiments.configs import synthetic

  c = synthetic.get_config("copy,smoke")  # episodes of T = 16, all 16 transitions (divisible by 4)
  c.phases = ",".join(PHASES)
  for p in (*PHASES, "eval"):
    c[p].batch_size = 8
  for p in PHASES:
    # Adam moves every weight by about lr, whatever its gradient: weights with gradients near zero
    # (e.g. 1e-7, where float32 summation order shows) move by lr * O(1) either way. A small lr
    # keeps that rounding well inside the tolerance; a sharding bug still moves weights by ~lr.
    c[p].lr = 1e-4
  c.mesh.data, c.mesh.fsdp, c.mesh.time = mesh
  c.mesh.fsdp_min_size = FSDP_MIN_SIZE
  c.model.rnn_kind = RNN_KIND
  return c


def _excess(a, b) -> float:
  """max(|a - b| - (atol + rtol |b|)): <= 0 when a and b agree within tolerance."""
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  return float(np.max(np.abs(a - b) - (ATOL + RTOL * np.abs(b)), initial=-1.0))


def _tree_excess(a, b) -> float:
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb):
    return float("inf")
  return max(_excess(x, y) for x, y in zip(la, lb))


def _jaxpr_time_constraints(fn, *args) -> int:
  """How many sharding constraints in fn's jaxpr put an axis on the mesh's 'time' axis."""
  import re

  import jax

  text = str(jax.make_jaxpr(fn)(*args))
  return len(re.findall(r"sharding_constraint\[[^\]]*'time'", text))


def _loop_collectives(hlo: str) -> int:
  """Collectives (all-reduce, all-gather, ...) inside the while loops of a compiled HLO module,
  the computations their bodies call included."""
  import re

  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  body = r"body=%?([\w.\-]+)"
  todo = [b for lines in comps.values() for b in re.findall(body, "\n".join(lines))]
  seen, count = set(), 0
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    text = "\n".join(comps[c])
    count += len(
      re.findall(r" (?:all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", text)
    )
    todo += re.findall(r"(?:body|calls|to_apply|condition)=%?([\w.\-]+)", text)
  return count


def worker(outdir: str) -> dict:
  import jax
  import numpy as np

  from smt_jax.runner import checkpoints, experiment
  from smt_jax.runner import config as config_lib

  assert jax.device_count() == 8, jax.devices()
  out = {"devices": jax.device_count(), "steps": {}, "init_excess": {}, "accum": {}}
  key = jax.random.fold_in(jax.random.key(0), 0)

  def one_step(exp, params, name, *, sharded: bool, inspect: bool = True):
    c = exp.config
    phase = experiment.make_phase(exp, name)
    if sharded:  # exactly as the runner does (on a copy: the step donates its input)
      state = phase.init_state(jax.tree.map(lambda a: a.copy(), params))
      batch = phase.batch(0)
      # accumulating: the runner's micro-batch steps, against the one-call scan below
      fn = phase.step if phase.accum_steps == 1 else phase.train_step
      loss_fn = phase.loss_fn
    else:  # everything on one device, without the mesh's constraints
      dev = jax.devices()[0]
      p1 = jax.device_put(jax.device_get(params), dev)
      state = {"params": p1, "opt_state": phase.optimizer.init(p1)}
      batch = jax.device_put(
        phase.source.batch(split="train", step=0, batch_size=phase.batch_size, seed=c.seed), dev
      )
      loss_fn = experiment.make_loss(c, name, exp.fns)
      fn = jax.jit(
        experiment.make_train_step(loss_fn, phase.optimizer, config_lib.grad_accum_steps(c))
      )
    time_constraints = (
      _jaxpr_time_constraints(loss_fn, state["params"], batch, key)
      if sharded and inspect and name == "smt"
      else 0
    )
    loop_collectives = (
      _loop_collectives(fn.lower(state, batch, key).compile().as_text())
      if sharded and inspect and name != "smt"
      else 0
    )
    # Two steps of the same program: the first has learning rate 0 (the warm-up starts at 0), so it
    # is the second that moves the parameters.
    for i in range(2):
      state, metrics = fn(state, batch, jax.random.fold_in(key, i))
    return state, jax.device_get(metrics), time_constraints, loop_collectives

  reference, ref_params = {}, None
  for mesh in MESHES:
    exp = experiment.build_experiment(_config(mesh))
    params = exp.init_params()
    name = "x".join(map(str, mesh))
    if ref_params is None:
      ref_params = jax.device_get(params)
      for phase in PHASES:
        new, metrics, *_ = one_step(exp, params, phase, sharded=False)
        reference[phase] = (jax.device_get(new), metrics)
    out["init_excess"][name] = _tree_excess(jax.device_get(params), ref_params)
    for phase in PHASES:
      new, metrics, n_time, n_loop = one_step(exp, params, phase, sharded=True)
      ref_new, ref_metrics = reference[phase]
      out["steps"][f"{name}/{phase}"] = {
        "loss": float(metrics["loss"]),
        "ref_loss": float(ref_metrics["loss"]),
        "metrics_excess": max(_excess(metrics[k], ref_metrics[k]) for k in ref_metrics),
        "params_excess": _tree_excess(jax.device_get(new["params"]), ref_new["params"]),
        "opt_state_excess": _tree_excess(jax.device_get(new["opt_state"]), ref_new["opt_state"]),
        "params_changed": _tree_excess(ref_new["params"], ref_params) > 0,
        "time_constraints": n_time,
        "loop_collectives": n_loop,
      }
      if mesh == (2, 4, 1) and phase == "smt":
        saved = new  # saved below, on this mesh
        leaves = jax.tree.leaves(new["params"])
        out["fsdp_leaves"] = sum("fsdp" in str(a.sharding.spec) for a in leaves)
        out["fsdp_split"] = sum(a.addressable_shards[0].data.shape != a.shape for a in leaves)
        out["num_leaves"] = len(leaves)
        out["fsdp_layout"] = [
          {
            "shape": list(a.shape),
            "shard": list(a.addressable_shards[0].data.shape),
            "on_fsdp": "fsdp" in str(a.sharding.spec),
          }
          for a in jax.tree.leaves(new)  # parameters and optimiser state
        ]
        mngr = checkpoints.make_manager(outdir, keep=2)
        checkpoints.save(mngr, 1, saved["params"], saved["opt_state"], phase_index=0, phase_step=1)
        mngr.wait_until_finished()
        saved_host = jax.device_get(saved)
        saved_shards = [a.addressable_shards[0].data.shape for a in leaves]

  # Gradient accumulation, data-parallel: each micro-batch keeps its rows on their devices.
  c = _config((8, 1, 1))
  for p in (*PHASES, "eval"):
    c[p].batch_size = 16
  c.optim.grad_accum_steps = 2
  exp_a = experiment.build_experiment(c)
  params_a = exp_a.init_params()
  for phase in ACCUM_PHASES:
    ref_new, ref_metrics, *_ = one_step(exp_a, params_a, phase, sharded=False)
    new, metrics, *_ = one_step(exp_a, params_a, phase, sharded=True, inspect=False)
    out["accum"][phase] = {
      "loss": float(metrics["loss"]),
      "ref_loss": float(ref_metrics["loss"]),
      "params_excess": _tree_excess(jax.device_get(new["params"]), ref_new["params"]),
    }

  # The one-pass causal teacher on the time axis: its gathered memories are split across it.
  c = _config((2, 1, 4))
  c.phases, c.model.teacher_kind, c.model.encoder_depth = "smt", "causal", 2
  exp_c = experiment.build_experiment(c)
  params_c = exp_c.init_params()
  ref_new, ref_metrics, *_ = one_step(exp_c, params_c, "smt", sharded=False)
  new, metrics, n_time, _ = one_step(exp_c, params_c, "smt", sharded=True)
  out["causal_time"] = {
    "loss": float(metrics["loss"]),
    "ref_loss": float(ref_metrics["loss"]),
    "metrics_excess": max(_excess(metrics[k], ref_metrics[k]) for k in ref_metrics),
    "params_excess": _tree_excess(jax.device_get(new["params"]), jax.device_get(ref_new["params"])),
    "time_constraints": n_time,
  }

  # The SMT loss on the runner's mesh: the uniformity term whole on every device from one
  # all-gather (objectives._whole_batch, under the mesh) instead of split by rows by the
  # partitioner (plain jit), and the devices started together (sharding.start_together, which
  # make_phase applies on a CPU mesh). Same values; fewer collectives; the batch-wide count
  # stays live in the compiled program (its all-reduce takes one more operand).
  import re

  from smt_jax import sharding

  raw = experiment.make_loss(exp_a.config, "smt", exp_a.fns)
  batch = experiment.make_phase(exp_a, "smt").batch(0)
  variants = {
    "split": raw,
    "whole": sharding.traced_on(exp_a.mesh, raw),
    "together": sharding.traced_on(exp_a.mesh, sharding.start_together(exp_a.mesh, raw)),
  }
  found = {}
  for name, f in variants.items():
    g = jax.jit(jax.value_and_grad(f, has_aux=True))
    hlo = g.lower(params_a, batch, key).compile().as_text()
    reduces = re.findall(r"= (\([^)]*\)|\S+) all-reduce\(", hlo)
    found[name] = {
      "value": jax.device_get(g(params_a, batch, key)),
      "collectives": len(reduces) + hlo.count(" all-gather("),
      "s32_reduced": sum(r.count("s32") for r in reduces),
    }
  out["smt_mesh"] = {
    **{
      f"{n}_excess": _tree_excess(found[n]["value"], found["split"]["value"])
      for n in variants
      if n != "split"
    },
    **{f"{n}_{k}": found[n][k] for n in found for k in ("collectives", "s32_reduced")},
    "identity_on_one_device": sharding.start_together(
      jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES), raw
    )
    is raw,
  }

  # Restore onto another mesh: every device on fsdp (a different split of the same arrays).
  exp_b = experiment.build_experiment(_config((1, 8, 1)))
  mngr = checkpoints.make_manager(outdir, keep=2)
  r = checkpoints.restore(
    mngr,
    **experiment.restore_targets(exp_b),
  )
  params_r, phase_index, phase_step = r["params"], r["phase_index"], r["phase_step"]
  restored = {"params": params_r, "opt_state": r["opt_state"]}
  leaves_r = jax.tree.leaves(params_r)
  want = jax.tree.leaves(exp_b.params_sharding)
  out["restore"] = {
    "phase": [phase_index, phase_step],
    "identical": all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved_host))
    ),
    "same_structure": (
      jax.tree.structure(jax.device_get(restored)) == jax.tree.structure(saved_host)
    ),
    "layout_is_target": all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(leaves_r, want)),
    "layout_changed": [a.addressable_shards[0].data.shape for a in leaves_r] != saved_shards,
    "mesh": dict(leaves_r[0].sharding.mesh.shape),
  }
  return out


# ------------------------------------------------------------------------------------------------
# The tests (in the pytest process).

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

pytestmark = pytest.mark.xdist_group("sharding")  # one worker: the module fixture runs once


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  outdir = tmp_path_factory.mktemp("sharding_ckpt")
  proc = subprocess.run(
    [sys.executable, __file__, str(outdir)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
@pytest.mark.parametrize("phase", PHASES)
def test_sharded_train_step_equals_one_device(results, mesh, phase):
  r = results["steps"][f"{mesh}/{phase}"]
  assert r["params_changed"], "the reference step did not move the parameters"
  assert abs(r["loss"] - r["ref_loss"]) <= ATOL + RTOL * abs(r["ref_loss"]), r
  assert r["metrics_excess"] <= 0, r
  assert r["params_excess"] <= 0, r
  assert r["opt_state_excess"] <= 0, r


@pytest.mark.parametrize("phase", ACCUM_PHASES)
def test_accumulated_step_sharded_equals_one_device(results, phase):
  r = results["accum"][phase]
  assert abs(r["loss"] - r["ref_loss"]) <= ATOL + RTOL * abs(r["ref_loss"]), r
  assert r["params_excess"] <= 0, r


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
@pytest.mark.parametrize("phase", ("dmt", "bptt"))
def test_rollout_backward_has_no_collective_per_time_step(results, mesh, phase):
  # The rollout's scan runs each device's rows apart (objectives._rows_apart): the parameters'
  # gradient is summed on each device through the whole unroll and all-reduced once after the
  # loop. Under plain jit the partitioner all-reduced it inside the backward loop, every step.
  assert results["steps"][f"{mesh}/{phase}"]["loop_collectives"] == 0


def test_smt_on_the_mesh_meets_less_and_starts_together(results):
  r = results["smt_mesh"]
  assert r["whole_excess"] <= 0 and r["together_excess"] <= 0, r
  assert r["whole_collectives"] < r["split_collectives"], r
  assert r["together_s32_reduced"] == r["whole_s32_reduced"] + 1, r
  assert r["identity_on_one_device"], r


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_parameters_created_sharded_equal_the_one_device_init(results, mesh):
  assert results["init_excess"][mesh] <= 0


def _expected_shard(shape: list[int], fsdp: int, min_size: int) -> list[int]:
  """The fsdp rule, written out independently: split the largest dimension that fsdp divides
  (the first of equal ones) of arrays of at least min_size elements; replicate the rest."""
  if int(np.prod(shape)) < min_size or not shape:
    return shape
  divisible = [i for i in range(len(shape)) if shape[i] % fsdp == 0]
  if not divisible:
    return shape
  i = max(divisible, key=lambda i: (shape[i], -i))
  return [n // fsdp if j == i else n for j, n in enumerate(shape)]


def test_fsdp_shards_large_arrays_and_replicates_small_ones(results):
  assert results["devices"] == 8
  layout = results["fsdp_layout"]  # mesh (2, 4, 1): fsdp = 4
  for leaf in layout:
    want = _expected_shard(leaf["shape"], 4, FSDP_MIN_SIZE)
    assert leaf["shard"] == want, leaf
    assert leaf["on_fsdp"] == (want != leaf["shape"]), leaf
  sharded = [leaf for leaf in layout if leaf["shard"] != leaf["shape"]]
  small = [leaf for leaf in layout if int(np.prod(leaf["shape"])) < FSDP_MIN_SIZE]
  assert sharded and small, "the rule was not exercised both ways"
  # Below the threshold even evenly divisible arrays stay whole (e.g. the [16] norm gains).
  assert any(leaf["shape"] and leaf["shape"][0] % 4 == 0 for leaf in small)
  assert results["fsdp_split"] == results["fsdp_leaves"] > 0, results


@pytest.mark.parametrize(
  "shape, fsdp, min_size, spec",
  [
    ((64, 256), 4, 2**14, P(None, "fsdp")),  # 16,384 elements: at the threshold, sharded
    ((64, 258), 4, 2**14, P("fsdp", None)),  # the largest dimension does not divide: the next
    ((64, 256), 4, 2**14 + 1, P()),  # below the threshold: replicated
    ((256,), 4, 2**14, P()),  # a bias
    ((8, 8), 4, 0, P("fsdp", None)),  # equal dimensions: the first
    ((3, 5), 4, 0, P()),  # nothing divides
    ((), 4, 0, P()),  # a scalar (e.g. Adam's count)
    ((64, 256), 1, 0, P()),  # no fsdp axis
  ],
)
def test_fsdp_spec_rule(shape, fsdp, min_size, spec):
  from smt_jax import sharding  # here: the worker above imports it after fixing sys.path

  assert sharding.fsdp_spec(shape, fsdp, min_size=min_size) == spec


@pytest.mark.parametrize("value", [-1, 1.5, "big"])
def test_fsdp_min_size_must_be_a_non_negative_integer(value):
  from experiments.configs import synthetic
  from smt_jax.runner import config as config_lib

  c = synthetic.get_config("copy,smoke")
  with c.mesh.ignore_type():
    c.mesh.fsdp_min_size = value
  with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.fsdp_min_size = "):
    config_lib.validate(c)


def test_time_axis_constrains_smt_transitions(results):
  assert results["steps"]["2x1x4/smt"]["time_constraints"] >= 3
  for mesh in ("8x1x1", "2x4x1"):
    assert results["steps"][f"{mesh}/smt"]["time_constraints"] == 0


def test_causal_teacher_sharded_on_time_equals_one_device(results):
  r = results["causal_time"]
  assert abs(r["loss"] - r["ref_loss"]) <= ATOL + RTOL * abs(r["ref_loss"]), r
  assert r["metrics_excess"] <= 0 and r["params_excess"] <= 0, r
  assert r["time_constraints"] >= 3, r


def test_checkpoint_saved_on_one_mesh_restores_onto_another(results):
  r = results["restore"]
  assert r["mesh"] == {"data": 1, "fsdp": 8, "time": 1}
  assert r["phase"] == [0, 1]
  assert r["same_structure"] and r["identical"]
  assert r["layout_is_target"] and r["layout_changed"]


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  print(json.dumps(worker(sys.argv[1])))
