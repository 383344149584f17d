"""Launchers: the TPU dry run prints the right commands and runs nothing; the SLURM script's dry run
exports the coordinator environment and one srun line. No network, gcloud or SLURM needed."""

from __future__ import annotations

import importlib.util
import io
import os
import pathlib
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

NASTY = "--config.name=a b; rm -rf ~ && echo 'q' \"$HOME\""
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
    "--config.batch_size=256",
    NASTY,
    "--",
    "--config.model.kind",
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
    "--config.batch_size=256",
    NASTY,
    "--config.model.kind",
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
  result = _run_sbatch(_slurm_env(tmp_path), "--config.batch_size=64", NASTY)
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
    "--config.batch_size=64",
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
