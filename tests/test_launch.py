"""Launchers: the TPU dry run prints the right commands and runs nothing; the SLURM script's dry run
exports the coordinator environment and one srun line. No network, gcloud or SLURM needed."""

from __future__ import annotations

import ast
import importlib.util
import io
import math
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm_gpu.sbatch"


def _load_tpu_pod():
  # By path, so the test does not depend on how (or whether) the package is installed.
  spec = importlib.util.spec_from_file_location("launch_tpu_pod", REPO / "launch" / "tpu_pod.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look the module up by name
  spec.loader.exec_module(module)
  return module


tpu_pod = _load_tpu_pod()

# A real field (the launcher checks the config), with a value no shell may interpret.
NASTY = "--config.data.path=a b; rm -rf ~ && echo 'q' \"$HOME\""
BASE = [
  "--name=smt-pix",
  "--zone=us-west4-a",
  "--project=my-proj",
  "--accelerator-type=v5litepod-16",
  "--config=experiments/configs/pixels.py:mnist",
  "--workdir=gs://bucket/runs/pix",
]


@pytest.fixture
def no_subprocess(monkeypatch):
  """Any attempt to start a process fails the test."""

  def forbidden(*args, **kwargs):
    raise AssertionError(f"dry run started a process: {args!r}")

  for name in ("run", "Popen", "call", "check_call", "check_output"):
    monkeypatch.setattr(tpu_pod.subprocess, name, forbidden)
  monkeypatch.setattr(os, "system", forbidden)


def _dry_run(capsys, *flags: str) -> list[list[str]]:
  assert tpu_pod.main(["--dry-run", *BASE, *flags]) == 0  # before any bare `--`
  out = capsys.readouterr().out
  return [shlex.split(line) for line in out.splitlines()]


def _gcloud_verb(argv: list[str]) -> str:
  assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], argv
  return argv[4]


def _remote(argv: list[str]) -> str:
  """The --command= string of a `tpu-vm ssh` argv."""
  (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return command


# ----------------------------------------------------------------------------- TPU pod


def test_tpu_dry_run_prints_every_stage_in_order(capsys, no_subprocess):
  commands = _dry_run(
    capsys,
    "--spot",
    "--config.smt.batch_size=256",
    NASTY,
    "--",
    "--config.model.rnn_kind",
    "mlp",
    "--jax_log_compiles",
  )
  package, create, scp, unpack, install, run, delete = commands

  assert package[:4] == ["git", "-C", str(REPO), "archive"] and package[-1] == "HEAD"
  tarball = next(a.removeprefix("--output=") for a in package if a.startswith("--output="))

  assert _gcloud_verb(create) == "create" and create[5] == "smt-pix"
  for flag in (
    "--zone=us-west4-a",
    "--project=my-proj",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    "--spot",
  ):
    assert flag in create

  assert _gcloud_verb(scp) == "scp"
  assert scp[5:7] == [tarball, "smt-pix:smt-jax.tar.gz"]
  assert {"--worker=all", "--recurse"} <= set(scp)

  for ssh in (unpack, install, run):
    assert _gcloud_verb(ssh) == "ssh" and ssh[5] == "smt-pix" and "--worker=all" in ssh
  assert "tar -xzf smt-jax.tar.gz" in _remote(unpack)
  assert shlex.split(_remote(install))[-3:] == ["--quiet", "-e", ".[tpu]"]

  remote = shlex.split(_remote(run))
  assert remote[:3] == ["cd", "smt-jax", "&&"]
  # Config and overrides reach the workers as the same argv elements they were given as.
  assert remote[3:] == [
    "python3",
    "-m",
    "experiments.run",
    "--config=experiments/configs/pixels.py:mnist",
    "--workdir=gs://bucket/runs/pix",
    "--config.smt.batch_size=256",
    NASTY,
    "--config.model.rnn_kind",
    "mlp",
    "--jax_log_compiles",
  ]

  assert _gcloud_verb(delete) == "delete" and delete[5] == "smt-pix" and "--quiet" in delete


def test_tpu_keep_clone_and_capacity_flags(capsys, no_subprocess):
  commands = _dry_run(
    capsys,
    "--keep",
    "--preemptible",
    "--repo=https://example.com/smt.git",
    "--ref=v1.2",
    "--create-arg=--network=my-net",
    "--env=XLA_FLAGS=--a=1 --b",
  )
  assert [_gcloud_verb(c) for c in commands] == ["create", "ssh", "ssh", "ssh"]  # no delete
  create, clone, _, run = commands
  assert "--preemptible" in create and "--spot" not in create and "--network=my-net" in create
  assert shlex.split(_remote(clone))[-6:] == ["git", "-C", "smt-jax", "checkout", "--quiet", "v1.2"]
  assert "https://example.com/smt.git" in shlex.split(_remote(clone))
  assert shlex.split(_remote(run))[3:5] == ["env", "XLA_FLAGS=--a=1 --b"]


def test_tpu_steps_select_stages(capsys, no_subprocess):
  assert [_gcloud_verb(c) for c in _dry_run(capsys, "--steps=install,run")] == ["ssh", "ssh"]
  assert [_gcloud_verb(c) for c in _dry_run(capsys, "--steps=delete")] == ["delete"]


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--workdir=/tmp/run"], "gs://"),
    (["--zoen=us"], "unrecognised"),
    (["--config.lr", "0.1"], "unrecognised"),
    (["--name=Bad_Name"], "--name"),
    (["--accelerator-type=tpu9-8"], "runtime-version"),
    (["--steps=create,launch"], "unknown stage"),
  ],
)
def test_tpu_bad_flags_fail_before_anything_runs(capsys, no_subprocess, flags, message):
  with pytest.raises(SystemExit):
    tpu_pod.main([*BASE, *flags, "--dry-run"])
  assert message in capsys.readouterr().err


