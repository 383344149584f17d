"""Both cores by default: a CPU-only run that names no mesh gets one CPU device per core,
data-parallel (the studies too, as many as divide every batch of their budget); its results equal
one device's to float tolerance and its checkpoints restore on one device. Whatever the user set
(XLA_FLAGS, JAX_NUM_CPU_DEVICES, a mesh, several processes) wins."""

import os
import subprocess
import sys

import numpy as np
import pytest
import run_helpers

from experiments import cli
from experiments.configs import synthetic

CONFIG = "experiments/configs/synthetic.py:parity,smoke"


def test_one_device_per_core_dividing_every_batch():
  c = synthetic.get_config("parity,smoke")  # batches of 4
  assert cli.cpu_devices(c, {}, cores=2) == 2
  assert cli.cpu_devices(c, {}, cores=3) == 2  # 3 does not divide 4
  assert cli.cpu_devices(c, {}, cores=8) == 4
  c.eval.batch_size = 6
  assert cli.cpu_devices(c, {}, cores=8) == 2
  assert cli.cpu_devices(c, {}, cores=1) == 1


def test_the_studies_take_a_device_per_core_dividing_every_budget_batch():
  from experiments.studies import budgets

  smoke = budgets.batch_sizes(budgets.get_config("smoke"))
  assert set(smoke) == {4, 8}  # the probes' batches and eval batches, the analyses' sequences
  assert cli.cpu_devices(None, {}, cores=2, batches=smoke) == 2
  assert cli.cpu_devices(None, {}, cores=8, batches=smoke) == 4
  assert cli.cpu_devices(None, {}, cores=2, batches=[4, 7]) == 1
  assert cli.cpu_devices(None, {"JAX_NUM_CPU_DEVICES": "1"}, cores=2, batches=smoke) is None
  b = budgets.apply_overrides(budgets.get_config("smoke"), ["probes.batch_size=6"])
  assert 6 in budgets.batch_sizes(b)


@pytest.mark.parametrize(
  "env, mesh",
  [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, None),
    ({"JAX_NUM_CPU_DEVICES": "1"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, None),
    ({}, ("data", 1)),
    ({}, ("time", 2)),
  ],
)
def test_what_the_user_set_wins(env, mesh):
  c = synthetic.get_config("parity,smoke")
  if mesh:
    c.mesh[mesh[0]] = mesh[1]
  assert cli.cpu_devices(c, env, cores=2) is None


def _run(workdir, env):
  out = subprocess.run(
    [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", f"--workdir={workdir}"],
    cwd=run_helpers.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  return out.stdout


def test_two_cores_equal_one_device_and_restore_on_it(tmp_path, tmp_path_factory):
  if len(os.sched_getaffinity(0)) < 2:
    pytest.skip("one core: the default is one device")
  env = run_helpers.subprocess_env(tmp_path_factory)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  two = _run(tmp_path / "two", env)
  assert "devices: 2 CPU devices, one per core, data-parallel" in two
  one = _run(tmp_path / "one", dict(env, JAX_NUM_CPU_DEVICES="1"))
  assert "devices:" not in one
  a, b = run_helpers.summary(str(tmp_path / "two")), run_helpers.summary(str(tmp_path / "one"))
  for phase in ("smt", "dmt"):
    for k, v in a[phase].items():
      np.testing.assert_allclose(v, b[phase][k], rtol=1e-4, atol=1e-5, err_msg=f"{phase} {k}")
  _, sa, _ = run_helpers.restore(str(tmp_path / "two"))
  _, sb, _ = run_helpers.restore(str(tmp_path / "one"))
  la, lb = run_helpers.leaves(sa), run_helpers.leaves(sb)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], rtol=1e-4, atol=1e-5, err_msg=k)
  # The finished two-device run, rerun on one device: its checkpoint restores there.
  again = _run(tmp_path / "two", dict(env, JAX_NUM_CPU_DEVICES="1"))
  assert f"Resumed from {tmp_path / 'two'} at the end step 0." in again
