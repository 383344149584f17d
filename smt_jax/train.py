"""The training shell: configs in, checkpoints, metrics and samples out.

This is the only module that reads config fields, touches files and clocks, or asks which process it
is; everything it calls is a pure function. `train_and_evaluate(config, workdir)` runs the config's
phases in order (e.g. SMT then DMT, or BPTT alone) and resumes from the latest checkpoint in
`workdir` when there is one.

What a run guarantees (tests/test_config_checks.py, test_reliability.py, test_kill_resume.py):
- A bad config, workdir or dataset fails before anything is compiled, naming field, value and fix.
- Killed at any moment (kill -9 included, mid-save included) and rerun with the same command, a run
  ends with the parameters, metrics rows and summary of an uninterrupted one, bit for bit on CPU:
  batches and PRNG keys are functions of the global step, checkpoints hold everything else
  (optimiser state, the count of skipped steps), and metrics rows past the restored step are
  dropped before they are rerun.
- SIGTERM saves a checkpoint of the current step, then raises `Preempted` (exit 143 from run.py).
- A non-finite loss, gradient or update is never applied; the run stops naming step, phase and
  terms (nan_policy='stop'), or skips the step and counts it (nan_policy='skip').
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from smt_jax import checkpoints, data, evaluation, metrics_io, objectives, sharding
from smt_jax.models import Teacher, head_width, make_rnn, rnn_fns, teacher_fns

PHASES = ("smt", "dmt", "bptt")


def say(msg: str) -> None:
  """A progress line on stdout, from process 0 only (absl logging is left to the libraries)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf and the config says to stop."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was saved. Rerun the command to resume."""

  exit_code = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


# ---------------------------------------------------------------------------------------------
# Building the experiment from its config.


def phase_list(config) -> list[str]:
  from smt_jax.config_checks import ConfigError
  phases = [p.strip() for p in config.phases.split(",") if p.strip()]
  for p in phases:
    if p not in PHASES:
      raise ConfigError(f"config.phases = {config.phases!r}: unknown phase {p!r}; valid phases: "
                        f"{list(PHASES)} (e.g. --config.phases=smt,dmt or --config.phases=bptt).")
  if not phases:
    raise ConfigError("config.phases = '': no phase to run; e.g. --config.phases=smt,dmt.")
  return phases


def phase_seq_len(config, phase: str) -> int:
  """The sequence length T a phase trains on (SPEC 5)."""
  if config.data.episodic:
    return config.data.seq_len
  if phase == "smt":
    return config.smt.context_length + config.smt.future_length
  if phase == "dmt":
    return config.smt.context_length + config.dmt.rollout_length + config.smt.future_length
  if phase == "bptt":
    return config.bptt.seq_len
  return config.eval.seq_len  # "eval"


def make_base_source(config) -> data.Source:
  """The dataset, built once (phases then differ only in sequence length)."""
  kwargs = dict(config.data.options)
  if config.data.name == "text":
    kwargs["path"] = config.data.path or None
  elif config.data.name == "mnist" and config.data.path:
    kwargs["data_dir"] = config.data.path
  if config.data.episodic:
    kwargs["seq_len"] = config.data.seq_len
  return data.make_source(config.data.name, **kwargs)


def with_seq_len(source: data.Source, seq_len: int) -> data.Source:
  if source.seq_len == seq_len:
    return source
  s = copy.copy(source)  # streams share their token arrays; only the crop length differs
  s.seq_len = seq_len
  return s


