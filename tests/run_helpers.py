"""Helpers for the tests that run `python -m experiments.run` in subprocesses: one persistent
compilation cache for all of them, XLA's cheap CPU compile, several processes of one job, and what
a finished run holds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

from smt_jax import storage
from smt_jax.runner import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("steps_per_s", "tokens_per_s")
# XLA's cheaper CPU compile: these runs are a few steps long, so the time goes into compiling
# (a 2-process smoke job 42 s against 56 s); every run a test compares with another has them too.
# The older elemental emitters instead of the fusion emitters compile the smoke model's three train
# steps in 8 s against 21 s.
FAST_COMPILE = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false"
)


def subprocess_env(tmp_path_factory, **extra) -> dict:
  """The environment of the runs: this session's compilation cache (shared by xdist workers) and
  XLA's cheap compile."""
  e = dict(os.environ)
  if not e.get("JAX_COMPILATION_CACHE_DIR"):
    base = tmp_path_factory.getbasetemp()
    e["JAX_COMPILATION_CACHE_DIR"] = str(
      (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache"
    )
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
  e["XLA_FLAGS"] = FAST_COMPILE
  e.update(extra)
  return e


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Job:
  """One `python -m <module> <args>` as `processes` processes of one JAX job on 127.0.0.1, each
  with `devices` CPU devices; output per process in `<log>.<i>`."""

  def __init__(self, args, env, log, *, processes=1, devices=4, module="experiments.run"):
    self.logs = [f"{log}.{i}" for i in range(processes)]
    self.procs = []
    port = free_port()
    for i in range(processes):
      flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
      e = dict(env, XLA_FLAGS=flags.strip())
      if processes > 1:
        e.update(
          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES=str(processes),
          JAX_PROCESS_ID=str(i),
        )
      with open(self.logs[i], "w") as out:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=e,
            stdout=out,
            stderr=subprocess.STDOUT,
          )
        )
    self.t0 = time.time()

  def output(self, i: int = 0) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def outputs(self) -> str:
    return "\n".join(f"--- process {i}:\n{self.output(i)[-3000:]}" for i in range(len(self.logs)))

  def wait_for(self, predicate, timeout_s: float = 600) -> bool:
    """Polls until predicate() holds (True), or a process ends or time runs out (False)."""
    while not predicate():
      if any(p.poll() is not None for p in self.procs) or time.time() - self.t0 > timeout_s:
        return False
      time.sleep(0.01)
    return True

  def finish(self, timeout_s: float = 600) -> list[int]:
    """Every process's exit status (killed and reported as None when time runs out)."""
    rcs = []
    for p in self.procs:
      try:
        rcs.append(p.wait(timeout=max(1, timeout_s - (time.time() - self.t0))))
      except subprocess.TimeoutExpired:
        p.kill()
        rcs.append(None)
    return rcs


def restore(workdir: str, step: int | None = None):
  """(step, state as numpy, meta) of a run's checkpoint (the latest by default), read whole."""
  mngr = checkpoints.make_manager(workdir, keep=1, read_only=True)
  try:
    import jax

    step = mngr.latest_step() if step is None else step
    # Onto this process's first device, whatever devices wrote it.
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
      mngr.item_metadata(step)["state"],
    )
    out = mngr.restore(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
    )
  finally:
    mngr.close()
  return step, out["state"], out["meta"]


def leaves(tree) -> dict:
  """{'params/rnn/...': numpy array} of a restored state."""
  import jax

  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def rows(workdir: str) -> list[dict]:
  """metrics.jsonl without its timing fields."""
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [
    {k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()
  ]


def summary(workdir: str) -> dict:
  """summary.json without its timing fields."""
  s = json.loads(storage.read_text(storage.join(workdir, "summary.json")))
  return {
    k: v for k, v in s.items() if not k.endswith(("compile_s",) + TIMING) and k != "wall_time_s"
  }
