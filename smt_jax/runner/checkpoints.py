"""Checkpoints (orbax `CheckpointManager`): saving, restoring, and what survives a crash.

A checkpoint holds the parameters, the phase's optimiser state and, as JSON, where the run is:
{phase_index, phase, phase_step, skipped_steps}. Steps are global (phase offsets added), so every
checkpoint of a run has its own number.

What survives a crash, and why:
- Orbax writes each checkpoint to a `<step>.orbax-checkpoint-tmp-*` folder and renames it when
  complete, so a kill mid-save leaves no checkpoint that looks finished (the leftover folder is
  removed when the next run opens the manager).
- A checkpoint that is unreadable anyway (truncated, deleted or corrupted files; TensorStore detects
  them) is skipped, with a warning, in favour of the newest readable one; the training shell moves
  the unreadable ones aside (`checkpoints/<step>.unreadable-<n>`) so that they are neither retried
  nor counted as "the latest" by later saves. When checkpoints exist but none is readable, the run
  stops rather than silently starting over.
- Two runs never write into one workdir at once (`smt_jax.runner.workdir`).
- Every path goes through `smt_jax.storage` (etils.epath), so a workdir may be `gs://bucket/run`.
- Readers (`experiments.sample`, the studies) open the checkpoints read-only (`make_manager(...,
  read_only=True)`): they never delete a live run's save in progress or its temporary folders.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from smt_jax import storage
from smt_jax.runner import multihost


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be used (corrupted, or written by an incompatible config)."""


# The run's end keeps its last phase's optimiser state as an item of its own, beside the state
# (parameters) that every reader restores: only a rerun that raises the steps reads it.
END_OPT_STATE = "end_opt_state"


@dataclasses.dataclass
class Position:
  """Where a run is: all a checkpoint's metadata and state restore (`Position.of(restore(...))`)."""

  phase_index: int = 0
  phase_step: int = 0  # steps done in the current phase
  skipped: int = 0  # non-finite steps skipped in the current phase
  params: Any = None
  opt_state: Any = None  # None at a phase start

  @classmethod
  def of(cls, restored: dict | None) -> Position | None:
    """The position `restore` returned (None: nothing was restored)."""
    if restored is None:
      return None
    keys = ("phase_index", "phase_step", "skipped_steps", "params", "opt_state")
    return cls(*(restored[k] for k in keys))


def make_manager(workdir: str, *, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoint manager. `read_only`: for readers of a run that may be live (samples,
  studies): nothing is created, deleted or cleaned up (a writer's unfinished save is left alone)."""
  verbosity = logging.get_verbosity()
  if read_only:  # orbax warns that a read-only manager is read-only
    logging.set_verbosity(logging.ERROR)
  try:
    return ocp.CheckpointManager(
      storage.path(storage.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),  # named: metadata is readable
        "meta": ocp.JsonCheckpointHandler(),
        END_OPT_STATE: ocp.StandardCheckpointHandler(),
      },
    )
  finally:
    logging.set_verbosity(verbosity)


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  params,
  opt_state,
  *,
  phase_index: int,
  phase_step: int,
  phase: str | None = None,
  skipped_steps: int = 0,
  opt_state_phase: int | None = None,
) -> None:
  """Saves (asynchronously) a checkpoint at global `step`, replacing one already there.

  `opt_state` belongs to phase `phase_index` when `phase_step` > 0; otherwise (a phase boundary)
  it is None, or the optimiser state of phase `opt_state_phase` (the run's last phase, kept at
  its end, in an item of its own, so that a rerun with more steps continues it).

  The shell decides when to save, so orbax's own policy is bypassed (`force=True`): without it
  orbax silently skips any step not above its latest, e.g. after a fall-back past an unreadable one.
  """
  state, items = {"params": params}, {}
  if opt_state is not None and phase_step > 0:
    state["opt_state"] = opt_state
  elif opt_state is not None:
    items[END_OPT_STATE] = ocp.args.StandardSave(opt_state)
  if step in mngr.all_steps():  # e.g. the phase-boundary save at a step a preemption save used
    mngr.wait_until_finished()
    mngr.delete(step)
  meta = {
    "phase_index": phase_index,
    "phase_step": phase_step,
    "phase": phase,
    "skipped_steps": int(skipped_steps),
  }
  if opt_state is not None and phase_step == 0:
    meta["opt_state_phase"] = int(opt_state_phase)
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), **items
    ),
    force=True,
  )


