"""Several processes, one job, for real: 2 processes x 2 CPU devices on 127.0.0.1 (gloo
collectives), against 1 process x 4 devices, through `python -m experiments.run`.

(a) a 2-process run equals the 1-process run to float tolerance;
(b) SIGTERM to both processes: both save the same step and exit 143, and the rerun ends bit for
    bit where an uninterrupted 2-process run ends (so two 2-process runs agree exactly: the
    interrupted one and the uninterrupted one);
(c) a 2-process checkpoint resumes in 1 process, and a 1-process checkpoint in 2, each ending
    where the 1-process run ends (to float tolerance);
(d) parameters sharded across the processes (fsdp 4, pixels smoke) finish and write samples.png,
    and `experiments.sample` draws from that run with 2 processes;
(e) when one process dies, the other exits within --peer_timeout_s with one line saying so.

Cost: a 2-process CPU job compiles every program on both processes (`multihost.initialize`
turns JAX's persistent cache off there: see why in it), so each costs a full compile; the runs
are shared between the tests (module fixtures, one xdist worker). (b) and (d) add four such jobs
(about two minutes on 2 cores), so they are `slow`: `pytest -m slow tests/test_multiprocess.py`.
"""

from __future__ import annotations

import re
import shutil
import signal

import numpy as np
import pytest
import run_helpers

pytestmark = pytest.mark.xdist_group("multiprocess")  # one worker: the runs are shared

CONFIG = "experiments/configs/synthetic.py:parity,smoke"  # SMT 6, DMT 4; checkpoints 6, 9, 10
PEER_TIMEOUT = "--peer_timeout_s=10"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return run_helpers.subprocess_env(tmp_path_factory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return tmp_path_factory.mktemp("multiprocess")


def _job(base, name, env, *, processes, config=CONFIG, extra=(), module="experiments.run"):
  args = [f"--workdir={base / name}", PEER_TIMEOUT, *extra]
  if module == "experiments.run":
    args.insert(0, f"--config={config}")
  return run_helpers.Job(
    args,
    env,
    base / f"{name}.{module.split('.')[-1]}.log",
    processes=processes,
    devices=4 // processes,
    module=module,
  )


def _run(base, name, env, **kw):
  job = _job(base, name, env, **kw)
  rcs = job.finish()
  assert rcs == [0] * len(job.procs), f"{name}: exit {rcs}\n{job.outputs()}"
  return base / name


@pytest.fixture(scope="module")
def one(base, env):
  return _run(base, "one", env, processes=1)


@pytest.fixture(scope="module")
def two(base, env):
  return _run(base, "two", env, processes=2)


def _final(workdir):
  step, state, _ = run_helpers.restore(str(workdir))
  return step, run_helpers.leaves(state["params"])


def _assert_same(a, b, *, exact):
  (sa, pa), (sb, pb) = _final(a), _final(b)
  assert sa == sb and pa.keys() == pb.keys()
  for k in pa:
    if exact:
      np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    else:
      np.testing.assert_allclose(pa[k], pb[k], rtol=2e-4, atol=2e-5, err_msg=k)
  ra, rb = run_helpers.rows(str(a)), run_helpers.rows(str(b))
  assert [(r["step"], r["phase"]) for r in ra] == [(r["step"], r["phase"]) for r in rb]
  if exact:
    assert ra == rb
    assert run_helpers.summary(str(a)) == run_helpers.summary(str(b))
  else:
    for x, y in zip(ra, rb):
      for k in x:
        if isinstance(x[k], float) and k != "grad_norm":
          np.testing.assert_allclose(
            x[k], y[k], rtol=2e-3, atol=1e-4, err_msg=f"{k} at {x['step']}"
          )


def test_two_processes_equal_one(one, two):
  """(a): the same global batch, the same keys, the same math on 4 devices, split 1 x 4 or 2 x 2."""
  _assert_same(one, two, exact=False)
  assert (two / "accuracy.md").exists()


@pytest.mark.slow
def test_sigterm_both_then_rerun_is_bit_identical(base, env, one, two):
  """(b), and (c) from a 2-process checkpoint into 1 process."""
  job = _job(base, "sigterm", env, processes=2)
  assert job.wait_for(lambda: re.search(r"smt step 2/", job.output(0))), job.outputs()
  for p in job.procs:
    p.send_signal(signal.SIGTERM)
  rcs = job.finish()
  assert rcs == [143, 143], f"exit {rcs}\n{job.outputs()}"
  m = re.search(r"SIGTERM: saved a checkpoint at smt step (\d+);", job.output(0))  # process 0 says
  assert m, job.outputs()
  step, _, meta = run_helpers.restore(
    str(base / "sigterm")
  )  # written by both: they agreed on the step
  assert (step, meta["phase"], meta["phase_step"]) == (int(m.group(1)), "smt", int(m.group(1)))
  shutil.copytree(base / "sigterm", base / "sigterm_in_one")

  resumed = _run(base, "sigterm", env, processes=2)
  _assert_same(two, resumed, exact=True)

  across = _run(base, "sigterm_in_one", env, processes=1)
  assert (
    f"Resumed from {base / 'sigterm_in_one'}" in (base / "sigterm_in_one.run.log.0").read_text()
  )
  _assert_same(one, across, exact=False)


def test_one_process_checkpoint_resumes_in_two(base, env, one):
  """(c), the other way: the 1-process run's DMT checkpoint (step 9, with its optimiser state)."""
  shutil.copytree(one, base / "one_in_two")
  shutil.rmtree(base / "one_in_two" / "checkpoints" / "10")
  resumed = _run(base, "one_in_two", env, processes=2)
  assert "Resumed from" in (base / "one_in_two.run.log.0").read_text()
  assert "at dmt step 3" in (base / "one_in_two.run.log.0").read_text()
  _assert_same(one, resumed, exact=False)


@pytest.mark.slow
def test_parameters_sharded_across_processes_finish_with_samples(base, env):
  """(d): fsdp 4 spans both processes; samples are drawn from parameters gathered first."""
  extra = ("--config.mesh.fsdp=4", "--config.mesh.data=1", "--config.mesh.fsdp_min_size=0")
  extra += ("--config.phases=smt",)  # what is sharded is the same in every phase: one suffices
  wd = _run(
    base, "fsdp", env, processes=2, config="experiments/configs/pixels.py:smoke", extra=extra
  )
  assert (wd / "samples.png").stat().st_size > 0
  (wd / "samples.png").unlink()
  _run(base, "fsdp", env, processes=2, module="experiments.sample")
  assert (wd / "samples.png").stat().st_size > 0


def test_a_dead_peer_stops_the_others_with_one_line(base, env):
  """(e): process 1 is killed (SIGKILL) while the job builds; process 0 must not hang."""
  job = _job(base, "peer", env, processes=2)
  assert job.wait_for(lambda: "workdir:" in job.output(1)), job.outputs()
  job.procs[1].kill()
  rcs = job.finish(timeout_s=120)
  out = job.output(0)
  assert rcs[0] == 1, f"exit {rcs}\n{out}"
  lines = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "process 1 of 2 stopped responding" in lines[0], out
