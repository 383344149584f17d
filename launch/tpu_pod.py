"""Run one `experiments.run` job on a Cloud TPU VM slice: create, copy, install, run, delete.

Every worker (host) of the slice runs the same command; `experiments.run` calls
`jax.distributed.initialize()`, which finds its peers through the TPU metadata, so nothing here
assigns process ids. The workdir must be a GCS path: all hosts share it, process 0 writes metrics
and checkpoints there, and it outlives the slice, so rerunning the same command after a preemption
creates a fresh slice and resumes from the latest checkpoint.

Usage (from the repository root; `--dry-run` prints the commands, one per line, and runs nothing):

  python -m launch.tpu_pod \\
      --name=smt-pixels --zone=us-west4-a --accelerator-type=v5litepod-16 --project=my-project \\
      --config=experiments/configs/pixels.py --workdir=gs://my-bucket/smt/pixels \\
      --spot --log-file=pixels.log -- --config.smt.batch_size=256

  # Before anything is created, the config and its overrides are checked here, as experiments.run
  # will parse and check them, against the slice's devices and hosts (16 and 4 for v5litepod-16):
  # a field that does not exist or a batch size the slice cannot split fails in seconds.

  # Keep the slice for a second run, then iterate on it without re-creating:
  python -m launch.tpu_pod ... --keep
  python -m launch.tpu_pod ... --steps=copy,install,run --keep
  python -m launch.tpu_pod ... --steps=delete

Overrides for the config (`--config.field=value`) may come anywhere on the command line in that
`=` form; everything after a bare `--` is passed to `experiments.run` verbatim.

The code that decides *what* to run is pure functions returning argv lists (`build_plan` and the
`*_command` helpers); only `execute` starts processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("create", "copy", "install", "run", "delete")

# Software ("runtime") versions Google recommends for JAX, by accelerator family
# (https://cloud.google.com/tpu/docs/runtimes). Longest prefix first: "v5litepod" before "v5p".
_RUNTIME_VERSIONS = (
  ("v6e", "v2-alpha-tpuv6e"),
  ("v5litepod", "v2-alpha-tpuv5-lite"),
  ("v5e", "v2-alpha-tpuv5-lite"),
  ("v5p", "v2-alpha-tpuv5"),
  ("v4", "tpu-ubuntu2204-base"),
  ("v3", "tpu-ubuntu2204-base"),
  ("v2", "tpu-ubuntu2204-base"),
)
# What an accelerator type's number counts, by family: (prefix, TensorCores per JAX device, JAX
# devices per host, the most devices a single-host slice has). v2/v3 count TensorCores, one
# device each, 8 per host; v4/v5p count TensorCores too, two per (megacore) device, 4 devices per
# host; v5e/v6e count chips, one device each, 4 per host in multi-host slices, up to 8 on one host
# (https://cloud.google.com/tpu/docs/system-architecture-tpu-vm).
_TOPOLOGIES = (
  ("v6e", 1, 4, 8),
  ("v5litepod", 1, 4, 8),
  ("v5e", 1, 4, 8),
  ("v5p", 2, 4, 4),
  ("v4", 2, 4, 4),
  ("v3", 1, 8, 8),
  ("v2", 1, 8, 8),
)
# GCP resource names: lowercase letters, digits and hyphens, starting with a letter.
_NAME_PATTERN = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of the launch plan. `stage` is one of STAGES, or "package" (local git archive)."""

  stage: str
  argv: tuple[str, ...]


# ----------------------------------------------------------------------------- pure: commands


def default_runtime_version(accelerator_type: str) -> str:
  """The recommended TPU software version for an accelerator type such as "v5litepod-16"."""
  for prefix, version in _RUNTIME_VERSIONS:
    if accelerator_type.startswith(prefix):
      return version
  raise ValueError(
    f"no default runtime version for accelerator type {accelerator_type!r}; "
    "pass --runtime-version (see `gcloud compute tpus tpu-vm versions list`)"
  )


