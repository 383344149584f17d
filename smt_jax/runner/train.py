"""The training shell: configs in, checkpoints, metrics and samples out.

`train_and_evaluate(config, workdir)` runs the config's phases in order (e.g. SMT then DMT, or
BPTT alone), each an `experiment.Phase`, and resumes from the latest checkpoint in `workdir` when
there is one. This is the module that touches files and clocks and asks which process it is;
everything it calls to build and to train is in `experiment` and pure.

What a run guarantees (tests/test_config_checks.py, test_reliability.py, test_kill_resume.py):
- A bad config, workdir or dataset fails before anything is compiled, naming field, value and fix.
- Killed at any moment (kill -9 included, mid-save included) and rerun with the same command, a run
  ends with the parameters, metrics rows and summary of an uninterrupted one, bit for bit on CPU:
  batches and PRNG keys are functions of the global step, checkpoints hold everything else
  (optimiser state, the count of skipped steps), and metrics rows past the restored step are
  dropped before they are rerun.
- SIGTERM or SIGINT (Ctrl-C) saves a checkpoint of the current step, then raises `Preempted`
  (exit 143 or 130 from run.py). The signal only sets a flag, honoured at the next step boundary
  (accumulating, one process: the next micro-batch's, the sums so far checkpointed): one arriving
  while XLA compiles waits for the compile (raising inside it crashes the process).
- A non-finite loss, gradient or update is never applied; the run stops naming step, phase and
  terms (nan_policy='stop'), or skips the step and counts it (nan_policy='skip').
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from smt_jax import storage
from smt_jax.runner import (
  checkpoints,
  console,
  evaluation,
  experiment,
  metrics_io,
  profiling,
  samples,
)
from smt_jax.runner import config as config_lib
from smt_jax.runner import workdir as workdir_lib
from smt_jax.runner.console import say
from smt_jax.runner.preemption import Preempted, SigtermWatch

__all__ = ["Hooks", "Preempted", "itstime", "train_and_evaluate"]


# What train_and_evaluate raises for a mistake the user can fix: the message says how (a command
# line prints it as one line, without a traceback).
USER_ERRORS = (
  config_lib.ConfigError,
  workdir_lib.WorkdirError,
  checkpoints.CheckpointError,
  experiment.NonFiniteError,
)


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Seams for tests and tools, passed in rather than patched; None keeps the default."""

  make_source: Callable | None = None  # config -> data.Source, instead of the config's dataset
  wrap_loss: Callable | None = None  # loss_fn -> loss_fn, for every phase, before jit
  train_batch: Callable | None = None  # (global step, host rows) -> rows, before they are sharded


