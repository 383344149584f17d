"""Side-by-side train-step speed: the authors' PyTorch reference against smt-jax,
same model, this CPU.

  SMT_REF_PYTHON=/root/refvenv/bin/python \
      python -m experiments.reference.compare_speed --rounds=3 --out=docs/reference_speed.json
  python -m experiments.reference.compare_speed --torch_python=/root/refvenv/bin/python --rounds=1

Each round runs, one after the other (never two at once), a subprocess of
`python -m experiments.benchmark --config=experiments/configs/bench.py` (smt-jax, this interpreter)
and one of `<torch_python> -m experiments.reference.benchmark_torch` (the reference, imported from
`../shared/reference/smt-pytorch/src`), alternating which goes first from round to round. Both time
the SMT, DMT and BPTT train steps of the bench config (vocab 17, d_model 64, 4 memory tokens, 4
heads, encoder 2, decoder 1, RNN 2, readout 1, batch 32; SMT Tc 64 Tf 32, DMT Tc 64 Td 32 Tf 32 k 4,
BPTT T 64) with the same --warmup and --steps, float32, on all the machine's cores: XLA's CPU
backend uses one thread per core by default, and the torch side gets --threads (default 2, this
machine's core count). Each side reports the median step time of its run.

Run it on an otherwise idle machine: a warning is printed when the load average before a run is
above --max_load. Under load, torch's OpenMP threads spin-wait for each other at every one of the
hundreds (SMT) to thousands (DMT, BPTT) of small ops of a step, and its steps can get 10-50x slower
(the CPU time too), which is not the reference's speed; --torch_omp_wait_policy=PASSIVE avoids that,
at 1.6-1.8x on an idle machine.

The table gives per phase the reference's and smt-jax's ms/step and the ratio ours/ref, each the
median over rounds (the ratio is the median of the per-round ratios), against the targets
SMT <= 0.7x, DMT <= 0.3x, BPTT <= 0.3x (an earlier, stricter set was 0.5x, 0.2x, 0.2x), and
beside them each side's fastest step over all rounds
and their ratio, which load disturbs least. --out writes every round's numbers as JSON.

How the two step times are taken differs slightly: smt-jax dispatches step i+1 before waiting for
step i (the training loop's steady state, compilation excluded and reported apart); PyTorch on CPU
runs each step synchronously. Wall time on a shared machine is noisy; the JSON also holds each
side's CPU seconds per step and the load average around each run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("rounds", 3, "Rounds; each runs both benchmarks once.")
flags.DEFINE_string("out", None, "Write every round's numbers and the summary as JSON here.")
flags.DEFINE_string(
  "torch_python",
  os.environ.get("SMT_REF_PYTHON"),
  "Python interpreter with torch and x-transformers (default: $SMT_REF_PYTHON).",
)
flags.DEFINE_string("ref_src", None, "Passed to benchmark_torch --ref_src (default: its own).")
flags.DEFINE_string("config", "experiments/configs/bench.py", "smt-jax benchmark config.")
flags.DEFINE_list("phases", ["smt", "dmt", "bptt"], "Phases to compare.")
flags.DEFINE_integer("steps", 20, "Timed steps per phase, both sides.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per phase (after compilation for smt-jax).")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads for the reference.")
flags.DEFINE_enum(
  "torch_omp_wait_policy",
  "default",
  ["default", "PASSIVE", "ACTIVE"],
  "OMP_WAIT_POLICY of the reference (benchmark_torch --omp_wait_policy). "
  "'default' leaves torch as it is: the fastest on an idle machine. On a machine "
  "others load, its spin-waiting can make its steps 10-50x slower "
  "(which flatters smt-jax); PASSIVE avoids that but costs 1.6-1.8x when idle.",
)
flags.DEFINE_float(
  "max_load",
  1.5,
  "Warn when the 1-minute load average before a run exceeds "
  "this (the numbers are then not the idle machine's).",
)
flags.DEFINE_multi_string(
  "jax_arg",
  [],
  "Extra argument for experiments.benchmark (repeatable), e.g. --jax_arg=--host_devices=2.",
)
flags.DEFINE_multi_string("torch_arg", [], "Extra argument for benchmark_torch (repeatable).")
flags.DEFINE_integer(
  "retries",
  1,
  "Reruns of a failed benchmark subprocess (smt-jax may be mid-edit), after --retry_wait_s.",
)
flags.DEFINE_integer("retry_wait_s", 180, "Seconds to wait before rerunning a failed benchmark.")
flags.DEFINE_integer("timeout_s", 1800, "Timeout of one benchmark subprocess.")
FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = {"smt": 0.7, "dmt": 0.3, "bptt": 0.3}  # smt-jax step time / reference step time
KEEP = (
  "median_s",
  "p25_s",
  "p75_s",
  "min_s",
  "p90_s",
  "cpu_s",
  "compile_s",
  "tokens_per_s",
  "steps",
  "loss",
)


def _git(*args) -> str | None:
  try:
    return subprocess.run(
      ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
  except Exception:  # noqa: BLE001 - git missing or not a checkout: the info is optional
    return None


def _command(side: str, out_json: str) -> tuple[list[str], dict]:
  env = dict(os.environ)
  common = [f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}"]
  if side == "jax":
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [
      sys.executable,
      "-m",
      "experiments.benchmark",
      f"--config={FLAGS.config}",
      f"--objectives={','.join(FLAGS.phases)}",
      *common,
      f"--out={out_json}",
      *FLAGS.jax_arg,
    ]
  else:
    cmd = [
      FLAGS.torch_python,
      "-m",
      "experiments.reference.benchmark_torch",
      f"--phases={','.join(FLAGS.phases)}",
      f"--threads={FLAGS.threads}",
      *common,
      f"--out={out_json}",
      *([f"--ref_src={FLAGS.ref_src}"] if FLAGS.ref_src else []),
      *(
        [f"--omp_wait_policy={FLAGS.torch_omp_wait_policy}"]
        if FLAGS.torch_omp_wait_policy != "default"
        else []
      ),
      *FLAGS.torch_arg,
    ]
  return cmd, env


def run_side(side: str, tmp: str, tag: str) -> dict:
  """Runs one benchmark subprocess (with retries); returns its per-phase numbers or an error."""
  out_json = os.path.join(tmp, f"{tag}_{side}.json")
  cmd, env = _command(side, out_json)
  attempts = []
  for attempt in range(FLAGS.retries + 1):
    if attempt:
      print(f"  {side}: failed; retrying in {FLAGS.retry_wait_s} s", flush=True)
      time.sleep(FLAGS.retry_wait_s)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    if load_before[0] > FLAGS.max_load:
      print(
        f"  WARNING: load average {load_before[0]:.2f} before the {side} run (others are "
        f"using the CPU): its times are inflated, the reference's possibly many-fold",
        flush=True,
      )
    try:
      proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=FLAGS.timeout_s,
        check=False,
      )
      rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
      rc, tail = "timeout", str(e)[-3000:]
    wall = time.perf_counter() - t0
    info = {
      "cmd": cmd,
      "rc": rc,
      "wall_s": wall,
      "load_avg_before": list(load_before),
      "load_avg_after": list(os.getloadavg()),
    }
    if rc == 0 and os.path.exists(out_json):
      with open(out_json) as f:
        raw = json.load(f)
      phases = {p: {k: raw[p][k] for k in KEEP if k in raw[p]} for p in FLAGS.phases if p in raw}
      meta = {
        k: raw[k]
        for k in (
          "n_params_teacher",
          "n_params_rnn",
          "torch",
          "x_transformers",
          "threads",
          "omp_wait_policy",
        )
        if k in raw
      }
      meta.update(raw.get("meta", {}))
      print(
        f"  {side}: "
        + ", ".join(f"{p} {1e3 * r['median_s']:.1f} ms" for p, r in phases.items())
        + f"  ({wall:.0f} s)",
        flush=True,
      )
      return {**info, "phases": phases, "meta": meta, "attempts": attempts}
    attempts.append({**info, "output_tail": tail})
  print(f"  {side}: FAILED (rc {rc}); last output:\n{tail}", flush=True)
  return {"error": f"rc {rc}", "attempts": attempts}


def summarize(rounds: list[dict]) -> dict:
  summary = {}
  for p in FLAGS.phases:
    ref = [r["torch"]["phases"][p]["median_s"] for r in rounds if p in r["torch"].get("phases", {})]
    ours = [r["jax"]["phases"][p]["median_s"] for r in rounds if p in r["jax"].get("phases", {})]
    ratios = [
      r["jax"]["phases"][p]["median_s"] / r["torch"]["phases"][p]["median_s"]
      for r in rounds
      if p in r["jax"].get("phases", {}) and p in r["torch"].get("phases", {})
    ]
    ratio = statistics.median(ratios) if ratios else None
    # The fastest single step of each side over all rounds: the least disturbed by other jobs.
    ref_min = [
      r["torch"]["phases"][p]["min_s"] for r in rounds if p in r["torch"].get("phases", {})
    ]
    ours_min = [r["jax"]["phases"][p]["min_s"] for r in rounds if p in r["jax"].get("phases", {})]
    target = TARGETS.get(p)
    summary[p] = {
      "ref_ms": 1e3 * statistics.median(ref) if ref else None,
      "ours_ms": 1e3 * statistics.median(ours) if ours else None,
      "ratio": ratio,
      "ratios": ratios,
      "target": target,
      "ref_min_ms": 1e3 * min(ref_min) if ref_min else None,
      "ours_min_ms": 1e3 * min(ours_min) if ours_min else None,
      "ratio_min": (min(ours_min) / min(ref_min)) if (ref_min and ours_min) else None,
      "met": (ratio <= target) if (ratio is not None and target is not None) else None,
      "rounds": len(ratios),
    }
  return summary


def format_table(summary: dict, n_rounds: int) -> str:
  def f(v, fmt):
    return "-" if v is None else format(v, fmt)

  lines = [
    f"median over {n_rounds} round(s); ratio = smt-jax / reference; the last three "
    f"columns: the fastest step of each side over all rounds (least disturbed by load)",
    f"{'phase':<7}{'reference ms/step':>19}{'smt-jax ms/step':>17}{'ratio':>8}"
    f"{'target':>9}{'':>8}{'ref min':>9}{'ours min':>10}{'ratio':>7}",
  ]
  for p, s in summary.items():
    met = {True: "met", False: "MISSED", None: "-"}[s["met"]]
    lines.append(
      f"{p:<7}{f(s['ref_ms'], '.1f'):>19}{f(s['ours_ms'], '.1f'):>17}"
      f"{f(s['ratio'], '.3f'):>8}{'<= ' + f(s['target'], 'g'):>9}{met:>8}"
      f"{f(s['ref_min_ms'], '.1f'):>9}{f(s['ours_min_ms'], '.1f'):>10}"
      f"{f(s['ratio_min'], '.3f'):>7}"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.torch_python:
    raise SystemExit(
      "compare_speed: no PyTorch interpreter; pass --torch_python=PATH (or set SMT_REF_PYTHON)"
    )
  if not (os.path.isfile(FLAGS.torch_python) and os.access(FLAGS.torch_python, os.X_OK)):
    raise SystemExit(f"compare_speed: --torch_python={FLAGS.torch_python} is not an executable")
  bad = sorted(set(FLAGS.phases) - set(TARGETS))
  if bad:
    raise app.UsageError(f"--phases: unknown {bad}; choose from {list(TARGETS)}")

  started = time.strftime("%Y-%m-%d %H:%M:%S")
  rounds = []
  with tempfile.TemporaryDirectory(prefix="compare_speed_") as tmp:
    for i in range(FLAGS.rounds):
      order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
      print(f"round {i + 1}/{FLAGS.rounds} ({order[0]} first)", flush=True)
      rnd = {"round": i + 1, "order": list(order)}
      for side in order:
        rnd[side] = run_side(side, tmp, f"r{i}")
      rounds.append(rnd)

  summary = summarize(rounds)
  print(format_table(summary, FLAGS.rounds), flush=True)
  ref_meta = next((r["torch"]["meta"] for r in rounds if "meta" in r["torch"]), {})
  jax_meta = next((r["jax"]["meta"] for r in rounds if "meta" in r["jax"]), {})
  if ref_meta:
    print(
      f"reference: torch {ref_meta.get('torch')}, {ref_meta.get('threads')} threads, "
      f"{ref_meta.get('n_params_teacher')} teacher / {ref_meta.get('n_params_rnn')} RNN "
      f"parameters; smt-jax: jax {jax_meta.get('jax')}, {jax_meta.get('device_count')} "
      f"{jax_meta.get('platform')} device(s), {jax_meta.get('cpu_count')} cores, "
      f"{jax_meta.get('n_params_teacher', '?')} / {jax_meta.get('n_params_rnn', '?')}",
      flush=True,
    )
    counts = [(m.get("n_params_teacher"), m.get("n_params_rnn")) for m in (ref_meta, jax_meta)]
    if jax_meta and None not in counts[1] and counts[0] != counts[1]:
      print(
        f"WARNING: the parameter counts differ (reference {counts[0]}, smt-jax {counts[1]}): "
        f"not the identical model",
        flush=True,
      )

  if FLAGS.out:
    result = {
      "summary": summary,
      "targets": TARGETS,
      "rounds": rounds,
      "settings": {
        "rounds": FLAGS.rounds,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
        "threads": FLAGS.threads,
        "config": FLAGS.config,
        "phases": FLAGS.phases,
        "torch_omp_wait_policy": FLAGS.torch_omp_wait_policy,
        "jax_args": FLAGS.jax_arg,
        "torch_args": FLAGS.torch_arg,
      },
      "git": {
        "head": _git("rev-parse", "HEAD"),
        "dirty": _git("status", "--porcelain", "--", "smt_jax", "experiments"),
      },
      "cpu_count": os.cpu_count(),
      "started": started,
      "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {FLAGS.out}", flush=True)
  if any(s["rounds"] == 0 for s in summary.values()):
    raise SystemExit("compare_speed: some phase has no complete round (see the output above)")


if __name__ == "__main__":
  app.run(main)
