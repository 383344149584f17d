"""Everything a run builds from its config: the experiment, and one `Phase` per training phase.

  exp = experiment.build_experiment(config)   # validated: data, mesh, abstract models
  phase = make_phase(exp, "smt")                 # data, optimiser, loss, the one train step
  state = phase.init_state(exp.init_params())
  state, metrics = phase.step(state, phase.batch(step), key)

`Experiment` holds what every phase shares (config, data, mesh, the models' graphs and abstract
parameters); `Phase` holds one phase's data source, optimiser, schedule and loss, its abstract
state (parameters and optimiser state as shape/dtype/sharding structs, from `jax.eval_shape`), and
the one compiled, sharded, donated train step that the runner, the benchmark and the tests all use.
Nothing here writes files or reads clocks: the config is read through `runner.config` (its
defaults, accessors and checks), and `train` imports this module, never the other way.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from smt_jax import analysis, data, objectives, optim, sharding
from smt_jax.models import TEACHER_KINDS, head_width, make_rnn, rnn_fns, teacher_fns
from smt_jax.runner import config as config_lib

# ---------------------------------------------------------------------------------------------
# Data.


def source_of(config) -> data.Source:
  """The dataset of `config.data`, built once (phases then differ only in sequence length)."""
  d = config.data
  kwargs = dict(d.options[d.name])
  # Object-store data (gs://...) is read by the source (by the row where it can), else from a
  # local copy, staged once per host.
  paths = data.DATASETS[d.name].paths
  stage = lambda p: paths and not paths.object_store and data.files.is_object_store(p)
  local = lambda p, field: data.files.stage(p, field=field) if stage(p) else p
  if paths:  # a source that reads files ("" = what it reads without)
    kwargs["path"] = local(d.path, "data.path") or None
  if d.eval_path:  # runner.config refuses it for sources without an eval_path
    kwargs["eval_path"] = local(d.eval_path, "data.eval_path")
  if config.data.episodic:
    kwargs["seq_len"] = config.data.seq_len
  return data.make_source(config.data.name, **kwargs)


def with_seq_len(source: data.Source, seq_len: int) -> data.Source:
  """`source` cropping `seq_len` tokens (streams share their token arrays)."""
  if source.seq_len == seq_len:
    return source
  s = copy.copy(source)
  s.seq_len = seq_len
  return s


# ---------------------------------------------------------------------------------------------
# Models, optimiser, loss and the train step: pure builders.


def build_models(config, vocab_size: int):
  """Teacher and RNN as NNX modules (call under nnx.eval_shape for abstract shapes)."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  rngs = nnx.Rngs(config.seed)
  head_dim = head_width(m.width, m.num_heads, m.head_dim)
  # The causal teacher attends within the windowed teacher's context length.
  window = {"window": config.smt.context_length} if m.teacher_kind == "causal" else {}
  # What both models are built with: the vocabulary, the memory's shape, the attention, the dtype.
  shared = dict(
    vocab_size=vocab_size,
    num_memory_tokens=m.num_memory_tokens,
    width=m.width,
    num_heads=m.num_heads,
    head_dim=head_dim,
    attention=m.attention,
    dtype=dtype,
    rngs=rngs,
  )
  teacher = TEACHER_KINDS[m.teacher_kind](
    **window, **shared, encoder_depth=m.encoder_depth, decoder_depth=m.decoder_depth
  )
  try:  # the kind's own options (checked by its constructor) and the model-wide arguments
    rnn = make_rnn(m.rnn_kind, **m.rnn[m.rnn_kind], **shared, initial_memory=m.rnn_initial_memory)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.model.rnn.{m.rnn_kind}: {e}") from None
  return teacher, rnn


# After the warm-up, the published schedules: constant for SMT and BPTT, cosine decay for DMT.
def make_schedule(config, phase: str) -> optax.Schedule:
  """Linear warm-up from 0, then `<phase>.schedule`: constant, or cosine decay to 0."""
  pc = config[phase]
  warmup = max(1, int(round(config.optim.warmup_frac * pc.steps)))
  if pc.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, pc.lr, warmup, max(pc.steps, warmup + 1))
  return optax.join_schedules(
    [optax.linear_schedule(0.0, pc.lr, warmup), optax.constant_schedule(pc.lr)], [warmup]
  )


