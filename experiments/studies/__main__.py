"""Reproduce the paper's findings at CPU scale: BPTT vs SMT vs SMT->DMT, with plots
(docs/method.md section 9).

  python -m experiments.studies --study=all --budget=cpu --out=docs     # every study, ~10 h CPU
  python -m experiments.studies --study=probes --budget=cpu --out=docs
  python -m experiments.studies --study=all --budget=smoke --out=/tmp/smoke --runs=/tmp/smoke_runs

Studies (the table in registry.py; budgets in budgets.py):
  probes     the five probes at two lengths, 3 seeds: BPTT vs SMT->DMT vs teacher, equal steps,
             accuracy / NLL, SeqFLOPs and wall time
  steps      one probe at several step budgets: accuracy vs steps, SeqFLOPs and wall time
  gradients  ||dL/dm_t|| vs distance from the loss, BPTT vs SMT, at init and trained (retrieval)
  drift      rollout vs one-step drift along the sequence after SMT and after DMT; across
             (c_dyn, c_unif)
  length     train at T, evaluate RNN and teacher at T, 2T, 4T (stack)
  length_parity  the length claim at the reference architecture: the five probes at
             T = 32 .. 256, BPTT vs SMT->DMT vs the teacher (one-pass causal, depth 2), 3 seeds
  curves     long budgets for two probes and digits: SMT->DMT vs BPTT against steps, tokens and
             SeqFLOPs, until the curves flatten
  scaling    width, RNN depth and memory size around a base point (Fig. 8); SeqFLOPs to a fixed
             loss per memory size (Fig. 9)
  sweep      the c_dyn x c_unif grid (Fig. 16), SMT->DMT on one probe
  text       bytes (the offline corpus): SMT->DMT vs BPTT, bits per byte against steps, tokens
             and SeqFLOPs
  geometry   2-D PCA of the RNN memory over a digit and over a probe episode
  updaters   transformer / mlp / gru updaters on one probe, SMT->DMT and BPTT
  teachers   windowed vs one-pass causal teacher: label quality on the stack probe, T = 32 and 64
  samples    digits from the RNN alone, SMT->DMT next to BPTT at equal steps
Runs are cached in --runs (default runs/studies/<budget>): a finished run is reused by every study
and every rerun, so `--study=all` after `--study=probes` only trains what is missing.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from experiments import cli
from experiments.studies import budgets, registry
from smt_jax.runner import config as config_lib

flags.DEFINE_string(
  "study", "all", f"One of {list(registry.STUDIES)} or 'all' (or a comma-separated list)."
)
flags.DEFINE_enum("budget", "cpu", ["cpu", "smoke"], "Budget (experiments/studies/budgets.py).")
flags.DEFINE_multi_string(
  "set",
  [],
  "Override a budget field, field=Python literal (repeatable), e.g. "
  "--set=\"length_parity.tasks=('copy',)\" --set=length_parity.seeds=(0,). Runs of other "
  "settings are cached apart; send --out elsewhere so docs/ keeps the full budget's tables.",
)
flags.DEFINE_string("out", "docs", "Where figures (*.png) and tables (studies/*.md, *.json) go.")
flags.DEFINE_string("runs", None, "Run workdirs (default runs/studies/<budget>).")
flags.DEFINE_string(
  "compile_cache",
  "",
  "Persistent XLA compilation cache dir ('' = "
  "<runs>/.jax_cache; 'none' = off). Seeds of one config then compile once.",
)
flags.DEFINE_bool("verbose", False, "Show the runner's progress lines.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  names = registry.resolve(FLAGS.study)
  try:
    budget = budgets.apply_overrides(budgets.get_config(FLAGS.budget), FLAGS.set)
  except ValueError as e:
    sys.exit(f"error: {e}")
  cli.use_cpu_cores(None, batches=budgets.batch_sizes(budget))  # as the runner, before JAX starts
  runs = FLAGS.runs or registry.default_runs(FLAGS.budget)
  if FLAGS.compile_cache != "none":
    registry.enable_compile_cache(FLAGS.compile_cache or os.path.join(runs, ".jax_cache"))
  t0 = time.time()
  try:  # a study's own checks and each run's config, before that run trains: one line
    res = registry.run_studies(
      names,
      budget=FLAGS.budget,
      out=FLAGS.out,
      runs=runs,
      quiet=not FLAGS.verbose,
      overrides=tuple(FLAGS.set),
    )
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  print(
    "Elapsed per study (s): "
    + ", ".join(f"{k} {v['elapsed_s']:.0f}" for k, v in res.items())
    + f"; total {time.time() - t0:.0f} s."
  )


if __name__ == "__main__":
  app.run(main)
