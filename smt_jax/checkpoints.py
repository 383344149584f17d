"""Checkpoints (orbax `CheckpointManager`) and the workdir's identity.

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
- `workdir/.lock` (an flock the kernel drops when the process dies, even by kill -9) keeps two
  runs from writing into one workdir at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be used (corrupted, or written by an incompatible config)."""


class WorkdirError(ValueError):
  """The workdir cannot be used: it holds a run of another config (and neither overwrite nor
  fork was asked), is a file, cannot be written, or is in use."""


class WorkdirBusyError(WorkdirError, RuntimeError):
  """Another live run holds the workdir's lock."""


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=True
    ),
    item_handlers={
      "state": ocp.StandardCheckpointHandler(),  # named: metadata is readable
      "meta": ocp.JsonCheckpointHandler(),
    },
  )


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
) -> None:
  """Saves (asynchronously) a checkpoint at global `step`, replacing one already there.

  The shell decides when to save, so orbax's own policy is bypassed (`force=True`): without it
  orbax silently skips any step not above its latest, e.g. after a fall-back past an unreadable one.
  """
  state = {"params": params}
  if opt_state is not None:
    state["opt_state"] = opt_state
  if step in mngr.all_steps():  # e.g. the phase-boundary save at a step a preemption save used
    mngr.wait_until_finished()
    mngr.delete(step)
  meta = {
    "phase_index": phase_index,
    "phase_step": phase_step,
    "phase": phase,
    "skipped_steps": int(skipped_steps),
  }
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    force=True,
  )


def read(mngr: ocp.CheckpointManager, step: int, target: dict) -> dict:
  """The state of checkpoint `step` restored into `target` ({'params'[, 'opt_state']}: trees of
  ShapeDtypeStructs with shardings): each array is read directly into its target layout."""
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
    "state"
  ]


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

  Returns None when there is no checkpoint, else {'params', 'opt_state' (None at a phase start),
  'phase_index', 'phase_step', 'skipped_steps', 'step'}.
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
      src = os.path.join(str(mngr.directory), str(step))
      if not os.path.isdir(src):
        continue
      n = 0
      while os.path.exists(f"{src}.unreadable-{n}"):
        n += 1
      os.rename(src, f"{src}.unreadable-{n}")
      print(f"Moved unreadable checkpoint {step} to {src}.unreadable-{n}.", flush=True)
  _barrier("smt_jax_quarantine")
  mngr.reload()


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# The workdir: which config it belongs to, and who is writing into it.


def check_workdir(workdir: str, config, *, overwrite: bool, fork: bool) -> str:
  """Decides what to do with `workdir` without touching it: 'new', 'same', 'overwrite' or 'fork'.

  Raises WorkdirError (a ValueError) when the workdir holds a run of a different config (or
  checkpoints of an unknown one) and neither `overwrite` nor `fork` is given.
  """
  if overwrite and fork:
    raise WorkdirError("--overwrite and --fork exclude each other: start over, or continue.")
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if _identity(old) == _identity(new):
      return "same"
    what = f"a run of a different config ({'; '.join(_diff(old, new)[:8])})"
  elif has_checkpoints(workdir):
    what = f"checkpoints but no {CONFIG_FILE} (a run of an unknown config)"
  else:
    return "new"
  if overwrite:
    return "overwrite"
  if fork:
    return "fork"
  raise WorkdirError(
    f"workdir {workdir} holds {what}. Use another --workdir, or pass --overwrite to start over "
    f"there, or --fork to continue its checkpoints under the new config."
  )


# Config sections that only say where a run is mirrored, not what it computes: a run resumed
# with another (e.g. --config.wandb.project added) is the same run.
OBSERVER_SECTIONS = ("wandb",)


def _identity(config_json: dict) -> dict:
  return {k: v for k, v in config_json.items() if k not in OBSERVER_SECTIONS}


def claim_workdir(workdir: str, config, *, overwrite: bool, fork: bool, is_main: bool) -> str:
  """Refuses a workdir that holds a run of a different config (unless overwrite or fork).

  overwrite: delete the old run and start over. fork: keep its checkpoints and continue them
  under the new config (the old config is kept as config.<n>.json). Returns the action taken
  (see `check_workdir`).
  """
  action = check_workdir(workdir, config, overwrite=overwrite, fork=fork)
  path = os.path.join(workdir, CONFIG_FILE)
  if is_main:
    if action == "overwrite":
      for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
      for name in ("metrics.jsonl", "summary.json", CONFIG_FILE):
        if os.path.exists(os.path.join(workdir, name)):
          os.remove(os.path.join(workdir, name))
    elif action == "fork" and os.path.exists(path):
      n = 1
      while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
        n += 1
      shutil.copy(path, os.path.join(workdir, f"config.{n}.json"))
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(json.loads(config.to_json()), f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
  _barrier("smt_jax_claim_workdir")  # no process reads the workdir before process 0 is done
  return action


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a (finished) checkpoint."""
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


@contextlib.contextmanager
def workdir_lock(workdir: str, *, is_main: bool):
  """Holds an exclusive lock on `workdir` (process 0) for the duration of a run.

  A second run started in the same workdir while the first is alive fails at once instead of
  interleaving checkpoints and metrics. The kernel drops the lock when the holder dies (kill -9
  included), so a crash never leaves a stale lock behind.
  """
  if not is_main:
    yield
    return
  import fcntl

  path = os.path.join(workdir, LOCK_FILE)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(
      f"workdir {workdir} is a file, not a directory: pass another --workdir (or move the file)."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
    f = open(path, "a+")
  except OSError as e:
    raise WorkdirError(
      f"cannot write to workdir {workdir} ({e.strerror}): pass a --workdir you can write to."
    ) from None
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise WorkdirBusyError(
        f"workdir {workdir} is in use by a running job ({holder}); wait for it "
        f"to finish or stop it, or use another --workdir."
      ) from None
    except OSError as e:  # a filesystem without flock: run unguarded rather than not at all
      logging.warning("Cannot lock %s (%s); not guarding against concurrent runs.", path, e)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    yield
  finally:
    f.close()  # releases the lock


def _diff(old, new, prefix=""):
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out