def make_optimizer(config, phase: str, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with global-norm clipping per model; the teacher is frozen outside SMT (its updates
  zeroed, so weight decay does not move it either: `smt_jax.optim.adamw_per_model`)."""
  o = config.optim
  return optim.adamw_per_model(
    schedule,
    frozen=() if phase == "smt" else ("teacher",),
    b1=o.b1,
    b2=o.b2,
    weight_decay=o.weight_decay,
    clip_norm=o.clip_norm,
    decay_all=o.decay_all,
  )


def make_loss(config, phase: str, fns, constrain_time=None):
  """The phase's objective with its hyper-parameters bound: (params, batch, key) -> (loss, m)."""
  tfns, rfns = fns
  if phase == "smt":
    s = config.smt
    return functools.partial(
      objectives.smt_loss,
      teacher=tfns,
      rnn=rfns,
      context_length=s.context_length,
      future_length=s.future_length,
      num_transitions=s.num_transitions,
      num_decoded=s.num_decoded,
      c_dec=s.c_dec,
      c_dyn=s.c_dyn,
      c_init=s.c_init,
      c_unif=s.c_unif,
      c_readout=s.c_readout,
      gamma=s.gamma,
      stop_teacher_grad=s.stop_teacher_grad,
      uniformity_max_samples=s.uniformity_max_samples,
      uniformity_over=s.uniformity_over,
      constrain_time=constrain_time,
    )
  if phase == "dmt":
    d = config.dmt
    start, from_rnn = config_lib.dmt_start(config)
    return functools.partial(
      objectives.dmt_loss,
      teacher=tfns,
      rnn=rfns,
      context_length=config.smt.context_length,
      rollout_length=d.rollout_length,
      label_every=d.label_every,
      c_dyn=d.c_dyn,
      c_readout=d.c_readout,
      stop_carry_grad=d.stop_carry_grad,
      reference_labels=d.reference_labels,
      start=start,
      from_rnn_initial_memory=from_rnn,
      rollout_solver=d.rollout,
      parallel_options=dict(
        jacobian=d.parallel_jacobian,
        damping=d.parallel_damping,
        tol=d.parallel_tol,
      ),
    )
  return functools.partial(
    objectives.bptt_loss, rnn=rfns, truncation=config.bptt.truncation or None
  )


def _micro_batches(a, accum_steps: int):
  """[B, ...] -> [k, B / k, ...]: row i of the batch in micro-batch i % k."""
  return jnp.moveaxis(a.reshape(a.shape[0] // accum_steps, accum_steps, *a.shape[1:]), 1, 0)


def accumulated(loss_fn, accum_steps: int):
  """loss_fn's value and gradient over a batch as `accum_steps` micro-batches, one at a time.

  (params, batch, key) -> ((loss, metrics), grads), as `jax.value_and_grad(loss_fn, has_aux=True)`:
  micro-batch j takes rows j, j + k, j + 2k, ... (k = accum_steps; so under data parallelism
  every device keeps its own rows, B / k divisible by the devices), all with the step's key, and
  a `lax.scan` over them keeps only one micro-batch's activations alive. Loss, metrics and
  gradients are the micro-batches' means (`num_*` counts their sums): for a loss that is a mean
  over rows with the same count of scored targets in each, the full batch's values. Terms over
  the whole batch (SMT's uniformity, over every memory of the batch) see one micro-batch at a
  time, as in the reference's accumulation. Under data parallelism XLA all-reduces each
  micro-batch's gradient as it is added (k all-reduces of the gradient per step, not one): the
  saving is memory; on one accelerator nothing is communicated.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn
  split = functools.partial(_micro_batches, accum_steps=accum_steps)

  def value_and_grad(params, batch, key):
    def micro(total, rows):
      out = grad_fn(params, rows, key)
      return jax.tree.map(jnp.add, total, out), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, batch, key))
    total, _ = jax.lax.scan(micro, zero, jax.tree.map(split, batch))
    (loss, metrics), grads = jax.tree.map(lambda a: a / accum_steps, total)
    counts = {k: v * accum_steps for k, v in metrics.items() if k.startswith("num_")}
    return (loss, {**metrics, **counts}), grads

  return value_and_grad


def make_train_step(loss_fn, optimizer, accum_steps: int = 1):
  """One optimiser step as a pure function: (state, batch, key) -> (state, metrics).

  With accum_steps > 1 the gradient is accumulated over that many micro-batches of the batch
  (`accumulated`) before the optimiser's clip and update, as the reference's `grad_accum_steps`.
  Non-finite loss, gradients or update never reach the parameters: the update is dropped and
  `finite` is reported, so the shell can stop (keeping the last good checkpoint) or count the skip.
  """
  grad_fn = accumulated(loss_fn, accum_steps)

  def step(state, batch, key):
    (loss, metrics), grads = grad_fn(state["params"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    # Finite gradients can still give a non-finite update (e.g. an overflowing learning rate).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    new = {"params": params, "opt_state": opt_state}
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, dict(metrics, grad_norm=grad_norm, finite=finite)

  return step


def init_accumulator(optimizer, accum_steps: int, metrics):
  """For `make_micro_step`: params -> the optimiser state of an accumulating phase, {'inner': the
  optimiser's state, 'grads' and 'metrics': the sums so far, 'micro': the next micro-batch,
  'finite': whether every one so far was}. `metrics`: the loss's metrics (shapes suffice)."""
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
  return lambda params: {
    "inner": optimizer.init(params),
    "grads": zeros(params),
    "metrics": zeros(metrics),
    "micro": jnp.zeros((), jnp.int32),
    "finite": jnp.ones((), bool),
  }


def make_micro_step(loss_fn, optimizer, accum_steps: int):
  """One micro-batch of an accumulated optimiser step: (state, batch, key) -> (state, metrics),
  the accumulation carried in `state['opt_state']` (`init_accumulator`), so a loop can stop and
  checkpoint between micro-batches and resume exactly.

  The call takes micro-batch `micro` of the step's whole batch (rows micro, micro + k, ...: the
  split of `accumulated`) and adds its gradient and metrics; the k-th call applies the mean
  (clipped by the optimiser) unless a micro-batch was non-finite, resets the sums and returns the
  step's metrics. k calls from micro = 0 are `make_train_step(loss_fn, optimizer, k)`'s one step:
  the same sums in the same order.
  """
  grad_fn, k = jax.value_and_grad(loss_fn, has_aux=True), accum_steps

  def step(state, batch, key):
    acc, params = state["opt_state"], state["params"]
    j = acc["micro"]
    rows = jax.tree.map(
      lambda a: jax.lax.dynamic_index_in_dim(_micro_batches(a, k), j, keepdims=False), batch
    )
    (loss, metrics), grads = grad_fn(params, rows, key)
    grads_sum = jax.tree.map(jnp.add, acc["grads"], grads)
    sums = jax.tree.map(jnp.add, acc["metrics"], metrics)
    finite = acc["finite"] & jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    mean = jax.tree.map(lambda a: a / k, grads_sum)
    updates, inner = optimizer.update(mean, acc["inner"], params)
    finite &= jnp.isfinite(optax.tree.norm(updates))
    last = j == k - 1
    keep = lambda new, old, when: jax.tree.map(lambda a, b: jnp.where(when, a, b), new, old)  # noqa: E731
    out = jax.tree.map(lambda a: a / k, sums)
    out.update({n: v * k for n, v in out.items() if n.startswith("num_")})
    new_acc = {
      "inner": keep(inner, acc["inner"], last & finite),
      "grads": keep(jax.tree.map(jnp.zeros_like, grads_sum), grads_sum, last),
      "metrics": keep(jax.tree.map(jnp.zeros_like, sums), sums, last),
      "micro": (j + 1) % k,
      "finite": last | finite,
    }
    new = {"params": keep(optax.apply_updates(params, updates), params, last & finite)}
    return dict(new, opt_state=new_acc), dict(out, grad_norm=optax.tree.norm(mean), finite=finite)

  return step


class NonFiniteError(RuntimeError):
  """A loss or gradient became NaN/Inf and the config says to stop."""


def check_finite(nan_policy: str, phase: str, step: int, metrics) -> int:
  """After a train step (`make_train_step` applies no non-finite update): 0 if it was finite; 1
  if not and `nan_policy` is 'skip' (the step was skipped: count it); raises under 'stop'."""
  if bool(jax.device_get(metrics["finite"])):
    return 0
  m = jax.device_get(metrics)
  bad = sorted(k for k, v in m.items() if k != "finite" and not np.all(np.isfinite(v)))
  what = ", ".join(bad) if bad else "the parameter update (finite loss and gradients)"
  if nan_policy == "skip":
    logging.warning("%s step %d: non-finite %s; update skipped.", phase, step + 1, what)
    return 1
  raise NonFiniteError(
    f"{phase} step {step + 1}: non-finite value in {what}; the update was not applied and the "
    f"last good checkpoint is kept. Lower {phase}.lr or optim.clip_norm, or set "
    f"--config.nan_policy=skip to skip such steps and count them."
  )


def copy_decoder_to_readout(params):
  """End of SMT: an RNN whose readout is a decoder (the transformer RNN's) takes the teacher
  decoder's weights (docs/method.md 4)."""
  if "decoder" not in params["rnn"]:
    return params
  dec, readout = params["teacher"]["decoder"], params["rnn"]["decoder"]
  if jax.tree.structure(dec) != jax.tree.structure(readout) or any(
    a.shape != b.shape for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(readout))
  ):
    logging.warning("RNN readout and teacher decoder differ in shape; readout not copied.")
    return params
  new_rnn = jax.tree.map(lambda a: a, params["rnn"])  # a new State; the old one stays intact
  new_rnn["decoder"] = jax.tree.map(jnp.copy, dec)  # own buffers: the train step donates them
  return {"teacher": params["teacher"], "rnn": new_rnn}


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def shardings_of(abstract_tree):
  """The shardings an abstract tree (of ShapeDtypeStructs) carries."""
  return jax.tree.map(lambda a: a.sharding, abstract_tree)


# ---------------------------------------------------------------------------------------------
# The experiment and its phases.


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """What an evaluation reads (`evaluation.held_out`) and when one runs (`console`): the config's
  eval section and the teacher's lengths, built from the config by `build`."""

  every_steps: int  # 0: only at the end of each phase
  first_step: int  # one more eval after this many steps of each phase (0: none)
  batch_size: int
  num_batches: int
  prompt_length: int  # eval/rnn_prompted_nll starts from E(the first prompt_length tokens)
  context_length: int  # Tc
  future_length: int  # Tf
  seed: int


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """What the samples read (`samples`): the config's samples section, built by `build`."""

  num: int
  temperature: float
  seed: int
  context_length: int  # Tc: a teacher-encoded prompt's window
  rnn_kind: str  # named on the figure


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What every phase of a run shares; built once from a validated config (`build`)."""

  config: Any
  phases: tuple[str, ...]
  steps: dict[str, int]  # each phase's optimiser steps
  source: data.Source  # at the length of the first phase that built it; phases re-crop it
  mesh: jax.sharding.Mesh
  graphdefs: tuple  # (teacher, rnn) NNX graph definitions
  fns: tuple  # (TeacherFns, RNNFns): the pure model functions the objectives call
  abstract_params: Any  # {'teacher', 'rnn'}: ShapeDtypeStructs with their (FSDP) shardings
  batch_sharding: jax.sharding.NamedSharding
  eval_spec: EvalSpec
  sample_spec: SampleSpec

  @property
  def params_sharding(self):
    return shardings_of(self.abstract_params)

  def source_at(self, phase: str) -> data.Source:
    """The data at the sequence length of `phase` (or 'eval')."""
    return with_seq_len(self.source, config_lib.phase_seq_len(self.config, phase))

  def init_params(self):
    """The initial parameters, created directly in their sharded layout (never gathered)."""
    config, vocab_size = self.config, self.source.vocab_size

    @functools.partial(jax.jit, out_shardings=self.params_sharding)
    def init():
      teacher, rnn = build_models(config, vocab_size)
      return {"teacher": nnx.state(teacher), "rnn": nnx.state(rnn)}

    with jax.set_mesh(self.mesh):
      return init()

  def batch(
    self,
    source: data.Source,
    *,
    split: str,
    step: int,
    batch_size: int,
    transform: Callable | None = None,
  ) -> dict[str, jax.Array]:
    """Global batch `step` of `source` as sharded arrays, assembled from this process's rows.

    `transform(step, rows) -> rows` may edit the host rows first (a test seam, e.g. to inject a
    fault); the tokens are checked against the vocabulary after it.
    """
    rows = source.batch(
      split=split,
      step=step,
      batch_size=batch_size,
      seed=self.config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    if transform is not None:
      rows = transform(step, rows)
    data.check_batch_tokens(
      f"data: {source.name} {split} batch {step}", rows["x"], rows["y"], source.vocab_size
    )
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in rows.items()
    }


def build(config, source: data.Source, mesh: jax.sharding.Mesh) -> Experiment:
  """The experiment of a config already validated against `source` and `mesh`.

  Use `experiment.build_experiment(config)`, which validates first; this is the unchecked
  step it ends with. Shapes only: no parameter is created (see `Experiment.init_params`).
  """
  abstract = nnx.eval_shape(lambda: build_models(config, source.vocab_size))
  (tg, t_abs), (rg, r_abs) = nnx.split(abstract[0]), nnx.split(abstract[1])
  params = {"teacher": t_abs, "rnn": r_abs}
  return Experiment(
    config=config,
    phases=tuple(config_lib.phase_names(config)),
    source=source,
    mesh=mesh,
    graphdefs=(tg, rg),
    fns=(teacher_fns(tg), rnn_fns(rg)),
    abstract_params=_abstract(
      params, sharding.state_shardings(params, mesh, min_size=config_lib.fsdp_min_size(config))
    ),
    batch_sharding=sharding.batch_sharding(mesh),
    steps={p: config[p].steps for p in config_lib.phase_names(config)},
    eval_spec=EvalSpec(
      every_steps=config.eval.every_steps,
      first_step=config.eval.first_step,
      batch_size=config.eval.batch_size,
      num_batches=config.eval.num_batches,
      prompt_length=config.eval.prompt_length,
      context_length=config.smt.context_length,
      future_length=config.smt.future_length,
      seed=config.seed,
    ),
    sample_spec=SampleSpec(
      num=config.samples.num,
      temperature=config.samples.temperature,
      seed=config.seed,
      context_length=config.smt.context_length,
      rnn_kind=config.model.rnn_kind,
    ),
  )


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase of an experiment: its data, optimiser, loss and compiled train step."""

  exp: Experiment
  name: str  # 'smt', 'dmt' or 'bptt'
  index: int  # its position in config.phases
  offset: int  # the global step of its step 0 (the steps of the phases before it)
  steps: int
  batch_size: int
  source: data.Source  # at this phase's sequence length
  schedule: optax.Schedule
  optimizer: optax.GradientTransformation
  loss_fn: Callable  # (params, batch, key) -> (loss, metrics), with the mesh's constraints
  abstract_state: dict  # {'params', 'opt_state'}: ShapeDtypeStructs with their shardings
  # jitted, sharded, donated: (state, batch, key) -> (state, metrics), one optimiser step; with
  # accum_steps > 1 one micro-batch of it (`make_micro_step`): see `train_step`.
  step: Callable
  init_opt_state: Callable  # params -> a fresh optimiser state (with the accumulator's sums)
  accum_steps: int = 1
  # The length curriculum (`warmup_config`): this phase on the shorter episodes, for its first
  # warmup_steps steps.
  warmup: Phase | None = None
  warmup_steps: int = 0

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.source.seq_len

  def at(self, step: int) -> Phase:
    """The phase that trains step `step` of this one: its warm-up, or itself."""
    return self.warmup if self.warmup is not None and step < self.warmup_steps else self

  def train_step(self, state, batch, key, stop: Callable | None = None):
    """One optimiser step: `step`, or its micro-batches one call each from the state's next one
    (a state restored mid-accumulation continues where it stopped). When `stop()` turns true
    between two micro-batches it returns (state, None): the sums so far are in the state."""
    if self.accum_steps == 1:
      return self.step(state, batch, key)
    first = int(state["opt_state"]["micro"])  # 0 unless resumed mid-accumulation
    for j in range(first, self.accum_steps):
      state, metrics = self.step(state, batch, key)
      if j + 1 < self.accum_steps and stop is not None and stop():
        return state, None
    return state, metrics

  def init_state(self, params, opt_state=None) -> dict:
    """{'params', 'opt_state'} in the step's layout; a fresh optimiser state (created sharded)
    unless `opt_state` is given (a resumed phase)."""
    shardings = shardings_of(self.abstract_state)
    params = jax.device_put(params, shardings["params"])  # a no-op when already in place
    if opt_state is None:
      with jax.set_mesh(self.exp.mesh):
        opt_state = jax.jit(self.init_opt_state, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state}

  def batch(self, step: int, transform: Callable | None = None) -> dict[str, jax.Array]:
    """The training batch of global step `step`."""
    return self.exp.batch(
      self.source, split="train", step=step, batch_size=self.batch_size, transform=transform
    )


def make_phase(
  exp: Experiment,
  name: str,
  *,
  wrap_loss: Callable | None = None,
) -> Phase:
  """Builds phase `name` of `exp` (nothing is compiled until its step first runs).

  wrap_loss: `loss_fn -> loss_fn`, applied before the step is built (a test seam).
  """
  c = exp.config
  index = exp.phases.index(name)
  schedule = make_schedule(c, name)
  optimizer = make_optimizer(c, name, schedule)
  loss_fn = make_loss(c, name, exp.fns, constrain_time=sharding.time_constraint(exp.mesh))
  if wrap_loss is not None:
    loss_fn = wrap_loss(loss_fn)
  loss_fn = sharding.start_together(exp.mesh, loss_fn)
  k, init_opt_state = config_lib.grad_accum_steps(c), optimizer.init
  if k > 1:  # the accumulator's sums live in the optimiser state: checkpointed with it
    rows = jax.ShapeDtypeStruct((c[name].batch_size // k, exp.source_at(name).seq_len), jnp.int32)
    key = jax.eval_shape(jax.random.key, 0)
    _, metrics = jax.eval_shape(loss_fn, exp.abstract_params, {"x": rows, "y": rows}, key)
    init_opt_state = init_accumulator(optimizer, k, metrics)
  opt_state = jax.eval_shape(init_opt_state, exp.abstract_params)
  abstract_state = {
    "params": exp.abstract_params,
    "opt_state": _abstract(
      opt_state, sharding.state_shardings(opt_state, exp.mesh, min_size=config_lib.fsdp_min_size(c))
    ),
  }
  w, _ = config_lib.warmup(c)
  warm = None
  if index == 0 and w:  # the curriculum's short episodes: the same state, its own step
    short = config_lib.warmup_config(c)
    warm = make_phase(
      dataclasses.replace(exp, config=short, source=source_of(short)), name, wrap_loss=wrap_loss
    )
  state_sharding = shardings_of(abstract_state)
  step = jax.jit(
    sharding.traced_on(
      exp.mesh,
      make_micro_step(loss_fn, optimizer, k) if k > 1 else make_train_step(loss_fn, optimizer),
    ),
    in_shardings=(state_sharding, exp.batch_sharding, None),
    out_shardings=(state_sharding, None),
    donate_argnums=0,
  )
  return Phase(
    exp=exp,
    name=name,
    index=index,
    offset=int(sum(c[p].steps for p in exp.phases[:index])),
    steps=c[name].steps,
    batch_size=c[name].batch_size,
    source=exp.source_at(name),
    schedule=schedule,
    optimizer=optimizer,
    loss_fn=loss_fn,
    abstract_state=abstract_state,
    step=step,
    init_opt_state=init_opt_state,
    accum_steps=k,
    warmup=warm,
    warmup_steps=w if warm is not None else 0,
  )


def restore_targets(exp: Experiment, phases: list[Phase] | None = None) -> dict:
  """`checkpoints.restore`'s abstract targets for `exp`: its phase names, parameters and each
  phase's optimiser state (`phases`: those already built; None builds them, compiling nothing)."""
  phases = phases if phases is not None else [make_phase(exp, p) for p in exp.phases]
  return {
    "phases": exp.phases,
    "params": exp.abstract_params,
    "opt_states": [p.abstract_state["opt_state"] for p in phases],
  }


# ---------------------------------------------------------------------------------------------
# Compute accounting: the x-axes runs are compared on (tokens seen, SeqFLOPs).


def unit_flops(exp: Experiment) -> dict[str, float]:
  """FLOPs XLA counts for one update / readout / encoder window / decoder call, one sequence.

  Lowered on the abstract parameters: nothing is created or compiled."""
  c = exp.config
  tfns, rfns = exp.fns
  strip = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  tp, rp = strip(exp.abstract_params["teacher"]), strip(exp.abstract_params["rnn"])
  k, d = c.model.num_memory_tokens, c.model.width
  m = jax.ShapeDtypeStruct((1, k, d), jnp.float32)
  tokens = lambda n: jax.ShapeDtypeStruct((1, n), jnp.int32)
  return {
    "update": analysis.count_flops(rfns.update, rp, m, jax.ShapeDtypeStruct((1,), jnp.int32)),
    "readout": analysis.count_flops(rfns.readout, rp, m),
    "encode": analysis.count_flops(tfns.encode, tp, tokens(c.smt.context_length)),
    "decode": analysis.count_flops(tfns.decode, tp, m, tokens(max(1, c.smt.future_length))),
  }


def work_per_step(exp: Experiment, phase: str, flops: dict[str, float]) -> float:
  """All the FLOPs of one training step of `phase` (every row; a backward pass counted as twice
  its forward), from `unit_flops`: a model of the matmul work, for comparing phases' costs
  (the runner's ETA), not a count.
    bptt: 3 T (f_update + f_readout)
    dmt:  (Td / k + 1) f_encode (the frozen teacher's labels) + 3 Td (f_update + f_readout)
    smt:  3 (W f_encode + N f_update + D (f_decode + f_readout)), with W = 1 window for the
          one-pass teacher, N + 1 for the windowed one; N transitions, D decoded memories"""
  c = exp.config
  fu, fr, fe, fd = (flops[k] for k in ("update", "readout", "encode", "decode"))
  if phase == "bptt":
    per_row = 3.0 * config_lib.phase_seq_len(c, phase) * (fu + fr)
  elif phase == "dmt":
    td = c.dmt.rollout_length
    per_row = (td // c.dmt.label_every + 1) * fe + 3.0 * td * (fu + fr)
  else:
    n = c.smt.num_transitions
    windows = 1 if c.model.teacher_kind == "causal" else n + 1
    decoded = c.smt.num_decoded or n + 1
    per_row = 3.0 * (windows * fe + n * fu + decoded * (fd + fr))
  return c[phase].batch_size * per_row


def step_costs(phases: list[Phase], flops: dict[str, float]) -> tuple:
  """Per phase: (warm-up steps, (tokens, SeqFLOPs) of one of them, (tokens, SeqFLOPs) of one
  other step). SeqFLOPs count the serial critical path of one sequence (batch rows run in
  parallel; the tokens axis counts them), as in `analysis.seq_flops_per_step`."""

  def cost(p: Phase, f) -> tuple[int, float]:
    return p.tokens_per_step, seq_flops_per_step(p.exp, p.name, f)

  return tuple(
    (
      p.warmup_steps,
      cost(p.warmup, unit_flops(p.warmup.exp)) if p.warmup else (0, 0.0),
      cost(p, flops),
    )
    for p in phases
  )


def progress(config, costs: tuple, index: int, done: int) -> dict:
  """Tokens seen and SeqFLOPs spent after `done` steps of phase #index, over the whole run
  (`costs`: `step_costs`)."""
  tokens, seqflops = 0, 0.0
  for i, (w, (t0, f0), (t, f)) in enumerate(costs[: index + 1]):
    n = done if i == index else config[config_lib.phase_names(config)[i]].steps
    short = min(n, w)
    tokens += short * t0 + (n - short) * t
    seqflops += short * f0 + (n - short) * f
  return {"tokens": tokens, "seqflops": seqflops}


def seq_flops_per_step(exp: Experiment, phase: str, flops: dict[str, float]) -> float:
  """SeqFLOPs of one training step of `phase`: FLOPs on its serial critical path, for one
  sequence (`analysis.seq_flops_per_step`; `flops` from `unit_flops`)."""
  c = exp.config
  return analysis.seq_flops_per_step(
    phase,
    seq_len=config_lib.phase_seq_len(c, phase),
    rollout_length=c.dmt.rollout_length,
    carry_grad=not c.dmt.stop_carry_grad,
    truncation=c.bptt.truncation,
    f_update=flops["update"],
    f_readout=flops["readout"],
    f_encode=flops["encode"],
    f_decode=flops["decode"],
  )


# ---------------------------------------------------------------------------------------------
# A run, built from its config: every check first.


def build_experiment(config, *, make_source: Callable | None = None) -> Experiment:
  """Validates `config` (alone, then with the mesh, then with the data) and builds its experiment.

  Every check runs before anything is compiled, and the checks that need no data before the data
  is loaded. `make_source(config) -> data.Source` replaces the config's dataset (a test seam).
  A config saved by an older version is completed from today's defaults (`config_lib.complete`).
  """
  config = config_lib.complete(config)
  config_lib.validate(config)
  mesh = config_lib.make_mesh(config)
  config_lib.validate_with_mesh(config, mesh)
  try:
    source = (make_source or source_of)(config)
  except ValueError as e:  # bad data (missing, too short, out-of-vocabulary tokens): say so
    raise config_lib.ConfigError(f"data {config.data.name!r}: {e}") from e
  validate_with_source(config, source)
  return build(config, source, mesh)


def validate_with_source(config, source: data.Source) -> None:
  """Checks that need the dataset: stream lengths, then the tokens of a real batch per phase."""
  c = config
  for phase in config_lib.phase_names(c) + ["eval"]:
    split = "eval" if phase == "eval" else "train"
    fields = " + ".join(config_lib.length_fields(c, phase))
    s = with_seq_len(source, config_lib.phase_seq_len(c, phase))
    if isinstance(source, data.StreamSource) and len(source.streams[split]) < s.seq_len + 1:
      raise config_lib.ConfigError(
        f"config.{fields} = {s.seq_len}: {phase} crops {s.seq_len + 1} tokens, but the "
        f"{c.data.name} {split} stream holds only {len(source.streams[split])}; shorten it or "
        f"use more data."
      )
    batch = s.batch(split=split, step=0, batch_size=1, seed=c.seed)
    if batch["x"].shape[1] != s.seq_len:
      raise config_lib.ConfigError(
        f"data: {c.data.name} gave sequences of length {batch['x'].shape[1]} for "
        f"{phase}, expected {s.seq_len} ({fields})."
      )
    try:
      data.check_batch_tokens(
        f"data: {c.data.name} {split} batch 0", batch["x"], batch["y"], source.vocab_size
      )
    except ValueError as e:
      options = dict(c.data.options[c.data.name])
      raise config_lib.ConfigError(f"{e} (config.data.options.{c.data.name} = {options})") from None
  if isinstance(source, data.PixelSource) and len(source.images("eval")) < c.samples.num:
    config_lib._fail(
      "samples.num",
      c.samples.num,
      f"samples.png shows that many eval images, but {c.data.name} has "
      f"{len(source.images('eval'))}; lower samples.num or add evaluation images.",
    )
