"""What every study shares: run configs, a cache of finished runs, restoring params, tables, plots.

A study trains through the real runner, `smt_jax.runner.train.train_and_evaluate(config,
workdir)`. A run that finished once (its `study_record.json` is written after the runner returns,
next to the same `config.json`) is reused by every later study and rerun, so studies can share
runs (e.g. the gradient and drift studies read the probe study's checkpoints) and an interrupted
study set resumes.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.configs import common as recipes
from experiments.configs import pixels, synthetic
from smt_jax.runner import checkpoints, experiment, metrics_io, train
from smt_jax.runner import config as config_lib
from smt_jax.runner import workdir as workdir_lib

RECORD = "study_record.json"


@dataclasses.dataclass
class Context:
  """Where a study reads its budget and writes its runs and outputs."""

  budget: ml_collections.ConfigDict
  out: str  # figures, tables (<out>/*.png, <out>/studies/<study>.{md,json})
  runs: str  # run workdirs
  quiet: bool = True

  def workdir(self, name: str) -> str:
    return os.path.join(self.runs, name)


# -------------------------------------------------------------------------------------------------
# Configs.


def probe_config(
  ctx: Context,
  task: str,
  length: int,
  *,
  seed: int,
  phases: str,
  rnn_kind: str = "transformer",
  **smt_overrides,
) -> ml_collections.ConfigDict:
  """The synthetic probe config at the study budget: SMT+DMT steps == BPTT steps."""
  b = ctx.budget
  # The recipe these studies were measured with (docs/results.md), not today's default.
  c = synthetic.get_config(f"{task},{length},earlier")
  c.data.options[task].update(dict(b.probes.options[task]))
  c.seed = seed
  c.phases = phases
  c.model.rnn_kind = rnn_kind
  _small_model(c, b.model.width, b.model.num_memory_tokens, b.model.num_heads, b.model.depth)
  p = b.probes
  c.smt.steps, c.dmt.steps, c.bptt.steps = p.smt_steps, p.dmt_steps, p.smt_steps + p.dmt_steps
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = p.batch_size
  c.smt.future_length = min(c.smt.future_length, length)
  c.dmt.label_every = 4 if length % 4 == 0 else 1
  c.eval.batch_size, c.eval.num_batches = p.eval_batch_size, p.eval_batches
  for k, v in smt_overrides.items():
    c.smt[k] = v
  _quiet_periodics(c, log_every=max(1, min(25, c.smt.steps)))
  return c


def digits_config(ctx: Context, *, phases: str, seed: int = 0) -> ml_collections.ConfigDict:
  """The pixels (8x8 digits) model and batch of the study budget; the caller sets the steps."""
  d = ctx.budget.digits
  smoke = ctx.budget.name == "smoke"
  c = pixels.get_config("smoke,earlier" if smoke else "digits,earlier")
  c.seed = seed
  c.phases = phases
  _small_model(c, d.width, d.num_memory_tokens, c.model.num_heads if smoke else 4, d.depth)
  # The recipe these studies' tables were measured with (the digits default before 2026-12-03).
  c.model.head_dim = 64
  c.smt.lr, c.smt.schedule, c.dmt.lr = 1e-3, "constant", 3e-4
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = d.batch_size
  c.samples.num = d.num_samples
  c.samples.at_eval = False  # the studies draw their own samples, at the end
  _quiet_periodics(c, log_every=max(1, min(50, c.smt.steps)))
  return c


def _small_model(c, width, memory_tokens, heads, depth):
  c.model.width, c.model.num_memory_tokens, c.model.num_heads = width, memory_tokens, heads
  c.model.encoder_depth, c.model.decoder_depth = depth, 1
  recipes.rnn_depth(c, depth, readout_depth=1)


def _quiet_periodics(c, *, log_every: int):
  """Only the final eval and the phase-boundary checkpoints (the studies restore those)."""
  c.eval.every_steps = 0  # never
  c.checkpoint_every_steps = 0
  c.keep_checkpoints = 4
  c.log_every_steps = log_every
  c.eval.prompt_length = 0  # the studies score the RNN alone (and the teacher), not prompted


# -------------------------------------------------------------------------------------------------
# Running (or reusing) one training run.


def apply_overrides(c: ml_collections.ConfigDict, overrides) -> None:
  """Sets 'field.path=python literal' overrides (e.g. "smt.future_length=8") on a run config;
  the runner validates the result."""
  for item in overrides:
    key, _, text = item.partition("=")
    *parents, leaf = key.strip().split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = ast.literal_eval(text.strip())


def ensure_run(ctx: Context, name: str, config: ml_collections.ConfigDict) -> dict:
  """Trains `config` in runs/<name> unless a finished run of the same config is there.

  Returns the run record: {'name', 'workdir', 'summary', 'wall_s', 'train_s': {phase: seconds of
  training excluding compile}, 'compile_s': {phase: s}, 'steps': {phase: n}, 'reused': bool}.
  """
  workdir = ctx.workdir(name)
  record_path = os.path.join(workdir, RECORD)
  cfg_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  new_cfg = json.loads(config.to_json())
  old_cfg = _read_json(cfg_path)
  if (
    os.path.exists(record_path)
    and old_cfg is not None
    and same_settings(_computed(old_cfg), _computed(new_cfg))
  ):
    rec = _read_json(record_path)
    rec["reused"] = True
    return rec
  # A run of another config (or an older version of this one) in the same place: start over.
  overwrite = old_cfg is not None and old_cfg != new_cfg
  if overwrite and os.path.exists(record_path):  # e.g. a --set budget in the default --runs
    print(f"[study] {workdir} holds a finished run of another config: replacing it", flush=True)
  print(f"[study] training {name} ({config.phases}, {config.model.rnn_kind})", flush=True)
  t0 = time.time()
  out = io.StringIO()
  with contextlib.redirect_stdout(out) if ctx.quiet else contextlib.nullcontext():
    summary = train.train_and_evaluate(config, workdir, overwrite=overwrite)
  wall = time.time() - t0
  phases = config_lib.phase_names(config)
  rows = metrics_io.read_metrics(workdir)
  train_s = {}
  for p in phases:
    rates = [
      r["steps_per_s"]
      for r in rows
      if r.get("phase") == p
      and "steps_per_s" in r
      and math.isfinite(r["steps_per_s"])
      and r["steps_per_s"] > 0
    ]
    train_s[p] = config[p].steps / float(np.mean(rates)) if rates else float("nan")
  rec = {
    "name": name,
    "workdir": workdir,
    "summary": summary,
    "wall_s": wall,
    "train_s": train_s,
    "compile_s": {p: summary.get(f"{p}/compile_s", float("nan")) for p in phases},
    "steps": {p: int(config[p].steps) for p in phases},
  }
  with open(record_path + ".tmp", "w") as f:
    json.dump(rec, f, indent=1)
  os.replace(record_path + ".tmp", record_path)
  print(
    f"[study]   done in {wall:.0f} s: "
    + ", ".join(
      f"{p} acc {summary[p]['eval/rnn_acc']:.3f}"
      for p in phases
      if isinstance(summary.get(p), dict)
    ),
    flush=True,
  )
  rec["reused"] = False
  return rec


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _computed(config_json: dict) -> dict:
  """What a run's config.json says it computes: today's fields (`config_lib.migrate`), without the
  learning rate of a phase it does not run (a BPTT run is the same run whatever SMT's lr is)."""
  c = config_lib.migrate(config_json)
  runs = set(str(c.get("phases", "")).split(","))
  return {
    k: {f: v for f, v in section.items() if f != "lr"}
    if k in config_lib.PHASES and k not in runs and isinstance(section, dict)
    else section
    for k, section in c.items()
  }


def same_settings(old: dict, new: dict) -> bool:
  """Configs agree on every field both have (a field added to the defaults later keeps the run)."""
  for k in set(old) & set(new):
    a, b = old[k], new[k]
    if isinstance(a, dict) and isinstance(b, dict):
      if not same_settings(a, b):
        return False
    elif a != b:
      return False
  return True


def run_seq_flops(config) -> tuple[dict[str, float], dict[str, float]]:
  """({phase: SeqFLOPs of the run's phase, steps x its per-step serial path}, the FLOPs of one
  update / readout / encoding / decoding they rest on), as the runner's `seqflops` axis counts them
  (`smt_jax.runner.experiment.seq_flops_per_step`: DMT's chained backward, BPTT's truncation,
  the length curriculum's shorter first steps)."""
  exp = experiment.build_experiment(config)
  flops = experiment.unit_flops(exp)
  per_phase = {
    p: experiment.seq_flops_per_step(exp, p, flops) * config[p].steps
    for p in config_lib.phase_names(config)
  }
  w, _ = config_lib.warmup(config)
  if w:  # the first phase's first w steps run on the curriculum's shorter episodes
    first = config_lib.phase_names(config)[0]
    short = experiment.build_experiment(config_lib.warmup_config(config))
    per_step = experiment.seq_flops_per_step(short, first, experiment.unit_flops(short))
    n = min(w, config[first].steps)
    per_phase[first] += n * (per_step - experiment.seq_flops_per_step(exp, first, flops))
  return per_phase, flops


def phase_end_step(config, phase: str) -> int:
  """The global step of the checkpoint saved at the end of `phase`."""
  phases = config_lib.phase_names(config)
  return int(sum(config[p].steps for p in phases[: phases.index(phase) + 1]))


def restore(config, workdir: str, step: int | None = None):
  """(exp, params) of a run: its parameters at checkpoint `step` (None: the latest; 0: the init)."""
  exp = experiment.build_experiment(config)
  if step == 0:
    return exp, exp.init_params()
  mngr = checkpoints.make_manager(workdir, keep=config.keep_checkpoints, read_only=True)
  try:
    steps = mngr.all_steps()
    if step is None:
      step = max(steps)
    if step not in steps:
      raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} (have {sorted(steps)}).")
    params = checkpoints.read_params(mngr, step, exp.abstract_params)
  finally:
    mngr.close()
  return exp, params