def build_models(config, vocab_size: int, seed: int):
  """Teacher and RNN as NNX modules (call under nnx.eval_shape for abstract shapes)."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  rngs = nnx.Rngs(seed)
  head_dim = head_width(m.width, m.num_heads, m.head_dim)
  teacher = Teacher(vocab_size=vocab_size, num_memory_tokens=m.num_memory_tokens, width=m.width,
                    encoder_depth=m.encoder_depth, decoder_depth=m.decoder_depth,
                    num_heads=m.num_heads, head_dim=head_dim, attention=m.attention, dtype=dtype,
                    rngs=rngs)
  rnn = make_rnn(m.rnn_kind, vocab_size=vocab_size, num_memory_tokens=m.num_memory_tokens,
                 width=m.width, depth=m.rnn_depth, num_heads=m.num_heads, head_dim=head_dim,
                 readout_depth=m.readout_depth, hidden=m.rnn_hidden or None,
                 initial_memory=m.rnn_initial_memory, attention=m.attention, dtype=dtype,
                 rngs=rngs)
  return teacher, rnn


def make_schedule(lr: float, steps: int, warmup_frac: float, decay: str):
  warmup = max(1, int(round(warmup_frac * steps)))
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1))
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)],
                              [warmup])


def make_optimizer(config, phase: str) -> optax.GradientTransformation:
  """AdamW with warm-up, global-norm clipping per model; frozen models get no update."""
  pc, o = config[phase], config.optim
  sched = make_schedule(pc.lr, pc.steps, o.warmup_frac, "cosine" if phase == "dmt" else "constant")

  # Weight decay on matrices only (not biases, norm gains), or on everything (the reference's).
  decayed = None if o.decay_all else (lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))

  def one_model():
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decayed))

  teacher_tx = one_model() if phase == "smt" else optax.set_to_zero()
  return optax.multi_transform({"teacher": teacher_tx, "rnn": one_model()},
                               {"teacher": "teacher", "rnn": "rnn"})


def make_loss(config, phase: str, fns, constrain_time=None):
  """The phase's objective with its hyper-parameters bound: (params, batch, key) -> (loss, m)."""
  tfns, rfns = fns
  if phase == "smt":
    s = config.smt
    return functools.partial(
        objectives.smt_loss, teacher=tfns, rnn=rfns, context_length=s.context_length,
        future_length=s.future_length, num_transitions=s.num_transitions, c_dec=s.c_dec,
        c_dyn=s.c_dyn, c_init=s.c_init, c_unif=s.c_unif, c_readout=s.c_readout, gamma=s.gamma,
        stop_teacher_grad=s.stop_teacher_grad, uniformity_max_samples=s.uniformity_max_samples,
        uniformity_over=s.uniformity_over, constrain_time=constrain_time)
  if phase == "dmt":
    d = config.dmt
    return functools.partial(
        objectives.dmt_loss, teacher=tfns, rnn=rfns, context_length=config.smt.context_length,
        rollout_length=d.rollout_length, label_every=d.label_every, c_dyn=d.c_dyn,
        c_readout=d.c_readout, stop_carry_grad=d.stop_carry_grad,
        reference_labels=d.reference_labels, start=-1 if config.data.episodic else None)
  return functools.partial(objectives.bptt_loss, rnn=rfns,
                           truncation=config.bptt.truncation or None)


def make_train_step(loss_fn, optimizer):
  """One optimiser step as a pure function (jitted and donated by the caller).

  Non-finite loss or gradients never reach the parameters: the update is dropped and `finite` is
  reported, so the shell can stop (keeping the last good checkpoint) or count the skip.
  """

  def step(state, batch, key):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch,
                                                                        key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    # Finite gradients can still give a non-finite update (e.g. an overflowing learning rate).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    new = {"params": params, "opt_state": opt_state}
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step


@dataclasses.dataclass
class Experiment:
  """What a run needs besides its mutable state; built once from the config."""
  config: Any
  phases: list[str]
  source: data.Source
  mesh: jax.sharding.Mesh
  graphdefs: tuple
  fns: tuple  # (TeacherFns, RNNFns)
  params_sharding: Any
  batch_sharding: jax.sharding.NamedSharding


