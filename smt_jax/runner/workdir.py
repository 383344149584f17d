"""The workdir: which config it belongs to, and who is writing into it.

- Identity: `config.json` is the run's config; a rerun with the same config resumes, one that only
  raises `<phase>.steps` continues (`raised_steps`, `continue_raised`), any other is refused unless
  it asks to start over (`overwrite`) or to continue the checkpoints under the new config (`fork`):
  `check_workdir` decides without touching anything, `claim_workdir` acts.
- Two runs never write into one workdir at once. A local workdir is held with `workdir/.lock`, an
  flock the kernel drops when the process dies (even by kill -9). An object store has no locks, so
  a remote workdir (or a filesystem without flock) is held with a lease (`Lease`,
  `workdir/lease.json`) that process 0 renews while the run lives.
- Every path goes through `smt_jax.storage` (etils.epath), so a workdir may be `gs://bucket/run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from smt_jax import storage
from smt_jax.runner import config as config_lib
from smt_jax.runner import multihost

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
LEASE_FILE = "lease.json"
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished save on an object store


class CheckpointError(RuntimeError):
  """Checkpoints exist but none can be used (corrupted, or written by an incompatible config)."""


class WorkdirError(ValueError):
  """The workdir cannot be used: it holds a run of another config (and neither overwrite nor
  fork was asked), is a file, cannot be written, or is in use."""


class WorkdirBusyError(WorkdirError, RuntimeError):
  """Another live run holds the workdir's lock."""


def check_workdir(workdir: str, config, *, overwrite: bool, fork: bool) -> str:
  """Decides what to do with `workdir` without touching it: 'new', 'same', 'extend' (the config
  differs from the run's only in raised `<phase>.steps`: continue it), 'overwrite' or 'fork'.

  Raises WorkdirError (a ValueError) when the workdir holds a run of a different config (or
  checkpoints of an unknown one) and neither `overwrite` nor `fork` is given.
  """
  if overwrite and fork:
    raise WorkdirError("--overwrite and --fork exclude each other: start over, or continue.")
  try:
    storage.check_reachable(workdir)
  except storage.StorageError as e:
    raise WorkdirError(str(e)) from None
  new, old = json.loads(config.to_json()), read_config(workdir)
  if old is not None:
    if _identity(old) == _identity(new):
      return "same"
    if raised_steps(old, new) and not (overwrite or fork):
      return "extend"
    what = f"a run of a different config ({'; '.join(_diff(_identity(old), _identity(new))[:8])})"
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
  """What a run computes: its config (an older version's with its moved fields where they are
  now) without the observer sections."""
  return {k: v for k, v in config_lib.migrate(config_json).items() if k not in OBSERVER_SECTIONS}


PHASES = ("smt", "dmt", "bptt")


def raised_steps(old: dict, new: dict) -> dict[str, tuple[int, int]]:
  """{phase: (old steps, new steps)} when the configs (as JSON dicts) differ only in raised
  `<phase>.steps` of phases the new config runs; else {}."""
  old, new = _identity(old), _identity(new)
  runs = [p for p in new.get("phases", "").split(",") if p]
  raised = {}
  for p in PHASES:
    a, b = (old.get(p) or {}).get("steps"), (new.get(p) or {}).get("steps")
    if a != b and p in runs:
      if not (isinstance(a, int) and isinstance(b, int) and b > a):
        return {}
      raised[p] = (a, b)
      old = dict(old, **{p: dict(old.get(p) or {}, steps=b)})
  return raised if raised and old == new else {}