def _fake_runner(fail_stage=None):
  """Records "create", "delete" or "other" per command; exits 1 on `fail_stage`."""
  calls = []

  def run(argv, log):
    stage = next((verb for verb in ("create", "delete") if verb in argv), "other")
    calls.append(stage)
    return 1 if stage == fail_stage else 0

  return calls, run


def _plan(*flags):
  return tpu_pod.build_plan(tpu_pod.parse_args([*BASE, *flags]))


def test_tpu_execute_deletes_after_a_failed_run():
  calls, run = _fake_runner(fail_stage="other")
  plan = _plan("--steps=create,install,run,delete")
  assert tpu_pod.execute(plan, run=run) == 1
  assert calls == ["create", "other", "delete"]  # stopped at install, then deleted


def test_tpu_execute_does_not_delete_a_slice_it_failed_to_create():
  calls, run = _fake_runner(fail_stage="create")
  assert tpu_pod.execute(_plan(), run=run) == 1
  assert calls == ["other", "create"]  # packaged, create failed, no delete


def test_tpu_execute_keep_never_deletes():
  calls, run = _fake_runner(fail_stage="other")
  assert tpu_pod.execute(_plan("--keep", "--steps=create,run"), run=run) == 1
  assert "delete" not in calls


def test_tpu_streaming_tees_output_to_the_log():
  log = io.BytesIO()
  rc = tpu_pod.run_streaming([sys.executable, "-c", "print('step 1 loss 0.5')"], log)
  assert rc == 0 and b"step 1 loss 0.5" in log.getvalue()


def test_tpu_launch_end_to_end_with_a_fake_gcloud(tmp_path):
  """The real shell: a stub `gcloud` whose training run fails; the slice is still deleted."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  calls = tmp_path / "calls"
  gcloud.write_text(
    "#!/bin/sh\n"
    f'echo "$*" >> {shlex.quote(str(calls))}\n'
    'case "$*" in *experiments.run*) echo "step 1 loss 2.0"; exit 7;; esac\n'
  )
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / "run.log"
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "launch" / "tpu_pod.py"),
      *BASE,
      f"--log-file={log}",
      f"--tarball={tmp_path / 'src.tar.gz'}",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode == 7, result.stderr
  verbs = [line.split()[3] for line in calls.read_text().splitlines()]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
  assert (tmp_path / "src.tar.gz").stat().st_size > 0  # the real `git archive` ran
  assert "step 1 loss 2.0" in result.stdout and "step 1 loss 2.0" in log.read_text()


# ----------------------------------------------------------------------------- SLURM


def _slurm_env(tmp_path) -> dict[str, str]:
  """Fake SLURM allocation: 2 nodes x 8 GPUs, `scontrol` and `srun` stubbed on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  stubs = {
    "scontrol": '[ "$1 $2 $3" = "show hostnames gpu-node-[07-08]" ] || exit 3\n'
    "printf 'gpu-node-07\\ngpu-node-08\\n'\n",
    "srun": f'touch {shlex.quote(str(tmp_path / "srun-was-called"))}\nexit 1\n',
  }
  for name, body in stubs.items():
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    DRY_RUN="1",
    SLURM_JOB_NODELIST="gpu-node-[07-08]",
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="16",
    SLURM_JOB_NUM_NODES="2",
    SLURM_NTASKS_PER_NODE="8",
    SLURM_CPUS_PER_TASK="8",
    SLURM_JOB_NAME="pix",
    SLURM_SUBMIT_DIR=str(tmp_path),
    CONFIG="experiments/configs/pixels.py:mnist",
  )
  return env