def itstime(step: int, every: int, total: int, *, last: bool) -> bool:
  """Whether a periodic action is due after `step` of `total` steps: every `every` steps (0:
  never), at the final step only if `last`."""
  return every > 0 and step % every == 0 and (last or step < total)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the phases of one run share besides their position."""

  exp: experiment.Experiment
  workdir: str
  mngr: Any  # orbax CheckpointManager
  writer: metrics_io.MetricsWriter
  watch: SigtermWatch
  hooks: Hooks
  with_teacher: bool  # a teacher is trained (and evaluated)
  tracer: profiling.StepTrace  # config.profile's jax.profiler trace
  console: console.Console  # what the run says on stdout
  unigram_nll: float  # the baseline every eval line is read against
  # Per phase, the cost of its steps (`experiment.step_costs`): the x-axes runs are compared on.
  per_step: tuple

  def progress(self, phase: experiment.Phase, done: int) -> dict:
    """Tokens seen and SeqFLOPs spent after `done` steps of `phase`, over the whole run."""
    return experiment.progress(self.exp.config, self.per_step, phase.index, done)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  overwrite: bool = False,
  fork: bool = False,
  hooks: Hooks | None = None,
) -> dict:
  """Runs every phase of `config`, resuming from `workdir`; returns the summary dict.

  Order: the config is validated, then the workdir checked (a refused workdir costs nothing),
  then mesh, data and their checks, and only then are parameters created and steps compiled. The
  workdir's config.json is written once its checkpoints are known to fit this config.

  Raises:
    config_lib.ConfigError: a config field (or the data) the run cannot use; raised before
      anything is compiled.
    workdir_lib.WorkdirError: `workdir` holds a run of another config (and neither `overwrite`
      nor `fork`); raised before anything is built.
    checkpoints.CheckpointError: checkpoints exist but none is readable.
    experiment.NonFiniteError: a non-finite loss or gradient under nan_policy='stop'.
    Preempted: SIGTERM or SIGINT arrived; a checkpoint of the current step was saved first.
  """
  watch = SigtermWatch()
  with watch.installed():  # from the start: a Ctrl-C while building or compiling is deferred too
    return _train_and_evaluate(
      config, workdir, overwrite=overwrite, fork=fork, hooks=hooks, watch=watch
    )


def _train_and_evaluate(config, workdir, *, overwrite, fork, hooks, watch) -> dict:
  t_start = time.time()
  hooks = hooks or Hooks()
  is_main = jax.process_index() == 0
  config_lib.validate(config)
  action = workdir_lib.check_workdir(workdir, config, overwrite=overwrite, fork=fork)
  saved = workdir_lib.read_config(workdir) if action == "extend" else None
  raised = workdir_lib.raised_steps(saved, json.loads(config.to_json())) if saved else {}
  with workdir_lib.workdir_lock(workdir, is_main=is_main):
    exp = experiment.build_experiment(config, make_source=hooks.make_source)
    phases = [experiment.make_phase(exp, name, wrap_loss=hooks.wrap_loss) for name in exp.phases]
    claim = functools.partial(
      workdir_lib.claim_workdir, workdir, config, overwrite=overwrite, fork=fork, is_main=is_main
    )
    if overwrite:
      claim()  # the old run goes before anything is restored from it
    # Closed in reverse order: the trace, the writer, then the checkpoints (mngr.close waits for a
    # save in flight, so a run that stops keeps its last checkpoint).
    with contextlib.ExitStack() as closing:
      mngr = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
      closing.callback(mngr.close)
      # Resume: which phase, which step. Batches and keys are functions of the global step, so
      # the restored state alone decides everything that follows.
      restored = checkpoints.restore(
        mngr, **experiment.restore_targets(exp, phases), quarantine=True, is_main=is_main
      )
      for line in workdir_lib.continue_raised(restored, raised, exp.phases):
        say(line)
      # The workdir becomes this config's only once its checkpoints are known to fit (a refused
      # --fork, or steps raised for a phase the run is past, leave it as it was).
      claim()
      pos = checkpoints.Position.of(restored) or checkpoints.Position(params=exp.init_params())
      if restored:
        where = exp.phases[pos.phase_index] if pos.phase_index < len(phases) else "the end"
        say(f"Resumed from {workdir} at {where} step {pos.phase_step}.")
      resume_step = restored["step"] if restored else 0
      writer = metrics_io.MetricsWriter(
        workdir,
        enabled=is_main,
        purge_step=resume_step + 1 if restored else None,
        wandb=metrics_io.wandb_of(exp.config),
      )
      writer.truncate_after(resume_step)  # rows after the checkpoint are rerun (none: all of them)
      flops = experiment.unit_flops(exp)  # lowered on abstract shapes: nothing compiles
      if restored is None:
        writer.write_config(config, f"eval/rnn_{exp.source.bits_unit}")
      run = _Run(
        exp=exp,
        workdir=workdir,
        mngr=mngr,
        writer=writer,
        watch=watch,
        hooks=hooks,
        with_teacher="smt" in exp.phases,
        tracer=profiling.StepTrace(storage.join(workdir, "profile"), **exp.config.profile, say=say),
        console=console.Console(exp, say, flops),
        unigram_nll=evaluation.unigram_nll(exp),
        per_step=experiment.step_costs(phases, flops),
      )
      closing.callback(writer.close)
      closing.callback(run.tracer.stop)
      return _train(run, phases, pos, t_start)


def _train(
  run: _Run, phases: list[experiment.Phase], pos: checkpoints.Position, t_start: float
) -> dict:
  c, is_main = run.exp.config, jax.process_index() == 0
  summary = metrics_io.read_summary(run.workdir)
  with jax.set_mesh(run.exp.mesh):
    for phase in phases[pos.phase_index :]:
      summary.update(_run_phase(run, phase, pos))
      if is_main:
        metrics_io.write_summary(run.workdir, summary)
      if phase.name == "smt" and c.smt.copy_decoder_to_readout:
        # SMT's final eval scored the RNN's own readout; what follows uses the decoder's weights.
        pos.params = experiment.copy_decoder_to_readout(pos.params)
      # Phase boundary checkpoint: a restart continues with the next phase. The run's end keeps
      # its last phase's optimiser state: a rerun with more steps continues that phase.
      nxt = phases[phase.index + 1].name if phase.index + 1 < len(phases) else None
      opt_state = pos.opt_state if nxt is None else None
      pos.phase_index, pos.phase_step, pos.skipped, pos.opt_state = phase.index + 1, 0, 0, None
      run.writer.flush()
      checkpoints.save(
        run.mngr,
        phase.offset + phase.steps,
        pos.params,
        opt_state,
        phase_index=pos.phase_index,
        phase_step=0,
        phase=nxt,
        opt_state_phase=phase.index,
      )
      if run.watch.flag and nxt is not None:
        _exit_preempted(run, f"the start of {nxt}")
    run.mngr.wait_until_finished()
    summary.update(
      evaluation.with_bits({"baseline/unigram_nll": run.unigram_nll}, run.exp.source.bits_unit)
    )
    summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + (time.time() - t_start)
  samples.on_process_zero(
    run.exp,
    pos.params,
    functools.partial(samples.write_samples, workdir=run.workdir, summary=summary),
  )
  if is_main:
    metrics_io.write_summary(run.workdir, summary)
  run.console.verdict(summary, run.workdir, summary["wall_time_s"])
  return summary


def _exit_preempted(run: _Run, where: str):
  run.mngr.wait_until_finished()
  sig = run.watch.signal_name
  say(f"{sig}: saved a checkpoint at {where}; exiting. Rerun the same command to resume.")
  raise Preempted(f"{sig}; checkpoint saved at {where}", run.watch.signum or signal.SIGTERM)


def _run_phase(run: _Run, phase: experiment.Phase, pos: checkpoints.Position) -> dict:
  """Trains `phase` from `pos` (updated as it goes); returns its summary entries."""
  c, name = run.exp.config, phase.name
  if run.watch.flag:  # the signal came before this phase's first step (building, compiling)
    if pos.phase_step == 0:  # a phase-start checkpoint (a restored one exists already)
      checkpoints.save(
        run.mngr, phase.offset, pos.params, None, phase_index=phase.index, phase_step=0, phase=name
      )
    _exit_preempted(run, f"{name} step {pos.phase_step}")
  state = phase.init_state(pos.params, pos.opt_state)
  base_key = jax.random.key(c.seed)  # step keys: fold_in(seed key, global step), never a stream
  out = {}

  if pos.phase_step == 0:
    run.writer.write_text("phase", f"{name} starts at step {phase.offset}", phase.offset)
  if pos.phase_step < phase.steps:
    run.console.compiling(name, pos.phase_step)
  t_compile = time.time()
  t_last, steps_since = None, 0  # the rate is measured from the end of the first (compiled) step
  train_s, train_steps = 0.0, 0  # measured training time and steps (evals excluded): throughput
  pending = None  # (step, metrics) of the step before: checked one step late to keep dispatch async
  for step in range(pos.phase_step, phase.steps):
    gstep = phase.offset + step
    run.tracer.before(gstep)
    if phase.warmup is not None and step == phase.warmup_steps:
      say(f"{name}: episodes of {phase.source.seq_len} tokens from step {step} (compiling)")
    now = phase.at(step)  # the length curriculum's short episodes first
    batch = now.batch(gstep, transform=run.hooks.train_batch)
    stop = (lambda: run.watch.flag) if step else None  # between micro-batches (accumulating)
    state, metrics = now.train_step(state, batch, jax.random.fold_in(base_key, gstep), stop)
    if metrics is None:  # a signal mid-accumulation: the checkpoint keeps the sums so far
      _checkpoint(run, phase, pos, state, step, pending)
      _exit_preempted(run, f"{name} step {step} (mid-accumulation of step {step + 1})")
    run.tracer.after(gstep, (state, metrics))
    if pending is not None:
      pos.skipped += experiment.check_finite(c.nan_policy, name, *pending)
    pending = (step, metrics)
    steps_since += 1
    if t_last is None:  # first step: compile + run
      jax.block_until_ready(metrics["loss"])
      out[f"{name}/compile_s"] = time.time() - t_compile
      run.console.compiled(name, out[f"{name}/compile_s"])
      t_last, steps_since = time.time(), 0
    done = step + 1
    if itstime(done, c.log_every_steps, phase.steps, last=True):
      row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
      row["lr"] = float(phase.schedule(step))
      dt = time.time() - t_last
      if steps_since and dt > 0:  # not measurable when this is the first step after a (re)start
        rate = steps_since / dt
        train_s, train_steps = train_s + dt, train_steps + steps_since
        row.update(steps_per_s=rate, tokens_per_s=rate * now.tokens_per_step)
        run.console.timed(name, train_s / train_steps)
      t_last, steps_since = time.time(), 0
      run.writer.write(phase.offset + done, name, done, row, **run.progress(phase, done))
      run.console.logged(name, done, row, skipped=pos.skipped)
    if done < phase.steps and done in run.console.evals[name]:
      _evaluate(run, phase, done, state["params"])
      t_last, steps_since = time.time(), 0  # eval time is not training throughput
    # Periodic checkpoints inside the phase; its last step is covered by the boundary checkpoint
    # (saved after the phase's final eval, so a restart never writes that eval twice).
    stop = run.watch.check(gstep)
    if itstime(done, c.checkpoint_every_steps, phase.steps, last=False) or stop:
      _checkpoint(run, phase, pos, state, done, pending)
      pending = None
      if stop:
        _exit_preempted(run, f"{name} step {done}")
  if pending is not None:
    pos.skipped += experiment.check_finite(c.nan_policy, name, *pending)
  pos.params, pos.opt_state, pos.phase_step = state["params"], state["opt_state"], phase.steps
  final = _evaluate(run, phase, phase.steps, pos.params)
  if train_steps:  # this process's measured part of the phase (a resumed run: since the restart)
    out[f"{name}/steps_per_s"] = train_steps / train_s
    tokens = run.progress(phase, phase.steps)["tokens"] - run.progress(phase, 0)["tokens"]
    out[f"{name}/tokens_per_s"] = train_steps / train_s * tokens / phase.steps  # the mean step
  out[name] = final
  out[f"{name}/skipped_steps"] = pos.skipped
  return out


def _checkpoint(run: _Run, phase: experiment.Phase, pos, state, done: int, pending) -> None:
  """Saves `state` after `done` steps of `phase`, the step before checked for finiteness first."""
  if pending is not None:
    pos.skipped += experiment.check_finite(run.exp.config.nan_policy, phase.name, *pending)
  run.writer.flush()  # the rows up to a checkpoint outlive a crash (on an object store too)
  at = dict(phase_index=phase.index, phase_step=done, phase=phase.name, skipped_steps=pos.skipped)
  checkpoints.save(run.mngr, phase.offset + done, state["params"], state["opt_state"], **at)


def _evaluate(run: _Run, phase: experiment.Phase, done: int, params) -> dict:
  """Held-out metrics after `done` steps of `phase`, written with their samples; returns them."""
  t0 = time.time()
  metrics = evaluation.held_out(run.exp, params, with_teacher=run.with_teacher)
  step = phase.offset + done
  run.writer.write(step, phase.name, done, metrics, **run.progress(phase, done))
  if run.exp.config.samples.at_eval:
    drawn = samples.on_process_zero(run.exp, params, samples.eval_samples) or {}
    for tag, (kind, value) in drawn.items():
      (run.writer.write_image if kind == "image" else run.writer.write_text)(tag, value, step)
  run.console.evaluated(phase.name, done, metrics, time.time() - t0, run.unigram_nll)
  return metrics
