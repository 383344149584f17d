"""Reproduce the paper's findings at CPU scale: BPTT vs SMT vs SMT->DMT, with plots (SPEC 9).

  python -m experiments.compare --study=all --budget=cpu --out=docs     # every study, ~55 min CPU
  python -m experiments.compare --study=probes --budget=cpu --out=docs
  python -m experiments.compare --study=all --budget=smoke --out=/tmp/smoke --runs=/tmp/smoke_runs

Studies (the table below; budgets in experiments/configs/studies.py):
  probes     the five probes at two lengths, 3 seeds: BPTT vs SMT->DMT vs teacher, equal steps,
             accuracy / NLL, SeqFLOPs and wall time
  steps      one probe at several step budgets: accuracy vs steps, SeqFLOPs and wall time
  gradients  ||dL/dm_t|| vs distance from the loss, BPTT vs SMT, at init and trained (retrieval)
  drift      rollout vs one-step drift along the sequence after SMT and after DMT; across
             (c_dyn, c_unif)
  length     train at T, evaluate RNN and teacher at T, 2T, 4T (stack)
  geometry   2-D PCA of the RNN memory over a digit and over a probe episode
  updaters   transformer / mlp / gru updaters on one probe, SMT->DMT and BPTT
  samples    digits from the RNN alone, SMT->DMT next to BPTT at equal steps
Runs are cached in --runs (default runs/studies/<budget>): a finished run is reused by every study
and every rerun, so `--study=all` after `--study=probes` only trains what is missing.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from experiments.studies import (drift, geometry, gradients, length, probes, samples, steps,
                                 updaters)

# The one name -> study table. Order matters for `all`: later studies reuse earlier runs.
STUDIES = {
    "probes": probes.run,
    "steps": steps.run,
    "gradients": gradients.run,
    "drift": drift.run,
    "length": length.run,
    "updaters": updaters.run,
    "samples": samples.run,
    "geometry": geometry.run,
}

flags.DEFINE_string("study", "all", f"One of {list(STUDIES)} or 'all' (or a comma-separated list).")
flags.DEFINE_enum("budget", "cpu", ["cpu", "smoke"], "Budget (experiments/configs/studies.py).")
flags.DEFINE_string("out", "docs", "Where figures (*.png) and tables (studies/*.md, *.json) go.")
flags.DEFINE_string("runs", None, "Run workdirs (default runs/studies/<budget>).")
flags.DEFINE_string("compile_cache", "", "Persistent XLA compilation cache dir ('' = "
                    "<runs>/.jax_cache; 'none' = off). Seeds of one config then compile once.")
flags.DEFINE_bool("verbose", False, "Show the runner's progress lines.")
FLAGS = flags.FLAGS


def resolve(study: str) -> list[str]:
  names = list(STUDIES) if study == "all" else [s.strip() for s in study.split(",") if s.strip()]
  unknown = [s for s in names if s not in STUDIES]
  if unknown or not names:
    raise ValueError(f"--study: unknown {unknown or study!r}; choose from {list(STUDIES)} or all.")
  return names


def enable_compile_cache(path: str) -> None:
  """Same HLO (e.g. a config's seeds) compiles once: XLA's persistent cache, also across reruns."""
  import jax
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_studies(names: list[str], *, budget: str, out: str, runs: str | None = None,
                quiet: bool = True) -> dict[str, dict]:
  """Runs the named studies in order; returns {study: results}. Importable (the tests call it)."""
  from experiments.configs import studies as budgets
  from experiments.studies import common
  ctx = common.Context(budget=budgets.get_config(budget), out=out,
                       runs=runs or os.path.join("runs", "studies", budget), quiet=quiet)
  results = {}
  for name in names:
    t0 = time.time()
    print(f"=== study {name} (budget {budget}) ===", flush=True)
    results[name] = STUDIES[name](ctx)
    results[name]["elapsed_s"] = time.time() - t0
    print(results[name].get("markdown", ""), flush=True)
    print(f"=== {name} done in {time.time() - t0:.0f} s; figures: "
          f"{', '.join(results[name].get('figures', []))}", flush=True)
  return results


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  names = resolve(FLAGS.study)
  runs = FLAGS.runs or os.path.join("runs", "studies", FLAGS.budget)
  if FLAGS.compile_cache != "none":
    enable_compile_cache(FLAGS.compile_cache or os.path.join(runs, ".jax_cache"))
  t0 = time.time()
  res = run_studies(names, budget=FLAGS.budget, out=FLAGS.out, runs=runs, quiet=not FLAGS.verbose)
  print("Elapsed per study (s): " + ", ".join(f"{k} {v['elapsed_s']:.0f}" for k, v in res.items())
        + f"; total {time.time() - t0:.0f} s.")


if __name__ == "__main__":
  app.run(main)