def tpu_topology(accelerator_type: str) -> tuple[int, int]:
  """(JAX devices, hosts) of a slice such as "v5litepod-16" (16, 4) or "v4-32" (16, 4)."""
  for prefix, cores_per_device, per_host, single_host in _TOPOLOGIES:
    if accelerator_type.startswith(prefix + "-"):
      count = accelerator_type.removeprefix(prefix + "-")
      if count.isdigit() and int(count) >= cores_per_device:
        devices = int(count) // cores_per_device
        return devices, 1 if devices <= single_host else -(-devices // per_host)
  raise ValueError(
    f"cannot tell how many devices and hosts a {accelerator_type!r} slice has, to check the "
    "config against them; pass --skip-config-check to launch unchecked"
  )


def _gcloud_tpu(verb: str, *positional: str, zone: str, project: str | None) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB POSITIONAL...` with the zone and (optional) project flags."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional, f"--zone={zone}"]
  if project:
    argv.append(f"--project={project}")
  return argv


def create_command(
  name: str,
  *,
  zone: str,
  project: str | None,
  accelerator_type: str,
  runtime_version: str,
  spot: bool = False,
  preemptible: bool = False,
  extra_args: Sequence[str] = (),
) -> list[str]:
  """Creates the slice. `spot`/`preemptible` pick the cheaper capacity that may be reclaimed."""
  if spot and preemptible:
    raise ValueError("spot and preemptible are mutually exclusive")
  argv = _gcloud_tpu("create", name, zone=zone, project=project)
  argv += [f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"]
  if spot:
    argv.append("--spot")
  if preemptible:
    argv.append("--preemptible")
  return argv + list(extra_args)


def ssh_command(name: str, remote_command: str, *, zone: str, project: str | None) -> list[str]:
  """Runs one shell command on every worker at once (`--worker=all`); output is interleaved."""
  argv = _gcloud_tpu("ssh", name, zone=zone, project=project)
  return argv + ["--worker=all", f"--command={remote_command}"]


def package_command(
  *, ref: str, tarball: str, remote_dir: str, repo_root: str | pathlib.Path = REPO_ROOT
) -> list[str]:
  """A `git archive` tarball of the committed tree at `ref`, unpacking into `remote_dir/`.

  Uncommitted changes are NOT shipped: that is what makes a run reproducible from its ref.
  """
  return [
    "git",
    "-C",
    str(repo_root),
    "archive",
    "--format=tar.gz",
    f"--prefix={remote_dir}/",
    f"--output={tarball}",
    ref,
  ]


def copy_archive_commands(
  name: str, *, zone: str, project: str | None, tarball: str, remote_dir: str
) -> list[list[str]]:
  """Copies the tarball to every worker's home directory, then replaces `remote_dir` with it."""
  remote_tarball = f"{remote_dir}.tar.gz"  # relative to the remote home directory
  scp = _gcloud_tpu("scp", tarball, f"{name}:{remote_tarball}", zone=zone, project=project)
  scp += ["--worker=all", "--recurse"]
  unpack = (
    f"rm -rf {shlex.quote(remote_dir)} && tar -xzf {shlex.quote(remote_tarball)} "
    f"&& rm -f {shlex.quote(remote_tarball)}"
  )
  return [scp, ssh_command(name, unpack, zone=zone, project=project)]


def clone_command(
  name: str, *, zone: str, project: str | None, repo_url: str, ref: str, remote_dir: str
) -> list[str]:
  """Clones `repo_url` at `ref` on every worker (the workers need read access to the repo)."""
  q_dir = shlex.quote(remote_dir)
  remote = (
    f"rm -rf {q_dir} && git clone --quiet {shlex.quote(repo_url)} {q_dir} "
    f"&& git -C {q_dir} checkout --quiet {shlex.quote(ref)}"
  )
  return ssh_command(name, remote, zone=zone, project=project)


def install_command(
  name: str, *, zone: str, project: str | None, remote_dir: str, python: str = "python3"
) -> list[str]:
  """`pip install -e .[tpu]` on every worker, after a pip recent enough for editable installs."""
  pip = shlex.join([python, "-m", "pip", "install", "--quiet"])
  remote = (
    f"cd {shlex.quote(remote_dir)} && {pip} --upgrade pip && {pip} -e {shlex.quote('.[tpu]')}"
  )
  return ssh_command(name, remote, zone=zone, project=project)


def experiment_argv(
  *, config: str, workdir: str, overrides: Sequence[str] = (), python: str = "python3"
) -> list[str]:
  """The command every worker runs: `python -m experiments.run --config=... --workdir=...`."""
  return [python, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}", *overrides]


def run_command(
  name: str,
  *,
  zone: str,
  project: str | None,
  remote_dir: str,
  config: str,
  workdir: str,
  overrides: Sequence[str] = (),
  env: Sequence[str] = (),
  python: str = "python3",
) -> list[str]:
  """Starts the experiment on every worker; the ssh session streams its output until it ends."""
  argv = experiment_argv(config=config, workdir=workdir, overrides=overrides, python=python)
  if env:
    argv = ["env", *env, *argv]
  remote = f"cd {shlex.quote(remote_dir)} && {shlex.join(argv)}"
  return ssh_command(name, remote, zone=zone, project=project)


def delete_command(name: str, *, zone: str, project: str | None) -> list[str]:
  """Deletes the slice without a confirmation prompt."""
  argv = _gcloud_tpu("delete", name, zone=zone, project=project)
  return argv + ["--quiet"]


def build_plan(args: argparse.Namespace) -> list[Step]:
  """Every command of the launch, in order, for the stages in `args.steps` (no delete if --keep)."""
  where = dict(zone=args.zone, project=args.project)
  stages = set(args.steps) - ({"delete"} if args.keep else set())
  ship_archive = "copy" in stages and not args.repo
  tarball = args.tarball or str(pathlib.Path(tempfile.gettempdir()) / f"{args.name}-src.tar.gz")
  plan: list[Step] = []
  if ship_archive:
    # Packaged before the slice exists: a bad ref fails before any TPU time is paid for.
    plan.append(
      Step(
        "package", tuple(package_command(ref=args.ref, tarball=tarball, remote_dir=args.remote_dir))
      )
    )
  if "create" in stages:
    runtime = args.runtime_version or default_runtime_version(args.accelerator_type)
    plan.append(
      Step(
        "create",
        tuple(
          create_command(
            args.name,
            **where,
            accelerator_type=args.accelerator_type,
            runtime_version=runtime,
            spot=args.spot,
            preemptible=args.preemptible,
            extra_args=args.create_arg,
          )
        ),
      )
    )
  if ship_archive:
    plan += [
      Step("copy", tuple(argv))
      for argv in copy_archive_commands(
        args.name, **where, tarball=tarball, remote_dir=args.remote_dir
      )
    ]
  elif "copy" in stages:
    plan.append(
      Step(
        "copy",
        tuple(
          clone_command(
            args.name, **where, repo_url=args.repo, ref=args.ref, remote_dir=args.remote_dir
          )
        ),
      )
    )
  if "install" in stages:
    plan.append(
      Step(
        "install",
        tuple(install_command(args.name, **where, remote_dir=args.remote_dir, python=args.python)),
      )
    )
  if "run" in stages:
    plan.append(
      Step(
        "run",
        tuple(
          run_command(
            args.name,
            **where,
            remote_dir=args.remote_dir,
            config=args.config,
            workdir=args.workdir,
            overrides=args.overrides,
            env=args.env,
            python=args.python,
          )
        ),
      )
    )
  if "delete" in stages:
    plan.append(Step("delete", tuple(delete_command(args.name, **where))))
  return plan


# ----------------------------------------------------------------------------- pure: flags


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m launch.tpu_pod",
    allow_abbrev=False,
    description="Create a Cloud TPU VM slice, copy and install smt-jax on every worker, run "
    "experiments.run on all of them, then delete the slice.",
    epilog="Config overrides: --config.field=value anywhere, or anything after a bare `--`.",
  )
  slice_ = parser.add_argument_group("slice")
  slice_.add_argument("--name", required=True, help="TPU VM name (lowercase, digits, hyphens).")
  slice_.add_argument("--zone", required=True, help="e.g. us-west4-a")
  slice_.add_argument(
    "--accelerator-type",
    default=None,
    help="e.g. v5litepod-16, v5p-32, v6e-16, v4-32 (needed to create).",
  )
  slice_.add_argument(
    "--runtime-version",
    default=None,
    help="TPU software version; default: Google's JAX recommendation for the "
    "accelerator family (e.g. v2-alpha-tpuv5-lite for v5litepod-*).",
  )
  slice_.add_argument("--project", default=None, help="GCP project (default: gcloud's).")
  capacity = slice_.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="Spot capacity (cheap, preemptible).")
  capacity.add_argument("--preemptible", action="store_true", help="Legacy preemptible capacity.")
  slice_.add_argument(
    "--create-arg",
    action="append",
    default=[],
    metavar="FLAG",
    help="Extra flag for `tpu-vm create`, repeatable, `=` form: --create-arg=--network=my-net",
  )

  code = parser.add_argument_group("code")
  code.add_argument(
    "--repo",
    default=None,
    help="git URL to clone on the workers; default: ship a `git archive` of this "
    "checkout (committed files only).",
  )
  code.add_argument("--ref", default="HEAD", help="git ref to ship or check out (default: HEAD).")
  code.add_argument(
    "--remote-dir",
    default="smt-jax",
    help="Checkout directory relative to the workers' home (%(default)s).",
  )
  code.add_argument("--tarball", default=None, help="Local path for the git archive.")
  code.add_argument("--python", default="python3", help="Interpreter on the workers.")

  job = parser.add_argument_group("job")
  job.add_argument(
    "--config",
    default=None,
    help="experiments.run config, e.g. experiments/configs/pixels.py:mnist (needed to run).",
  )
  job.add_argument(
    "--workdir",
    default=None,
    help="gs:// path shared by all hosts: metrics, checkpoints, resume (needed to run).",
  )
  job.add_argument(
    "--skip-config-check",
    action="store_true",
    help="Do not check --config and its overrides here against the slice's devices before "
    "anything starts (the check uses this checkout's configs: skip it when --ref or --repo "
    "ships configs that differ).",
  )
  job.add_argument(
    "--env",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="Environment variable for the job on every worker, repeatable.",
  )

  flow = parser.add_argument_group("flow")
  flow.add_argument(
    "--steps", default=",".join(STAGES), help="Comma-separated stages to run, from %(default)s."
  )
  flow.add_argument(
    "--keep",
    action="store_true",
    help="Do not delete the slice, neither at the end nor on failure.",
  )
  flow.add_argument(
    "--log-file",
    default=None,
    help="Also append all command output (the job's logs included) here.",
  )
  flow.add_argument(
    "--dry-run",
    action="store_true",
    help="Print every command, one per line, shell-quoted; run nothing.",
  )
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses launcher flags; `--config.*` flags and everything after `--` become `overrides`."""
  argv = list(argv)
  tail: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, tail = argv[:cut], argv[cut + 1 :]
  parser = make_parser()
  args, unknown = parser.parse_known_args(argv)
  stray = [a for a in unknown if not (a.startswith("--config.") and "=" in a)]
  if stray:
    parser.error(
      f"unrecognised arguments {stray}; config overrides take the form "
      "--config.field=value, other experiments.run flags go after a bare `--`"
    )
  args.overrides = unknown + tail

  args.steps = [s for s in args.steps.split(",") if s]
  if bad := [s for s in args.steps if s not in STAGES]:
    parser.error(f"--steps: unknown stage(s) {bad}; choose from {','.join(STAGES)}")
  if not _NAME_PATTERN.fullmatch(args.name):
    parser.error(
      f"--name {args.name!r}: use lowercase letters, digits and hyphens, "
      "starting with a letter (at most 63 characters)"
    )
  if "run" in args.steps:
    if not (args.config and args.workdir):
      parser.error("the run stage needs --config and --workdir")
    if not args.workdir.startswith("gs://"):
      # A local path would give each host its own, unshared directory that dies with the slice.
      parser.error(f"--workdir {args.workdir!r}: must be a gs:// path that all hosts share")
  if bad := [e for e in args.env if "=" not in e or e.startswith("=")]:
    parser.error(f"--env {bad}: use KEY=VALUE")
  if "create" in args.steps and not args.accelerator_type:
    parser.error("the create stage needs --accelerator-type (e.g. v5litepod-16)")
  if "create" in args.steps and not args.runtime_version:
    try:
      default_runtime_version(args.accelerator_type)
    except ValueError as e:
      parser.error(str(e))
  return args


# ----------------------------------------------------------------------------- imperative shell


def _say(message: str, log: BinaryIO | None = None) -> None:
  """Progress for the human, on stderr (stdout carries the commands' own output)."""
  print(f"[tpu_pod] {message}", file=sys.stderr, flush=True)
  if log is not None:
    log.write(f"[tpu_pod] {message}\n".encode())
    log.flush()


def run_streaming(argv: Sequence[str], log: BinaryIO | None = None) -> int:
  """Runs argv, streaming its output to stdout and, if given, to `log`; returns the exit code."""
  if log is None:
    return subprocess.run(list(argv), check=False).returncode
  # Chunks rather than lines, so prompts without a trailing newline still show up.
  with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(1 << 16):
      sys.stdout.buffer.write(chunk)
      sys.stdout.buffer.flush()
      log.write(chunk)
      log.flush()
  return proc.returncode


def execute(
  plan: Sequence[Step],
  *,
  log: BinaryIO | None = None,
  run: Callable[[Sequence[str], BinaryIO | None], int] = run_streaming,
) -> int:
  """Runs the plan in order, stopping at the first failure; delete steps run last, always.

  The slice is deleted after a failure (or Ctrl-C) too, but only if this launch created it or was
  pointed at an existing one (no create stage): a failed create may mean the name belongs to
  someone else's slice.
  """
  body = [s for s in plan if s.stage != "delete"]
  teardown = [s for s in plan if s.stage == "delete"]
  owns_slice = not any(s.stage == "create" for s in body)
  rc = 0
  try:
    for step in body:
      _say(f"{step.stage}: {shlex.join(step.argv)}", log)
      rc = run(step.argv, log)
      if rc != 0:
        _say(f"{step.stage} failed with exit code {rc}", log)
        break
      owns_slice |= step.stage == "create"
  finally:
    for step in teardown:
      if not owns_slice:
        _say(
          "not deleting: the slice was not created by this launch. If it exists and is "
          f"yours, delete it with: {shlex.join(step.argv)}",
          log,
        )
        continue
      _say(f"delete: {shlex.join(step.argv)}", log)
      delete_rc = run(step.argv, log)
      if delete_rc != 0:
        _say(f"delete failed with exit code {delete_rc}; the slice may still be billing", log)
      rc = rc or delete_rc
  return rc


def _warn_if_dirty(args: argparse.Namespace) -> None:
  """Only committed files are shipped by `git archive`; say so when the checkout differs."""
  status = subprocess.run(
    ["git", "-C", str(REPO_ROOT), "status", "--porcelain"],
    capture_output=True,
    text=True,
    check=False,
  )
  if status.returncode == 0 and status.stdout.strip():
    _say(f"warning: uncommitted changes are not shipped; the workers get {args.ref!r} as committed")


def check_config(args: argparse.Namespace) -> str:
  """What experiments.run will train, checked here against the slice before anything starts.

  The config and its overrides go through experiments.run's own flag parsing and
  `config_lib.validate_for_devices` with the slice's device and host counts, so a field that
  does not exist or a batch size the slice cannot split fails now, not after create, copy and
  install. Raises ValueError (one line); returns a line saying what was checked.
  """
  devices, hosts = tpu_topology(args.accelerator_type)
  if str(REPO_ROOT) not in sys.path:  # also when run as a script (`python launch/tpu_pod.py`)
    sys.path.insert(0, str(REPO_ROOT))
  run_args = [f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides]
  try:
    from launch import checks

    shape = checks.check_run_args(run_args, num_devices=devices, num_processes=hosts)
  except ImportError as e:  # jax, ml_collections, ...: smt-jax is not installed here
    raise ValueError(
      f"the config check needs smt-jax's dependencies here ({e}): `pip install -e .`, or "
      "--skip-config-check"
    ) from None
  return f"config check: ok, mesh {shape} on {devices} devices over {hosts} hosts"


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if "run" in args.steps and not args.skip_config_check:
    if not args.accelerator_type:
      make_parser().error(
        "the config check needs the slice's --accelerator-type (or --skip-config-check)"
      )
    try:
      _say(check_config(args))
    except ValueError as e:
      make_parser().error(f"config check: {e}")
  plan = build_plan(args)
  if args.dry_run:
    for step in plan:
      print(shlex.join(step.argv))
    return 0

  if "copy" in args.steps and not args.repo:
    _warn_if_dirty(args)
  if "run" in args.steps:
    _say(
      f"workdir {args.workdir}: metrics and checkpoints (process 0 writes them); rerun this "
      "same command to resume from the latest checkpoint there"
    )
  log = open(args.log_file, "ab") if args.log_file else None  # noqa: SIM115 (closed below)
  try:
    return execute(plan, log=log)
  except KeyboardInterrupt:
    _say("interrupted", log)
    return 130
  finally:
    if log is not None:
      log.close()


if __name__ == "__main__":
  sys.exit(main())
