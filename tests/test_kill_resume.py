"""Crash-exact resume, for real: `python -m experiments.run` in a subprocess, killed and rerun.

One workdir goes through every way a job ends early, each rerun being the same command:
  0. SIGKILL as soon as the first metrics row is written, before the first checkpoint;
  1. SIGTERM (preemption) during SMT: exit 143, a checkpoint of the step it stopped at;
  2. SIGKILL while a checkpoint is being written (its `*.orbax-checkpoint-tmp*` folder exists);
  3. SIGKILL at a random moment after the next checkpoint appears;
  4. a rerun to the end;
  5. the latest checkpoint corrupted on disk (data files truncated), and a rerun.
After 4 and again after 5, the final parameters, every metrics row, the summary and the samples
must equal, bit for bit, those of an uninterrupted run of the same command (timing fields aside).

Cost: one cold compile (the uninterrupted run); the killed runs and reruns share a persistent JAX
compilation cache, so each costs little more than starting Python.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import run_helpers

ROOT = run_helpers.ROOT
CONFIG = "experiments/configs/synthetic.py:parity,smoke"  # SMT 6 steps, DMT 4; checkpoints every 3
TIMEOUT_S = 600
pytestmark = pytest.mark.xdist_group("kill_resume")  # one worker: the module fixture runs once


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The subprocesses' environment: one persistent compilation cache for all of them."""
  return run_helpers.subprocess_env(tmp_path_factory)


class Run:
  """One `python -m experiments.run` of the config in `workdir`, output to a log file."""

  def __init__(self, workdir, env, log):
    self.log = log
    self._out = open(log, "w")
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.run", f"--config={CONFIG}", f"--workdir={workdir}"],
      cwd=ROOT,
      env=env,
      stdout=self._out,
      stderr=subprocess.STDOUT,
    )
    self.t0 = time.time()

  def wait_for(self, predicate, what: str) -> bool:
    """Polls (1 ms) until predicate() holds (True) or the run ends first (False)."""
    while not predicate():
      if self.proc.poll() is not None:
        return False
      if time.time() - self.t0 > TIMEOUT_S:
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}; log:\n{self.output()}")
      time.sleep(0.001)
    return True

  def finish(self) -> int:
    try:
      rc = self.proc.wait(timeout=max(1, TIMEOUT_S - (time.time() - self.t0)))
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f"run timed out; log:\n{self.output()}")
    self._out.close()
    return rc

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()


def _ckpt_dir(workdir):
  return os.path.join(workdir, "checkpoints")


def _entries(workdir) -> list[str]:
  try:
    return os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    return []


def _finished_steps(workdir) -> set[int]:
  return {int(n) for n in _entries(workdir) if n.isdigit()}


def _tmp_entries(workdir) -> list[str]:
  return [n for n in _entries(workdir) if "orbax-checkpoint-tmp" in n]


def _logged_steps(workdir) -> list[int]:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


_restore, _rows, _summary = run_helpers.restore, run_helpers.rows, run_helpers.summary


