"""The accelerator check: the paper's configuration on whatever device this machine has.

  python -m experiments.device_check --out=runs/device_check        # a GPU or TPU: a few minutes
  python -m experiments.device_check --config=experiments/configs/bench.py:paper,tiny --out=/tmp/c

On the paper's model and phases at parity in bfloat16 (`bench.py:paper`, 256-token vocabulary) it
times, as `experiments.benchmark` does (the runner's own jitted, sharded train step, compiled
first, then steps in steady state):
  smt       SMT as published: the windowed teacher, one transition per sequence;
  smt_full  SMT as the fair race trains it (`common.full_supervision`): the one-pass causal
            teacher, every transition, 8 memories decoded;
  dmt, bptt DMT (Td 256, gradients through the rollout) and BPTT (T 320).
For each: step time, compile time, matmul FLOPs (counted on the step's jaxpr) and MFU against the
device's peak (`benchmark.PEAK_FLOPS`), the memory XLA plans for the compiled step (arguments,
outputs and temporaries, `memory_analysis()`), the device's peak memory in use so far (where the
backend reports it; a step that does not fit is reported as such, with its plan), and (`--fit`,
SMT by default) the largest batch that fits: the step compiled at the config's batch and at twice
it, the memory fitted as fixed + per row, solved for 90% of the device's memory (on a CPU, of the
machine's RAM): an estimate from XLA's plan, not a run.
Writes `<out>/device_check.json` and `<out>/device_check.md` (the table).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import benchmark, cli
from experiments.configs import common
from smt_jax.runner import config as config_lib  # importing them starts no JAX backend
from smt_jax.runner import experiment


def define_flags() -> None:
  """The command line's flags (defined only when run as a program, as `experiments.benchmark`'s)."""
  config_flags.DEFINE_config_file(
    "config",
    "experiments/configs/bench.py:paper",
    "The configuration to check (and :arg).",
    lock_config=False,
  )
  flags.DEFINE_string("out", "runs/device_check", "Folder for device_check.json and .md.")
  flags.DEFINE_list("objectives", ["smt", "smt_full", "dmt", "bptt"], "Which train steps to time.")
  flags.DEFINE_integer("steps", 5, "Timed steps per objective (the median is reported).")
  flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
  flags.DEFINE_integer("vocab_size", 256, "Vocabulary of the uniform random tokens timed.")
  flags.DEFINE_list(
    "fit",
    ["smt"],
    "Objectives whose largest batch is estimated (one more compile each: on the H100 the paper's "
    "steps compiled in 44-101 s, so all four would not fit in 8 minutes).",
  )


FLAGS = flags.FLAGS

OBJECTIVES = ("smt", "smt_full", "dmt", "bptt")
FILL = 0.9  # the share of the device's memory the largest batch may plan for


def objective_config(config, name: str):
  """(config, phase) of one objective: smt_full is SMT with `common.full_supervision`."""
  c = config.copy_and_resolve_references()
  if name == "smt_full":
    common.full_supervision(c, c.smt.context_length + c.smt.future_length)
    return c, "smt"
  return c, name


def device_memory() -> dict:
  """{'limit': bytes one device may use, 'peak': bytes in use at most so far (None if unknown)}:
  the backend's memory_stats on GPU and TPU, the machine's RAM on a CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if limit is None:
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return {"limit": int(limit), "peak": stats.get("peak_bytes_in_use")}


def compiled_step(config, phase: str, batch_size: int, vocab_size: int):
  """The runner's train step of `phase` at `batch_size`, compiled on abstract inputs (nothing is
  allocated or run)."""
  c = config.copy_and_resolve_references()
  c[phase].batch_size = batch_size
  c.phases = "smt,dmt" if phase == "dmt" else phase
  exp = experiment.build_experiment(c, make_source=benchmark.UniformTokens(vocab_size))
  p = experiment.make_phase(exp, phase)
  rows = benchmark.random_batch(np.random.default_rng(0), 1, p.source.seq_len, vocab_size)
  batch = {
    k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=exp.batch_sharding)
    for k, v in rows.items()
  }
  with jax.set_mesh(exp.mesh):
    return p.step.lower(p.abstract_state, batch, jax.random.key(0)).compile()


