"""Several processes, one job: starting `jax.distributed`, noticing a dead peer, and the work one
process does alone (samples) while the job's mesh spans all of them.

A job of several processes (a TPU pod slice, SLURM tasks, or `JAX_COORDINATOR_ADDRESS` set by
hand) runs the same command on every process. When one of them dies, the others would block in
their next collective until JAX's coordination service gives up (minutes later, with a
multi-page abort). `PeerWatch` turns that into one line within a set time instead: each process
posts a heartbeat to the coordination service's key-value store and reads the others'; a peer
whose heartbeat stops for `timeout_s`, or that reports a failure, makes every other process print
why and exit (status 1), so the scheduler can restart the job, which resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import jax
import numpy as np
from absl import logging

PEER_EXIT_CODE = 1
_KEY = "smt_jax/alive/"


def wants_distributed(env=None) -> bool:
  """Whether the environment describes a job of several processes."""
  env = os.environ if env is None else env
  return bool(
    env.get("JAX_COORDINATOR_ADDRESS")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    or int(env.get("JAX_NUM_PROCESSES", "1")) > 1
  )


def initialize(*, peer_timeout_s: float = 60.0) -> PeerWatch | None:
  """`jax.distributed.initialize()` once, when the environment describes a multi-process job
  (explicitly through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else JAX's
  own cluster detection: TPU pods, SLURM); then a started `PeerWatch`. None for one process.

  JAX's own heartbeat timeout is set well above `peer_timeout_s`, so that the watch speaks first.
  """
  if not wants_distributed():
    return None
  env = os.environ
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(
      coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
    )
  jax.distributed.initialize(
    **kwargs, heartbeat_timeout_seconds=int(max(100, 2 * peer_timeout_s + 10))
  )
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  if jax.default_backend() == "cpu":
    # CPU collectives (gloo) give a new communicator 30 s for every process to arrive, and JAX's
    # persistent compilation cache is written by process 0 alone: with it, process 0 loads a
    # program that the others compile, reaches the program's first collective first, and times
    # out there whenever that compile takes over 30 s. Without it, every process compiles alike.
    jax.config.update("jax_enable_compilation_cache", False)
  return PeerWatch(peer_timeout_s).start()


@contextlib.contextmanager
def job(*, peer_timeout_s: float = 60.0, clean_exits=(None, 0)):
  """`initialize`, then the body; its peers learn how this process ended: 'done' when the body
  returns or exits with a status in `clean_exits`, else 'failed: <why>' (so they exit too)."""
  peers = initialize(peer_timeout_s=peer_timeout_s)
  try:
    yield peers
  except SystemExit as e:  # a clean stop, or a one-line error (its message is the status)
    if peers is not None:
      peers.done() if e.code in clean_exits else peers.fail(str(e.code))
    raise
  except BaseException as e:
    if peers is not None:
      peers.fail(f"{type(e).__name__}: {e}")
    raise
  if peers is not None:
    peers.done()


class PeerWatch:
  """Exits this process, with one line saying why, when another process of the job is gone.

  Every `timeout_s / 6` s (at least 0.5 s) a daemon thread posts this process's heartbeat count
  under `smt_jax/alive/<process>` and reads every peer's. A peer is gone when its count has not
  changed for `timeout_s` s (killed, its VM lost), or when it posted 'failed: <why>' (`fail`);
  a peer that posted 'done' (`done`) finished cleanly and is no longer watched. When the
  coordinator (process 0) itself is gone, the key-value store is unreachable, which is reported
  once that has lasted `timeout_s` s.
  """

  def __init__(self, timeout_s: float, *, client=None, exit=None, process=None, period_s=None):
    """client: the key-value store (default: jax.distributed's); exit(message): what to do when
    a peer is gone (default: print `error: <message>. ...` and os._exit(1)); process: (this
    process, the number of processes), default JAX's."""
    if timeout_s <= 0:
      raise ValueError(f"peer timeout {timeout_s} s: must be > 0.")
    from jax._src import distributed

    self.timeout_s = float(timeout_s)
    self.period_s = period_s or max(0.5, self.timeout_s / 6)
    self.client = client or distributed.global_state.client
    self.me, self.count = process or (jax.process_index(), jax.process_count())
    self._exit = exit or _exit_now
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.beat = 0

  def start(self) -> PeerWatch:
    self._post(str(self.beat))
    self._thread = threading.Thread(target=self._loop, name="smt_jax-peers", daemon=True)
    self._thread.start()
    return self

  def _post(self, value: str) -> None:
    self.client.key_value_set(f"{_KEY}{self.me}", value, allow_overwrite=True)

  def _loop(self) -> None:
    now = time.monotonic()
    seen = {q: (None, now) for q in range(self.count) if q != self.me}  # value, when it changed
    unreachable_since = None
    while not self._stop.wait(self.period_s):
      now = time.monotonic()
      try:
        self.beat += 1
        self._post(str(self.beat))
        values = dict(self.client.key_value_dir_get(_KEY))
        unreachable_since = None
      except Exception as e:  # noqa: BLE001 - the coordinator is gone (or briefly unreachable)
        unreachable_since = unreachable_since or now
        if now - unreachable_since >= self.timeout_s:
          return self._exit(
            f"process {self.me} of {self.count}: lost the job's coordinator (process 0) for "
            f"{self.timeout_s:.0f} s ({type(e).__name__}); exiting"
          )
        continue
      for q in list(seen):
        value = values.get(f"{_KEY}{q}")
        if value == "done":
          del seen[q]
        elif value is not None and value.startswith("failed"):
          return self._exit(f"process {q} of {self.count} {value}; process {self.me} exiting")
        elif value != seen[q][0]:
          seen[q] = (value, now)
        elif now - seen[q][1] >= self.timeout_s:
          return self._exit(
            f"process {q} of {self.count} stopped responding (no heartbeat for "
            f"{self.timeout_s:.0f} s: killed, or its host lost); process {self.me} exiting"
          )

  def _stop_thread(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()

  def done(self) -> None:
    """This process finished (or stopped at a checkpoint): its peers stop watching it."""
    self._stop_thread()
    with contextlib.suppress(Exception):
      self._post("done")

  def fail(self, why: str) -> None:
    """This process is exiting on an error: its peers exit too, quoting `why` (one line)."""
    self._stop_thread()
    with contextlib.suppress(Exception):
      self._post("failed: " + " ".join(why.split())[:300])


def _exit_now(message: str) -> None:
  os.write(2, f"error: {message}. Rerun the job to resume from its last checkpoint.\n".encode())
  sys.stderr.flush()
  os._exit(PEER_EXIT_CODE)  # the main thread may be blocked in a collective that never returns


def host_local(tree):
  """`tree`'s arrays whole on this host (numpy), for work one process does alone (samples).

  With several processes this is a collective (every process must call it): arrays sharded
  across processes are gathered. With one process the tree is returned as it is."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


@contextlib.contextmanager
def on_this_host(mesh):
  """Inside, jitted work runs on this process's first device alone (a one-device mesh with
  `mesh`'s axis names), not on the job's mesh, whose other processes are not taking part."""
  if jax.process_count() == 1:
    with jax.set_mesh(mesh):
      yield
    return
  devices = np.array(jax.local_devices()[:1]).reshape((1,) * len(mesh.axis_names))
  local = jax.sharding.Mesh(devices, mesh.axis_names, axis_types=mesh.axis_types)
  with jax.set_mesh(local):
    yield


def barrier(name: str) -> None:
  """Every process waits here for the others (nothing to wait for in a one-process job)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