def test_killed_and_preempted_run_ends_bit_identical(tmp_path, env):
  seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
  rng = random.Random(seed)
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "run")
  story = [f"KILL_SEED={seed}"]  # what happened, for the failure message

  def check(cond, msg, run=None):
    assert cond, f"{msg}\n{' | '.join(story)}" + (f"\nlog:\n{run.output()}" if run else "")

  r = Run(ref, env, tmp_path / "ref.log")
  check(r.finish() == 0, "the uninterrupted run failed", r)

  # 0. SIGKILL at the first metrics row: the rerun starts over, and must not log that row twice.
  r = Run(wd, env, tmp_path / "0.log")
  check(r.wait_for(lambda: _logged_steps(wd), "a first metrics row"), "ended before logging", r)
  r.proc.kill()
  r.finish()
  story.append(
    f"SIGKILL at the first row: rows {_logged_steps(wd)}, checkpoints {sorted(_finished_steps(wd))}"
  )

  # 1. SIGTERM once SMT has logged a step: a checkpoint at the step it stops at, then exit 143.
  r = Run(wd, env, tmp_path / "1.log")
  check(
    r.wait_for(lambda: re.search(r"smt step \d+/", r.output()), "a progress line"),
    "ended before logging",
    r,
  )
  r.proc.send_signal(signal.SIGTERM)
  rc = r.finish()
  m = re.search(r"SIGTERM: saved a checkpoint at smt step (\d+)", r.output())
  check(rc == 143 and m, f"SIGTERM: expected exit 143 after a checkpoint, got {rc}", r)
  stopped = int(m.group(1))
  story.append(f"SIGTERM -> checkpoint at smt step {stopped}")
  step, _, meta = _restore(wd)
  check(
    step == stopped and meta["phase"] == "smt" and meta["phase_step"] == stopped,
    f"latest checkpoint {step} {meta} is not the SIGTERM step {stopped}",
  )
  check(max(_logged_steps(wd)) <= stopped, "rows logged past the checkpoint")

  # 2. SIGKILL while the next checkpoint is being written (a save takes ~0.1-0.6 s here; should
  # this process be scheduled too late to catch one, the next save is tried).
  for attempt in range(3):
    r = Run(wd, env, tmp_path / f"2.{attempt}.log")
    caught = r.wait_for(lambda: _tmp_entries(wd), "a checkpoint being written")
    r.proc.kill()
    r.finish()
    check(caught, "the run ended before writing a checkpoint", r)
    check(
      attempt or f"Resumed from {wd} at smt step {stopped}." in r.output(),
      "did not resume there",
      r,
    )
    left = _tmp_entries(wd)
    story.append(f"SIGKILL mid-save, left {left}")
    if left:
      break
  check(left, "every save finished before the kill landed (no partial checkpoint left)")

  # 3. SIGKILL at a random moment after a new checkpoint is complete.
  before = _finished_steps(wd)
  r = Run(wd, env, tmp_path / "3.log")
  r.wait_for(lambda: _finished_steps(wd) - before, "a new checkpoint")
  time.sleep(rng.uniform(0.0, 0.5))
  r.proc.kill()
  rc = r.finish()
  story.append(
    f"SIGKILL at random (rc {rc}), checkpoints {sorted(_finished_steps(wd))}, "
    f"logged up to {max(_logged_steps(wd), default=0)}"
  )

  # 4. Rerun to the end.
  r = Run(wd, env, tmp_path / "4.log")
  check(r.finish() == 0, "the final rerun failed", r)
  story.append(re.search(r"Resumed from .*|$", r.output()).group(0))
  check(not _tmp_entries(wd), f"partial checkpoints left: {_tmp_entries(wd)}")

  _check_same_results(ref, wd, check)

  # 5. The latest checkpoint corrupted on disk: the rerun says so, falls back to the one before,
  # moves the bad one aside, and redoes the steps since, to the same end.
  latest = max(_finished_steps(wd))
  data_files = [
    os.path.join(d, f)
    for d, _, fs in os.walk(os.path.join(_ckpt_dir(wd), str(latest)))
    for f in fs
    if os.path.basename(d) == "d"
  ]
  check(data_files, f"no data files found in checkpoint {latest}")
  for f in data_files:
    os.truncate(f, os.path.getsize(f) // 2)
  r = Run(wd, env, tmp_path / "5.log")
  check(r.finish() == 0, "the rerun after corruption failed", r)
  out = r.output()
  previous = max(_finished_steps(wd) - {latest})
  check(
    f"checkpoint {latest} is unreadable" in out
    and f"restored checkpoint {previous} instead of the newer, unreadable [{latest}]" in out,
    "the fall-back was not reported",
    r,
  )
  check(
    os.path.isdir(os.path.join(_ckpt_dir(wd), f"{latest}.unreadable-0")),
    "the unreadable checkpoint was not moved aside",
    r,
  )
  _check_same_results(ref, wd, check)
  for log in sorted(tmp_path.glob("*.log")):  # a rate is printed only where it was measured
    check("nan steps/s" not in log.read_text(), f"{log.name} prints a rate of nan steps/s")
  print("\n".join(story))  # shown with -s: which kills landed where


def _check_same_results(ref, wd, check):
  """Final parameters, metrics rows, summary and samples of `wd` equal those of `ref`."""
  ref_step, ref_state, _ = _restore(ref)
  step, state, _ = _restore(wd)
  check(step == ref_step, f"final checkpoint {step} != {ref_step}")
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  check([p for p, _ in ref_leaves] == [p for p, _ in leaves], "different parameter trees")
  for (path, a), (_, b) in zip(ref_leaves, leaves):
    check(
      np.array_equal(np.asarray(a), np.asarray(b)),
      f"{jax.tree_util.keystr(path)} differs from the uninterrupted run's",
    )
  ref_rows, rows = _rows(ref), _rows(wd)
  check(
    [(x["step"], x["phase"]) for x in rows] == [(x["step"], x["phase"]) for x in ref_rows],
    f"rows {[(x['step'], x['phase']) for x in rows]} != "
    f"{[(x['step'], x['phase']) for x in ref_rows]}",
  )
  for a, b in zip(ref_rows, rows):
    check(a == b, f"row of step {a['step']} differs:\n{a}\n{b}")
  check(_summary(wd) == _summary(ref), f"summaries differ:\n{_summary(ref)}\n{_summary(wd)}")
  with open(os.path.join(ref, "accuracy.md")) as f1, open(os.path.join(wd, "accuracy.md")) as f2:
    check(f1.read() == f2.read(), "accuracy tables differ")
