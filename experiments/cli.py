"""The command lines' shared parsing: every mistake in one line on stderr, exit status 1.

absl prints a flag error on two lines (plus a traceback for some, e.g. an override of a config
field that does not exist); `parse_flags`, given to `app.run(main, flags_parser=...)`, says each
in one line naming the flag and the fix, before anything is imported or compiled.
"""

from __future__ import annotations

import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
_CONFIGS = os.path.join("experiments", "configs")


def resolve_config(value: str) -> str:
  """The --config value with its file found: as given (from the working directory), else under
  the checkout's root or its experiments/ (the design card's `configs/pixels.py` is
  experiments/configs/pixels.py). Raises FlagsError naming the configs when there is no file."""
  path, sep, arg = value.partition(":")
  for candidate in (path, os.path.join(_ROOT, path), os.path.join(_ROOT, "experiments", path)):
    if os.path.isfile(candidate):
      rel = os.path.relpath(candidate)
      return (os.path.abspath(candidate) if rel.startswith("..") else rel) + sep + arg
  names = [
    f
    for f in sorted(os.listdir(os.path.join(_ROOT, _CONFIGS)))
    if f.endswith(".py") and "def get_config" in open(os.path.join(_ROOT, _CONFIGS, f)).read()
  ]
  raise FlagsError(
    f"--config={value}: no such config file; use one of {_CONFIGS}/{{{','.join(names)}}} "
    f"(e.g. --config={_CONFIGS}/pixels.py)."
  )


class FlagsError(ValueError):
  """A command line that cannot run; the message is the one line to print."""


def _override_error(argv: list[str], message: str) -> str:
  """ml_collections' KeyError for an override of a field that does not exist, as one line:
  the flag, the config section, and its "did you mean" hint."""
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', message)
  key = hint[2] if hint else re.findall(r"[A-Za-z_]\w*", message)[0]
  fix = f'Did you mean "{hint[1]}"?' if hint else f"See {_CONFIGS}/common.py for the fields."
  for a in argv:
    name = a.split("=", 1)[0]
    parts = name[len("--config.") :].split(".")
    if name.startswith("--config.") and key in parts:
      section = ".".join(["config", *parts[: parts.index(key)]])
      return f"{name}: {section} has no field {key!r}. {fix}"
  return f"no config field {key!r}. {fix}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake said in one line (no traceback) and exit 1."""
  argv = list(argv)
  try:
    for i, a in enumerate(argv):
      if a.startswith("--config="):
        argv[i] = "--config=" + resolve_config(a[len("--config=") :])
      elif a == "--config" and i + 1 < len(argv):
        argv[i + 1] = resolve_config(argv[i + 1])
    try:
      return FLAGS(argv)
    except flags.Error as e:
      msg = str(e)
      lines = [line.strip() for line in msg.splitlines() if line.strip()]
      if "Error whilst parsing config file" in msg:  # get_config raised: its last line says why
        flag = lines[0].split(": Error whilst", 1)[0].removeprefix("flag ")
        raise FlagsError(f"{flag}: {lines[-1].split(': ', 1)[-1]}") from None
      required = re.search(r"Flag (--\w+) must have a value other than None", msg)
      if required:
        raise FlagsError(f"{required[1]} is required (see --helpshort).") from None
      if "Did you mean" in msg and "--config." in msg:
        raise FlagsError(_override_error(argv, msg)) from None
      raise FlagsError(lines[0].removeprefix("flag ")) from None
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
      raise FlagsError(_override_error(argv, str(e))) from None
  except FlagsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