def build_experiment(config) -> tuple[Experiment, Any]:
  """Validates the config, builds mesh and data, and creates the parameters already sharded.

  Every check runs before anything is compiled, and the checks that need no data (the config on
  its own, then the mesh) before the data is loaded.
  """
  from smt_jax import config_checks  # local: keeps the import graph of the library flat
  phases = phase_list(config)
  config_checks.validate(config, phases)
  mesh = config_checks.make_mesh(config)
  config_checks.validate_with_mesh(config, phases, mesh)
  try:
    source = make_base_source(config)
  except ValueError as e:  # bad data (missing, too short, out-of-vocabulary tokens): say so
    raise config_checks.ConfigError(f"data {config.data.name!r}: {e}") from e
  config_checks.validate_with_source(config, phases, source)

  # Shapes first: the abstract models give the graph and the shardings; the parameters are then
  # materialised directly in their sharded layout.
  abstract = nnx.eval_shape(lambda: build_models(config, source.vocab_size, config.seed))
  (tg, t_abs), (rg, r_abs) = nnx.split(abstract[0]), nnx.split(abstract[1])
  abstract_params = {"teacher": t_abs, "rnn": r_abs}
  params_sharding = sharding.param_shardings(abstract_params, mesh)

  @functools.partial(jax.jit, out_shardings=params_sharding)
  def init():
    teacher, rnn = build_models(config, source.vocab_size, config.seed)
    return {"teacher": nnx.state(teacher), "rnn": nnx.state(rnn)}

  with jax.set_mesh(mesh):
    params = init()
  exp = Experiment(config=config, phases=phases, source=source, mesh=mesh, graphdefs=(tg, rg),
                   fns=(teacher_fns(tg), rnn_fns(rg)), params_sharding=params_sharding,
                   batch_sharding=sharding.batch_sharding(mesh))
  return exp, params


# ---------------------------------------------------------------------------------------------
# The loop.


def global_batch(exp: Experiment, source: data.Source, *, split: str, step: int, batch_size: int):
  """This process's rows of batch `step`, assembled into one global sharded array per field."""
  local = source.batch(split=split, step=step, batch_size=batch_size, seed=exp.config.seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
  check_tokens(local, source, split=split, step=step)
  return {k: jax.make_array_from_process_local_data(exp.batch_sharding, v)
          for k, v in local.items()}


def check_tokens(batch: dict[str, np.ndarray], source: data.Source, *, split: str,
                 step: int) -> None:
  """Every token id in [0, V) and every target in [-1, V): an embedding lookup would otherwise
  clip or fill out-of-range ids silently. A host-side min/max over [B, T] ints: negligible."""
  v = source.vocab_size
  x, y = batch["x"], batch["y"]
  if x.size and (x.min() < 0 or x.max() >= v or y.min() < -1 or y.max() >= v):
    raise ValueError(
        f"data: {source.name} {split} batch {step} has tokens outside the vocabulary "
        f"[0, {v}) (x in [{x.min()}, {x.max()}], targets y in [{y.min()}, {y.max()}], -1 = no "
        f"target); the dataset (or its options in config.data.options) is inconsistent.")


def run_eval(exp: Experiment, params, *, with_teacher: bool) -> dict[str, float]:
  c = exp.config
  source = with_seq_len(exp.source, phase_seq_len(c, "eval"))
  tfns, rfns = exp.fns
  totals: dict[str, float] = {}
  for i in range(c.eval.num_batches):
    batch = global_batch(exp, source, split="eval", step=i, batch_size=c.eval.batch_size)
    out = evaluation.evaluate(params, batch, rnn=rfns, teacher=tfns if with_teacher else None,
                              context_length=c.smt.context_length,
                              prompt_length=c.eval.prompt_length if with_teacher else 0,
                              future_length=c.smt.future_length if with_teacher else 0)
    for k, v in jax.device_get(out).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = c.eval.num_batches
  res = {"eval/rnn_nll": totals["rnn_nll_sum"] / max(totals["count"], 1),
         "eval/rnn_acc": totals["rnn_correct_sum"] / max(totals["count"], 1)}
  if with_teacher:
    res["eval/teacher_nll"] = totals["teacher_nll_sum"] / max(totals["count"], 1)
    res["eval/teacher_acc"] = totals["teacher_correct_sum"] / max(totals["count"], 1)
    res["eval/teacher_full_nll"] = (totals["teacher_full_nll_sum"]
                                    / max(totals["teacher_full_count"], 1))
    if "teacher_decoding_sum" in totals:
      res["eval/teacher_decoding_nll"] = (totals["teacher_decoding_sum"]
                                          / max(totals["teacher_decoding_count"], 1))
    res["eval/drift_mse"] = totals["drift_mse"] / n
    res["eval/drift_1mr2"] = totals["drift_1mr2"] / n
    if "prompted_nll_sum" in totals:
      res["eval/rnn_prompted_nll"] = totals["prompted_nll_sum"] / max(totals["prompted_count"], 1)
  return res


def unigram_nll(exp: Experiment) -> float:
  """Entropy (nats) of the eval targets' own distribution: the bar a model must clear."""
  c = exp.config
  source = with_seq_len(exp.source, phase_seq_len(c, "eval"))
  counts = np.zeros(exp.source.vocab_size)
  for i in range(c.eval.num_batches):
    y = source.batch(split="eval", step=i, batch_size=c.eval.batch_size, seed=c.seed)["y"]
    counts += np.bincount(y[y >= 0], minlength=exp.source.vocab_size)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def copy_decoder_to_readout(params, rnn_kind: str):
  """End of SMT: the transformer RNN's readout takes the teacher decoder's weights (SPEC 4)."""
  if rnn_kind != "transformer":
    return params
  dec = params["teacher"]["decoder"]
  if jax.tree.structure(dec) != jax.tree.structure(params["rnn"]["decoder"]) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(dec),
                                         jax.tree.leaves(params["rnn"]["decoder"]))):
    logging.warning("RNN readout and teacher decoder differ in shape; readout not copied.")
    return params
  new_rnn = jax.tree.map(lambda a: a, params["rnn"])  # a new State; the old one stays intact
  new_rnn["decoder"] = jax.tree.map(jnp.copy, dec)  # own buffers: the train step donates them
  return {"teacher": params["teacher"], "rnn": new_rnn}


