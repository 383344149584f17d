"""Checks a launch's `experiments.run` arguments here, against the target's devices, first.

A pod or cluster job that names a field the config lacks, or a batch size its devices cannot
split, would otherwise fail after the slice is created, the code copied and installed. This
parses the arguments exactly as `experiments.run` does (ml_collections' `config_flags`, the
config locked) and runs `smt_jax.runner.config.validate_for_devices` with the target's device
and process counts, so such a launch fails here, in a second, naming the field and the fix.

  python -m launch.checks --num-devices=16 --num-processes=16 \\
      --config=experiments/configs/pixels.py:mnist --config.smt.batch_size=256

(`launch/tpu_pod.py` runs it itself; run it before `sbatch launch/slurm_gpu.sbatch`.) What it
cannot see: data paths (they name files on the target), the dataset's contents, and flags of
other libraries (anything but `--config*` and `experiments.run`'s own flags is passed over).
Config paths are relative to the repository root, as on the workers.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import pathlib
import sys
from collections.abc import Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class LaunchCheckError(ValueError):
  """The launch's arguments would fail on the target; the message says what to fix."""


@contextlib.contextmanager
def _from_repo_root():
  """Config files are given relative to the repository root and import `experiments.configs`."""
  cwd, path = os.getcwd(), list(sys.path)
  os.chdir(REPO_ROOT)
  sys.path.insert(0, str(REPO_ROOT))
  try:
    yield
  finally:
    os.chdir(cwd)
    sys.path[:] = path


def _parse(argv: list[str]):
  """experiments.run's flags on a fresh FlagValues: (config, experiments.run's other flags)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["experiments.run", *argv]
  fv = flags.FlagValues()
  # As experiments/run.py defines them (tests/test_launch.py checks that the names agree).
  config_flags.DEFINE_config_file(
    "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "overwrite", flag_values=fv)
  flags.DEFINE_bool("fork", False, "fork", flag_values=fv)
  flags.DEFINE_float("peer_timeout_s", 60.0, "peer_timeout_s", flag_values=fv)
  try:
    fv(argv, known_only=True)  # other libraries' flags (e.g. --jax_log_compiles) are left alone
  except flags.Error as e:  # a bad value, or a config file that raised (its last line says why)
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raise LaunchCheckError(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}") from None
  config = fv.config
  if config is None:
    raise LaunchCheckError("no --config=experiments/configs/<file>.py[:arg] given")
  try:
    config.keys()  # a config file that failed to load raises on first use
  except OSError as e:
    spec = next(a for a in argv if a.startswith(("--config=", "-config=")))
    why = str(e).strip().splitlines()[-1].strip()
    raise LaunchCheckError(f"{spec}: cannot load it ({why})") from None
  return config


def _fields(config, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items"):
      out += _fields(v, f"{prefix}{k}.")
  return out


def _check_override_names(config, overrides: Sequence[str]) -> None:
  """Each `--config.a.b` names a field of the config; else say which fields are near."""
  fields = _fields(config)
  for arg in overrides:
    name = arg.split("=", 1)[0].lstrip("-")
    if not name.startswith("config."):
      continue
    field = name.removeprefix("config.")
    if field in fields:
      continue
    leaf = field.rsplit(".", 1)[-1]
    near = [f for f in fields if f.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
      field, fields, n=3
    )
    hint = f"; did you mean {' or '.join(f'--config.{f}' for f in near)}?" if near else "."
    raise LaunchCheckError(f"{arg}: the config has no field {field!r}{hint}")


def parse_run_args(args: Sequence[str]):
  """The config `python -m experiments.run ARGS` would train (ARGS: --config=..., overrides...)."""
  args = list(args)
  with _from_repo_root():
    base = _parse([a for a in args if a.startswith(("--config=", "-config="))])
    _check_override_names(base, args)
    return _parse(args)


def check_run_args(args: Sequence[str], *, num_devices: int, num_processes: int) -> dict:
  """Raises LaunchCheckError unless `experiments.run ARGS` passes the config checks on a target
  of `num_devices` devices over `num_processes` processes; returns the mesh shape it gets."""
  config = parse_run_args(args)
  from smt_jax.runner import config as config_lib

  try:
    return config_lib.validate_for_devices(
      config, num_devices=num_devices, num_processes=num_processes
    )
  except config_lib.ConfigError as e:
    raise LaunchCheckError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m launch.checks",
    description="Check experiments.run's arguments against a target's devices, without them.",
    epilog="Every other argument is experiments.run's: --config=..., --config.field=value, ...",
  )
  parser.add_argument("--num-devices", type=int, required=True, help="Devices of the whole job.")
  parser.add_argument(
    "--num-processes", type=int, default=1, help="Processes (hosts, or SLURM tasks) of the job."
  )
  args, run_args = parser.parse_known_args(argv)
  try:
    shape = check_run_args(run_args, num_devices=args.num_devices, num_processes=args.num_processes)
  except (LaunchCheckError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"ok: mesh {shape} on {args.num_devices} devices, {args.num_processes} processes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
