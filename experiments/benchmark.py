"""Times steady-state SMT, DMT and BPTT train steps: a table on stdout, JSON with --out.

  python -m experiments.benchmark --config=experiments/configs/bench.py --out=bench.json
  python -m experiments.benchmark --config=experiments/configs/bench.py --objectives=smt --steps=50
  python -m experiments.benchmark --config=experiments/configs/bench.py --sweep=seq_len
  python -m experiments.benchmark --config=experiments/configs/bench.py --sweep=devices
  python -m experiments.benchmark --config=experiments/configs/bench.py --sweep=teacher \\
      --seq_lens=32,64,128,256,512 --sweep_batch_size=2 --steps=3 --warmup=1

What is timed is the runner's own train step (`experiment.make_phase(...).step`: its loss and
optimiser, jitted with its shardings and donation), on a config validated as every run's is, with
parameters and optimiser state created already sharded on the config's mesh. Compilation
(`lower().compile()`) is timed on its own; then `--warmup` steps run untimed and `--steps` steps are
timed in steady state, as the training loop runs them (the next step is dispatched before the last
one is waited for): a step's time is the interval between consecutive completions, and the median is
reported. The batch is uniform random tokens of the config's vocabulary: step time does not depend
on token values, and this keeps data generation out of the measurement.

Per objective the JSON holds `median_s` (per train step), `tokens_per_s` (B*T / median_s),
`compile_s`, `seq_depth` (updates on the sequential critical path: SMT 1, DMT Td, BPTT T),
`cpu_s` (process CPU seconds per step, all threads: steadier than wall time on a shared machine),
`flops` (matmul FLOPs of one step, counted on its jaxpr: backward, rematerialisation and every
scan iteration included), `xla_flops` (XLA's `cost_analysis()`, which counts a while-loop body
once, so it undercounts DMT and BPTT, and on several devices counts one device's share),
`planned_bytes` (the memory XLA plans for the compiled step, per device), `flops_per_s`, on GPU
`mfu` = flops_per_s over the peak of the dtype the run used (`PEAK_FLOPS`),
and with `--op_split=N` `op_split`: N more steps traced with `jax.profiler`, their device time
per step and device by kind of op (`profiling.op_split`).

Sweeps (`--sweep`):
  seq_len  BPTT at T in --seq_lens, and SMT training every transition of an episode of length T
           (Tc and Tf fixed, capped at T): step time and per-transition (per-token) cost.
  teacher  SMT on every transition of episodes of length T in --seq_lens, Tc = T: the windowed
           teacher against the one-pass causal teacher (`model.teacher_kind`), the same model:
           step time, time and matmul FLOPs per transition.
  devices  the same config on 1, 2, 4, 8 devices (`--device_counts`), one subprocess per count
           with XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU; the devices go to the
           mesh axis `--sweep_axis` (data, fsdp or time).
The main table runs, as the runner does, on one CPU device per core (data-parallel, as many as
divide the batches) unless the user chose (`--host_devices=N`, XLA_FLAGS, JAX_NUM_CPU_DEVICES,
config.mesh); the sweeps on one device unless `--host_devices` says otherwise.
Wall-clock numbers on a shared machine are noisy: compare ratios measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments import cli
from smt_jax import analysis, data
from smt_jax.runner import config as config_lib
from smt_jax.runner import experiment, profiling


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing the module
  (tests, `experiments.device_check`) does not collide with their flags of the same names."""
  config_flags.DEFINE_config_file(
    "config", "experiments/configs/bench.py", "Path to a config file (and :arg).", lock_config=False
  )
  flags.DEFINE_string("out", None, "Write the results as JSON to this file.")
  flags.DEFINE_list("objectives", ["smt", "dmt", "bptt"], "Which train steps to time.")
  flags.DEFINE_integer("steps", 20, "Timed steps per objective (the median is reported).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_enum("sweep", None, ["seq_len", "devices", "teacher"], "An optional scaling sweep.")
  flags.DEFINE_list("seq_lens", ["16", "32", "64", "128"], "Sequence lengths of --sweep=seq_len.")
  flags.DEFINE_integer("sweep_batch_size", 8, "Batch size of --sweep=seq_len (0: the config's).")
  flags.DEFINE_list("device_counts", ["1", "2", "4", "8"], "Device counts of --sweep=devices.")
  flags.DEFINE_enum(
    "sweep_axis",
    "data",
    ["data", "fsdp", "time"],
    "--sweep=devices: the mesh axis that takes the devices.",
  )
  flags.DEFINE_integer(
    "vocab_size",
    0,
    "Vocabulary size (0: the config's dataset's; set it to "
    "time a config whose data is not on this machine, e.g. 257 for mnist).",
  )
  flags.DEFINE_integer(
    "host_devices",
    0,
    "CPU only: split the host into this many XLA devices (the mesh's data axis takes them). 0: "
    "as the runner, one per core dividing the batches for the main table (unless XLA_FLAGS, "
    "JAX_NUM_CPU_DEVICES or config.mesh say otherwise), one for the sweeps.",
  )
  flags.DEFINE_integer(
    "op_split",
    0,
    "After timing, trace this many more steps of each objective with jax.profiler and print where "
    "their device time went: matmul, layout (copies, transposes, concatenations, pads), "
    "elementwise, collectives, and the costliest HLO ops (`profiling.op_split`). 0: no trace.",
  )
  flags.DEFINE_bool("child", False, "Internal: a --sweep=devices subprocess (prints JSON).")


FLAGS = flags.FLAGS

OBJECTIVES = ("smt", "dmt", "bptt")

# Dense peak FLOP/s by device and dtype (NVIDIA datasheets, no sparsity). float32 matmuls on these
# GPUs run as TF32 under JAX's default matmul precision, so a float32 run is measured against the
# TF32 peak (`float32_ieee` is the non-tensor-core peak, for reference).
PEAK_FLOPS = {
  "H100 SXM": {"bfloat16": 989.4e12, "float32": 494.7e12, "float32_ieee": 66.9e12},
  "H100 PCIe": {"bfloat16": 756.0e12, "float32": 378.0e12, "float32_ieee": 51.2e12},
  "H200": {"bfloat16": 989.4e12, "float32": 494.7e12, "float32_ieee": 66.9e12},
  "A100": {"bfloat16": 312.0e12, "float32": 156.0e12, "float32_ieee": 19.5e12},
}


def peak_flops(device_kind: str, dtype: str) -> tuple[str | None, float | None]:
  """(table row, peak FLOP/s) for a device kind string such as 'NVIDIA H100 80GB HBM3'."""
  kind = device_kind.upper()
  if "H200" in kind:
    row = "H200"
  elif "H100" in kind:
    row = "H100 PCIe" if "PCIE" in kind else "H100 SXM"
  elif "A100" in kind:
    row = "A100"
  else:
    return None, None
  return row, PEAK_FLOPS[row]["bfloat16" if dtype in ("bfloat16", "float16") else "float32"]


def xla_count(compiled) -> float | None:
  """XLA's FLOP count of a compiled step (`analysis.count_flops`); None without a cost analysis."""
  try:
    return analysis.count_flops(compiled)
  except ValueError:
    return None


def planned_bytes(compiled) -> int | None:
  """The memory XLA plans for a compiled program: arguments, outputs and temporaries, less the
  outputs that reuse donated arguments."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def random_batch(rng, batch_size: int, seq_len: int, vocab_size: int):
  """Uniform tokens; y is the next token (the last one has no target)."""
  x = rng.integers(0, vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
  y = x[:, 1:].copy()
  y[:, -1] = -1
  return {"x": x[:, :-1], "y": y}


class UniformTokens:
  """`make_source` for a config whose data is not on this machine: a stream of uniform random
  tokens of a given vocabulary (step time does not depend on token values)."""

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def __call__(self, config):
    n = (
      4
      * max(config_lib.phase_seq_len(config, p) for p in (*config_lib.phase_names(config), "eval"))
      + 1
    )
    rng = np.random.default_rng(config.seed)
    source = data.StreamSource(
      streams={s: rng.integers(0, self.vocab_size, n).astype(np.int32) for s in data.SPLITS},
      vocab_size=self.vocab_size,
      seq_len=n - 1,
    )
    source.name = f"uniform tokens (V = {self.vocab_size})"
    return source


def time_objective(
  config, phase: str, *, steps: int, warmup: int, vocab_size: int = 0, op_split: int = 0
) -> dict:
  """Compiles and times one objective's train step on the config's mesh; returns its stats (and,
  with op_split > 0, `profiling.op_split` of that many more steps, traced)."""
  config = config.copy_and_resolve_references()
  config.phases = "smt,dmt" if phase == "dmt" else phase  # DMT continues an SMT phase
  exp = experiment.build_experiment(
    config, make_source=UniformTokens(vocab_size) if vocab_size else None
  )
  p = experiment.make_phase(exp, phase)  # the runner's own train step
  vocab_size, seq_len, batch_size = exp.source.vocab_size, p.source.seq_len, p.batch_size

  with jax.set_mesh(exp.mesh):
    state = p.init_state(exp.init_params())
    rng = np.random.default_rng(config.seed)
    batches = [
      {
        k: jax.make_array_from_process_local_data(exp.batch_sharding, v)
        for k, v in random_batch(rng, batch_size, seq_len, vocab_size).items()
      }
      for _ in range(2)
    ]
    keys = [jax.random.fold_in(jax.random.key(config.seed), i) for i in range(2)]

    t0 = time.perf_counter()
    compiled = p.step.lower(state, batches[0], keys[0]).compile()
    compile_s = time.perf_counter() - t0
    flops = analysis.count_flops(p.step, state, batches[0], keys[0], counter="matmul")

    for i in range(warmup):
      state, metrics = compiled(state, batches[i % 2], keys[i % 2])
    jax.block_until_ready(state)
    # Steady state as the training loop runs it: step i+1 is dispatched before step i is waited
    # for, so Python's dispatch overlaps the device's work. A step's time is the interval between
    # consecutive completions; its CPU time, the process's CPU seconds (all threads) in it.
    times, cpu_times = [], []
    t_last, c_last, pending = time.perf_counter(), time.process_time(), None
    for i in range(steps + 1):
      if i < steps:
        state, metrics = compiled(state, batches[i % 2], keys[i % 2])
      if pending is not None:
        jax.block_until_ready(pending)
        t_now, c_now = time.perf_counter(), time.process_time()
        times.append(t_now - t_last)
        cpu_times.append(c_now - c_last)
        t_last, c_last = t_now, c_now
      pending = metrics["loss"]
    loss = float(metrics["loss"])
    split = None
    if op_split:
      with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for i in range(op_split):
          state, metrics = compiled(state, batches[i % 2], keys[i % 2])
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        split = profiling.op_split(trace_dir, steps=op_split, devices=exp.mesh.devices.size)

  median = float(np.median(times))
  device = jax.devices()[0]
  dtype = str(config.model.dtype)
  peak_row, peak = (
    peak_flops(device.device_kind, dtype) if device.platform == "gpu" else (None, None)
  )
  out = {
    "median_s": median,
    "min_s": float(np.min(times)),
    "p90_s": float(np.percentile(times, 90)),
    "cpu_s": float(np.median(cpu_times)),
    "tokens_per_s": batch_size * seq_len / median,
    "compile_s": compile_s,
    "seq_depth": analysis.serial_updates(
      phase, seq_len=seq_len, rollout_length=config.dmt.rollout_length
    ),
    "seq_len": seq_len,
    "batch_size": batch_size,
    "steps": steps,
    "flops": flops,
    "xla_flops": xla_count(compiled),
    "planned_bytes": planned_bytes(compiled),
    "flops_per_s": flops / median if flops else None,
    "mfu": (flops / median / peak) if (flops and peak) else None,
    "peak_flops": peak,
    "peak_row": peak_row,
    "dtype": dtype,
    "loss": loss,
    "op_split": split,
  }
  if phase == "smt":
    n = config.smt.num_transitions
    out["num_transitions"] = n
    out["per_transition_s"] = median / n
  return out


def count_params(config, vocab_size: int = 0) -> dict:
  """{'n_params_teacher': .., 'n_params_rnn': ..} of the config's models (shapes only)."""
  vocab_size = vocab_size or experiment.source_of(config).vocab_size
  teacher, rnn = nnx.eval_shape(lambda: experiment.build_models(config, vocab_size))
  count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  return {"n_params_teacher": count(teacher), "n_params_rnn": count(rnn)}


def run_objectives(
  config, objectives, *, steps: int, warmup: int, vocab_size: int = 0, op_split: int = 0
) -> dict:
  out = {
    p: time_objective(
      config, p, steps=steps, warmup=warmup, vocab_size=vocab_size, op_split=op_split
    )
    for p in objectives
  }
  out.update(count_params(config, vocab_size))
  return out


def every_transition(config, t: int, context_length: int, batch_size: int, vocab_size: int = 0):
  """`config` training SMT on every transition of episodes of length `t` (copy-probe tokens of
  the config's vocabulary), with Tc = `context_length` and Tf capped at T."""
  c = config.copy_and_resolve_references()
  vocab = vocab_size or experiment.source_of(c).vocab_size
  c.phases = "smt"
  c.data = ml_collections.ConfigDict(
    dict(name="copy", episodic=True, seq_len=t, path="", options={"num_tokens": vocab - 1})
  )
  c.smt.context_length = context_length
  c.smt.future_length = min(c.smt.future_length, t)
  c.smt.num_transitions = t
  if batch_size:
    c.smt.batch_size = c.eval.batch_size = batch_size
  return c


def sweep_teacher(
  config, lengths: list[int], *, batch_size: int, steps: int, warmup: int, vocab_size: int = 0
) -> dict:
  """SMT on every transition of episodes of length T, Tc = T: the windowed teacher (T+1 windows)
  against the one-pass causal teacher, the same model; step time, and time and matmul FLOPs per
  transition (of one sequence)."""
  rows = []
  for t in lengths:
    row = {"seq_len": t}
    for kind in ("windowed", "causal"):
      c = every_transition(config, t, t, batch_size, vocab_size)
      c.model.teacher_kind = kind
      r = time_objective(c, "smt", steps=steps, warmup=warmup, vocab_size=vocab_size)
      per = t * r["batch_size"]  # transitions in one step
      row[f"{kind}_s"] = r["median_s"]
      row[f"{kind}_per_transition_s"] = r["median_s"] / per
      row[f"{kind}_flops_per_transition"] = r["flops"] / per
    row["speedup"] = row["windowed_s"] / row["causal_s"]
    rows.append(row)
    print(format_teacher_sweep({"rows": [row]}, header=len(rows) == 1), flush=True)
  return {"batch_size": batch_size or None, "rows": rows}


def format_teacher_sweep(s: dict, header: bool = True) -> str:
  lines = (
    [
      f"{'T':>5}{'windowed s':>12}{'causal s':>10}{'speed-up':>10}{'windowed s/tr':>15}"
      f"{'causal s/tr':>13}{'windowed GFLOP/tr':>19}{'causal GFLOP/tr':>17}"
    ]
    if header
    else []
  )
  for r in s["rows"]:
    lines.append(
      f"{r['seq_len']:>5}{r['windowed_s']:>12.4f}{r['causal_s']:>10.4f}{r['speedup']:>9.1f}x"
      f"{r['windowed_per_transition_s']:>15.5f}{r['causal_per_transition_s']:>13.5f}"
      f"{r['windowed_flops_per_transition'] / 1e9:>19.3f}"
      f"{r['causal_flops_per_transition'] / 1e9:>17.3f}"
    )
  return "\n".join(lines)


def sweep_seq_len(
  config,
  lengths: list[int],
  *,
  batch_size: int,
  steps: int,
  warmup: int,
  objectives,
  vocab_size: int = 0,
) -> dict:
  """BPTT at T, and SMT on every transition of an episode of length T (Tc, Tf fixed, capped at
  T)."""

  rows = []
  for t in lengths:
    row = {"seq_len": t}
    c = config.copy_and_resolve_references()
    if "bptt" in objectives:
      c.bptt.seq_len = t
      if batch_size:
        c.bptt.batch_size = batch_size
      r = time_objective(c, "bptt", steps=steps, warmup=warmup, vocab_size=vocab_size)
      row["bptt_s"] = r["median_s"]
      row["bptt_per_token_s"] = r["median_s"] / t
      row["bptt_seq_depth"] = r["seq_depth"]
    if "smt" in objectives:
      c = every_transition(config, t, min(config.smt.context_length, t), batch_size, vocab_size)
      r = time_objective(c, "smt", steps=steps, warmup=warmup, vocab_size=vocab_size)
      row["smt_s"] = r["median_s"]
      row["smt_per_transition_s"] = r["per_transition_s"]
      row["smt_seq_depth"] = r["seq_depth"]
    rows.append(row)
  return {
    "batch_size": batch_size or None,
    "context_length": config.smt.context_length,
    "future_length": config.smt.future_length,
    "rows": rows,
  }


def sweep_devices(
  config,
  argv_config: str,
  counts: list[int],
  axis: str,
  *,
  steps: int,
  warmup: int,
  objectives,
  overrides: list[str],
  vocab_size: int = 0,
) -> dict:
  """One subprocess per device count, on fake CPU devices (their number is fixed before JAX
  starts). On the time axis SMT trains a multiple of max(counts) transitions, at most 8 per
  device count step, so that every count divides them."""
  rows = []
  for n in counts:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    ).strip()
    mesh = {"data": 1, "fsdp": 1, "time": 1, axis: n}
    cmd = [
      sys.executable,
      "-m",
      "experiments.benchmark",
      f"--config={argv_config}",
      "--child",
      f"--objectives={','.join(objectives)}",
      f"--steps={steps}",
      f"--warmup={warmup}",
      f"--vocab_size={vocab_size}",
      *[f"--config.mesh.{a}={s}" for a, s in mesh.items()],
      *overrides,
    ]
    if axis == "time":
      top = max(counts)
      per = max(1, min(8, config_lib.phase_seq_len(config, "smt") // top))
      cmd.append(f"--config.smt.num_transitions={top * per}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(
        f"device sweep, {n} devices: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}"
      )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append({"devices": n, **{f"{p}_s": result[p]["median_s"] for p in objectives}})
  return {"axis": axis, "rows": rows}


def format_table(results: dict) -> str:
  lines = [
    f"{'objective':<10}{'median s':>10}{'min s':>9}{'CPU s':>8}{'tokens/s':>11}"
    f"{'compile s':>11}{'seq depth':>11}{'GFLOP/s':>9}{'MFU':>7}"
  ]
  for p in OBJECTIVES:
    r = results.get(p)
    if not r:
      continue
    gf = f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
    lines.append(
      f"{p:<10}{r['median_s']:>10.4f}{r['min_s']:>9.4f}{r['cpu_s']:>8.3f}"
      f"{r['tokens_per_s']:>11,.0f}"
      f"{r['compile_s']:>11.1f}{r['seq_depth']:>11}{gf:>9}{mfu:>7}"
    )
  return "\n".join(lines)


def format_op_split(results: dict) -> str:
  """Per objective: ms per step per device by kind of op, then its costliest HLO ops."""
  kinds = ("matmul", "layout", "elementwise", "collective")
  lines = [f"{'objective':<10}" + "".join(f"{k + ' ms':>15}" for k in kinds)]
  tops = []
  for p in OBJECTIVES:
    split = (results.get(p) or {}).get("op_split")
    if not split:
      continue
    total = sum(split[k] for k in kinds)
    lines.append(
      f"{p:<10}" + "".join(f"{split[k]:>8.1f} ({100 * split[k] / total:>2.0f}%)" for k in kinds)
    )
    tops.append(f"{p} costliest ops: " + ", ".join(f"{n} {ms:.1f}" for n, ms in split["top"][:6]))
  return "\n".join(lines + tops)


def format_seq_sweep(s: dict) -> str:
  lines = [
    f"{'T':>5}{'BPTT s':>10}{'BPTT s/token':>14}{'depth':>7}{'SMT s':>10}"
    f"{'SMT s/transition':>18}{'depth':>7}"
  ]
  for r in s["rows"]:

    def f(k, w, fmt=".4f"):
      return f"{r[k]:>{w}{fmt}}" if k in r else f"{'-':>{w}}"

    lines.append(
      f"{r['seq_len']:>5}{f('bptt_s', 10)}{f('bptt_per_token_s', 14, '.5f')}"
      f"{f('bptt_seq_depth', 7, 'd')}{f('smt_s', 10)}"
      f"{f('smt_per_transition_s', 18, '.5f')}{f('smt_seq_depth', 7, 'd')}"
    )
  rows = s["rows"]
  if len(rows) > 1:
    first, last = rows[0], rows[-1]
    growth = last["seq_len"] / first["seq_len"]
    parts = [f"T x{growth:g}:"]
    if "bptt_s" in first:
      parts.append(f"BPTT step x{last['bptt_s'] / first['bptt_s']:.2f}")
    if "smt_s" in first:
      ratio = last["smt_per_transition_s"] / first["smt_per_transition_s"]
      parts.append(f"SMT per-transition x{ratio:.2f}")
    lines.append("  ".join(parts))
  return "\n".join(lines)


def format_device_sweep(s: dict) -> str:
  keys = [k for k in s["rows"][0] if k.endswith("_s")]
  lines = [
    f"{'devices':>8}"
    + "".join(f"{k[:-2].upper() + ' s':>10}" for k in keys)
    + f"   (mesh axis '{s['axis']}')"
  ]
  for r in s["rows"]:
    lines.append(f"{r['devices']:>8}" + "".join(f"{r[k]:>10.4f}" for k in keys))
  return "\n".join(lines)


def _config_overrides(argv: list[str]) -> list[str]:
  return [a for a in argv[1:] if a.startswith("--config.")]


def main(argv):
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  objectives = [o.strip() for o in FLAGS.objectives if o.strip()]
  bad = sorted(set(objectives) - set(OBJECTIVES))
  if bad:
    raise app.UsageError(f"--objectives: unknown {bad}; choose from {list(OBJECTIVES)}.")
  config = FLAGS.config
  if FLAGS.host_devices:  # before JAX starts: the device count is fixed at backend creation
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_force_host_platform_device_count={FLAGS.host_devices}"
    )
  elif not FLAGS.child and FLAGS.sweep is None:
    cli.use_cpu_cores(config)  # as the runner: one CPU device per core unless the user chose
  if FLAGS.child:
    print(
      json.dumps(
        run_objectives(
          config, objectives, steps=FLAGS.steps, warmup=FLAGS.warmup, vocab_size=FLAGS.vocab_size
        )
      )
    )
    return

  device = jax.devices()[0]
  meta = {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "config": FLAGS["config"].config_filename,
    "overrides": _config_overrides(sys.argv),
    "dtype": str(config.model.dtype),
    "cpu_count": os.cpu_count(),
    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  print(
    f"device: {device.device_kind} x{jax.device_count()} ({device.platform}), "
    f"dtype {config.model.dtype}, config {meta['config']}",
    flush=True,
  )
  results = run_objectives(
    config,
    objectives,
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    vocab_size=FLAGS.vocab_size,
    op_split=FLAGS.op_split,
  )
  results["meta"] = meta
  print(format_table(results), flush=True)
  if FLAGS.op_split:
    print(format_op_split(results), flush=True)
  print(
    f"parameters: teacher {results['n_params_teacher']:,}, RNN {results['n_params_rnn']:,}",
    flush=True,
  )
  if any(r.get("mfu") for r in results.values() if isinstance(r, dict)):
    row = next(r for r in results.values() if isinstance(r, dict) and r.get("peak_row"))
    print(
      f"MFU against the {row['peak_row']} {row['dtype']} peak, "
      f"{row['peak_flops'] / 1e12:.1f} TFLOP/s (matmul FLOPs of the jaxpr, "
      f"rematerialisation included)"
    )

  if FLAGS.sweep == "seq_len":
    results["sweep_seq_len"] = sweep_seq_len(
      config,
      [int(t) for t in FLAGS.seq_lens],
      batch_size=FLAGS.sweep_batch_size,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      objectives=[o for o in objectives if o in ("smt", "bptt")],
      vocab_size=FLAGS.vocab_size,
    )
    print(format_seq_sweep(results["sweep_seq_len"]), flush=True)
  elif FLAGS.sweep == "teacher":
    results["sweep_teacher"] = sweep_teacher(
      config,
      [int(t) for t in FLAGS.seq_lens],
      batch_size=FLAGS.sweep_batch_size,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      vocab_size=FLAGS.vocab_size,
    )
  elif FLAGS.sweep == "devices":
    results["sweep_devices"] = sweep_devices(
      config,
      FLAGS["config"].config_filename,
      [int(n) for n in FLAGS.device_counts],
      FLAGS.sweep_axis,
      steps=FLAGS.steps,
      warmup=FLAGS.warmup,
      objectives=["smt"] if FLAGS.sweep_axis == "time" else objectives,
      overrides=[o for o in _config_overrides(sys.argv) if not o.startswith("--config.mesh.")],
      vocab_size=FLAGS.vocab_size,
    )
    print(format_device_sweep(results["sweep_devices"]), flush=True)

  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
