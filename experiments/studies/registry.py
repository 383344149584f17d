"""The study table and the driver behind `python -m experiments.studies` (its flags: __main__.py).

Importable without absl flags (the tests and other scripts use it): `STUDIES` maps a study name to
its `run(ctx)`, `resolve` turns a --study value into names, `run_studies` runs them in order, and
`enable_compile_cache` turns on XLA's persistent compilation cache.
"""

from __future__ import annotations

import os
import time

import jax

from experiments.studies import (
  budgets,
  common,
  curves,
  drift,
  geometry,
  gradients,
  language,
  length,
  length_parity,
  probes,
  race,
  recipe,
  samples,
  scaling,
  steps,
  sweep,
  teachers,
  updaters,
)

# The one name -> study table. Order matters for `all`: later studies reuse earlier runs.
STUDIES = {
  "probes": probes.run,
  "steps": steps.run,
  "gradients": gradients.run,
  "drift": drift.run,
  "length": length.run,
  "length_parity": length_parity.run,
  "curves": curves.run,
  "scaling": scaling.run,
  "sweep": sweep.run,
  "updaters": updaters.run,
  "samples": samples.run,
  "geometry": geometry.run,
  "teachers": teachers.run,
  "text": language.run,
  "race": race.run,
  "recipe": recipe.run,
}


def default_runs(budget: str) -> str:
  """Where run workdirs go unless told otherwise: runs/studies/<budget>."""
  return os.path.join("runs", "studies", budget)


def resolve(study: str) -> list[str]:
  """`all`, one name or a comma-separated list -> study names, in the order given."""
  names = list(STUDIES) if study == "all" else [s.strip() for s in study.split(",") if s.strip()]
  unknown = [s for s in names if s not in STUDIES]
  if unknown or not names:
    raise ValueError(f"--study: unknown {unknown or study!r}; choose from {list(STUDIES)} or all.")
  return names


def enable_compile_cache(path: str) -> None:
  """Same HLO (e.g. a config's seeds) compiles once: XLA's persistent cache, also across reruns."""
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_studies(
  names: list[str],
  *,
  budget: str,
  out: str,
  runs: str | None = None,
  quiet: bool = True,
  overrides: tuple[str, ...] = (),
) -> dict[str, dict]:
  """Runs the named studies in order; returns {study: results}. `overrides`: `--set` values
  (budgets.apply_overrides), e.g. ("length_parity.tasks=('copy',)",)."""
  b = budgets.apply_overrides(budgets.get_config(budget), overrides)
  ctx = common.Context(budget=b, out=out, runs=runs or default_runs(budget), quiet=quiet)
  results = {}
  for name in names:
    t0 = time.time()
    print(f"=== study {name} (budget {budget}) ===", flush=True)
    results[name] = STUDIES[name](ctx)
    results[name]["elapsed_s"] = time.time() - t0
    print(results[name].get("markdown", ""), flush=True)
    print(
      f"=== {name} done in {time.time() - t0:.0f} s; figures: "
      f"{', '.join(results[name].get('figures', []))}",
      flush=True,
    )
  return results
