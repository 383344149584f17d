"""Regenerate samples (digit grid / text / probe table) from a run's latest checkpoint.

  python -m experiments.sample --workdir=runs/pixels_digits [--temperature=0.8] [--num=24]

Reads the run's config from <workdir>/config.json, restores the newest readable checkpoint and
writes the samples into the workdir (or --out).
"""

import json
import os

import ml_collections
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run's workdir (holding config.json and checkpoints/).")
flags.DEFINE_string("out", None, "Where to write the samples (default: the workdir).")
flags.DEFINE_float("temperature", None, "Sampling temperature (default: the run's config).")
flags.DEFINE_integer("num", None, "How many samples (default: the run's config).")
flags.DEFINE_integer("seed", None, "Sampling seed (default: the run's config seed).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from smt_jax import checkpoints, config_checks, experiment, metrics_io, samples

  with open(os.path.join(FLAGS.workdir, checkpoints.CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if FLAGS.temperature is not None:
    config.samples.temperature = FLAGS.temperature
  if FLAGS.num is not None:
    config.samples.num = FLAGS.num
  if FLAGS.seed is not None:
    config.seed = FLAGS.seed
  exp = config_checks.build_experiment(config)
  mngr = checkpoints.make_manager(FLAGS.workdir, keep=config.keep_checkpoints)
  restored = checkpoints.restore(
    mngr,
    **experiment.restore_targets(exp),
  )
  if restored is None:
    raise SystemExit(f"No checkpoint in {FLAGS.workdir}/checkpoints.")
  params, phase_index, phase_step = (restored[k] for k in ("params", "phase_index", "phase_step"))
  out = FLAGS.out or FLAGS.workdir
  os.makedirs(out, exist_ok=True)
  paths = samples.write_samples(exp, params, out, metrics_io.read_summary(FLAGS.workdir))
  where = exp.phases[phase_index] if phase_index < len(exp.phases) else "end"
  print(f"Checkpoint at {where} step {phase_step}; wrote {', '.join(paths)}")
  mngr.close()


if __name__ == "__main__":
  app.run(main)
