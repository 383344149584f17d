"""A `jax.profiler` trace of a window of train steps (config.profile), part of the training shell.

The trace goes to `<workdir>/profile`: `plugins/profile/<run>/<host>.xplane.pb`, which
TensorBoard's profile plugin reads (`tensorboard --logdir=<workdir>/profile`, then the PROFILE
tab; `pip install tensorboard-plugin-profile`), and, for a local workdir, `perfetto_trace.json.gz`
next to it, which https://ui.perfetto.dev opens directly. The profiler writes object-store paths
(`gs://`) itself, but JAX's Perfetto export does not (jax-ml/jax#19263), so a `gs://` workdir gets
the `.xplane.pb` (and the `<host>.trace.json.gz` it comes with) only. Every process traces its own
host; in a multi-process job each writes under `<workdir>/profile/process_<i>` (several processes
on one host would otherwise write the same files), which TensorBoard lists as one run each.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from collections.abc import Callable

import jax


class StepTrace:
  """Traces the global steps [start_step, start_step + num_steps) into `log_dir`.

  Call `before(step)` before a step is dispatched and `after(step, outputs)` once it is: the
  trace starts before the window's first step and stops once its last step has finished on the
  device (`after` waits for that step's outputs, so the trace holds the device's work, not just
  the dispatch). Each traced step is a `StepTraceAnnotation` named 'train' with its global step
  number, which the profile plugin uses to split the timeline into steps. A run resumed inside
  the window traces what is left of it; `stop()` ends a trace cut short (an error, SIGTERM).
  num_steps = 0 traces nothing. In a job of several processes each traces into its own
  `log_dir/process_<i>`.
  """

  def __init__(
    self,
    log_dir: str,
    *,
    start_step: int,
    num_steps: int,
    say: Callable[[str], None] = print,
  ):
    if jax.process_count() > 1:
      log_dir = f"{log_dir.rstrip('/')}/process_{jax.process_index()}"
    self.log_dir = log_dir
    self.start, self.stop_at = start_step, start_step + num_steps
    self.say = say
    self.tracing = False
    self.done = num_steps == 0
    self._annotation = None

  def before(self, step: int) -> None:
    if not self.tracing and not self.done and self.start <= step < self.stop_at:
      # Perfetto's file is written with local file I/O only (jax-ml/jax#19263).
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace="://" not in self.log_dir)
      self.tracing = True
      self.say(f"profile: tracing steps {step}..{self.stop_at - 1} into {self.log_dir}")
    if self.tracing:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
      self._annotation.__enter__()

  def after(self, step: int, outputs) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.tracing and step + 1 >= self.stop_at:
      jax.block_until_ready(outputs)  # the last traced step's device work, inside the trace
      self.stop()

  def stop(self) -> None:
    """Ends the trace, if one is running, and writes it."""
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing, self.done = False, True
      self.say(f"profile: trace written to {self.log_dir} (tensorboard --logdir={self.log_dir})")


# What an XLA CPU thunk's name says it does: its kind, from the HLO op (fusions are named after
# the ops they fuse). Loops are left out: their own time is that of the thunks they run.
OP_KINDS = (
  ("matmul", re.compile(r"^(ynn_fusion|dot|onednn|xnn|custom-call|convolution)")),
  ("collective", re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective|Rend)")),
  ("layout", re.compile(r"(transpose|copy|concatenate|pad|slice|gather|scatter|reverse)")),
  ("loop", re.compile(r"^(while|conditional|call)(\.|$)")),
)
NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "Wait", "end:", "ParseArguments")


def op_kind(name: str) -> str:
  """'matmul', 'collective', 'layout' (copies, transposes, concatenations, pads, slices),
  'loop', or 'elementwise' (the rest: elementwise fusions, reductions) for a thunk's name."""
  for kind, pattern in OP_KINDS:
    if pattern.search(name):
      return kind
  return "elementwise"


def op_split(log_dir: str, *, steps: int, devices: int = 1) -> dict:
  """Where the traced steps' device time went, from the Perfetto trace `jax.profiler` wrote under
  `log_dir` (traced with create_perfetto_trace=True): {kind: ms per step per device} for the kinds
  of `op_kind` (loops left out), and 'top', the 12 costliest HLO ops (ms per step per device).

  Thunk times are summed over the devices' threads, so with one device running several thunks at
  once they can add up to more than the wall time; 'collective' includes the waiting for the
  other devices at each collective.
  """
  (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
      per_op[e["name"]] += e["dur"] / 1e3 / steps / devices  # us -> ms per step per device
  split = collections.Counter()
  for name, ms in per_op.items():
    if op_kind(name) != "loop":
      split[op_kind(name)] += ms
  return {
    **{k: split[k] for k in ("matmul", "layout", "elementwise", "collective")},
    "top": [[name, ms] for name, ms in per_op.most_common() if op_kind(name) != "loop"][:12],
  }
