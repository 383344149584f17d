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
  experiments/configs/pixels.py); a run's workdir is its config.json (`configs/saved.py`).
  Raises FlagsError naming the configs when there is no file."""
  if os.path.isfile(os.path.join(value, "config.json")):  # a run's workdir: its own config
    return f"{os.path.join(_CONFIGS, 'saved.py')}:{value}"
  path, sep, arg = value.partition(":")
  for candidate in (path, os.path.join(_ROOT, path), os.path.join(_ROOT, "experiments", path)):
    if os.path.isfile(candidate):
      rel = os.path.relpath(candidate)
      return (os.path.abspath(candidate) if rel.startswith("..") else rel) + sep + arg
  names = [
    f
    for f in sorted(os.listdir(os.path.join(_ROOT, _CONFIGS)))
    if f.endswith(".py")
    and "def get_config" in open(os.path.join(_ROOT, _CONFIGS, f)).read()
    and f != "saved.py"
  ]
  raise FlagsError(
    f"--config={value}: no such config file or run; use one of {_CONFIGS}/{{{','.join(names)}}} "
    f"(e.g. --config={_CONFIGS}/pixels.py) or a run's workdir."
  )


def default_workdir(config_arg: str) -> str:
  """runs/<file stem>_<arg>, e.g. runs/pixels_digits for experiments/configs/pixels.py; for
  `--config=<workdir>` (configs/saved.py), that workdir."""
  path, _, arg = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  if stem == "saved":  # a run's own config: that run's workdir
    return arg
  module = {"pixels": "digits", "synthetic": "retrieval", "text": "small"}
  arg = arg or module.get(stem, "default")
  return os.path.join("runs", f"{stem}_{arg.replace(',', '_')}")


def cpu_devices(config, env, cores: int, batches: list[int] | None = None) -> int | None:
  """How many CPU devices a run gets when nobody said: one per core, data-parallel, as many as
  divide every batch (XLA on CPU runs much of a step on one core). None where the user chose
  (XLA_FLAGS' device count, JAX_NUM_CPU_DEVICES, a mesh in the config) or the job has several
  processes. The count only shapes JAX's CPU backend: on a GPU or TPU the mesh takes those.
  `batches`: the batch sizes to divide instead of the config's (config None: a set of runs, e.g.
  the studies')."""
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import multihost  # no JAX backend starts on importing them

  if (
    "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
    or env.get("JAX_NUM_CPU_DEVICES")
    or multihost.wants_distributed(env)
    or (config is not None and (config.mesh.data, config.mesh.fsdp, config.mesh.time) != (-1, 1, 1))
  ):
    return None
  if batches is None:
    k = config_lib.grad_accum_steps(config)  # a training batch splits into k micro-batches
    batches = [config[p].batch_size // k for p in config.phases.split(",") if p]
    batches.append(config.eval.batch_size)
  return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in batches))


def use_cpu_cores(config, batches: list[int] | None = None) -> None:
  """Gives JAX's CPU backend `cpu_devices` devices (before it starts) and says so."""
  n = cpu_devices(config, os.environ, len(os.sched_getaffinity(0)), batches)
  if n:
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    if n > 1 and jax.default_backend() == "cpu" and jax.process_index() == 0:
      how = "--config.mesh.data=1" if config is not None else "JAX_NUM_CPU_DEVICES=1"
      print(f"devices: {n} CPU devices, one per core, data-parallel ({how}: one)")


class FlagsError(ValueError):
  """A command line that cannot run; the message is the one line to print."""


def _override_error(argv: list[str], message: str) -> str:
  """ml_collections' KeyError for an override of a field that does not exist, as one line:
  the flag, the config section, and its "did you mean" hint."""
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', message)
  key = hint[2] if hint else re.findall(r"[A-Za-z_]\w*", message)[0]
  fix = f'Did you mean "{hint[1]}"?' if hint else "See smt_jax/runner/config.py for the fields."
  for a in argv:
    name = a.split("=", 1)[0]
    parts = name[len("--config.") :].split(".")
    if name.startswith("--config.") and key in parts:
      section = ".".join(["config", *parts[: parts.index(key)]])
      return f"{name}: {section} has no field {key!r}. {fix}"
  return f"no config field {key!r}. {fix}"


_EXPECTED = (  # (what the parser says, the type it wanted, an example of it)
  ("invalid literal for int()", "an integer", "1000, not 1e3 or 1000.0"),
  ("could not convert string to float", "a number", "3e-4"),
  ("Non-boolean argument", "True or False", "False"),
)


def _type_hint(message: str) -> str:
  """A config override of the wrong type, said with the type the field holds."""
  flag, _, why = message.partition(": ")
  for said, kind, example in _EXPECTED:
    if flag.startswith("--config.") and said in why:
      field, _, value = flag[len("--config.") :].partition("=")
      return f"{flag}: {field} holds {kind}; got {value!r} (e.g. {example})."
  return message


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
      raise FlagsError(_type_hint(lines[0].removeprefix("flag "))) from None
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
      raise FlagsError(_override_error(argv, str(e))) from None
  except FlagsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