def continue_raised(restored: dict | None, raised: dict, phases: list[str]) -> list[str]:
  """A rerun that raised `<phase>.steps` (`raised_steps`): continues the phase the run is in, or
  its last phase when it had finished (`restored` is moved there, with that phase's optimiser
  state). Refuses a phase the run is past: what followed started from its end. Returns the
  lines to say."""
  if not raised:
    return []
  at = restored["phase_index"] if restored else 0
  finished = at == len(phases)
  for name, (old, new) in raised.items():
    i = phases.index(name)
    if i < at and not (finished and i == at - 1):
      where = "its end" if finished else f"{phases[at]} step {restored['phase_step']}"
      raise WorkdirError(
        f"{name}.steps raised {old} -> {new}, but the run is past {name} (at {where}): what "
        f"followed started from {name}'s end. Raise the steps of the phase it is in (or of its "
        f"last phase), or pass --fork to continue its checkpoints, --overwrite to start over."
      )
  said = ", ".join(f"{n}.steps {o} -> {m}" for n, (o, m) in raised.items())
  lines = [
    f"Continuing the run with {said} (config.json updated, the old one kept as "
    f"config.<n>.json; learning-rate schedules follow the new lengths)."
  ]
  if finished and phases[-1] in raised:
    restored.update(phase_index=at - 1, phase_step=raised[phases[-1]][0])
    if restored["opt_state"] is None:  # an end checkpoint written before the end kept it
      lines.append(f"{phases[-1]}: the run's end kept no optimiser state; it starts afresh.")
  return lines


def read_config(workdir: str) -> dict | None:
  """The workdir's config.json as a dict (None when there is none)."""
  path = storage.join(workdir, CONFIG_FILE)
  return json.loads(storage.read_text(path)) if storage.exists(path) else None


