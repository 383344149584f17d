"""SIGTERM and SIGINT (Ctrl-C): save a checkpoint at the next step boundary, then stop with
`Preempted`.

One process: our own handler sets a flag, and the loop saves and stops at the next step boundary.
The handler never raises: a KeyboardInterrupt raised while XLA compiles or runs (or while orbax
writes from its threads) tears the interpreter down under them (a segfault, rc 139), so the
signal is deferred to a point where Python is in control. A second Ctrl-C while the first is
being honoured exits at once (os._exit(130), no checkpoint), for a run that must stop now.
Several processes: the processes must agree on the step to stop at (one saving while another
runs the next step's collectives would hang), so JAX's preemption service (started by
jax.distributed.initialize) takes SIGTERM, and `reached_preemption_sync_point`, asked at every
step, names the same step on every process; SIGINT keeps its default there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; a checkpoint of the current step was saved. Rerun the command to
  resume. `exit_code` is what a shell reports for a process ended by that signal (143, 130)."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + signum


class SigtermWatch:
  """Whether SIGTERM or SIGINT has arrived; ask `check(step)` once per step, on every process."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.flag = False
    self.signum: int | None = None  # the signal that set the flag
    self.multi_process = jax.process_count() > 1

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum or signal.SIGTERM).name

  def __call__(self, signum, frame):
    del frame
    if self.flag and signum == signal.SIGINT and self.signum == signal.SIGINT:
      # A second Ctrl-C: stop now, without the checkpoint (and without Python's teardown, which
      # XLA's threads may not survive).
      os.write(2, b"\nSIGINT again: exiting without a checkpoint.\n")
      os._exit(128 + signal.SIGINT)
    self.flag = True
    self.signum = self.signum or signum

  def check(self, global_step: int) -> bool:
    """Whether to save and exit after `global_step`."""
    if self.multi_process and not self.flag:
      from jax.experimental import multihost_utils

      self.flag = multihost_utils.reached_preemption_sync_point(global_step)
    return self.flag

  @contextlib.contextmanager
  def installed(self):
    """SIGTERM and SIGINT set the flag while inside; signals can only be caught on the main
    thread. On exit the previous handlers come back."""
    if self.multi_process or threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self) for s in self.SIGNALS}
    try:
      yield self
    finally:
      for s, handler in old.items():
        signal.signal(s, handler)
