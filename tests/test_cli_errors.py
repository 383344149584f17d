"""Failures that say one thing: each expected mistake prints exactly one line on stderr, naming
the flag or path and the fix, with no traceback and exit status 1; Ctrl-C (SIGINT) gets SIGTERM's
treatment (a checkpoint, one line, exit 130), also when it lands while XLA compiles.

The mistakes are command lines run as a user would (subprocesses, started together so that their
Python start-ups overlap); all but the workdir ones fail while parsing flags, before JAX loads.
"""

import fcntl
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "experiments/configs/pixels.py:smoke"


def _env(tmp_path):
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_NUM_CPU_DEVICES="1",  # one device whatever the cores (tests/test_cpu_devices.py: more)
    PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


def _start(args, env, cwd=ROOT):
  return subprocess.Popen(
    [sys.executable, "-m", *args],
    cwd=cwd,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_each_mistake_is_one_line(tmp_path):
  env = _env(tmp_path)
  afile = tmp_path / "afile"
  afile.write_text("not a directory")
  if os.geteuid() == 0:  # root writes anywhere a mode allows: /sys refuses even root
    unwritable = "/sys/smt_jax_test_workdir"
  else:
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    unwritable = str(ro / "run")
  locked = tmp_path / "locked"
  locked.mkdir()
  holder = open(locked / ".lock", "a+")
  fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
  holder.write("pid 4242")
  holder.flush()
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  (no_ckpt / "config.json").write_text("{}")
  run = ["experiments.run", f"--config={SMOKE}"]
  cases = {
    "override typo": (
      [*run, "--config.smt.stepz=3", f"--workdir={tmp_path / 'w'}"],
      "--config.smt.stepz: config.smt has no field 'stepz'. Did you mean \"steps\"?",
    ),
    # The design card's short form finds experiments/configs/pixels.py (and then the typo).
    "configs/ short form": (
      ["experiments.run", "--config=configs/pixels.py:smoke", "--config.model.widht=8"],
      "--config.model.widht: config.model has no field 'widht'. Did you mean \"width\"?",
    ),
    "missing config file": (
      ["experiments.run", "--config=experiments/configs/pixel.py"],
      "--config=experiments/configs/pixel.py: no such config file or run; use one of "
      "experiments/configs/{bench.py,pixels.py,synthetic.py,text.py} "
      "(e.g. --config=experiments/configs/pixels.py) or a run's workdir.",
    ),
    "bad config argument": (
      ["experiments.run", "--config=configs/pixels.py:digitz"],
      "--config=experiments/configs/pixels.py:digitz: pixels.py: unknown argument 'digitz'; use "
      "digits, mnist, sketch, quickdraw or smoke.",
    ),
    "workdir is a file": (
      [*run, f"--workdir={afile}"],
      f"workdir {afile} is a file, not a directory: pass another --workdir (or move the file).",
    ),
    "unwritable workdir": (
      [*run, f"--workdir={unwritable}"],
      re.compile(
        rf"cannot write to workdir {re.escape(unwritable)} \([^)]+\): pass a --workdir you can "
        r"write to\."
      ),
    ),
    "workdir in use": (
      [*run, f"--workdir={locked}"],
      f"workdir {locked} is in use by a running job (pid 4242); wait for it to finish or stop "
      f"it, or use another --workdir.",
    ),
    "override of the wrong type": (
      [*run, "--config.smt.steps=1e3"],
      "--config.smt.steps=1e3: smt.steps holds an integer; got '1e3' (e.g. 1000, not 1e3 or "
      "1000.0).",
    ),
    "run: no --config": (["experiments.run"], "--config is required (see --helpshort)."),
    "workdir in an unknown store": (
      [*run, "--workdir=nosuch://bucket/run"],
      "--workdir=nosuch://bucket/run: no filesystem for nosuch:// (Protocol not known: nosuch); "
      "install the fsspec package for it.",
    ),
    "peer timeout": (
      [*run, "--peer_timeout_s=0"],
      "--peer_timeout_s=0.0: must be > 0 seconds (e.g. 60).",
    ),
    "sample: missing workdir": (
      ["experiments.sample", f"--workdir={tmp_path / 'nope'}"],
      f"--workdir={tmp_path / 'nope'}: no such directory; pass the workdir of a run.",
    ),
    "sample: no checkpoints": (
      ["experiments.sample", f"--workdir={no_ckpt}"],
      f"--workdir={no_ckpt}: no checkpoint yet in {no_ckpt}/checkpoints; let the run save one "
      f"(checkpoint_every_steps, or the end of a phase), then sample.",
    ),
  }
  procs = {name: _start(args, env, cwd=ROOT) for name, (args, _) in cases.items()}
  try:
    for name, proc in procs.items():
      out, err = proc.communicate(timeout=300)
      expected = cases[name][1]
      lines = err.splitlines()
      assert proc.returncode == 1 and len(lines) == 1, f"{name}: rc {proc.returncode}\n{err}"
      if isinstance(expected, str):
        assert lines[0] == f"error: {expected}", name
      else:
        assert expected.fullmatch(lines[0].removeprefix("error: ")), (name, lines[0])
  finally:
    holder.close()
  assert not (no_ckpt / "checkpoints").exists()  # sampling created nothing
  assert (tmp_path / "w").exists() is False  # the typo stopped the run before its workdir


def test_ctrl_c_while_compiling_saves_and_exits_130(tmp_path):
  # Ctrl-C while XLA compiles the first train step (JAX_LOG_COMPILES announces it on stderr):
  # the signal is deferred instead of raising inside XLA (a segfault, rc 139, before), the step
  # finishes, and the run saves it and says so in one line.
  env = dict(_env(tmp_path), JAX_LOG_COMPILES="1")
  wd = tmp_path / "run"
  cmd = ["experiments.run", "--config=experiments/configs/synthetic.py:parity,smoke"]
  cmd += ["--config.phases=bptt", "--config.model.rnn_kind=elman", f"--workdir={wd}"]
  proc = _start(cmd, env)
  log = []
  for line in proc.stderr:
    log.append(line)
    if "Compiling jit(step)" in line:
      proc.send_signal(signal.SIGINT)
      break
  else:
    raise AssertionError(f"no train step compiled: {''.join(log)}")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, (out, err)
  assert "Traceback" not in err and "Error" not in err, err
  assert out.splitlines() == [
    f"workdir: {wd}",
    "bptt: compiling its train step...",
    out.splitlines()[2],  # compiled (its time varies)
    "SIGINT: saved a checkpoint at bptt step 1; exiting. Rerun the same command to resume.",
  ]
  assert out.splitlines()[2].startswith("bptt: compiled and ran its first step in ")
  assert os.listdir(wd / "checkpoints") == ["1"]


def test_sigint_sets_the_flag_and_never_raises():
  from smt_jax.runner.preemption import Preempted, SigtermWatch

  before = signal.getsignal(signal.SIGINT)
  watch = SigtermWatch()
  with watch.installed():
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
    time.sleep(0.05)
    assert watch.flag and watch.signal_name == "SIGINT" and watch.check(0)
  assert signal.getsignal(signal.SIGINT) is before  # restored on the way out
  assert Preempted("x", signal.SIGINT).exit_code == 130
  assert Preempted("x").exit_code == 143


def test_a_second_ctrl_c_stops_at_once(tmp_path):
  code = (
    "import os, signal, time\n"
    "from smt_jax.runner.preemption import SigtermWatch\n"
    "w = SigtermWatch()\n"
    "with w.installed():\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(0.05)\n"
    "  print('flag', w.flag, flush=True)\n"
    "  os.kill(os.getpid(), signal.SIGINT)\n"
    "  time.sleep(5)\n"
    "  print('not reached')\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True
  )
  assert proc.returncode == 130 and proc.stdout == "flag True\n"
  assert proc.stderr.strip() == "SIGINT again: exiting without a checkpoint."
