"""The main entry point: train an experiment from its config.

  python -m experiments.run --config=experiments/configs/pixels.py
  python -m experiments.run --config=experiments/configs/synthetic.py:stack \\
      --config.model.rnn_kind=gru

Rerunning the same command resumes from the latest checkpoint in --workdir (default
runs/<config name>_<arg>); rerunning it with a phase's steps raised (--config.dmt.steps=600)
continues the run for longer, and `--config=<workdir>` stands for that run's own config (no
overrides to retype). On multi-host systems every process runs this same command.

Exit status: 0 when every phase finished; 143 (as for a process ended by SIGTERM) when SIGTERM
arrived and a checkpoint of the current step was saved first, so that a scheduler restarts the
job rather than counting it done; 130 for Ctrl-C (SIGINT), which gets the same treatment (a
second Ctrl-C stops at once, without the checkpoint); 1 on an error. Every expected mistake (a
typo in an override, a missing config file, a workdir that is a file, cannot be written, holds
another config's run or is in use) prints one line naming the fix, before anything compiles.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

config_flags.DEFINE_config_file(
  "config", None, "Path to a config file (and :arg).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go.")
flags.DEFINE_bool("overwrite", False, "Start over in a workdir that holds another config's run.")
flags.DEFINE_bool("fork", False, "Continue another config's checkpoints under this config.")
flags.DEFINE_float(
  "peer_timeout_s",
  60.0,
  "Several processes: when one stops responding for this long (or fails), the others exit with "
  "one line saying so.",
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  try:
    _main(argv)
  except KeyboardInterrupt:  # before training started (e.g. while importing JAX): nothing to save
    print("SIGINT: interrupted before training started; nothing to save.", file=sys.stderr)
    sys.exit(130)


def _main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # library INFO chatter (orbax) off unless asked with -v
    logging.set_verbosity(logging.WARNING)
  if FLAGS.peer_timeout_s <= 0:
    sys.exit(f"error: --peer_timeout_s={FLAGS.peer_timeout_s}: must be > 0 seconds (e.g. 60).")
  cli.use_cpu_cores(FLAGS.config)  # before JAX starts its CPU backend
  from smt_jax.runner import multihost

  clean = (None, 0, 130, 143)  # finished, or stopped at a checkpoint (SIGINT, SIGTERM)
  with multihost.job(peer_timeout_s=FLAGS.peer_timeout_s, clean_exits=clean):
    _train()


def _train():
  from smt_jax.runner import train  # after distributed init

  workdir = FLAGS.workdir or cli.default_workdir(FLAGS["config"].config_filename)
  print(f"workdir: {workdir}", flush=True)
  try:
    train.train_and_evaluate(FLAGS.config, workdir, overwrite=FLAGS.overwrite, fork=FLAGS.fork)
  except train.Preempted as e:  # the checkpoint is saved; rerun the command to resume
    sys.exit(e.exit_code)  # 143 (SIGTERM) or 130 (SIGINT), as for a process the signal ended
  except train.USER_ERRORS as e:  # the message says what to fix; a traceback would bury it
    sys.exit(f"error: {e}")
  # The run has printed its verdict; every number is in {workdir}/summary.json.


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