def largest_batch(config, phase: str, vocab_size: int, limit: int, planned: int | None) -> dict:
  """The largest batch whose planned memory fits FILL of `limit`, from the plans at the config's
  batch (`planned`) and at twice it (memory = fixed + per_row x batch)."""
  b, m0 = config[phase].batch_size, planned
  m1 = benchmark.planned_bytes(compiled_step(config, phase, 2 * b, vocab_size))
  if m0 is None or m1 is None or m1 <= m0:
    return {"largest_batch": None, "bytes_per_row": None, "fixed_bytes": None}
  per_row = (m1 - m0) / b
  fixed = m0 - per_row * b
  step = jax.device_count() * config_lib.grad_accum_steps(config)  # what a batch divides by
  fits = int((FILL * limit - fixed) // per_row) // step * step
  return {"largest_batch": max(fits, 0), "bytes_per_row": per_row, "fixed_bytes": fixed}


def run(config, objectives, *, steps: int, warmup: int, vocab_size: int, fit=()) -> dict:
  """Every objective's measurements, and what was measured on (see the module docstring)."""
  device = jax.devices()[0]
  mem = device_memory()
  out = {
    "meta": {
      "device_kind": device.device_kind,
      "platform": device.platform,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "dtype": str(config.model.dtype),
      "vocab_size": vocab_size,
      "memory_limit_bytes": mem["limit"],
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
  }
  for name in objectives:
    c, phase = objective_config(config, name)
    t0 = time.perf_counter()
    try:
      r = benchmark.time_objective(c, phase, steps=steps, warmup=warmup, vocab_size=vocab_size)
    except jax.errors.JaxRuntimeError as e:  # does not fit: say so, and still plan its memory
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      b = c[phase].batch_size
      r = {"error": str(e).splitlines()[0], "batch_size": b, "seq_len": None}
      r["planned_bytes"] = benchmark.planned_bytes(compiled_step(c, phase, b, vocab_size))
    r["peak_bytes_so_far"] = device_memory()["peak"]
    if name in fit:
      r.update(largest_batch(c, phase, vocab_size, mem["limit"], r["planned_bytes"]))
    r["check_s"] = time.perf_counter() - t0
    out[name] = r
    print(format_row(name, r), flush=True)
  return out


HEADER = (
  "| objective | batch | T | step ms | compile s | GFLOP / step | MFU | planned GB | peak GB |"
  " largest batch (est.) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(name: str, r: dict) -> str:
  gb = lambda v: "-" if v is None else f"{v / 2**30:.2f}"
  mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
  fits = "-" if r.get("largest_batch") is None else f"{r['largest_batch']:,}"
  if "error" in r:
    return (
      f"| {name} | {r['batch_size']} | - | out of memory | - | - | - | "
      f"{gb(r.get('planned_bytes'))} | {gb(r.get('peak_bytes_so_far'))} | {fits} |"
    )
  return (
    f"| {name} | {r['batch_size']} | {r['seq_len']} | {1e3 * r['median_s']:.1f} | "
    f"{r['compile_s']:.1f} | {r['flops'] / 1e9:.3g} | {mfu} | {gb(r.get('planned_bytes'))} | "
    f"{gb(r.get('peak_bytes_so_far'))} | {fits} |"
  )


def markdown(results: dict) -> str:
  m = results["meta"]
  rows = [format_row(k, v) for k, v in results.items() if k != "meta"]
  return "\n".join(
    [
      f"Device: {m['device_kind']} x{m['device_count']} ({m['platform']}), {m['dtype']}, "
      f"vocabulary {m['vocab_size']}, {m['memory_limit_bytes'] / 2**30:.1f} GB per device; "
      f"JAX {m['jax']}, {m['time']}.",
      "",
      HEADER,
      *rows,
      "",
      f"Largest batch: XLA's planned memory at the batch and twice it, fitted linearly and "
      f"solved for {FILL:.0%} of the device's memory (an estimate, not a run).",
    ]
  )


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  for flag in ("objectives", "fit"):
    bad = sorted(set(FLAGS[flag].value) - set(OBJECTIVES))
    if bad:
      raise app.UsageError(f"--{flag}: unknown {bad}; choose from {list(OBJECTIVES)}.")
  cli.use_cpu_cores(FLAGS.config)
  print(HEADER, flush=True)
  results = run(
    FLAGS.config,
    FLAGS.objectives,
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    vocab_size=FLAGS.vocab_size,
    fit=FLAGS.fit,
  )
  results["meta"]["config"] = FLAGS["config"].config_filename
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "device_check.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(FLAGS.out, "device_check.md"), "w") as f:
    f.write(markdown(results) + "\n")
  print(f"wrote {FLAGS.out}/device_check.json and device_check.md")


if __name__ == "__main__":
  define_flags()
  app.run(main)
