"""SMT->DMT against BPTT on one config, at equal training tokens, in one command; then one plot.

  python -m experiments.compare                     # retrieval at T = 32: 4 min 20 s on 2 cores
  python -m experiments.compare --config=experiments/configs/pixels.py \\
      --config.smt.steps=600 --config.dmt.steps=150

Trains the config's SMT and DMT phases in <workdir>/smt_dmt, then BPTT in <workdir>/bptt for as many
steps as give it the same training tokens (batch x sequence length x steps, over every phase: the
same data), each at its config's learning rate; rerunning resumes both. Prints one line per method
(the RNN alone, its teacher, the tokens, the wall time) and draws the RNN's held-out metric
(--metric: accuracy on an episodic probe, NLL otherwise) against tokens and training seconds, with
the unigram baseline, into <workdir>/compare.png. Overrides (--config.x=y) apply to both runs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli, plot
from smt_jax.runner import config as config_lib
from smt_jax.runner import metrics_io, train
from smt_jax.runner.console import format_duration

DEFAULT_CONFIG = "experiments/configs/synthetic.py:retrieval,32,showcase"
FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing the module
  (tests, other tools) does not collide with their flags of the same names (--config, --out)."""
  config_flags.DEFINE_config_file(
    "config", None, f"Path to a config file (and :arg); default {DEFAULT_CONFIG}.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Where the two runs go (default runs/compare_<config>).")
  flags.DEFINE_string("metric", None, "The plotted metric (default eval/rnn_acc or eval/rnn_nll).")
  flags.DEFINE_string("out", None, "The picture (default <workdir>/compare.png).")


LABELS = {"smt_dmt": "SMT->DMT", "bptt": "BPTT"}


def configs(config) -> dict:
  """{'smt_dmt': the config's SMT and DMT phases, 'bptt': BPTT on the same tokens}."""
  smt_dmt = config.copy_and_resolve_references()
  smt_dmt.phases = "smt,dmt"
  bptt = config.copy_and_resolve_references()
  bptt.phases = "bptt"
  per_step = bptt.bptt.batch_size * config_lib.phase_seq_len(bptt, "bptt")
  bptt.bptt.steps = max(1, round(config_lib.training_tokens(smt_dmt) / per_step))
  return {"smt_dmt": smt_dmt, "bptt": bptt}


def _line(name: str, summary: dict, config, metric: str) -> str:
  last = summary.get("dmt") or summary.get("bptt") or {}
  teacher = summary.get("smt", {})
  acc = metric.endswith("_acc")
  key = "eval/rnn_acc" if acc else "eval/rnn_nll"
  tkey = "eval/teacher_acc" if acc else "eval/teacher_nll"
  steps = "+".join(str(config[p].steps) for p in config.phases.split(","))
  what = "accuracy" if acc else "NLL"
  teacher_part = f", its teacher {teacher[tkey]:.3f}" if tkey in teacher else ""
  return (
    f"{LABELS[name]:>8}: RNN alone {what} {last.get(key, float('nan')):.3f}{teacher_part}; "
    f"{steps} steps, {config_lib.training_tokens(config):.3g} tokens, "
    f"{format_duration(summary.get('wall_time_s', 0))}"
  )


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # library INFO chatter (orbax) off unless asked with -v
    logging.set_verbosity(logging.WARNING)

  config = FLAGS.config
  cli.use_cpu_cores(config)
  path, _, arg = FLAGS["config"].config_filename.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  workdir = FLAGS.workdir or os.path.join("runs", f"compare_{stem}_{arg.replace(',', '_')}")
  metric = FLAGS.metric or ("eval/rnn_acc" if config.data.episodic else "eval/rnn_nll")
  runs = configs(config)
  tokens = config_lib.training_tokens(runs["bptt"])
  print(f"workdir: {workdir} (smt_dmt/ and bptt/, both on {tokens:.3g} tokens)")
  summaries = {}
  for name, c in runs.items():
    print(f"--- {LABELS[name]}", flush=True)
    try:
      summaries[name] = train.train_and_evaluate(c, os.path.join(workdir, name))
    except train.Preempted as e:  # the checkpoint is saved; rerun the command to resume
      sys.exit(e.exit_code)
    except train.USER_ERRORS as e:  # the message says what to fix; a traceback would bury it
      sys.exit(f"error: {e}")
  out = FLAGS.out or os.path.join(workdir, "compare.png")
  plot.plot_runs(
    [os.path.join(workdir, n) for n in runs],
    metric=metric,
    x=["tokens", "seconds"],
    out=out,
    labels=[LABELS[n] for n in runs],
    title=f"{metric}: SMT->DMT and BPTT on the same {tokens:.3g} training tokens",
  )
  base = metrics_io.read_summary(os.path.join(workdir, "smt_dmt")).get("baseline/unigram_nll")
  print("--- equal tokens, each method at its config's learning rate")
  for name, c in runs.items():
    print(_line(name, summaries[name], c, metric))
  if base is not None:
    print(f"  unigram baseline NLL {base:.3f} (a model without memory)")
  print(f"wrote {out}")


def parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_flags, with the default config named on the command line (so that overrides of it
  are checked there, in one line, like any other's)."""
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
  return cli.parse_flags(argv)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