def _run_sbatch(env, *args):
  return subprocess.run(
    ["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30, check=False
  )


def test_slurm_dry_run_prints_coordinator_env_and_srun(tmp_path):
  result = _run_sbatch(_slurm_env(tmp_path), "--config.smt.batch_size=64", NASTY)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert "export JAX_COORDINATOR_ADDRESS=gpu-node-07:24242" in lines  # port 20000 + 4242
  assert "export JAX_NUM_PROCESSES=16" in lines
  assert any(line.startswith("export JAX_PROCESS_ID=$SLURM_PROCID") for line in lines)
  assert not (tmp_path / "srun-was-called").exists()

  (srun_line,) = [line for line in lines if line.startswith("srun ")]
  srun = shlex.split(srun_line)
  assert "--cpus-per-task=8" in srun
  python_at = srun.index("python")
  assert srun[python_at:] == [
    "python",
    "-m",
    "experiments.run",
    "--config=experiments/configs/pixels.py:mnist",
    f"--workdir={tmp_path}/runs/pix",
    "--config.smt.batch_size=64",
    NASTY,
  ]

  # The per-task wrapper really gives each task its own JAX_PROCESS_ID.
  bash_at = srun.index("bash")
  wrapper = srun[bash_at:python_at] + ["printenv", "JAX_PROCESS_ID"]
  task = subprocess.run(
    wrapper,
    env={**os.environ, "SLURM_PROCID": "5"},
    capture_output=True,
    text=True,
    timeout=30,
    check=True,
  )
  assert task.stdout.strip() == "5"


def test_slurm_respects_workdir_and_port_overrides(tmp_path):
  env = _slurm_env(tmp_path) | {"WORKDIR": "/shared/runs/x y", "COORDINATOR_PORT": "1234"}
  result = _run_sbatch(env)
  assert result.returncode == 0, result.stderr
  assert "export JAX_COORDINATOR_ADDRESS=gpu-node-07:1234" in result.stdout.splitlines()
  assert "--workdir=/shared/runs/x y" in shlex.split(result.stdout.splitlines()[-1])


def test_slurm_refuses_to_run_outside_an_allocation(tmp_path):
  env = {k: v for k, v in _slurm_env(tmp_path).items() if k != "SLURM_JOB_NODELIST"}
  result = _run_sbatch(env)
  assert result.returncode != 0 and "sbatch" in result.stderr


# ----------------------------------------------------------------------------- documented commands
# Every launch command the docs show is checked as the real launch would check it: its config and
# overrides through experiments.run's flag parsing and config_checks, against the devices and
# processes of the target the command names. The commands are read from the files themselves.


def _load_checks():
  spec = importlib.util.spec_from_file_location("launch_checks", REPO / "launch" / "checks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


checks = _load_checks()
DOCUMENTED = ("launch/README.md", "launch/tpu_pod.py", "launch/slurm_gpu.sbatch")


def _shell_text(path: str) -> str:
  """The shell the file shows: README's bash blocks, the module docstring, the script's comments."""
  text = (REPO / path).read_text()
  if path.endswith(".md"):
    return "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S))
  if path.endswith(".py"):
    return ast.get_docstring(ast.parse(text))
  return "\n".join(
    line[1:] for line in text.splitlines() if line.startswith("#") and line[:2] not in ("#!", "#S")
  )


def _documented_commands(path: str) -> list[list[str]]:
  """The launch commands of a file (continued lines joined, comments dropped), placeholders
  (`...`) left out: tpu_pod, slurm_gpu.sbatch and launch.checks invocations."""
  out = []
  for line in re.sub(r"\\\n", " ", _shell_text(path)).splitlines():
    try:
      argv = shlex.split(line, comments=True)
    except ValueError:  # prose with an apostrophe
      continue
    if any("..." in a for a in argv):
      continue
    if {"launch.tpu_pod", "launch.checks"} & set(argv) or any(
      a.endswith("slurm_gpu.sbatch") for a in argv
    ):
      out.append(argv)
  return out


def _sbatch_header() -> dict[str, str]:
  text = SBATCH.read_text()
  header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
  header["config"] = re.search(r'config="\$\{CONFIG:-([^}]*)\}"', text).group(1)
  return header


def _target(argv: list[str]) -> tuple[str, list[str], int, int] | None:
  """(what, experiments.run's arguments, devices, processes) of a documented command; None for a
  command that runs nothing (e.g. --steps=delete)."""
  if "launch.tpu_pod" in argv:
    args = tpu_pod.parse_args(argv[argv.index("launch.tpu_pod") + 1 :])
    if "run" not in args.steps:
      return None
    devices, hosts = tpu_pod.tpu_topology(args.accelerator_type)
    run_args = [f"--config={args.config}", f"--workdir={args.workdir}", *args.overrides]
    return f"tpu_pod {args.accelerator_type}", run_args, devices, hosts
  if "launch.checks" in argv:
    rest = argv[argv.index("launch.checks") + 1 :]
    flags_ = dict(a.removeprefix("--").split("=", 1) for a in rest if a.startswith("--num-"))
    run_args = [a for a in rest if not a.startswith("--num-")]
    return "checks", run_args, int(flags_["num-devices"]), int(flags_.get("num-processes", 1))
  # [ENV=VALUE ...] (sbatch [OPTIONS] | bash) launch/slurm_gpu.sbatch [experiments.run args]
  env = dict(a.split("=", 1) for a in argv if re.fullmatch(r"[A-Z_]+=.*", a))
  script = next(i for i, a in enumerate(argv) if a.endswith("slurm_gpu.sbatch"))
  options = dict(a.removeprefix("--").split("=", 1) for a in argv[:script] if a.startswith("--"))
  slurm = {**_sbatch_header(), **options}
  tasks = int(env.get("SLURM_NTASKS", int(slurm["nodes"]) * int(slurm["ntasks-per-node"])))
  config = env.get("CONFIG", slurm["config"])
  run_args = [f"--config={config}", "--workdir=/shared/run", *argv[script + 1 :]]
  return "slurm", run_args, tasks * int(slurm["gpus-per-task"]), tasks


_COMMANDS = [
  (path, i, argv) for path in DOCUMENTED for i, argv in enumerate(_documented_commands(path))
]


@pytest.mark.parametrize(
  "path, argv", [(p, a) for p, _, a in _COMMANDS], ids=[f"{p}#{i}" for p, i, _ in _COMMANDS]
)
def test_documented_launch_commands_pass_the_config_checks_on_their_target(path, argv):
  target = _target(argv)
  if target is None:
    return
  what, run_args, devices, processes = target
  shape = checks.check_run_args(run_args, num_devices=devices, num_processes=processes)
  assert math.prod(shape.values()) == devices, (what, shape)


def test_the_documented_commands_were_found():
  """The parser above finds what the docs show (else the check would pass by seeing nothing)."""
  found = {path: [_target(a) for a in _documented_commands(path)] for path in DOCUMENTED}
  kinds = {path: sorted({t[0] for t in targets if t}) for path, targets in found.items()}
  assert kinds["launch/README.md"] == ["checks", "slurm", "tpu_pod v5litepod-16"], kinds
  assert kinds["launch/tpu_pod.py"] == ["tpu_pod v5litepod-16"], kinds
  assert kinds["launch/slurm_gpu.sbatch"] == ["checks", "slurm"], kinds
  readme = [t for t in found["launch/README.md"] if t]
  assert {(t[0], t[2], t[3]) for t in readme} >= {
    ("tpu_pod v5litepod-16", 16, 4),
    ("slurm", 16, 16),  # sbatch --nodes=2 x the header's 8 tasks, and the DRY_RUN example's 16
  }
  assert any("--config.profile.num_steps=5" in t[1] for t in readme)  # the profiling example
  assert all(any(a.startswith("--config.") for a in t[1]) for t in readme if t[0] != "checks")


def test_every_config_override_in_the_launch_docs_names_a_field():
  """Prose and printed plans included, not only the commands checked above."""
  base = _fields_of(checks.parse_run_args(["--config=experiments/configs/pixels.py"]))
  for path in DOCUMENTED:
    for name in re.findall(r"--config\.([\w.]+)", (REPO / path).read_text()):
      name = name.rstrip(".")
      if name == "field":  # the placeholder of `--config.field=value`
        continue
      assert name in base or name.startswith("data.options."), f"{path}: --config.{name}"


def _fields_of(config, prefix=""):
  out = set()
  for k, v in config.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _fields_of(v, f"{prefix}{k}.")
  return out


def test_launch_checks_parse_with_experiments_runs_flags():
  run_py = (REPO / "experiments" / "run.py").read_text()
  checks_py = (REPO / "launch" / "checks.py").read_text()
  names = lambda text: sorted(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", text))
  expected = ["config", "fork", "overwrite", "peer_timeout_s", "workdir"]
  assert names(checks_py) == names(run_py) == expected
  assert "lock_config=True" in run_py and "lock_config=True" in checks_py


@pytest.mark.parametrize(
  "accelerator, devices, hosts",
  [
    ("v5litepod-16", 16, 4),
    ("v5litepod-8", 8, 1),
    ("v5litepod-256", 256, 64),
    ("v6e-32", 32, 8),
    ("v5p-8", 4, 1),
    ("v5p-128", 64, 16),
    ("v4-8", 4, 1),
    ("v4-16", 8, 2),
    ("v4-32", 16, 4),
    ("v3-32", 32, 4),
    ("v2-8", 8, 1),
  ],
)
def test_tpu_topology(accelerator, devices, hosts):
  assert tpu_pod.tpu_topology(accelerator) == (devices, hosts)


def test_tpu_topology_of_an_unknown_slice_says_how_to_skip():
  with pytest.raises(ValueError, match="--skip-config-check"):
    tpu_pod.tpu_topology("tpu9-8")


@pytest.mark.parametrize(
  "override, message",
  [
    ("--config.batch_size=256", "no field 'batch_size'; did you mean --config.bptt.batch_size"),
    ("--config.smt.batch_size=100", "config.smt.batch_size = 100: must be divisible by data x"),
    ("--config.smt.batch_size=abc", "--config.smt.batch_size=abc: invalid literal for int()"),
    ("--config.mesh.data=3", "needs 3 devices, but 16 are available"),
    ("--config.profile.start_step=-1", "config.profile.start_step = -1"),
  ],
)
def test_tpu_bad_override_fails_before_any_command_runs(
  capsys, monkeypatch, no_subprocess, override, message
):
  def no_execute(*args, **kwargs):
    raise AssertionError("the plan ran")

  monkeypatch.setattr(tpu_pod, "execute", no_execute)
  with pytest.raises(SystemExit):
    tpu_pod.main([*BASE, override])
  err = capsys.readouterr().err
  assert "config check: " in err and message in err, err
  assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_tpu_config_check_can_be_skipped_and_needs_the_slice_type(capsys, no_subprocess):
  assert tpu_pod.main(["--dry-run", *BASE, "--skip-config-check", "--config.batch_size=1"]) == 0
  assert "--config.batch_size=1" in capsys.readouterr().out  # passed through, unchecked
  with pytest.raises(SystemExit):
    tpu_pod.main(["--dry-run", *[a for a in BASE if "accelerator" not in a], "--steps=run"])
  assert "--accelerator-type" in capsys.readouterr().err


def test_launch_checks_command_line(capsys):
  argv = ["--num-devices=16", "--num-processes=16", "--config=experiments/configs/pixels.py:mnist"]
  assert checks.main([*argv, "--config.smt.batch_size=256"]) == 0
  assert "ok: mesh {'data': 16, 'fsdp': 1, 'time': 1}" in capsys.readouterr().out
  assert checks.main([*argv, "--config.smt.batch_sise=256"]) == 1
  assert "did you mean --config.smt.batch_size" in capsys.readouterr().err
