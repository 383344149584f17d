"""Writes constraints.txt: the exact versions of smt-jax's dependencies installed in this Python.

  python tools/make_constraints.py > constraints.txt     # regenerate (after upgrading a package)
  python tools/make_constraints.py --check               # exit 1 if constraints.txt is stale

The lock covers `install_requires` and every extra of setup.cfg, with their dependencies followed
recursively through the installed packages' metadata (markers evaluated for this Python and the
extras asked for): what `pip freeze` shows for the project's dependencies, and nothing else, in a
sorted, stable order. A dependency that is not installed here (e.g. gcsfs, or jax's CUDA plugin on a
CPU machine) cannot be locked: it is named in the file's header instead. Local version labels
(torch's `+cpu`) are dropped: `torch==2.13.0` also admits `2.13.0+cpu`, and PyPI has no `+cpu`.

The README's commands and `.ci/run` install with it: `pip install -c constraints.txt -e ".[test]"`
(a constraint only pins what is installed anyway; it installs nothing by itself).
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata as md
import os
import platform
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "constraints.txt")


def declared(setup_cfg: str = os.path.join(ROOT, "setup.cfg")) -> dict[str, list[Requirement]]:
  """setup.cfg's requirements: {'': install_requires, extra: its requirements}."""
  cfg = configparser.ConfigParser()
  cfg.read(setup_cfg)
  lines = lambda text: [ln.strip() for ln in text.splitlines() if ln.strip()]
  out = {"": [Requirement(r) for r in lines(cfg["options"]["install_requires"])]}
  for extra, text in cfg["options.extras_require"].items():
    out[extra] = [Requirement(r) for r in lines(text)]
  return out


def _applies(req: Requirement, extras: set[str]) -> bool:
  if req.marker is None:
    return True
  return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def lock(roots: list[Requirement]) -> tuple[dict[str, str], set[str]]:
  """Follows `roots` through the installed metadata: ({name: version}, names not installed)."""
  pinned: dict[str, str] = {}
  missing: set[str] = set()
  seen: set[tuple[str, frozenset[str]]] = set()
  todo = [(r, set()) for r in roots]
  while todo:
    req, parent_extras = todo.pop()
    if not _applies(req, parent_extras):
      continue
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = md.distribution(req.name)
    except md.PackageNotFoundError:
      missing.add(name)
      continue
    pinned[name] = dist.version.split("+")[0]
    todo.extend((Requirement(r), set(req.extras)) for r in dist.requires or [])
  return pinned, missing - set(pinned)


def render() -> str:
  groups = declared()
  roots = [r for reqs in groups.values() for r in reqs]
  pinned, missing = lock(roots)
  head = [
    "# Exact versions smt-jax is tested with (its dependencies and every extra's), for",
    '#   pip install -c constraints.txt -e ".[test]"',
    "# Regenerate: python tools/make_constraints.py > constraints.txt (see that file).",
    f"# From Python {platform.python_version()} on {platform.system()} {platform.machine()}.",
  ]
  if missing:
    head.append(f"# Not installed there, so not locked: {', '.join(sorted(missing))}.")
  return "\n".join(head + [f"{n}=={v}" for n, v in sorted(pinned.items())]) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare with constraints.txt")
  args = parser.parse_args()
  text = render()
  if not args.check:
    sys.stdout.write(text)
    return 0
  with open(OUT) as f:
    current = f.read()
  strip = lambda t: [ln for ln in t.splitlines() if not ln.startswith("#")]
  if strip(current) != strip(text):
    print("constraints.txt is stale: python tools/make_constraints.py > constraints.txt")
    return 1
  print("constraints.txt matches this environment.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
