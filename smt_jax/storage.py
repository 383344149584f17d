"""One path layer for every file a run reads or writes: local folders and object stores alike.

A workdir is a local path or a URL of any store `etils.epath` reaches: `gs://bucket/run` (through
`gcsfs`: `pip install -e ".[gcs]"`), `s3://...` and the other fsspec stores. Checkpoints (orbax,
which writes arrays through TensorStore), metrics, config, summary, TensorBoard events, samples
and the run's claim all go through here.

What object stores change, and how this module copes:
- No append: a remote `metrics.jsonl` and TensorBoard event file are kept whole in memory and
  rewritten (one object put) when flushed; a put is atomic, so a reader sees the old or the new
  object, never half of one.
- No rename-into-place: `write_text` puts the object directly (atomic); a local file is written to
  a temporary name and renamed, which is atomic too.
- No flock: a remote workdir is claimed with a lease object instead (`runner.workdir.Lease`).
"""

from __future__ import annotations

import os
import uuid

from etils import epath


class StorageError(ValueError):
  """A workdir URL this install cannot reach (its filesystem package is missing)."""


# The pip extra that makes each remote protocol reachable (gcsfs, s3fs, ...).
_PACKAGES = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", None)}


def _fresh_listings() -> None:
  """Object-store listings are read fresh, never from fsspec's listing cache: a workdir is
  written by other processes (the run, its other hosts, a rerun), and a stale listing would hide
  a new checkpoint or show a deleted one."""
  import fsspec

  for proto in ("gcs", "gs", "s3", "az"):
    fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)


_fresh_listings()


def is_remote(path) -> bool:
  """Whether `path` is a URL of an object store ('gs://b/run'), not a local path."""
  s = os.fspath(path)
  return "://" in s and not s.startswith("file://")


def protocol(path) -> str:
  return os.fspath(path).split("://", 1)[0] if is_remote(path) else "file"


def path(p) -> epath.Path:
  """`p` as an epath.Path; a local path is made absolute (orbax needs absolute local paths)."""
  s = os.fspath(p)
  return epath.Path(s if is_remote(s) else os.path.abspath(s))


def join(base, *parts) -> str:
  """`base/parts...` as a string, for local paths and URLs alike."""
  if is_remote(base):
    return "/".join([os.fspath(base).rstrip("/"), *parts])
  return os.path.join(os.fspath(base), *parts)


def check_reachable(p, *, field: str = "--workdir") -> None:
  """Raises StorageError (one line, naming `field` and the fix) when `p`'s store needs a package
  that is not installed; says nothing for local paths."""
  if not is_remote(p):
    return
  proto = protocol(p)
  package, extra = _PACKAGES.get(proto, (None, None))
  if package is None:
    try:
      import fsspec

      fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:
      raise StorageError(
        f"{field}={p}: no filesystem for {proto}:// ({e}); install the fsspec package for it."
      ) from None
    return
  try:
    __import__(package)
  except ImportError:
    hint = f'pip install -e ".[{extra}]"' if extra else f"pip install {package}"
    raise StorageError(f"{field}={p}: {proto}:// needs {package}; {hint}.") from None


def exists(p) -> bool:
  return path(p).exists()


def is_dir(p) -> bool:
  return path(p).is_dir()


def list_names(p) -> list[str]:
  """The names directly inside folder `p` ([] when it does not exist)."""
  d = path(p)
  return sorted(c.name for c in d.iterdir()) if d.is_dir() else []


def walk_files(folder) -> list[str]:
  """Every file under `folder` whose name and folders do not start with '.', sorted; walked
  level by level (object stores refuse a recursive glob)."""
  found, todo = [], [path(folder)]
  while todo:
    for p in todo.pop().iterdir():
      if not p.name.startswith("."):
        (todo if p.is_dir() else found).append(p)
  return sorted(os.fspath(p) for p in found)


def read_text(p) -> str:
  return path(p).read_text()


def write_text(p, text: str) -> None:
  """Writes `text` to `p` atomically: readers see the old content or the new, never a part."""
  write_bytes(p, text.encode())


def write_bytes(p, data: bytes) -> None:
  """Writes `data` to `p` atomically (a local temporary file renamed into place; an object put)."""
  target = path(p)
  if is_remote(p):
    target.write_bytes(data)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def makedirs(p) -> None:
  """Creates folder `p` (an object store has no folders: nothing to do there)."""
  if not is_remote(p):
    os.makedirs(os.fspath(p), exist_ok=True)


def remove(p) -> None:
  """Deletes file `p` if it exists."""
  f = path(p)
  if f.exists():
    f.unlink()


def rmtree(p) -> None:
  """Deletes folder `p` and everything in it, if it exists."""
  d = path(p)
  if d.exists():
    d.rmtree()


def rename(src, dst) -> None:
  """Moves `src` (a file or folder) to `dst` (a copy and a delete on an object store)."""
  path(src).rename(path(dst))


def local_dir_for(p, name: str) -> str:
  """A local folder standing in for `p` where a tool can only write local files (wandb's run
  files): `p` itself when local, else a folder under the system's temporary directory."""
  if not is_remote(p):
    return os.fspath(p)
  import hashlib
  import tempfile

  digest = hashlib.sha1(os.fspath(p).encode()).hexdigest()[:12]
  d = os.path.join(tempfile.gettempdir(), f"smt_jax-{name}-{digest}")
  os.makedirs(d, exist_ok=True)
  return d
