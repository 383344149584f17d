"""SIGTERM: save a checkpoint at the next step boundary, then stop with `Preempted`.

One process: our own SIGTERM handler sets a flag. Several: the processes must agree on the step to
stop at (one saving while another runs the next step's collectives would hang), so JAX's preemption
service (started by jax.distributed.initialize) takes the signal, and
`reached_preemption_sync_point`, asked at every step, names the same step on every process.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was saved. Rerun the command to resume."""

  exit_code = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class SigtermWatch:
  """Whether SIGTERM has arrived; ask `check(step)` once per step, on every process."""

  def __init__(self):
    self.flag = False
    self.multi_process = jax.process_count() > 1

  def __call__(self, signum, frame):
    del signum, frame
    self.flag = True

  def check(self, global_step: int) -> bool:
    """Whether to save and exit after `global_step`."""
    if self.multi_process and not self.flag:
      from jax.experimental import multihost_utils

      self.flag = multihost_utils.reached_preemption_sync_point(global_step)
    return self.flag

  @contextlib.contextmanager
  def installed(self):
    """SIGTERM sets the flag while inside; signals can only be caught on the main thread."""
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = signal.signal(signal.SIGTERM, self)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, old)
