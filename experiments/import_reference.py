"""Turn an SMT checkpoint of the authors' PyTorch code into an smt-jax workdir.

  python -m experiments.import_reference --checkpoint=smt_run/checkpoint.pt --workdir=runs/ref
  python -m experiments.run --config=runs/ref/config.py --workdir=runs/ref     # DMT from it
  python -m experiments.sample --workdir=runs/ref                              # samples

The checkpoint is `train_smt.py`'s `checkpoint.pt` (its cfg, both state dicts and the iteration
count). The workdir gets a config with the checkpoint's model and SMT settings on top of
`--config` (default: by the checkpoint's dataset, `pixels.py:mnist` or `text.py:tinystories`)
with the reference recipe (`common.reference_recipe`), and one checkpoint at the end of its SMT
phase (the RNN readout holding the teacher decoder's weights, as `train_smt.py` saves it), so
`experiments.run` continues with DMT. `--config.*` overrides apply to the base config (e.g.
`--config.data.path=`). The SMT optimiser state is not imported: the SMT phase counts as done.

Unpickling the checkpoint needs torch: `pip install -e ".[reference]"`.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import types

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments.configs import common
from smt_jax import reference
from smt_jax.runner import checkpoints, experiment
from smt_jax.runner import config as config_lib
from smt_jax.runner import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a program: tests import the functions)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Base config (default: by the checkpoint's "
    "dataset); its model and SMT fields come from the checkpoint.",
  )
  flags.DEFINE_string("checkpoint", None, "train_smt.py's checkpoint.pt.")
  flags.DEFINE_string("workdir", None, "The smt-jax workdir to create.")
  flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds another run.")
  flags.mark_flags_as_required(["checkpoint", "workdir"])


BASE_CONFIGS = {
  "mnist": "experiments/configs/pixels.py:mnist",
  "tinystories": "experiments/configs/text.py:tinystories",
}
RUN_CONFIG = '''"""The config of an imported reference run: {workdir}/config.json, as written by
experiments.import_reference (edit that file, not this one, or use --fork)."""

import json
import os

import ml_collections


def get_config():
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))
'''


class CheckpointImportError(ValueError):
  """The checkpoint cannot be imported (a one-line reason)."""


class _Record:
  """Stands in for a class of the reference's code (its configs) while unpickling."""

  def __init__(self, *args, **kwargs):
    self.__dict__.update(kwargs)

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


class _Unpickler(pickle.Unpickler):
  """Unpickles the reference's config dataclasses without their code (as plain records)."""

  def find_class(self, module, name):
    try:
      return super().find_class(module, name)
    except (ImportError, AttributeError):
      return type(name, (_Record,), {"__module__": "smt_jax_reference_stub"})


def load_config(spec: str):
  """A project config by its file and argument, e.g. 'experiments/configs/pixels.py:mnist'."""
  path, _, arg = spec.partition(":")
  loader = importlib.util.spec_from_file_location("smt_jax_config", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_checkpoint(path: str) -> dict:
  """train_smt.py's checkpoint.pt as {'cfg', 'teacher', 'rnn', 'itr'} with numpy state dicts."""
  if not os.path.isfile(path):  # first: a wrong path is the likelier mistake, torch or not
    raise CheckpointImportError(
      f"--checkpoint={path}: no such file (train_smt.py writes <save_dir>/checkpoint.pt)."
    )
  try:
    import torch
  except ImportError:
    raise CheckpointImportError(
      "reading a PyTorch checkpoint needs torch: pip install -e \".[reference]\" "
      "(torch is not a dependency of smt-jax otherwise)."
    ) from None
  module = types.SimpleNamespace(
    Unpickler=_Unpickler, load=pickle.load, __name__="smt_jax_reference_pickle"
  )
  ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=module)
  missing = [k for k in ("cfg", "teacher", "rnn", "itr") if k not in ckpt]
  if missing:
    raise CheckpointImportError(
      f"--checkpoint={path} lacks {missing}: is it train_smt.py's checkpoint.pt?"
    )
  to_np = lambda sd: {k: v.detach().cpu().float().numpy() for k, v in sd.items()}
  return {
    "cfg": ckpt["cfg"],
    "teacher": to_np(ckpt["teacher"]),
    "rnn": to_np(ckpt["rnn"]),
    "itr": int(ckpt["itr"]),
  }


def _get(obj, name: str):
  value = obj
  for part in name.split("."):
    if not hasattr(value, part):
      raise CheckpointImportError(
        f"the checkpoint's cfg has no {name!r}: not a train_smt.py config."
      )
    value = getattr(value, part)
  return value


