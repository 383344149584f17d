"""Budgets of the studies that reproduce the paper's findings (`experiments.studies`, SPEC 9).

Argument: `cpu` (default; on a shared 2-core CPU the pre-parity study set trained in about 55
minutes, length_parity in 62 and text in 17 more; everything reruns in about a minute once its runs
are cached) or `smoke` (tiny models, a few steps, one seed; what
tests/test_studies.py runs).

Every comparison gives each method the SAME number of optimiser steps:
  SMT steps + DMT steps == BPTT steps, with the same batch size, model width and RNN kind.

Commands:
  python -m experiments.studies --study=all --budget=cpu --out=docs        # everything, ~2 h
  python -m experiments.studies --study=probes --budget=cpu --out=docs     # one study
  python -m experiments.studies --study=all --budget=smoke --out=/tmp/smoke_docs
Studies: probes, steps, gradients, drift, length, geometry, updaters, samples, teachers,
length_parity, text (see docs/results.md).
Runs (checkpoints, metrics) go to runs/studies/<budget>/ and are reused by later studies and reruns.
"""

import ml_collections


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  if arg not in ("cpu", "smoke"):
    raise ValueError(f"budgets.py: unknown budget {arg!r}; use cpu or smoke.")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = arg

  # The probe model (teacher and RNN): small enough for a CPU, the same for every method.
  c.model = ml_collections.ConfigDict(
    dict(
      width=16 if smoke else 32,
      num_memory_tokens=2 if smoke else 4,
      num_heads=2 if smoke else 4,
      depth=1,
    )
  )

  # 1. Probes: BPTT vs SMT->DMT at two difficulty levels (sequence length T), seeds.
  c.probes = ml_collections.ConfigDict()
  c.probes.tasks = (
    ("retrieval", "stack") if smoke else ("retrieval", "copy", "stack", "keys_values", "modular")
  )
  c.probes.lengths = (8,) if smoke else (16, 32)
  c.probes.seeds = (0,) if smoke else (0, 1, 2)
  c.probes.smt_steps = 2 if smoke else 150
  c.probes.dmt_steps = 2 if smoke else 50
  c.probes.batch_size = 4 if smoke else 16
  c.probes.eval_batch_size = 8 if smoke else 64
  c.probes.eval_batches = 1 if smoke else 2
  # Task sizes. Every task has a vocabulary of 17 (9 in smoke), so the compiled train / eval steps
  # of all tasks at one length are identical and XLA's compilation cache serves them all.
  c.probes.options = ml_collections.ConfigDict(
    dict(
      retrieval=dict(num_tokens=8 if smoke else 16),
      copy=dict(num_tokens=8 if smoke else 16),
      stack=dict(num_tokens=8 if smoke else 16, max_depth=2 if smoke else 4),
      keys_values=dict(num_keys=4 if smoke else 8, num_values=4 if smoke else 8),
      modular=dict(modulus=9 if smoke else 17),
    )
  )

  # 1b. Accuracy vs budget: one probe, several optimiser-step budgets (the probe budget reused).
  c.steps = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=c.probes.lengths[0],
      totals=(c.probes.smt_steps + c.probes.dmt_steps,) if smoke else (200, 600, 1200, 2400),
    )
  )

  # 2. Gradient flow: the retrieval probe at the longest length, seed 0 (reuses the probe runs).
  c.gradients = ml_collections.ConfigDict(
    dict(task="retrieval", length=c.probes.lengths[-1], num_sequences=4 if smoke else 32)
  )

  # 3. Drift: along the sequence (reuses the probe run), and across SMT settings (SMT-only runs).
  c.drift = ml_collections.ConfigDict(
    dict(task="stack", length=c.probes.lengths[-1], num_sequences=8 if smoke else 128)
  )
  c.drift.settings = (
    () if smoke else ((0.01, 1e-3), (1.0, 1e-3), (0.1, 0.0), (0.1, 1e-2))
  )  # (c_dyn, c_unif); (0.1, 1e-3) is reused

  # 4. Length generalisation: train at T (reuses the probe runs), evaluate at factor * T.
  c.length = ml_collections.ConfigDict(
    dict(task="stack", length=c.probes.lengths[0], factors=(1, 2) if smoke else (1, 2, 4))
  )

  # 5./7. Digits (pixels): SMT->DMT vs BPTT at equal steps, samples and memory geometry.
  # The model of pixels.py:digits (width 64, depth 2, 2 transitions per sequence), smaller batch.
  c.digits = ml_collections.ConfigDict(
    dict(
      width=16 if smoke else 64,
      num_memory_tokens=2 if smoke else 4,
      depth=1 if smoke else 2,
      smt_steps=2 if smoke else 1200,
      dmt_steps=2 if smoke else 300,
      batch_size=4 if smoke else 16,
      num_samples=4 if smoke else 10,
    )
  )
  c.geometry = ml_collections.ConfigDict(
    dict(probe_task="stack", probe_length=c.probes.lengths[-1], num_sequences=8 if smoke else 64)
  )

  # 8. Label quality: the windowed teacher vs the one-pass causal teacher, SMT->DMT at the probe
  # budget, with a two-layer encoder (at one layer, Tc = T, the two kinds compute the same).
  c.teachers = ml_collections.ConfigDict(
    dict(
      tasks=("retrieval",) if smoke else ("stack",),
      lengths=(8,) if smoke else (32, 64),
      seeds=(0,) if smoke else (0, 1, 2),
      depth=2,
    )
  )

  # 1c. Length at parity (length_parity.py): the probes whose dependency span grows with T, at
  # T = 32 .. 256, BPTT vs SMT->DMT vs the teacher, 3 seeds, SMT + DMT steps == BPTT steps. The
  # one-pass causal teacher (depth 2, Tc = T, Tf per task) makes the long lengths affordable; SMT
  # trains min(T, decoder_tokens // Tf) transitions per batch (all of them while that is >= T,
  # else a random subset), so the decoder's work per step stays the same at every length.
  c.length_parity = ml_collections.ConfigDict(
    dict(
      tasks=("retrieval",) if smoke else ("retrieval", "stack"),
      lengths=(8,) if smoke else (32, 64, 128, 256),
      seeds=(0,) if smoke else (0, 1, 2),
      smt_steps=2 if smoke else 150,
      dmt_steps=2 if smoke else 50,
      batch_size=4 if smoke else 16,
      eval_batch_size=8 if smoke else 64,
      eval_batches=1 if smoke else 2,
      teacher_kind="causal",
      teacher_depth=2,
      # Tf per task: a float is a fraction of T, an int a fixed horizon (at most T). Retrieval's
      # needle sits before T/2 and is asked for at T-1, so Tf = T/2 asks every memory from T/2
      # on; a stack's push-to-pop span does not grow with T (95% within 17 steps at T = 256).
      future=dict(retrieval=0.5, stack=4 if smoke else 16),
      decoder_tokens=8 if smoke else 512,  # SMT transitions per batch: min(T, this // Tf)
    )
  )

  # 9. Bytes (language.py): SMT->DMT vs BPTT on the offline corpus, text.py's CPU model, equal
  # optimiser steps and batch, curves of held-out bits per byte (eval every eval_every_steps).
  c.text = ml_collections.ConfigDict(
    dict(
      smt_steps=2 if smoke else 600,
      dmt_steps=2 if smoke else 150,
      batch_size=4 if smoke else 16,
      eval_every_steps=2 if smoke else 75,
      eval_batches=1 if smoke else 2,
    )
  )

  # 6. Updater kinds on one probe, SMT->DMT and BPTT, seed 0.
  c.updaters = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=c.probes.lengths[0],
      kinds=("transformer",) if smoke else ("transformer", "mlp", "gru"),
    )
  )
  return c
