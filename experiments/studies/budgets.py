"""Budgets of the studies that reproduce the paper's findings (`experiments.studies`,
docs/method.md section 9).

Argument: `cpu` (default; on a shared 2-core CPU every study together trained in about 10 hours of
run time, length_parity 4.9 h and the curves 2 h of it; everything reruns in about a minute once its
runs are cached) or `smoke` (tiny models, a few steps, one seed; what tests/test_studies.py runs).

Every comparison gives each method the SAME number of optimiser steps:
  SMT steps + DMT steps == BPTT steps, with the same batch size, model width and RNN kind.

Commands:
  python -m experiments.studies --study=all --budget=cpu --out=docs        # everything, ~10 h
  python -m experiments.studies --study=probes --budget=cpu --out=docs     # one study
  python -m experiments.studies --study=all --budget=smoke --out=/tmp/smoke_docs
  python -m experiments.studies --study=length_parity --set="length_parity.tasks=('copy',)" \
    --out=/tmp/copy_only                                                 # a budget field changed
Studies: race, recipe, probes, steps, gradients, drift, length, geometry, updaters, samples,
teachers, length_parity, curves, scaling, sweep, text (see docs/results.md).
Runs (checkpoints, metrics) go to runs/studies/<budget>/ and are reused by later studies and reruns.
"""

import ast

import ml_collections