def claim_workdir(workdir: str, config, *, overwrite: bool, fork: bool, is_main: bool) -> str:
  """Refuses a workdir that holds a run of a different config (unless overwrite or fork).

  overwrite: delete the old run and start over. fork: keep its checkpoints and continue them
  under the new config (the old config is kept as config.<n>.json, as when it only raised steps).
  Returns the action taken (see `check_workdir`).
  """
  action = check_workdir(workdir, config, overwrite=overwrite, fork=fork)
  path = storage.join(workdir, CONFIG_FILE)
  if is_main:
    if action == "overwrite":
      for name in ("checkpoints", "tensorboard"):
        storage.rmtree(storage.join(workdir, name))
      for name in ("metrics.jsonl", "summary.json", CONFIG_FILE):
        storage.remove(storage.join(workdir, name))
    elif action in ("fork", "extend") and storage.exists(path):
      n = 1
      while storage.exists(storage.join(workdir, f"config.{n}.json")):
        n += 1
      storage.write_text(storage.join(workdir, f"config.{n}.json"), storage.read_text(path))
    storage.makedirs(workdir)
    storage.write_text(path, json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True))
  multihost.barrier("smt_jax_claim_workdir")  # nobody reads the workdir before process 0 is done
  return action


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir/checkpoints` holds a (finished) checkpoint."""
  d = storage.join(workdir, "checkpoints")
  steps = [name for name in storage.list_names(d) if name.isdigit()]
  if not storage.is_remote(workdir):
    return bool(steps)  # a local save is renamed into place when complete
  # An object store has no rename: orbax writes into <step>/ directly and marks it complete with
  # commit_success.txt at the end.
  return any(storage.exists(storage.join(d, s, COMMIT_FILE)) for s in steps)


@contextlib.contextmanager
def workdir_lock(workdir: str, *, is_main: bool, lease_ttl_s: float | None = None):
  """Holds `workdir` exclusively (process 0) for the duration of a run.

  A second run started in the same workdir while the first is alive fails (WorkdirBusyError)
  instead of interleaving checkpoints and metrics. A local workdir is held with an flock, which
  the kernel drops when the holder dies (kill -9 included), so a crash never leaves a stale lock.
  A remote workdir (`gs://...`), or a local filesystem without flock, is held with a `Lease`
  (`lease_ttl_s`, default $SMT_JAX_LEASE_TTL_S or 60 s).
  """
  if not is_main:
    yield
    return
  if storage.is_remote(workdir):
    with Lease(workdir, ttl_s=lease_ttl_s):
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
    except OSError as e:  # a filesystem without flock (some network filesystems): a lease
      logging.warning("Cannot flock %s (%s); holding the workdir with a lease instead.", path, e)
      with Lease(workdir, ttl_s=lease_ttl_s):
        yield
      return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}")
    f.flush()
    yield
  finally:
    f.close()  # releases the lock


class Lease:
  """A workdir's claim on a store without locks: `<workdir>/lease.json`, renewed by its holder.

  The holder writes {owner, host, pid, seq, renewed} and rewrites it every ttl/3 s from a
  background thread (seq counts up), and deletes it when the run ends. A run that finds a lease:
  - takes it at once when it is older than `ttl_s` by its own clock, or when it names this host
    and a pid that no longer lives (a killed run's leftover);
  - otherwise watches it for up to `ttl_s`: a renewal (seq changes) means a live holder, and the
    run stops with WorkdirBusyError, before it builds or writes anything; no renewal in that time
    means the holder is gone (a preempted VM), and the run takes the lease over.
  After writing its own lease it reads it back ~1 s later and stops if another run's replaced it.

  What it guarantees: a run started while another run is alive in the workdir is refused (within
  ttl_s), and a rerun after a crash or preemption proceeds (at once on the same host, else within
  ttl_s). What it does not: the store offers no compare-and-swap through epath, so two runs
  started within about a second of each other on different hosts may both start; and a holder
  stalled for longer than ttl_s (SIGSTOP, a frozen VM) can lose its lease to a new run, which it
  notices at its next renewal and reports.
  """

  def __init__(self, workdir: str, *, ttl_s: float | None = None, settle_s: float = 1.0):
    self.path = storage.join(workdir, LEASE_FILE)
    self.workdir = workdir
    self.ttl_s = float(ttl_s or os.environ.get("SMT_JAX_LEASE_TTL_S") or 60.0)
    self.settle_s = settle_s
    self.owner = uuid.uuid4().hex
    self.seq = 0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict | None:
    """The lease; None when there is none; {} when it stays unreadable (torn by a dead writer)."""
    for _ in range(3):
      try:
        return json.loads(storage.read_text(self.path))
      except FileNotFoundError:
        return None
      except (ValueError, OSError):  # caught mid-rewrite (a store's put need not be atomic)
        time.sleep(0.2)
    return {}

  def _write(self) -> None:
    lease = {
      "owner": self.owner,
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "seq": self.seq,
      "renewed": time.time(),
      "ttl_s": self.ttl_s,
    }
    storage.write_text(self.path, json.dumps(lease))

  def _holder(self, lease: dict) -> str:
    age = time.time() - float(lease.get("renewed", 0))
    return f"host {lease.get('host')} pid {lease.get('pid')}, renewed {age:.0f} s ago"

  def _stale(self, lease: dict) -> bool:
    if time.time() - float(lease.get("renewed", 0)) > self.ttl_s:
      return True
    if lease.get("host") == socket.gethostname():
      try:
        os.kill(int(lease.get("pid", -1)), 0)
      except ProcessLookupError:
        return True
      except (PermissionError, ValueError, OverflowError):
        return False
    return False

  def _busy(self, lease: dict) -> WorkdirBusyError:
    return WorkdirBusyError(
      f"workdir {self.workdir} is in use by a running job ({self._holder(lease)}; its lease "
      f"{self.path} is being renewed); wait for it to finish or stop it, or use another --workdir."
    )

  def acquire(self) -> None:
    storage.makedirs(self.workdir)
    lease = self._read()
    if lease is not None and not self._stale(lease):
      deadline = time.time() + self.ttl_s
      print(
        f"workdir {self.workdir} has a lease ({self._holder(lease)}): waiting up to "
        f"{self.ttl_s:.0f} s to see whether its holder is alive.",
        flush=True,
      )
      while time.time() < deadline:
        time.sleep(min(2.0, self.ttl_s / 6))
        now = self._read()
        if now is None:
          break  # released
        if now and (now.get("owner"), now.get("seq")) != (lease.get("owner"), lease.get("seq")):
          raise self._busy(now)
      else:
        print(f"Taking over the stale lease of {self._holder(lease)}.", flush=True)
    self._write()
    time.sleep(self.settle_s)
    now = self._read()
    if now is None or now.get("owner") != self.owner:
      raise self._busy(now or {})
    self._thread = threading.Thread(target=self._renew, name="smt_jax-lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.ttl_s / 3):
      try:
        now = self._read()
        if now and now.get("owner") != self.owner:
          print(
            f"ERROR: another run took over the lease of {self.workdir} ({self._holder(now)}); "
            f"two runs may now write into it. Stop one of them.",
            file=sys.stderr,
            flush=True,
          )
          return
        self.seq += 1
        self._write()
      except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next period
        logging.warning("Could not renew the lease %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    now = self._read()
    if now is not None and now.get("owner") == self.owner:
      storage.remove(self.path)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _diff(old, new, prefix=""):
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out
