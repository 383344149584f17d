"""The training shell: configs in, checkpoints, metrics and samples out.

This is the only module that reads config fields, touches files and clocks, or asks which process it
is; everything it calls is a pure function. `train_and_evaluate(config, workdir)` runs the config's
phases in order (e.g. SMT then DMT, or BPTT alone) and resumes from the latest checkpoint in
`workdir` when there is one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import signal
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
from smt_jax.models import Teacher, make_rnn, rnn_fns, teacher_fns

PHASES = ("smt", "dmt", "bptt")


def say(msg: str) -> None:
  """A progress line on stdout, from process 0 only (absl logging is left to the libraries)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf and the config says to stop."""


# ---------------------------------------------------------------------------------------------
# Building the experiment from its config.


def phase_list(config) -> list[str]:
  phases = [p.strip() for p in config.phases.split(",") if p.strip()]
  for p in phases:
    if p not in PHASES:
      raise ValueError(f"config.phases: unknown phase {p!r}; valid phases: {list(PHASES)} "
                       f"(e.g. --config.phases=smt,dmt or --config.phases=bptt).")
  if not phases:
    raise ValueError("config.phases is empty; e.g. --config.phases=smt,dmt.")
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
  teacher = Teacher(vocab_size=vocab_size, num_memory_tokens=m.num_memory_tokens, width=m.width,
                    encoder_depth=m.encoder_depth, decoder_depth=m.decoder_depth,
                    num_heads=m.num_heads, dtype=dtype, rngs=rngs)
  rnn = make_rnn(m.rnn_kind, vocab_size=vocab_size, num_memory_tokens=m.num_memory_tokens,
                 width=m.width, depth=m.rnn_depth, num_heads=m.num_heads,
                 readout_depth=m.readout_depth, hidden=m.rnn_hidden or None, dtype=dtype,
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

  def one_model():
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                    mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))

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
        c_dyn=s.c_dyn, c_unif=s.c_unif, c_readout=s.c_readout, gamma=s.gamma,
        stop_teacher_grad=s.stop_teacher_grad, uniformity_max_samples=s.uniformity_max_samples,
        uniformity_over=s.uniformity_over, constrain_time=constrain_time)
  if phase == "dmt":
    d = config.dmt
    return functools.partial(
        objectives.dmt_loss, teacher=tfns, rnn=rfns, context_length=config.smt.context_length,
        rollout_length=d.rollout_length, label_every=d.label_every, c_dyn=d.c_dyn,
        c_readout=d.c_readout, stop_carry_grad=d.stop_carry_grad,
        start=-1 if config.data.episodic else None)
  return functools.partial(objectives.bptt_loss, rnn=rfns,
                           truncation=config.bptt.truncation or None)


def make_train_step(loss_fn, optimizer, *, skip_nonfinite: bool):
  """One optimiser step as a pure function (jitted and donated by the caller).

  Non-finite loss or gradients never reach the parameters: the update is dropped and `finite` is
  reported, so the shell can stop (keeping the last good checkpoint) or count the skip.
  """
  del skip_nonfinite  # both policies drop the update; the shell decides whether to stop

  def step(state, batch, key):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch,
                                                                        key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
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
  """Validates the config, builds data and mesh, and creates the parameters already sharded."""
  from smt_jax import config_checks  # local: keeps the import graph of the library flat
  phases = phase_list(config)
  config_checks.validate(config, phases)
  source = make_base_source(config)
  config_checks.validate_with_source(config, phases, source)
  mesh = sharding.make_mesh(dict(config.mesh))
  config_checks.validate_with_mesh(config, phases, mesh)

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
  return {k: jax.make_array_from_process_local_data(exp.batch_sharding, v)
          for k, v in local.items()}


def run_eval(exp: Experiment, params, *, with_teacher: bool) -> dict[str, float]:
  c = exp.config
  source = with_seq_len(exp.source, phase_seq_len(c, "eval"))
  tfns, rfns = exp.fns
  totals: dict[str, float] = {}
  for i in range(c.eval.num_batches):
    batch = global_batch(exp, source, split="eval", step=i, batch_size=c.eval.batch_size)
    out = evaluation.evaluate(params, batch, rnn=rfns, teacher=tfns if with_teacher else None,
                              context_length=c.smt.context_length,
                              prompt_length=c.eval.prompt_length if with_teacher else 0)
    for k, v in jax.device_get(out).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = c.eval.num_batches
  res = {"eval/rnn_nll": totals["rnn_nll_sum"] / max(totals["count"], 1),
         "eval/rnn_acc": totals["rnn_correct_sum"] / max(totals["count"], 1)}
  if with_teacher:
    res["eval/teacher_nll"] = totals["teacher_nll_sum"] / max(totals["count"], 1)
    res["eval/teacher_acc"] = totals["teacher_correct_sum"] / max(totals["count"], 1)
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
  """Set by SIGTERM: the loop saves a checkpoint at the next step boundary and exits."""

  def __init__(self):
    self.flag = False

  def __call__(self, signum, frame):
    del signum, frame
    self.flag = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False, fork: bool = False) -> dict:
  """Runs every phase of `config`, resuming from `workdir`; returns the summary dict."""
  t_start = time.time()
  exp, params = build_experiment(config)
  c = exp.config
  is_main = jax.process_index() == 0
  checkpoints.claim_workdir(workdir, c, overwrite=overwrite, fork=fork, is_main=is_main)
  mngr = checkpoints.make_manager(workdir, keep=c.keep_checkpoints)
  writer = metrics_io.MetricsWriter(workdir, enabled=is_main)
  offsets = np.cumsum([0] + [c[p].steps for p in exp.phases]).tolist()
  with_teacher = "smt" in exp.phases
  summary = metrics_io.read_summary(workdir)

  # Resume: which phase, which step.
  phase_idx, phase_step, opt_state = 0, 0, None
  restored = checkpoints.restore_latest(mngr, exp, params, make_optimizer)
  if restored is not None:
    params, opt_state, phase_idx, phase_step = restored
    writer.truncate_after(offsets[phase_idx] + phase_step)
    say(f"Resumed from {workdir} at {exp.phases[phase_idx] if phase_idx < len(exp.phases) else 'the end'}"
        f" step {phase_step}.")

  preempted = _Preempted()
  old_handler = signal.signal(signal.SIGTERM, preempted)
  try:
    with jax.set_mesh(exp.mesh):
      for pi in range(phase_idx, len(exp.phases)):
        phase = exp.phases[pi]
        start = phase_step if pi == phase_idx else 0
        if start == 0 or opt_state is None:
          opt_state = None
        params, opt_state, done = _run_phase(exp, phase, pi, offsets[pi], start, params,
                                             opt_state, mngr, writer, preempted, summary,
                                             with_teacher)
        if not done:  # preempted: a checkpoint was saved; exit so the scheduler can restart us
          return summary
        opt_state = None
        if phase == "smt" and c.smt.copy_decoder_to_readout:
          params = copy_decoder_to_readout(params, c.model.rnn_kind)
        # Phase boundary checkpoint: a restart continues with the next phase.
        checkpoints.save(mngr, offsets[pi + 1], params, None,
                         phase_index=pi + 1, phase_step=0, force=True)
      mngr.wait_until_finished()
      summary["baseline/unigram_nll"] = unigram_nll(exp)
      summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + (time.time() - t_start)
      if is_main:
        from smt_jax import samples  # local: matplotlib only where samples are drawn
        samples.write_samples(exp, params, workdir, summary)
        metrics_io.write_summary(workdir, summary)
  finally:
    signal.signal(signal.SIGTERM, old_handler)
    writer.close()
    mngr.close()
  return summary


def _run_phase(exp, phase, phase_index, offset, start, params, opt_state, mngr, writer,
               preempted, summary, with_teacher):
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
  step_fn = jax.jit(make_train_step(loss_fn, optimizer, skip_nonfinite=c.nan_policy == "skip"),
                    in_shardings=(state_sharding, exp.batch_sharding, None),
                    out_shardings=(state_sharding, None), donate_argnums=0)
  base_key = jax.random.key(c.seed)
  tokens_per_step = pc.batch_size * source.seq_len
  skipped = summary.get(f"{phase}/skipped_steps", 0)

  t_compile = time.time()
  t_last, steps_since = None, 0
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
      dt = time.time() - t_last
      rate = steps_since / dt if dt > 0 and steps_since else float("nan")
      t_last, steps_since = time.time(), 0
      row = {k: float(v) for k, v in m.items() if k != "finite"}
      row.update(steps_per_s=rate, tokens_per_s=rate * tokens_per_step, lr=float(
          make_schedule(pc.lr, pc.steps, c.optim.warmup_frac,
                        "cosine" if phase == "dmt" else "constant")(step)))
      writer.write(offset + done_steps, phase, done_steps, row)
      say(f"{phase} step {done_steps}/{pc.steps}  loss {row['loss']:.4f}  {rate:.2f} steps/s  "
          f"{rate * tokens_per_step:,.0f} tokens/s")
    if c.eval.every_steps and done_steps % c.eval.every_steps == 0 and done_steps < pc.steps:
      writer.write(offset + done_steps, phase, done_steps,
                   run_eval(exp, state["params"], with_teacher=with_teacher))
    ckpt_due = c.checkpoint_every_steps and done_steps % c.checkpoint_every_steps == 0
    if ckpt_due or preempted.flag:
      skipped += _check_finite(c, phase, *pending)
      pending = None
      summary[f"{phase}/skipped_steps"] = skipped
      checkpoints.save(mngr, offset + done_steps, state["params"], state["opt_state"],
                       phase_index=phase_index, phase_step=done_steps, force=preempted.flag)
      if preempted.flag:
        mngr.wait_until_finished()
        say(f"SIGTERM: saved a checkpoint at {phase} step {done_steps}; exiting.")
        return state["params"], state["opt_state"], False
  if pending is not None:
    skipped += _check_finite(c, phase, *pending)
  final = run_eval(exp, state["params"], with_teacher=with_teacher)
  writer.write(offset + pc.steps, phase, pc.steps, final)
  summary[phase] = final
  summary[f"{phase}/skipped_steps"] = skipped
  if jax.process_index() == 0:
    metrics_io.write_summary(writer.workdir, summary)
  return state["params"], state["opt_state"], True


def _check_finite(c, phase, step, metrics) -> int:
  """1 if step was skipped for non-finite values (nan_policy 'skip'); raises under 'stop'."""
  if bool(jax.device_get(metrics["finite"])):
    return 0
  m = jax.device_get(metrics)
  bad = sorted(k for k, v in m.items() if k != "finite" and not np.all(np.isfinite(v)))
  if c.nan_policy == "skip":
    logging.warning("%s step %d: non-finite %s; update skipped.", phase, step + 1, bad)
    return 1
  raise NonFiniteError(
      f"{phase} step {step + 1}: non-finite value in {', '.join(bad) or 'gradients'}; the update "
      f"was not applied and the last good checkpoint is kept. Lower the learning rate, or set "
      f"--config.nan_policy=skip to skip such steps.")
