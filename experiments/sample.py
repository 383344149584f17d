"""Regenerate samples (digit grid / text / probe table) from a run's latest checkpoint.

  python -m experiments.sample --workdir=runs/pixels_digits [--temperature=0.8] [--num=24]

Reads the run's config from <workdir>/config.json, restores the newest readable checkpoint and
writes the samples into the workdir (or --out). The workdir may be remote (gs://...), and may
belong to a live run: its checkpoints are opened read-only. In a job of several processes (the
same environment as the run's), every process restores its part and process 0 writes.
"""

import json
import sys

import ml_collections
from absl import app, flags, logging

from experiments import cli

flags.DEFINE_string("workdir", None, "A run's workdir (holding config.json and checkpoints/).")
flags.DEFINE_string("out", None, "Where to write the samples (default: the workdir).")
flags.DEFINE_float("temperature", None, "Sampling temperature (default: the run's config).")
flags.DEFINE_integer("num", None, "How many samples (default: the run's config).")
flags.DEFINE_integer("seed", None, "Sampling seed (default: the run's config seed).")
flags.DEFINE_float("peer_timeout_s", 60.0, "Several processes: see experiments.run.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from smt_jax.runner import multihost

  with multihost.job(peer_timeout_s=FLAGS.peer_timeout_s):
    _sample()


def _sample():
  import jax

  from smt_jax import storage
  from smt_jax.runner import checkpoints, experiment, metrics_io, multihost, samples
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import workdir as workdir_lib

  workdir = FLAGS.workdir
  config_path = storage.join(workdir, workdir_lib.CONFIG_FILE)
  # Mistakes are one line each (no traceback), said before anything is built.
  try:
    storage.check_reachable(workdir)
  except storage.StorageError as e:
    sys.exit(f"error: {e}")
  if not storage.is_dir(workdir):
    sys.exit(f"error: --workdir={workdir}: no such directory; pass the workdir of a run.")
  if not storage.exists(config_path):
    sys.exit(
      f"error: --workdir={workdir}: no {workdir_lib.CONFIG_FILE}, so not a run's workdir; pass "
      f"the --workdir that python -m experiments.run wrote."
    )
  if not workdir_lib.has_checkpoints(workdir):
    sys.exit(
      f"error: --workdir={workdir}: no checkpoint yet in {workdir}/checkpoints; let the run save "
      f"one (checkpoint_every_steps, or the end of a phase), then sample."
    )
  config = ml_collections.ConfigDict(json.loads(storage.read_text(config_path)))
  if FLAGS.temperature is not None:
    config.samples.temperature = FLAGS.temperature
  if FLAGS.num is not None:
    config.samples.num = FLAGS.num
  if FLAGS.seed is not None:
    config.seed = FLAGS.seed
  try:
    exp = experiment.build_experiment(config)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  mngr = checkpoints.make_manager(workdir, keep=config.keep_checkpoints, read_only=True)
  try:
    restored = checkpoints.restore(mngr, **experiment.restore_targets(exp))
  except checkpoints.CheckpointError as e:
    restored, error = None, f"error: {e}"
  else:
    error = None if restored else f"error: no readable checkpoint in {workdir}/checkpoints."
  if error:
    mngr.close()  # before exiting: orbax's threads must not outlive the interpreter's teardown
    sys.exit(error)
  try:
    phase_index, phase_step = restored["phase_index"], restored["phase_step"]
    params = multihost.host_local(restored["params"])  # every process takes part
    if jax.process_index() == 0:
      out = FLAGS.out or workdir
      storage.makedirs(out)
      with multihost.on_this_host(exp.mesh):
        paths = samples.write_samples(exp, params, out, metrics_io.read_summary(workdir))
      where = exp.phases[phase_index] if phase_index < len(exp.phases) else "end"
      print(f"Checkpoint at {where} step {phase_step}; wrote {', '.join(paths)}")
  finally:
    mngr.close()


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