class _Preempted:
  """Set by SIGTERM: the loop saves a checkpoint at the next step boundary and exits.

  One process: our own SIGTERM handler sets the flag. Several: the processes must agree on the
  step to stop at (one saving while another runs the next step's collectives would hang), so JAX's
  preemption service (started by jax.distributed.initialize) takes the signal and
  `reached_preemption_sync_point`, asked at every step, names the same step on every process.
  """

  def __init__(self):
    self.flag = False
    self.multi_process = jax.process_count() > 1

  def __call__(self, signum, frame):
    del signum, frame
    self.flag = True

  def check(self, global_step: int) -> bool:
    """Whether to save and exit after `global_step` (ask once per step, on every process)."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False, fork: bool = False) -> dict:
  """Runs every phase of `config`, resuming from `workdir`; returns the summary dict.

  Order: the config is validated, then the workdir checked (a refused workdir costs nothing),
  then mesh, data and their checks, and only then are parameters created and steps compiled. The
  workdir's config.json is written once its checkpoints are known to fit this config.

  Raises:
    config_checks.ConfigError: a config field (or the data) the run cannot use; raised before
      anything is compiled.
    checkpoints.WorkdirError: `workdir` holds a run of another config (and neither `overwrite`
      nor `fork`); raised before anything is built.
    checkpoints.CheckpointError: checkpoints exist but none is readable.
    NonFiniteError: a non-finite loss/gradient under nan_policy='stop' (checkpoints kept).
    Preempted: SIGTERM arrived; a checkpoint of the current step was saved first.
  """
  from smt_jax import config_checks
  t_start = time.time()
  is_main = jax.process_index() == 0
  config_checks.validate(config, phase_list(config))
  checkpoints.check_workdir(workdir, config, overwrite=overwrite, fork=fork)
  with checkpoints.workdir_lock(workdir, is_main=is_main):
    exp, params = build_experiment(config)
    claim = functools.partial(checkpoints.claim_workdir, workdir, config, overwrite=overwrite,
                              fork=fork, is_main=is_main)
    if overwrite:
      claim()  # the old run goes before anything is restored from it
    return _train(exp, params, workdir, t_start, claim)


def _train(exp: Experiment, params, workdir: str, t_start: float, claim) -> dict:
  c = exp.config
  is_main = jax.process_index() == 0
  mngr = checkpoints.make_manager(workdir, keep=c.keep_checkpoints)
  offsets = np.cumsum([0] + [c[p].steps for p in exp.phases]).tolist()
  with_teacher = "smt" in exp.phases
  summary = metrics_io.read_summary(workdir)

  # Resume: which phase, which step. Batches and keys are functions of the global step, so the
  # restored state alone decides everything that follows.
  phase_idx, phase_step, opt_state, skipped, resume_step = 0, 0, None, 0, 0
  try:
    restored = checkpoints.restore(mngr, exp, params, make_optimizer, quarantine=True,
                                   is_main=is_main)
    # The workdir becomes this config's only once its checkpoints are known to fit (a refused
    # --fork leaves it as it was).
    claim()
  except BaseException:
    mngr.close()
    raise
  if restored is not None:
    params, opt_state = restored["params"], restored["opt_state"]
    phase_idx, phase_step = restored["phase_index"], restored["phase_step"]
    skipped, resume_step = restored["skipped_steps"], restored["step"]
    say(f"Resumed from {workdir} at "
        f"{exp.phases[phase_idx] if phase_idx < len(exp.phases) else 'the end'} step {phase_step}.")
  writer = metrics_io.MetricsWriter(workdir, enabled=is_main,
                                    purge_step=resume_step + 1 if restored else None)
  writer.truncate_after(resume_step)  # rows after the checkpoint are rerun (none: all of them)

  preempted = _Preempted()
  try:
    with preempted.installed(), jax.set_mesh(exp.mesh):
      for pi in range(phase_idx, len(exp.phases)):
        phase = exp.phases[pi]
        start = phase_step if pi == phase_idx else 0
        if start == 0 or opt_state is None:
          opt_state = None
        params, opt_state = _run_phase(exp, phase, pi, offsets[pi], start, params, opt_state,
                                       skipped if pi == phase_idx else 0, mngr, writer,
                                       preempted, summary, with_teacher)
        opt_state = None
        if phase == "smt" and c.smt.copy_decoder_to_readout:
          # After SMT's final eval (which scores the RNN's own readout): later phases, samples and
          # the boundary checkpoint use the readout with the teacher decoder's weights.
          params = copy_decoder_to_readout(params, c.model.rnn_kind)
        # Phase boundary checkpoint: a restart continues with the next phase.
        nxt = exp.phases[pi + 1] if pi + 1 < len(exp.phases) else None
        checkpoints.save(mngr, offsets[pi + 1], params, None, phase_index=pi + 1, phase_step=0,
                         phase=nxt)
        if preempted.flag and nxt is not None:
          _exit_preempted(mngr, f"the start of {nxt}")
      mngr.wait_until_finished()
      summary["baseline/unigram_nll"] = unigram_nll(exp)
      summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + (time.time() - t_start)
      if is_main:
        from smt_jax import samples  # local: matplotlib only where samples are drawn
        samples.write_samples(exp, params, workdir, summary)
        metrics_io.write_summary(workdir, summary)
  finally:
    writer.close()
    mngr.close()  # waits for a save in flight: a run that stops keeps its last checkpoint
  return summary


def _exit_preempted(mngr, where: str):
  mngr.wait_until_finished()
  say(f"SIGTERM: saved a checkpoint at {where}; exiting. Rerun the same command to resume.")
  raise Preempted(f"preempted; checkpoint saved at {where}")


def _run_phase(exp, phase, phase_index, offset, start, params, opt_state, skipped, mngr, writer,
               preempted, summary, with_teacher):
  """Trains one phase from step `start`; returns (params, opt_state). Raises Preempted."""
  c = exp.config
  pc = c[phase]
  source = with_seq_len(exp.source, phase_seq_len(c, phase))
  optimizer = make_optimizer(c, phase)
  constrain = sharding.time_constraint(exp.mesh)
  loss_fn = make_loss(c, phase, exp.fns, constrain_time=constrain)
  state = {"params": params,
           "opt_state": opt_state if opt_state is not None else optimizer.init(params)}
  state_sharding = sharding.state_shardings(state, exp.mesh)
  state = jax.device_put(state, state_sharding)
  step_fn = jax.jit(make_train_step(loss_fn, optimizer),
                    in_shardings=(state_sharding, exp.batch_sharding, None),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  schedule = make_schedule(pc.lr, pc.steps, c.optim.warmup_frac,
                           "cosine" if phase == "dmt" else "constant")
  base_key = jax.random.key(c.seed)  # step keys: fold_in(seed key, global step), never a stream
  tokens_per_step = pc.batch_size * source.seq_len

  t_compile = time.time()
  t_last, steps_since = None, 0  # the rate is measured from the end of the first (compiled) step
  train_s, train_steps = 0.0, 0  # measured training time and steps, for the summary's throughput
  pending = None  # (step, metrics) of the step before: checked one step late to keep dispatch async
  for step in range(start, pc.steps):
    gstep = offset + step
    batch = global_batch(exp, source, split="train", step=gstep, batch_size=pc.batch_size)
    state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, gstep))
    if pending is not None:
      skipped += _check_finite(c, phase, *pending)
    pending = (step, metrics)
    steps_since += 1
    if t_last is None:  # first step: compile + run
      jax.block_until_ready(metrics["loss"])
      summary[f"{phase}/compile_s"] = time.time() - t_compile
      t_last, steps_since = time.time(), 0
    done_steps = step + 1
    if c.log_every_steps and done_steps % c.log_every_steps == 0:
      m = jax.device_get(metrics)
      row = {k: float(v) for k, v in m.items() if k != "finite"}
      row["lr"] = float(schedule(step))
      msg = f"{phase} step {done_steps}/{pc.steps}  loss {row['loss']:.4f}"
      dt = time.time() - t_last
      if steps_since and dt > 0:  # not measurable when this is the first step after a (re)start
        rate = steps_since / dt
        train_s, train_steps = train_s + dt, train_steps + steps_since
        row.update(steps_per_s=rate, tokens_per_s=rate * tokens_per_step)
        msg += f"  {rate:.2f} steps/s  {rate * tokens_per_step:,.0f} tokens/s"
      if skipped:
        msg += f"  ({skipped} non-finite steps skipped)"
      t_last, steps_since = time.time(), 0
      writer.write(offset + done_steps, phase, done_steps, row)
      say(msg)
    if c.eval.every_steps and done_steps % c.eval.every_steps == 0 and done_steps < pc.steps:
      writer.write(offset + done_steps, phase, done_steps,
                   run_eval(exp, state["params"], with_teacher=with_teacher))
      t_last, steps_since = time.time(), 0  # eval time is not training throughput
    # Periodic checkpoints inside the phase; its last step is covered by the boundary checkpoint
    # (saved after the phase's final eval, so a restart never writes that eval twice).
    ckpt_due = (c.checkpoint_every_steps and done_steps % c.checkpoint_every_steps == 0
                and done_steps < pc.steps)
    stop = preempted.check(gstep)
    if ckpt_due or stop:
      skipped += _check_finite(c, phase, *pending)
      pending = None
      checkpoints.save(mngr, offset + done_steps, state["params"], state["opt_state"],
                       phase_index=phase_index, phase_step=done_steps, phase=phase,
                       skipped_steps=skipped)
      if stop:
        _exit_preempted(mngr, f"{phase} step {done_steps}")
  if pending is not None:
    skipped += _check_finite(c, phase, *pending)
  final = run_eval(exp, state["params"], with_teacher=with_teacher)
  writer.write(offset + pc.steps, phase, pc.steps, final)
  if train_steps:  # this process's measured part of the phase (a resumed run: since the restart)
    summary[f"{phase}/steps_per_s"] = train_steps / train_s
    summary[f"{phase}/tokens_per_s"] = train_steps / train_s * tokens_per_step
  summary[phase] = final
  summary[f"{phase}/skipped_steps"] = skipped
  if jax.process_index() == 0:
    metrics_io.write_summary(writer.workdir, summary)
  return state["params"], state["opt_state"]


def _check_finite(c, phase, step, metrics) -> int:
  """1 if step was skipped for non-finite values (nan_policy 'skip'); raises under 'stop'."""
  if bool(jax.device_get(metrics["finite"])):
    return 0
  m = jax.device_get(metrics)
  bad = sorted(k for k, v in m.items() if k != "finite" and not np.all(np.isfinite(v)))
  what = ", ".join(bad) if bad else "the parameter update (finite loss and gradients)"
  if c.nan_policy == "skip":
    logging.warning("%s step %d: non-finite %s; update skipped.", phase, step + 1, what)
    return 1
  raise NonFiniteError(
      f"{phase} step {step + 1}: non-finite value in {what}; the update was not applied and the "
      f"last good checkpoint is kept. Lower {phase}.lr or optim.clip_norm, or set "
      f"--config.nan_policy=skip to skip such steps and count them.")