def read(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
  """The state of checkpoint `step` restored into `target` ({'params'[, 'opt_state']}: trees of
  ShapeDtypeStructs with shardings): each array is read directly into its target layout."""
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
    "state"
  ]


def read_params(mngr: ocp.CheckpointManager, step: int, params) -> Any:
  """The parameters of checkpoint `step` restored into `params` (abstract), whatever else it
  holds. A checkpoint inside a phase also holds that phase's optimiser state in the same item,
  which orbax reads only as a whole: it is read onto one local device, from the checkpoint's
  own metadata, and dropped."""
  target = {"params": params}
  saved = mngr.item_metadata(step)["state"]
  if "opt_state" in saved:
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target["opt_state"] = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved["opt_state"]
    )
  return read(mngr, step, target)["params"]


def restore(
  mngr: ocp.CheckpointManager,
  *,
  phases,
  params,
  opt_states,
  quarantine: bool = False,
  is_main: bool = True,
) -> dict | None:
  """Restores the newest readable checkpoint into abstract targets.

  Args:
    phases: the run's phase names (a checkpoint of another phase list is refused).
    params: the parameters' abstract target (ShapeDtypeStructs with shardings).
    opt_states: per phase, its optimiser state's abstract target (`Phase.abstract_state`).

  Returns None when there is no checkpoint, else {'params', 'opt_state' (None at a phase start;
  at the end of the run, the last phase's), 'phase_index', 'phase_step', 'skipped_steps', 'step'}.
  Falls back past unreadable checkpoints and says so; with `quarantine`, moves those aside once an
  older one has been restored. Raises CheckpointError when checkpoints exist but none is readable,
  or when one was written for a different list of phases or model.
  """
  phases = list(phases)
  _drop_closed_event_loop_errors()
  steps = sorted(mngr.all_steps(), reverse=True)
  unreadable: list[tuple[int, str]] = []
  for step in steps:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      pi, ps = int(meta["phase_index"]), int(meta["phase_step"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
      unreadable.append((step, _describe(e)))
      _warn_unreadable(mngr, step, e)
      continue
    # A checkpoint of another phase list (e.g. --fork with new phases) is not corruption: stop.
    saved_phase = meta.get("phase")
    here = phases[pi] if pi < len(phases) else None
    if pi > len(phases) or (saved_phase is not None and saved_phase != here):
      raise CheckpointError(
        f"checkpoint {step} in {mngr.directory} was written at phase #{pi} ({saved_phase!r}) "
        f"of another phase list; this config's phases are {phases}. Use another --workdir "
        f"or --overwrite."
      )
    # Parameters of other shapes come from another config (e.g. --fork with a new width): not
    # corruption, and no older checkpoint will fit either, so stop and say so.
    try:
      saved = mngr.item_metadata(step)["state"]
      saved = None if saved is None else _shapes(saved["params"])
    except Exception as e:  # noqa: BLE001
      unreadable.append((step, _describe(e)))
      _warn_unreadable(mngr, step, e)
      continue
    want = _shapes(params)
    if saved is not None and saved != want:
      diff = [
        f"{k}: {saved.get(k, 'absent')} saved, {want.get(k, 'absent')} now"
        for k in sorted(set(saved) | set(want))
        if saved.get(k) != want.get(k)
      ]
      raise CheckpointError(
        f"checkpoint {step} in {mngr.directory} holds parameters of other shapes than this "
        f"config's model ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}): it was "
        f"written under another config. Use another --workdir, or --overwrite."
      )
    try:
      target = {"params": params}
      if ps > 0:
        target["opt_state"] = opt_states[pi]
      restored = read(mngr, step, target)
      # The run's end keeps its last phase's optimiser state, for that phase to continue (its
      # steps raised); a phase this config appends after it (--fork) starts afresh.
      if ps == 0 and meta.get("opt_state_phase") is not None and pi == len(phases):
        end = ocp.args.StandardRestore(opt_states[meta["opt_state_phase"]])
        restored["opt_state"] = mngr.restore(step, args=ocp.args.Composite(**{END_OPT_STATE: end}))[
          END_OPT_STATE
        ]
    except Exception as e:  # noqa: BLE001
      unreadable.append((step, _describe(e)))
      _warn_unreadable(mngr, step, e)
      continue
    if unreadable:
      print(
        f"WARNING: restored checkpoint {step} instead of the newer, unreadable "
        f"{[s for s, _ in unreadable]}.",
        flush=True,
      )
      if quarantine:
        _quarantine(mngr, [s for s, _ in unreadable], is_main=is_main)
    return {
      "params": restored["params"],
      "opt_state": restored.get("opt_state"),
      "phase_index": pi,
      "phase_step": ps,
      "step": step,
      "skipped_steps": int(meta.get("skipped_steps", 0)),
    }
  if unreadable:
    raise CheckpointError(
      f"{mngr.directory} holds checkpoints {steps} but none is readable "
      f"({'; '.join(f'{s}: {m}' for s, m in unreadable[:3])}). If the config changed, use "
      f"another --workdir; to discard them, rerun with --overwrite."
    )
  return None


def _drop_closed_event_loop_errors() -> None:
  """Stops the 'Event loop is closed' RuntimeErrors of a failed restore's pending reads.

  When TensorStore fails to read a checkpoint, orbax's event loop closes while other reads are in
  flight; their callbacks, and the abandoned read coroutines, then raise into `sys.unraisablehook`
  (dozens of tracebacks, some after the restore has returned) that would bury the one warning that
  matters. Installed by the first restore, for the rest of the process; every other unraisable
  error still goes through.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loop", False):
    return

  def hook(u):
    closed_loop = (
      isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
    )
    orbax_read = "orbax" in getattr(getattr(u.object, "cr_code", None), "co_filename", "")
    if not (closed_loop or orbax_read):  # both: echoes of a failed read, already reported
      previous(u)

  hook.drops_closed_event_loop = True
  sys.unraisablehook = hook


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'rnn/decoder/head/kernel/value': shape} for a parameter tree or its checkpoint metadata."""

  def name(path):
    return "/".join(
      str(next(getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a))) for k in path
    )

  return {name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def _describe(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e)[:200]}"


def _warn_unreadable(mngr, step: int, e: Exception) -> None:
  logging.warning(
    "Checkpoint %d in %s is unreadable (%s); falling back to the previous one.",
    step,
    mngr.directory,
    _describe(e),
  )
  print(
    f"WARNING: checkpoint {step} is unreadable ({type(e).__name__}); falling back to the "
    f"previous one.",
    flush=True,
  )


def _quarantine(mngr: ocp.CheckpointManager, steps: list[int], *, is_main: bool) -> None:
  """Moves unreadable checkpoints to `<step>.unreadable-<n>` (kept for inspection, not listed)."""
  if is_main:
    for step in steps:
      src = storage.join(str(mngr.directory), str(step))
      if not storage.is_dir(src):
        continue
      n = 0
      while storage.exists(f"{src}.unreadable-{n}"):
        n += 1
      storage.rename(src, f"{src}.unreadable-{n}")
      print(f"Moved unreadable checkpoint {step} to {src}.unreadable-{n}.", flush=True)
  multihost.barrier("smt_jax_quarantine")
  mngr.reload()