def reference_config(base, cfg, itr: int):
  """`base` with the model, SMT and optimiser settings of a train_smt.py cfg (SMT done at itr)."""
  t, r = _get(cfg, "teacher"), _get(cfg, "rnn")
  for what, v, want in (
    ("teacher.mem_rms_norm", getattr(t, "mem_rms_norm", True), True),
    ("teacher.mem_fsq", getattr(t, "mem_fsq", None), None),
    ("rnn.mem_fsq", getattr(r, "mem_fsq", None), None),
    ("rnn.d_model", _get(r, "d_model"), _get(t, "d_model")),
    ("rnn.n_heads", _get(r, "n_heads"), _get(t, "n_heads")),
    ("rnn.mem_tokens", _get(r, "mem_tokens"), _get(t, "mem_tokens")),
    ("rnn.vocab_size", _get(r, "vocab_size"), _get(t, "vocab_size")),
  ):
    if v != want:
      raise CheckpointImportError(
        f"cfg.{what} = {v!r}: smt-jax imports models with {want!r} there."
      )
  c = base
  common.reference_recipe(c)
  c.phases = "smt,dmt"
  c.model.update(
    rnn_kind="transformer",
    width=int(t.d_model),
    num_heads=int(t.n_heads),
    num_memory_tokens=int(t.mem_tokens),
    encoder_depth=int(t.encoder_depth),
    decoder_depth=int(t.decoder_depth),
  )
  c.model.rnn.transformer.update(depth=int(r.rnn_depth), readout_depth=int(r.decoder_depth))
  s = _get(cfg, "smt")
  c.smt.update(
    steps=max(int(itr), 1),
    context_length=int(s.Tc),
    future_length=int(s.Tf),
    gamma=float(s.gamma),
    c_dec=float(s.coef_dec),
    c_dyn=float(s.coef_dyn),
    c_unif=float(s.coef_unif),
    stop_teacher_grad=bool(getattr(s, "detach_rnn", False)),
    uniformity_over="tokens" if getattr(s, "unif_over_tokens", True) else "states",
    batch_size=int(_get(cfg, "batch_size")),
    lr=float(_get(cfg, "lr")),
  )
  betas = tuple(_get(cfg, "adam_betas"))
  c.optim.update(
    b1=float(betas[0]),
    b2=float(betas[1]),
    weight_decay=float(_get(cfg, "weight_decay")),
    clip_norm=float(_get(cfg, "clip_grad_norm")),
  )
  c.seed = int(getattr(cfg, "seed", c.seed))
  return c


def import_checkpoint(ckpt: dict, base, workdir: str, *, overwrite: bool = False) -> str:
  """Writes the workdir for a loaded checkpoint (see `load_checkpoint`); returns its config.py."""
  config = reference_config(base, ckpt["cfg"], ckpt["itr"])
  exp = experiment.build_experiment(config)  # validates the config and the data first
  m = config.model
  if exp.source.vocab_size != ckpt["cfg"].teacher.vocab_size:
    raise CheckpointImportError(
      f"the checkpoint's vocabulary is {ckpt['cfg'].teacher.vocab_size}, the "
      f"config's data {config.data.name!r} has {exp.source.vocab_size}: pass "
      f"the --config of the data it was trained on."
    )
  try:
    teacher, rnn = reference.from_state_dicts(
      ckpt["teacher"],
      ckpt["rnn"],
      vocab_size=exp.source.vocab_size,
      width=m.width,
      num_heads=m.num_heads,
      num_memory_tokens=m.num_memory_tokens,
      encoder_depth=m.encoder_depth,
      decoder_depth=m.decoder_depth,
      rnn_depth=m.rnn.transformer.depth,
      readout_depth=m.rnn.transformer.readout_depth,
    )
  except ValueError as e:
    raise CheckpointImportError(f"the checkpoint's weights do not fit its cfg: {e}") from None
  imported = {"teacher": nnx.state(teacher), "rnn": nnx.state(rnn)}
  if jax.tree.structure(imported) != jax.tree.structure(exp.abstract_params):
    raise CheckpointImportError("the imported models do not have the runner's parameter layout.")
  imported = jax.device_put(imported, exp.params_sharding)
  workdir_lib.claim_workdir(workdir, config, overwrite=overwrite, fork=False, is_main=True)
  mngr = checkpoints.make_manager(workdir, keep=config.keep_checkpoints)
  try:
    checkpoints.save(
      mngr, config.smt.steps, imported, None, phase_index=1, phase_step=0, phase="dmt"
    )
    mngr.wait_until_finished()
  finally:
    mngr.close()
  path = os.path.join(workdir, "config.py")
  with open(path, "w") as f:
    f.write(RUN_CONFIG.format(workdir=workdir))
  return path


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    ckpt = load_checkpoint(FLAGS.checkpoint)
    base = FLAGS.config
    if base is None:
      dataset = str(getattr(ckpt["cfg"], "dataset", ""))
      if dataset not in BASE_CONFIGS:
        raise CheckpointImportError(
          f"the checkpoint's dataset {dataset!r} has no default config: pass "
          f"--config=experiments/configs/<file>.py[:arg]."
        )
      base = load_config(BASE_CONFIGS[dataset])
    path = import_checkpoint(
      ckpt, base.copy_and_resolve_references(), FLAGS.workdir, overwrite=FLAGS.overwrite
    )
  except (CheckpointImportError, config_lib.ConfigError, workdir_lib.WorkdirError) as e:
    sys.exit(f"error: {e}")
  print(
    f"Imported SMT step {ckpt['itr']} into {FLAGS.workdir}. Continue with DMT:\n"
    f"  python -m experiments.run --config={path} --workdir={FLAGS.workdir}\n"
    f"  python -m experiments.sample --workdir={FLAGS.workdir}"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
