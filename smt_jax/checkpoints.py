"""Checkpoints (orbax `CheckpointManager`) and the workdir's identity.

A checkpoint holds the parameters, the phase's optimiser state and, as JSON, where the run is:
{phase_index, phase_step}. Steps are global (phase offsets added), so every checkpoint of a run has
its own number. Orbax writes each checkpoint to a temporary folder and renames it when complete, so
a crash mid-save leaves no checkpoint that looks finished; a checkpoint that is unreadable anyway
(corrupted files) is skipped with a warning in favour of the one before it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, *, phase_index: int,
         phase_step: int, force: bool = False) -> None:
  state = {"params": params}
  if opt_state is not None:
    state["opt_state"] = opt_state
  if step in mngr.all_steps():  # e.g. the phase-boundary save at a step a periodic save used
    mngr.wait_until_finished()
    mngr.delete(step)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      meta=ocp.args.JsonSave({"phase_index": phase_index, "phase_step": phase_step})),
      force=force)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def restore_latest(mngr: ocp.CheckpointManager, exp, params, make_optimizer):
  """Restores the newest readable checkpoint: (params, opt_state|None, phase_index, phase_step).

  Returns None when the workdir has no checkpoint. Falls back past unreadable checkpoints.
  """
  from smt_jax import sharding  # the shell's helpers; imported here to keep this module light
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      pi, ps = int(meta["phase_index"]), int(meta["phase_step"])
      target = {"params": _abstract(params, exp.params_sharding)}
      if ps > 0:
        phase = exp.phases[pi]
        opt_state = jax.eval_shape(make_optimizer(exp.config, phase).init, params)
        target["opt_state"] = _abstract(opt_state, sharding.state_shardings(opt_state, exp.mesh))
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
      logging.warning("Checkpoint %d in %s is unreadable (%s: %s); falling back to the previous "
                      "one.", step, mngr.directory, type(e).__name__, str(e)[:200])
      print(f"WARNING: checkpoint {step} is unreadable ({type(e).__name__}); falling back to the "
            f"previous one.", flush=True)
      continue
    return restored["params"], restored.get("opt_state"), pi, ps
  return None


def claim_workdir(workdir: str, config, *, overwrite: bool, fork: bool, is_main: bool) -> None:
  """Refuses a workdir that holds a run of a different config (unless overwrite or fork).

  overwrite: delete the old run and start over. fork: keep its checkpoints and continue them
  under the new config (the old config is kept as config.<n>.json).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != new:
      diff = _diff(old, new)
      if overwrite:
        if is_main:
          for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
          for name in ("metrics.jsonl", "summary.json", CONFIG_FILE):
            if os.path.exists(os.path.join(workdir, name)):
              os.remove(os.path.join(workdir, name))
      elif fork:
        if is_main:
          n = 1
          while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
          shutil.copy(path, os.path.join(workdir, f"config.{n}.json"))
      else:
        raise ValueError(
            f"workdir {workdir} holds a run of a different config ({'; '.join(diff[:8])}). "
            f"Use another --workdir, or pass --overwrite to start over there, or --fork to "
            f"continue its checkpoints under the new config.")
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _diff(old, new, prefix=""):
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out
