"""The SMT, DMT and BPTT objectives: pure functions (params, batch, key, *, hyper-parameters).

Each returns `(loss, metrics)` and works under `jax.jit`, `jax.grad`, `jax.vmap` and sharding. The
models enter as plain functions of their parameters (`TeacherFns`, `RNNFns`: the memory contract,
`smt_jax.contract`), so any RNN cell written in any JAX library can be trained: nothing here
imports Flax.

Time indexing (docs/method.md sections 2-5). A batch holds x, y int [B, T]; y[t] is predicted after
reading x[0..t]; y == -1 means no target. The teacher's memory at time t is m_t = E(x[t-Tc+1 .. t])
(left-padded with -1; t = -1 is the empty context, giving the initial memory). m_t's decoder
predicts y[t .. t+Tf-1] from x[t+1 .. t+Tf]. An RNN transition is (m_t, x[t+1]) -> m_{t+1};
readout(m_t) predicts y[t].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np

from smt_jax import losses, parallel, sharding
from smt_jax.contract import Batch, Params, RNNFns, TeacherFns, check_batch_against_models


def _check_params(params: Params, keys: tuple[str, ...], what: str) -> None:
  if not hasattr(params, "keys") or any(k not in params for k in keys):
    raise ValueError(
      f"{what}: params must be a mapping with entries {list(keys)} (the models' "
      f"parameters), got {type(params).__name__}"
      f"{' with ' + str(list(params.keys())) if hasattr(params, 'keys') else ''}."
    )


def _check_batch(batch: Batch, min_len: int, what: str) -> tuple[jax.Array, jax.Array]:
  if not hasattr(batch, "keys") or "x" not in batch or "y" not in batch:
    raise ValueError(
      f"{what}: batch must be a mapping {{'x': int [B, T], 'y': int [B, T]}}, got "
      f"{type(batch).__name__}."
    )
  x, y = batch["x"], batch["y"]
  if x.ndim != 2 or x.shape != y.shape:
    raise ValueError(
      f"batch['x'] and batch['y'] must both be int [B, T]; got {x.shape} and {y.shape}."
    )
  for name, v in (("x", x), ("y", y)):
    if not jnp.issubdtype(v.dtype, jnp.integer):
      raise ValueError(f"batch['{name}'] must hold integer tokens, got dtype {v.dtype}.")
  if x.shape[1] < min_len:
    raise ValueError(f"sequence length T = {x.shape[1]} is too short: {what} needs T >= {min_len}.")
  return x, y


def _positive(**kwargs) -> None:
  for name, v in kwargs.items():
    if v is None or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v}.")


def windows(x: jax.Array, ends: jax.Array, length: int) -> jax.Array:
  """Context windows x[t-length+1 .. t] for each t in `ends`, left-padded with -1.

  Args:
    x: int [B, T]. ends: int [N], each in [-1, T-1] (-1 gives an all-padding window).
  Returns:
    int [B, N, length].
  """
  idx = ends[:, None] - length + 1 + jnp.arange(length)  # [N, length]
  return jnp.where(idx >= 0, x[:, jnp.clip(idx, 0, x.shape[1] - 1)], -1)


def shifted(v: jax.Array, start: jax.Array, length: int) -> jax.Array:
  """v[:, s + j] for s in `start` and j < length, -1 outside [0, T): int [B, N, length].

  `start` is int [N] (the same times for every row) or [B, N] (each row its own).
  """
  idx = start[..., None] + jnp.arange(length)
  ok = (idx >= 0) & (idx < v.shape[1])
  safe = jnp.clip(idx, 0, v.shape[1] - 1)
  got = v[:, safe] if start.ndim == 1 else jax.vmap(lambda row, i: row[i])(v, safe)
  return jnp.where(ok, got, -1)


def scored_windows(y: jax.Array, times: jax.Array, length: int) -> jax.Array:
  """How many targets each memory's future window y[t .. t+length-1] holds: int [B, G].

  times: int [G], memory times in [-1, T-1]. A window with none contributes exactly zero to the
  decoding loss (every term is masked), so its decoder pass can be skipped.
  """
  has = (y != -1).astype(jnp.int32)
  before = jnp.pad(jnp.cumsum(has, axis=1), ((0, 0), (1, 0)))  # before[:, i] = #targets in y[:i]
  t = y.shape[1]
  return before[:, jnp.clip(times + length, 0, t)] - before[:, jnp.clip(times, 0, t)]


def decoded_memories(
  y: jax.Array, times: jax.Array, length: int, num: int, key: jax.Array | None
) -> jax.Array:
  """Which `num` of the memories at `times` [G] each sequence decodes: indices int [B, num].

  Memories whose future window holds a target come first, in random order (`key`; None: in time
  order), so when a sequence has at most `num` of them every one is decoded and the decoding loss
  equals the full one exactly; otherwise it is the masked mean over a uniform random `num` of them.
  """
  scored = scored_windows(y, times, length) > 0
  noise = (
    jnp.zeros(scored.shape)
    if key is None
    else jax.random.uniform(key, scored.shape, minval=0.0, maxval=0.5)
  )
  # Scored windows rank in [1, 1.5), the others in [0, 0.5); ties (key None) go to earlier times.
  rank = jnp.where(scored, 1.0, 0.0) + noise - 1e-6 * jnp.arange(times.shape[0])
  return jax.lax.top_k(rank, num)[1]


def encode_over_time(teacher: TeacherFns, params: Params, context: jax.Array) -> jax.Array:
  """Teacher memories for many windows at once: vmap of E over the time axis.

  context int [B, N, Tc] -> memories [B, N, K, d].
  """
  if context.ndim != 3 or not jnp.issubdtype(context.dtype, jnp.integer):
    raise ValueError(
      f"context must be int [B, N, Tc] (windows per time position), got "
      f"{context.dtype} {context.shape}."
    )
  return jax.vmap(teacher.encode, in_axes=(None, 1), out_axes=1)(params, context)


def teacher_memories(
  teacher: TeacherFns,
  params: Params,
  x: jax.Array,
  times: jax.Array,
  context_length: int,
  constrain: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
  """The teacher's memories m_t for t in `times` (int [N], each in [-1, T-1]): [B, N, K, d].

  A windowed teacher encodes the N windows x[t-Tc+1 .. t] (vmapped, `constrain` applied to the
  windows, so a 'time' mesh axis splits the encoder's work); a one-pass teacher encodes the
  sequence once, computing only the N memories asked for when it has `encode_at` (else all of
  them, then gathered; `constrain` applied to them).
  """
  constrain = constrain or (lambda a: a)
  if teacher.encode_at is not None:
    return constrain(teacher.encode_at(params, x, times))
  if teacher.encode_all is not None:
    return constrain(jnp.take(teacher.encode_all(params, x), times + 1, axis=1))
  return encode_over_time(teacher, params, constrain(windows(x, times, context_length)))


def transition_positions(
  seq_len: int, num_transitions: int, context_length: int, key: jax.Array | None
) -> jax.Array:
  """Which memory times t the SMT loss trains, as int [N] in [-1, T-2].

  num_transitions == 1: the published recipe, t = Tc-1 (windows x[0:Tc] and x[1:Tc+1], input x[Tc]).
  num_transitions == T: every transition of the sequence, t = -1 .. T-2
    (from the initial memory on).
  Otherwise a sorted random subset of that range, shared by the batch, drawn with `key`.
  """
  if not 1 <= num_transitions <= seq_len:
    raise ValueError(f"num_transitions must be in [1, T={seq_len}], got {num_transitions}.")
  if num_transitions == 1:
    if seq_len < context_length + 1:
      raise ValueError(
        f"num_transitions=1 uses t = Tc-1 and input x[Tc]: needs T >= Tc + 1 = "
        f"{context_length + 1}, got T = {seq_len}."
      )
    return jnp.array([context_length - 1])
  if num_transitions == seq_len:
    return jnp.arange(-1, seq_len - 1)
  if key is None:
    raise ValueError("a PRNG key is needed to draw a random subset of transitions.")
  return jnp.sort(
    jax.random.choice(key, jnp.arange(-1, seq_len - 1), (num_transitions,), replace=False)
  )


def smt_loss(
  params: Params,
  batch: Batch,
  key: jax.Array | None,
  *,
  teacher: TeacherFns,
  rnn: RNNFns,
  context_length: int,
  future_length: int,
  num_transitions: int = 1,
  num_decoded: int = 0,
  c_dec: float = 1.0,
  c_dyn: float = 0.1,
  c_unif: float = 1e-3,
  c_readout: float = 1.0,
  c_init: float = 0.1,
  gamma: float = 1.0,
  stop_teacher_grad: bool = False,
  uniformity_max_samples: int = 512,
  uniformity_temperature: float = 2.0,
  uniformity_over: str = "tokens",
  constrain_time: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised Memory Training: teacher + RNN, every transition in parallel over time.

    L = c_dec L_dec + c_dyn L_dyn + c_init L_init + c_unif L_unif + c_readout L_readout

  With c_init = c_readout = 0 this is the reference's `forward_smt` (its loss and each term).

  L_dec     decoding_loss of D(m_t, x[t+1 .. t+Tf]) against y[t .. t+Tf-1] (gamma-discounted);
  L_dyn     MSE(update(m_t, x[t+1]), m_{t+1}), the one-step transition regression;
  L_init    MSE(RNN initial memory, E(empty)), so the RNN starts where the teacher does (not in
            the reference);
  L_unif    uniformity_loss of the memories (per token, or per whole state);
  L_readout CE(readout(stop_gradient(m_{t+1})), y[t+1]): trains the RNN's readout on teacher
            memories (no gradient into the teacher; not in the reference, whose readout learns in
            DMT and takes the decoder's weights at the end of SMT).
  All teacher memories come from one `vmap` of the encoder over time positions and all RNN
  transitions from one `vmap` of `update`: no unrolling, an O(1) gradient path between any tokens.

  Where to start (the published defaults, docs/method.md section 6, and what the configs use):
    num_transitions  1 on long streams (text, pixels: the paper's main runs, T = Tc + Tf, the
                     cheapest step); T on short episodic tasks (the probes: every memory of a
                     sequence trained, from the initial memory on, which an RNN that must start
                     from its own initial memory needs); in between, a random subset per batch
                     (more transitions per sequence for the same teacher work; pixels.py uses 2).
    c_dyn            0.1. It also pushes the teacher's memories towards what the RNN can
                     predict (the gradient flows into the encoder unless stop_teacher_grad); much
                     larger values can collapse the memories (watch uniformity_loss).
    learning rate    AdamW 3e-4 with b2 0.95, weight decay 0.01, clip 1.0 per model, 1% warm-up
                     then constant (batch 128); the small CPU configs train at 1e-3. Teacher and
                     RNN train together: `smt_jax.adamw_per_model(lr)`.
    context_length   long enough to hold what the future depends on (the memory can only keep
                     what the window shows); the probes use Tc = T.

  Args:
    params: {'teacher': teacher params, 'rnn': RNN params}.
    batch: {'x': int [B, T], 'y': int [B, T]}.
    key: PRNG key (random transition subset, uniformity subset); may be None when
      num_transitions is 1 or T and the memories number at most `uniformity_max_samples`.
    teacher, rnn: the models as pure functions.
    context_length: Tc, the encoder's window. future_length: Tf, the decoder's horizon.
    num_transitions: 1 (t = Tc-1, the published recipe), T (all), or a random subset size.
    num_decoded: 0 decodes every source memory (the published recipe). Else each sequence
      decodes this many of its encoded memories (with every transition: all T+1 of them), those
      whose future window holds a target first, picked at random (`key`): the decoder's work is
      then num_decoded windows per sequence however many transitions the RNN trains, and windows
      without a target (an exact zero in L_dec) cost nothing while scored ones remain. L_readout
      then reads the decoded memories too (readout(m_t) predicts y[t]).
    stop_teacher_grad: if True, L_dyn and L_init do not train the teacher.
    constrain_time: optional function applied to every [B, N, ...] array over time positions
      (e.g. a sharding constraint putting N on a 'time' mesh axis).

  Returns:
    (loss, metrics) with the weighted terms and diagnostics.
  """
  _positive(context_length=context_length, future_length=future_length)
  if uniformity_over not in ("tokens", "states"):
    raise ValueError(f"uniformity_over must be 'tokens' or 'states', got {uniformity_over!r}.")
  x, y = _check_batch(batch, 2, "smt_loss")
  _check_params(params, ("teacher", "rnn"), "smt_loss")
  check_batch_against_models(
    params, batch, rnn=rnn, teacher=teacher, context_length=context_length, caller="smt_loss"
  )
  seq_len = x.shape[1]
  if num_decoded < 0:
    raise ValueError(f"num_decoded must be >= 0 (0: every source memory), got {num_decoded}.")
  k_pos, k_unif = jax.random.split(key) if key is not None else (None, None)
  k_dec = jax.random.fold_in(key, 2) if key is not None else None
  src = transition_positions(seq_len, num_transitions, context_length, k_pos)  # [N]
  n = src.shape[0]
  tp, rp = params["teacher"], params["rnn"]
  constrain = constrain_time or (lambda a: a)

  # Teacher labels: memories at t (sources) and t+1 (targets). With every transition, the two sets
  # overlap in all but one position, so encode t = -1 .. T-1 once and slice.
  if n == seq_len:
    mem_times = jnp.arange(-1, seq_len)
    mem = teacher_memories(teacher, tp, x, mem_times, context_length, constrain)
    m_src, m_tgt = mem[:, :-1], mem[:, 1:]  # [B, N, K, d]
  else:
    mem_times = src
    mem = teacher_memories(
      teacher, tp, x, jnp.concatenate([src, src + 1]), context_length, constrain
    )
    m_src, m_tgt = mem[:, :n], mem[:, n:]
  m_src, m_tgt = constrain(m_src), constrain(m_tgt)

  # Decoding loss: every source memory predicts its Tf future targets; or, with num_decoded, a
  # random num_decoded of the memories (all T+1 with every transition) whose window is scored.
  if num_decoded:
    if num_decoded > mem_times.shape[0]:
      raise ValueError(
        f"num_decoded = {num_decoded} exceeds the {mem_times.shape[0]} memories encoded per "
        f"sequence; set it <= {mem_times.shape[0]} (0: every source memory)."
      )
    pick = decoded_memories(y, mem_times, future_length, num_decoded, k_dec)  # [B, num_decoded]
    dec_t = mem_times[pick]
    m_dec = jnp.take_along_axis(mem if n == seq_len else m_src, pick[:, :, None, None], axis=1)
  else:
    dec_t, m_dec = src, m_src
  y_future = constrain(shifted(y, dec_t, future_length))  # [B, N_dec, Tf]
  x_future = constrain(shifted(x, dec_t + 1, future_length))
  logits = jax.vmap(teacher.decode, in_axes=(None, 1, 1), out_axes=1)(tp, m_dec, x_future)
  l_dec = losses.decoding_loss(logits, y_future, gamma=gamma)

  # Dynamics loss: the RNN's one-step transitions, all in parallel over time.
  teacher_out = jax.lax.stop_gradient if stop_teacher_grad else (lambda a: a)
  x_next = constrain(x[:, src + 1])  # [B, N]
  predicted = jax.vmap(rnn.update, in_axes=(None, 1, 1), out_axes=1)(rp, teacher_out(m_src), x_next)
  l_dyn = losses.dynamics_loss(predicted, teacher_out(m_tgt))
  if c_init:
    m_init = teacher.encode(tp, jnp.full((1, context_length), -1, x.dtype))[0]
    l_init = losses.dynamics_loss(rnn.initial_memory(rp)[None], teacher_out(m_init)[None])
  else:
    l_init = jnp.zeros((), jnp.float32)

  # Uniformity over the source memories (tokens, or whole flattened states).
  unif_in = (
    m_src if uniformity_over == "tokens" else einops.rearrange(m_src, "b n k d -> b n (k d)")
  )
  l_unif = _whole_batch(
    functools.partial(
      losses.uniformity_loss, max_samples=uniformity_max_samples, temperature=uniformity_temperature
    ),
    unif_in,
    k_unif,
  )

  # Readout on teacher memories m_{t+1}, predicting y[t+1] (skipped when off, as L_init: a zero
  # weight would still cost its forward and backward passes); with num_decoded, on the decoded
  # memories m_t, predicting y[t] (the first target of their window).
  if c_readout:
    r_mem, r_t = (m_dec, dec_t) if num_decoded else (m_tgt, src + 1)
    y_next = constrain(shifted(y, r_t, 1)[..., 0])  # [B, N]
    r_logits = jax.vmap(rnn.readout, in_axes=(None, 1), out_axes=1)(
      rp, jax.lax.stop_gradient(r_mem)
    )
    r_ce, r_mask = losses.masked_cross_entropy(r_logits, y_next)
    l_readout = losses.masked_mean(r_ce, r_mask)
  else:
    l_readout = jnp.zeros((), jnp.float32)

  loss = c_dec * l_dec + c_dyn * l_dyn + c_init * l_init + c_unif * l_unif + c_readout * l_readout
  metrics = {
    "loss": loss,
    "decoding_loss": l_dec,
    "dynamics_loss": l_dyn,
    "init_loss": l_init,
    "uniformity_loss": l_unif,
    "readout_loss": l_readout,
    "one_step_drift_1mr2": losses.drift(
      jax.lax.stop_gradient(predicted), jax.lax.stop_gradient(m_tgt)
    )["one_minus_r2"],
    "num_targets": jnp.sum(y_future != -1).astype(jnp.float32),
  }
  return loss, metrics


def rollout(
  params: Params,
  memory: jax.Array,
  inputs: jax.Array,
  *,
  update: Callable,
  stop_gradient_every: int | None = None,
  remat: bool = True,
  unroll: int = 1,
) -> jax.Array:
  """Runs the RNN with `lax.scan`: the states after reading each input.

  Args:
    params: RNN params. memory: [B, K, d], the state before inputs[:, 0].
    inputs: int [B, L].
    update: (params, m, x) -> m'.
    stop_gradient_every: None lets gradients flow through the whole unroll (BPTT); 1 stops them
      before every update (on-policy imitation, DMT); k > 1 truncates every k steps (TBPTT).

  Returns:
    states [B, L, K, d]: states[:, i] has read inputs[:, :i+1].

  Under a mesh that splits the batch (`jax.set_mesh`), each device scans its own rows and the
  parameters' gradient is all-reduced once, after the loop (`_rows_apart`).
  """
  parallel.check_rollout_inputs(memory, inputs)
  if stop_gradient_every is not None:
    _positive(stop_gradient_every=stop_gradient_every)
  # prevent_cse=False: scan already keeps iterations apart, and the barrier would block fusion.
  update_step = jax.checkpoint(update, prevent_cse=False) if remat else update

  def run(params, memory, inputs):
    def step(m, xs):
      i, x_t = xs
      if stop_gradient_every is not None:
        # Cut before update i when i is a multiple of k; with k > 1 the first segment still reaches
        # the initial memory (truncated BPTT trains it), with k == 1 nothing crosses a step.
        cut = (i % stop_gradient_every == 0) & ((i > 0) | (stop_gradient_every == 1))
        m = jnp.where(cut, jax.lax.stop_gradient(m), m)
      m = update_step(params, m, x_t)
      return m, m

    steps = jnp.arange(inputs.shape[1])
    _, states = jax.lax.scan(step, memory, (steps, inputs.T), unroll=unroll)  # [L, B, K, d]
    return jnp.swapaxes(states, 0, 1)

  return _rows_apart(run, params, memory, inputs)


def _split_batch_axes(rows: int) -> tuple[str, ...]:
  """The current mesh's (`jax.set_mesh`) batch axes of more than one device, when `rows` divide
  evenly across them; () otherwise (no mesh, one device, or uneven rows)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  return () if rows % int(np.prod([mesh.shape[a] for a in axes])) else axes


def _rows_apart(run: Callable, params: Params, memory: jax.Array, inputs: jax.Array) -> jax.Array:
  """run(params, memory, inputs) with each device's rows scanned on their own when the current
  mesh (`jax.set_mesh`) splits the batch over several devices and B divides evenly.

  Under plain `jit` the parameters' gradient of a scan is a replicated carry of the backward
  scan, so XLA's partitioner all-reduces every iteration's contribution across the batch devices
  (a collective per time step). Here the rows are `shard_map`ped over the batch axes and the
  parameters made device-varying once, before the scan: each device sums its own rows' gradient
  through the whole unroll and the one all-reduce happens at the end, as for any data-parallel
  gradient. Same values; without such a mesh, `run` itself.
  """
  axes = _split_batch_axes(memory.shape[0])
  if not axes:
    return run(params, memory, inputs)

  def local(params, memory, inputs):
    params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)
    return run(params, memory, inputs)

  rows = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(
    local,
    in_specs=(jax.sharding.PartitionSpec(), rows, rows),
    out_specs=rows,
    axis_names=set(axes),
  )(params, memory, inputs)


def _whole_batch(fn: Callable, tokens: jax.Array, key: jax.Array | None) -> jax.Array:
  """fn(tokens, key=key) over the whole batch's tokens [B, ...], computed on every device from one
  all-gather of them when the current mesh splits the batch over several devices.

  A term that pairs every row with every other (the uniformity loss) is otherwise split by rows by
  XLA's partitioner, which then meets the other devices four times (gathering the tokens and their
  norms, reducing the logsumexp's max and sum) and once more in the backward pass. Here each device
  gathers the tokens once (in row order: the same subset and value as on one device), computes the
  small term whole, and takes its own rows' gradient by slicing, with no collective.
  """
  axes = _split_batch_axes(tokens.shape[0])
  if not axes:
    return fn(tokens, key=key)

  def whole(tokens, key):
    return fn(jax.lax.all_gather(tokens, axes, axis=0, tiled=True, to="invarying"), key=key)

  P = jax.sharding.PartitionSpec
  return jax.shard_map(whole, in_specs=(P(axes), P()), out_specs=P(), axis_names=set(axes))(
    tokens, key
  )


def readout_over_time(rnn: RNNFns, params: Params, states: jax.Array) -> jax.Array:
  """vmap of readout over time: states [B, L, K, d] -> logits [B, L, V]."""
  return jax.vmap(rnn.readout, in_axes=(None, 1), out_axes=1)(params, states)


def dmt_loss(
  params: Params,
  batch: Batch,
  key: jax.Array | None = None,
  *,
  teacher: TeacherFns,
  rnn: RNNFns,
  context_length: int,
  rollout_length: int,
  label_every: int,
  c_dyn: float = 10.0,
  c_readout: float = 1.0,
  stop_carry_grad: bool = False,
  start: int | None = None,
  reference_labels: bool = False,
  from_rnn_initial_memory: bool = False,
  rollout_solver: str = "sequential",
  parallel_options: dict | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DAgger Memory Training: the RNN imitates the frozen teacher along its own rollout.

  The rollout starts at memory time t0 = `start` (default Tc-1, the stream recipe; -1 starts from
  the initial memory, as for episodic tasks). Labels are the teacher's memories
  m_enc(s) = m_{t0+s} = E(x[t0+s-Tc+1 .. t0+s]) (for t0 = Tc-1: E(x[s .. s+Tc-1])) every k steps.
  The RNN starts from m_enc(0) (with `from_rnn_initial_memory`, from its own initial memory, where
  its evaluation starts) and reads x[t0+1 ..] with `lax.scan`; its state after s inputs is state_s.

    L = c_dyn * mean_{s in S} MSE(state_s, m_enc(s))
        + c_readout * mean_{s in R} CE(readout(stop_gradient(state_s)), y[t0+s])

  Default: S = {k, 2k, .., Td}, R = {0, .., Td} (every label is of a state the RNN wrote).
  reference_labels: the reference's `forward_dmt`, S = {0, k, .., Td-k} (s = 0, where state and
  label coincide, counts in the mean) and R = {0, .., Td-1}.

  stop_carry_grad=False (default) lets the gradient of every label flow back through the whole
  rollout, as the reference's code does (its `detach_rnn=True`); it measured better on digits
  (docs/parity.md). True applies stop_gradient to the carried state before every update, so each
  label trains only the last update (on-policy imitation, no backpropagation through time, as
  docs/method.md section 5 describes DMT; cheaper). The teacher gets no gradient.

  Where to start: c_dyn 10, c_readout 1, Td 256, k 16, AdamW lr 3e-5 with warm-up then cosine
  decay, batch 32 (published, after 150k SMT steps; the small CPU configs use 3e-4 after a
  1e-3 SMT phase, i.e. about a tenth of the SMT learning rate), for about 1% of SMT's steps.
  The teacher is frozen, but `optax.adamw`'s decoupled weight decay would still shrink its
  parameters (the update -lr * wd * p needs no gradient): zero its updates,
  `smt_jax.adamw_per_model(lr, frozen=("teacher",))`, as the runner does.

  Args:
    params: {'teacher': ..., 'rnn': ...}. batch: x, y int [B, T] with T >= t0 + 1 + Td.
    key: unused (the signature matches the other objectives).
    context_length: Tc. rollout_length: Td. label_every: k (must divide Td).
    start: t0, the memory time the rollout starts from (None: Tc - 1).
    from_rnn_initial_memory: with start = -1, the rollout starts from the RNN's own initial
      memory (`rnn.initial_memory`, trained here too) instead of the teacher's E(empty): where
      the RNN alone starts when it is evaluated or sampled. The labels stay the teacher's.
    rollout_solver: 'sequential' (`lax.scan`) or 'parallel': the rollout, and with gradients
      through it their adjoint, solved by quasi-Newton iterations in parallel over time
      (`smt_jax.parallel_rollout`; `parallel_options`: its jacobian, damping, tol, max_iters).
      The same loss and gradients to the tolerance; its metrics add 'rollout_iters'.

  Returns:
    (loss, metrics) including drift ('drift_mse', 'drift_1mr2') of the rollout vs the labels.
  """
  del key
  _positive(context_length=context_length, rollout_length=rollout_length, label_every=label_every)
  if rollout_length % label_every:
    raise ValueError(
      f"label_every (k={label_every}) must divide rollout_length (Td={rollout_length})."
    )
  t0 = context_length - 1 if start is None else start
  if t0 < -1:
    raise ValueError(f"start must be >= -1 (the empty context), got {start}.")
  if from_rnn_initial_memory and t0 != -1:
    raise ValueError(
      f"from_rnn_initial_memory starts the rollout before any input (start = -1), got start = "
      f"{t0}: a memory mid-sequence is the teacher's."
    )
  if rollout_solver not in ("sequential", "parallel"):
    raise ValueError(f"rollout_solver must be 'sequential' or 'parallel', got {rollout_solver!r}.")
  x, y = _check_batch(batch, t0 + 1 + rollout_length, "dmt_loss (start + 1 + Td)")
  _check_params(params, ("teacher", "rnn"), "dmt_loss")
  check_batch_against_models(
    params, batch, rnn=rnn, teacher=teacher, context_length=context_length, caller="dmt_loss"
  )
  tp = jax.lax.stop_gradient(params["teacher"])
  rp = params["rnn"]
  last = rollout_length - label_every if reference_labels else rollout_length
  label_steps = jnp.arange(0, last + 1, label_every)  # s = 0, k, .., last
  num_states = rollout_length if reference_labels else rollout_length + 1  # readout: s < this
  trained = label_steps[1:]  # the labels of states the RNN wrote (s > 0)
  labels = teacher_memories(teacher, tp, x, label_steps + t0, context_length)  # [B, S, K, d]
  inputs = x[:, t0 + 1 : t0 + 1 + rollout_length]
  if from_rnn_initial_memory:
    m_init = rnn.initial_memory(rp).astype(labels.dtype)
    first = jnp.broadcast_to(m_init, labels[:, :1].shape)  # state_0, [B, 1, K, d]
  else:
    first = labels[:, :1]
  metrics = {}
  if rollout_solver == "parallel":
    options = dict(parallel_options or {})

    def run_rollout(p, memory, **unused):
      states, info = parallel.parallel_rollout(p, memory, inputs, update=rnn.update, **options)
      metrics["rollout_iters"] = info.iterations.astype(jnp.float32)
      return states

  else:
    run_rollout = functools.partial(rollout, inputs=inputs, update=rnn.update)
  if stop_carry_grad:
    # With the carry cut before every update, the gradient reaches only the updates whose outputs
    # are labelled: every other step would backpropagate zeros. So the rollout runs forward only
    # (no residuals, no backward scan), and the labelled updates are redone with gradients, all
    # at once (one vmap): the same loss and gradients, for a fraction of the work.
    states = run_rollout(jax.lax.stop_gradient(rp), jax.lax.stop_gradient(first[:, 0]), remat=False)
    states = jax.lax.stop_gradient(jnp.concatenate([first, states], axis=1))  # s = 0..Td
    predicted = jax.vmap(rnn.update, in_axes=(None, 1, 1), out_axes=1)(
      rp, states[:, trained - 1], inputs[:, trained - 1]
    )  # [B, |trained|, K, d]
  else:
    states = run_rollout(rp, first[:, 0])
    states = jnp.concatenate([first, states], axis=1)  # state_s for s = 0..Td
    predicted = states[:, trained]
  if reference_labels:  # s = 0 counts in the mean (a zero error from the teacher's m_0)
    predicted = jnp.concatenate([first, predicted], axis=1)
    l_dyn = losses.dynamics_loss(predicted, labels)
  else:
    l_dyn = losses.dynamics_loss(predicted, labels[:, 1:])
  logits = readout_over_time(rnn, rp, jax.lax.stop_gradient(states[:, :num_states]))
  y_rollout = shifted(y, jnp.array([t0]), num_states)[:, 0]  # y[t0 + s], [B, num_states]
  ce, mask = losses.masked_cross_entropy(logits, y_rollout)
  l_readout = losses.masked_mean(ce, mask)
  d = losses.drift(jax.lax.stop_gradient(states[:, trained]), labels[:, 1:])
  loss = c_dyn * l_dyn + c_readout * l_readout
  return loss, {
    "loss": loss,
    "dynamics_loss": l_dyn,
    "readout_loss": l_readout,
    "drift_mse": d["mse"],
    "drift_1mr2": d["one_minus_r2"],
    **metrics,
  }


def bptt_loss(
  params: Params,
  batch: Batch,
  key: jax.Array | None = None,
  *,
  teacher: TeacherFns | None = None,
  rnn: RNNFns,
  truncation: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Backpropagation through time: the baseline.

  From the RNN's initial memory, read x[0..T-1] with `lax.scan`; readout(state_t) predicts y[t].

    L = masked mean over t of CE(readout(state_t), y[t])

  Gradients flow through the whole unroll, or are cut every `truncation` steps (truncated BPTT).

  Starting points: AdamW lr 3e-4 (published; the small CPU configs use 1e-3), truncation None.
  Cost and memory grow with T (the unroll is sequential), unlike `smt_loss`.

  Args:
    params: {'rnn': RNN params} (a 'teacher' entry, if present, is ignored), so one parameter
      tree serves every objective.
    batch: x, y int [B, T]. key: unused.
    teacher: unused: accepted so that the three objectives take the same pieces
      (`functools.partial(objective, teacher=..., rnn=...)`).
    rnn: the RNN as pure functions (memory contract: `RNNFns`).
    truncation: None (full BPTT) or k: the gradient is cut every k steps.
  """
  del key, teacher
  if truncation is not None:
    _positive(truncation=truncation)
  x, y = _check_batch(batch, 1, "bptt_loss")
  _check_params(params, ("rnn",), "bptt_loss")
  check_batch_against_models(params, batch, rnn=rnn, caller="bptt_loss")
  rp = params["rnn"]
  m_init = rnn.initial_memory(rp)
  m0 = jnp.broadcast_to(m_init, (x.shape[0], *m_init.shape))
  states = rollout(rp, m0, x, update=rnn.update, stop_gradient_every=truncation)
  ce, mask = losses.masked_cross_entropy(readout_over_time(rnn, rp, states), y)
  loss = losses.masked_mean(ce, mask)
  return loss, {"loss": loss, "readout_loss": loss}