# the streams' rows (64 + 8 tokens) at Tf 8, every memory trained; with 16 decoded the recipe
# search's winner (`,full` since)
TF8 = ("smt.future_length=8", "smt.num_transitions=72")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  if arg not in ("cpu", "smoke"):
    raise ValueError(f"budgets.py: unknown budget {arg!r}; use cpu or smoke.")
  smoke = arg == "smoke"
  c = ml_collections.ConfigDict()
  c.name = arg

  # Comment numbers are the sections of docs/results.md.
  # The probe model (teacher and RNN): small enough for a CPU, the same for every method.
  c.model = ml_collections.ConfigDict(
    dict(
      width=16 if smoke else 32,
      num_memory_tokens=2 if smoke else 4,
      num_heads=2 if smoke else 4,
      depth=1,
    )
  )

  # 10. Probes: BPTT vs SMT->DMT at two difficulty levels (sequence length T), seeds.
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

  # 10b. Accuracy vs budget: one probe, several optimiser-step budgets (the probe budget reused).
  c.steps = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=c.probes.lengths[0],
      totals=(c.probes.smt_steps + c.probes.dmt_steps,) if smoke else (200, 600, 1200, 2400),
    )
  )

  # 8. Gradient flow: the retrieval probe at the longest length, seed 0 (reuses the probe runs).
  c.gradients = ml_collections.ConfigDict(
    dict(task="retrieval", length=c.probes.lengths[-1], num_sequences=4 if smoke else 32)
  )

  # 9. Drift: along the sequence (reuses the probe run), and across SMT settings (SMT-only runs).
  c.drift = ml_collections.ConfigDict(
    dict(task="stack", length=c.probes.lengths[-1], num_sequences=8 if smoke else 128)
  )
  c.drift.settings = (
    () if smoke else ((0.01, 1e-3), (1.0, 1e-3), (0.1, 0.0), (0.1, 1e-2))
  )  # (c_dyn, c_unif); (0.1, 1e-3) is reused

  # 8. Length generalisation: train at T (reuses the probe runs), evaluate at factor * T.
  c.length = ml_collections.ConfigDict(
    dict(task="stack", length=c.probes.lengths[0], factors=(1, 2) if smoke else (1, 2, 4))
  )

  # Digits (pixels): the model of pixels.py:digits,earlier (width 64, depth 2, 2 transitions per
  # sequence) with a smaller batch. Its SMT->DMT and BPTT runs are the curves study's (steps there);
  # the samples and geometry studies read them.
  c.digits = ml_collections.ConfigDict(
    dict(
      width=16 if smoke else 64,
      num_memory_tokens=2 if smoke else 4,
      depth=1 if smoke else 2,
      batch_size=4 if smoke else 16,
      num_samples=4 if smoke else 10,
    )
  )
  c.geometry = ml_collections.ConfigDict(
    dict(probe_task="stack", probe_length=c.probes.lengths[-1], num_sequences=8 if smoke else 64)
  )

  # 6. Label quality: the windowed teacher vs the one-pass causal teacher, SMT->DMT at the probe
  # budget, with a two-layer encoder (at one layer, Tc = T, the two kinds compute the same).
  c.teachers = ml_collections.ConfigDict(
    dict(
      tasks=("retrieval",) if smoke else ("stack",),
      lengths=(8,) if smoke else (32, 64),
      seeds=(0,) if smoke else (0, 1, 2),
      depth=2,
    )
  )

  # 1. Length at parity (length_parity.py): the five probes at T = 32 .. 256, BPTT vs SMT->DMT
  # vs the teacher, 3 seeds, SMT + DMT steps == BPTT steps. The one-pass causal teacher (depth 2,
  # Tc = T, Tf per task) makes the long lengths affordable; SMT
  # trains min(T, decoder_tokens // Tf) transitions per batch (all of them while that is >= T,
  # else a random subset), so the decoder's work per step stays the same at every length.
  c.length_parity = ml_collections.ConfigDict(
    dict(
      tasks=("retrieval",) if smoke else ("retrieval", "stack", "copy", "keys_values", "modular"),
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
      # on; copy reproduces a string of (T-1)//2 tokens after its separator, so Tf = T/2 asks the
      # separator's memory for all of it. What the others must carry does not grow with T: a
      # stack's push-to-pop span (95% within 17 steps at T = 256), the 8 key/value pairs that
      # open a keys_values episode (queries follow until T-1), a modular episode's (w, b).
      future=dict(
        retrieval=0.5,
        copy=0.5,
        stack=4 if smoke else 16,
        keys_values=4 if smoke else 16,
        modular=4 if smoke else 16,
      ),
      decoder_tokens=8 if smoke else 512,  # SMT transitions per batch: min(T, this // Tf)
    )
  )

  # 5. Bytes (language.py): SMT->DMT vs BPTT on the offline corpus, text.py's CPU model, equal
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

  # 2. Long budgets (curves.py): probes (length_parity's config) and digits, SMT->DMT vs BPTT
  # at equal steps, held-out evals every eval_every steps, long enough for the curves to flatten.
  # Retrieval: does anyone learn it at 7.5x the length study's budget (nobody does at 200 steps)?
  long_probe = dict(  # both probes: 7.5x the length study's steps
    smt_steps=2 if smoke else 1200, dmt_steps=2 if smoke else 300, eval_every=2 if smoke else 100
  )
  c.curves = ml_collections.ConfigDict(
    dict(
      workloads=("stack", "digits") if smoke else ("stack", "retrieval", "digits"),
      stack=dict(task="stack", length=8 if smoke else 64, **long_probe),
      retrieval=dict(task="retrieval", length=8 if smoke else 32, **long_probe),
      digits=dict(
        smt_steps=2 if smoke else 1600,
        dmt_steps=2 if smoke else 400,
        eval_every=2 if smoke else 200,
      ),
    )
  )

  # 3. Scaling (scaling.py, Fig. 8 / 9): width, RNN depth and memory tokens K around a base point,
  # one probe at length_parity's config, SMT->DMT vs BPTT at equal steps, evals every eval_every.
  c.scaling = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=8 if smoke else 32,
      width=c.model.width,
      memory_tokens=c.model.num_memory_tokens,
      depth=1,
      widths=(8,) if smoke else (16, 32, 64),
      depths=(2,) if smoke else (1, 2),
      memory_tokens_sweep=(1,) if smoke else (1, 2, 4, 8),
      smt_steps=2 if smoke else 300,
      dmt_steps=2 if smoke else 100,
      eval_every=2 if smoke else 25,
    )
  )

  # 4. The c_dyn x c_unif grid (sweep.py, Fig. 16): SMT->DMT at length_parity's config.
  c.sweep = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=8 if smoke else 32,
      c_dyn=(0.1, 1.0) if smoke else (0.01, 0.1, 1.0),
      c_unif=(1e-3,) if smoke else (0.0, 1e-3, 1e-2),
      seeds=(0,) if smoke else (0, 1),
    )
  )

  # 0. The fair race: the default recipes against BPTT at equal tokens, a small lr grid each.
  c.race = ml_collections.ConfigDict(
    dict(
      workloads=("stack",) if smoke else ("digits", "stack", "stack32", "text"),
      length=8 if smoke else 64,  # T of a probe named without one ('stack'; 'stack32': 32)
      tokens=dict(
        digits=1_000_000, stack=320 if smoke else 1_000_000, stack32=1_000_000, text=1_000_000
      ),
      smt_share=0.75,  # of SMT->DMT's tokens, SMT's; DMT the rest
      # each workload's lr grid (1e-2 where 3e-3 was a method's best)
      lrs=dict(stack=(1e-3,))
      if smoke
      else dict(
        digits=(3e-4, 1e-3, 3e-3, 1e-2),
        stack=(3e-4, 1e-3, 3e-3, 1e-2),
        stack32=(1e-3, 3e-3, 1e-2),
        text=(1e-3, 3e-3, 1e-2),
      ),
      # where the earlier recipe races too (on a probe its windowed teacher encodes T windows;
      # on text it is the default), and at which lrs
      earlier=() if smoke else ("digits", "text"),
      earlier_lrs=(1e-3,) if smoke else (1e-3, 3e-3),
      dmt_lr_ratio=0.3,
      seeds=(0,),
      evals=2 if smoke else 5,
    )
  )

  # 0c. The recipe search: each workload's recipe varied one axis at a time, at equal tokens. A
  # probe ('stack32': stack at T = 32) starts from its default config at its default budget; a
  # stream ('digits', 'text') from the race's config (0), each method at `lrs`.
  c.recipe = ml_collections.ConfigDict(
    dict(
      workloads=("stack8",) if smoke else ("stack32", "digits", "text"),
      # per workload (digits: seed 1, text: seed 0, whose default and BPTT runs the race has)
      seeds=dict(stack8=(0,)) if smoke else dict(stack32=(0,), digits=(1,), text=(0,)),
      # the race's best (section 0)
      lrs=dict(digits=dict(smt_dmt=3e-3, bptt=1e-3), text=dict(smt_dmt=3e-3, bptt=3e-3)),
      variants=dict(stack8=(("default", ()), ("every memory decoded", ("smt.num_decoded=9",))))
      if smoke
      else dict(
        stack32=(
          ("default", ()),
          ("every memory decoded", ("smt.num_decoded=33",)),
          ("Tf 8", ("smt.future_length=8",)),
          ("DMT a quarter of the tokens", ("smt.steps=1688", "dmt.steps=562")),
          ("no DMT", ("phases='smt'", "smt.steps=2250")),
        ),
        digits=(
          ("default", ()),
          ("Tf 8", TF8),
          ("16 decoded", ("smt.num_decoded=16",)),
          ("DMT half the tokens", ("smt.steps=195", "dmt.steps=218")),
          ("Tf 32", ("smt.future_length=32", "smt.num_transitions=96")),
          ("Tf 8, 16 decoded", TF8 + ("smt.num_decoded=16",)),
          (
            "Tf 8, 32 decoded",
            TF8 + ("smt.num_decoded=32",),
          ),
          (
            "Tf 4, 16 decoded",
            ("smt.future_length=4", "smt.num_transitions=68", "smt.num_decoded=16"),
          ),
          (
            "Tf 8, every memory decoded",
            TF8 + ("smt.num_decoded=0",),
          ),
          (  # every memory decoded took 1.18-1.27x its train seconds (3 seeds): equal wall-clock
            "Tf 8, 16 decoded, 1.25x the tokens",
            TF8 + ("smt.num_decoded=16", "smt.steps=408", "dmt.steps=144"),
          ),
        ),
        text=(
          ("default", ()),
          ("Tf 8", TF8),
          ("16 decoded", ("smt.num_decoded=16",)),
          (
            "Tf 8, 16 decoded",
            TF8 + ("smt.num_decoded=16",),
          ),
          ("Tf 4", ("smt.future_length=4", "smt.num_transitions=68")),
          (
            "Tf 4, 16 decoded",
            ("smt.future_length=4", "smt.num_transitions=68", "smt.num_decoded=16"),
          ),
          (
            "Tf 8, 32 decoded",
            TF8 + ("smt.num_decoded=32",),
          ),
        ),
      ),
      # variants that train on other tokens on purpose (the equal wall-clock rows)
      more_tokens=dict(stack8=())
      if smoke
      else dict(digits=("Tf 8, 16 decoded, 1.25x the tokens",)),
      bptt=dict(stack8=(("BPTT", ()),))
      if smoke
      else dict(
        stack32=(("BPTT", ()), ("BPTT truncated at 8", ("bptt.truncation=8",))),
        digits=(("BPTT", ()),),
        text=(("BPTT", ()),),
      ),
    )
  )

  # 7. Updater kinds on one probe, SMT->DMT and BPTT, seed 0.
  c.updaters = ml_collections.ConfigDict(
    dict(
      task="stack",
      length=c.probes.lengths[0],
      kinds=("transformer",) if smoke else ("transformer", "mlp", "gru"),
    )
  )
  return c