def eval_batch(
  exp, *, seq_len: int | None = None, batch_size: int, step: int = 0, source=None
) -> dict[str, jax.Array]:
  """Held-out sequences (the eval split) from the run's source, optionally at another length."""
  src = source or exp.source
  if seq_len is not None:
    src = experiment.with_seq_len(src, seq_len)
  b = src.batch(split="eval", step=step, batch_size=batch_size, seed=exp.config.seed)
  return {k: jax.numpy.asarray(v) for k, v in b.items()}


# -------------------------------------------------------------------------------------------------
# Numbers, tables and files.


def mean_std(values) -> tuple[float, float]:
  v = np.asarray([x for x in values], np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_ms(values, digits: int = 3) -> str:
  m, s = mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_outputs(ctx: Context, study: str, results: dict, markdown: str) -> dict:
  """<out>/studies/<study>.json (numbers) and .md (tables); returns results with their paths."""
  d = os.path.join(ctx.out, "studies")
  os.makedirs(d, exist_ok=True)
  results = dict(results, study=study, budget=ctx.budget.name)
  with open(os.path.join(d, f"{study}.json"), "w") as f:
    json.dump(_jsonable(results), f, indent=1, allow_nan=True)
  with open(os.path.join(d, f"{study}.md"), "w") as f:
    f.write(markdown)
  return results


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": 110})
  return plt


def save_figure(ctx: Context, fig, name: str) -> str:
  os.makedirs(ctx.out, exist_ok=True)
  path = os.path.join(ctx.out, name)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  pyplot().close(fig)
  return path