def batch_sizes(budget) -> list[int]:
  """Every batch size a budget names (its *batch_size and num_sequences fields, in lists too):
  what the studies' CPU device count must divide."""
  found = []

  def visit(node, key=""):
    if isinstance(node, (dict, ml_collections.ConfigDict)):
      for k, v in node.items():
        visit(v, k)
    elif isinstance(node, (list, tuple)):
      for v in node:
        visit(v, key)
    elif isinstance(node, int) and (key.endswith("batch_size") or key == "num_sequences"):
      found.append(node)

  visit(budget)
  return found


def apply_overrides(budget: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """`--set` values, 'field.path=python literal' each, applied to (a copy of) a budget.

  e.g. "length_parity.tasks=('copy', 'modular')" or "length_parity.seeds=(0,)". A field the budget
  lacks, a value that is not a Python literal, or one of another type raises ValueError naming it.
  """
  budget = ml_collections.ConfigDict(budget.to_dict())
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set={item!r}: expected field=value, e.g. length_parity.seeds=(0,).")
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      raise ValueError(
        f"--set={item!r}: {text.strip()!r} is not a Python literal (quote strings: 'copy')."
      ) from None
    *parents, leaf = key.split(".")
    node = budget
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f"--set: the budget has no field {'.'.join(parents[: i + 1])!r}.")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"--set: the budget has no field {key!r}.")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):  # merge, not replace
      value = dict(old.to_dict(), **value)  # (a ConfigDict holds its dict fields as ConfigDicts)
    try:
      node[leaf] = value
    except TypeError:
      raise ValueError(
        f"--set={item!r}: {key} is a {type(old).__name__} ({old!r}), not a {type(value).__name__}."
      ) from None
  return budget
