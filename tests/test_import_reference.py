"""experiments.import_reference: an authors' SMT checkpoint becomes a workdir DMT continues.

The weights are a reference-layout state dict (made with `to_state_dicts`, as the reference's
`state_dict()` names them); the cfg is a stand-in with train_smt.py's fields. The torch test
writes a real `checkpoint.pt` (its cfg a dataclass from a module the reader cannot import, as
train_smt.py's `__main__.Config` is) and skips where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import types

import numpy as np
import pytest
from flax import nnx

from experiments import import_reference
from experiments.configs import pixels
from smt_jax import reference
from smt_jax.runner import checkpoints, experiment, train

DIMS = dict(
  vocab_size=18,
  width=16,
  num_heads=2,
  num_memory_tokens=2,
  encoder_depth=1,
  decoder_depth=1,
  rnn_depth=1,
  readout_depth=1,
)  # digits: 17 levels + BOS


def reference_cfg(**smt):
  ns = types.SimpleNamespace
  model = dict(vocab_size=18, mem_tokens=2, d_model=16, n_heads=2, mem_rms_norm=True, mem_fsq=None)
  return ns(
    dataset="digits",
    seed=0,
    lr=3e-4,
    batch_size=4,
    weight_decay=0.01,
    adam_betas=(0.9, 0.95),
    clip_grad_norm=1.0,
    teacher=ns(encoder_depth=1, decoder_depth=1, **model),
    rnn=ns(rnn_depth=1, decoder_depth=1, **model),
    smt=ns(
      **{
        **dict(
          Tc=16,
          Tf=4,
          gamma=1.0,
          coef_dec=1.0,
          coef_dyn=0.1,
          coef_unif=0.001,
          detach_rnn=False,
          unif_over_tokens=True,
        ),
        **smt,
      }
    ),
  )


def reference_weights(seed=3):
  teacher, rnn = reference.build(**DIMS, seed=seed)
  return reference.to_state_dicts(teacher, rnn)


def restore_params(workdir):
  config = import_reference.load_config(str(pathlib.Path(workdir) / "config.py"))
  exp = experiment.build_experiment(config)
  mngr = checkpoints.make_manager(str(workdir), keep=3)
  restored = checkpoints.restore(
    mngr,
    **experiment.restore_targets(exp),
  )
  mngr.close()
  params, phase_index = restored["params"], restored["phase_index"]
  teacher = nnx.merge(exp.graphdefs[0], params["teacher"])
  rnn = nnx.merge(exp.graphdefs[1], params["rnn"])
  return config, reference.to_state_dicts(teacher, rnn), phase_index


def test_import_then_dmt_continues_from_the_reference_weights(tmp_path):
  t_sd, r_sd = reference_weights()
  ckpt = {"cfg": reference_cfg(), "teacher": t_sd, "rnn": r_sd, "itr": 7}
  workdir = tmp_path / "ref"
  path = import_reference.import_checkpoint(ckpt, pixels.get_config("smoke"), str(workdir))

  config, (t_in, r_in), phase_index = restore_params(workdir)
  assert phase_index == 1  # SMT done: the next phase is DMT
  assert config.smt.steps == 7 and config.smt.context_length == 16
  assert config.model.rnn_initial_memory == "zeros" and config.dmt.reference_labels
  for ours, ref in ((t_in, t_sd), (r_in, r_sd)):
    assert set(ours) == set(ref) and all(np.array_equal(ours[k], ref[k]) for k in ref)
  # config.py (what experiments.run is given) is the workdir's config.json.
  assert json.loads(config.to_json()) == json.loads((workdir / "config.json").read_text())

  summary = train.train_and_evaluate(config, str(workdir))  # DMT, then eval and samples
  assert "dmt" in summary and "smt" not in summary
  assert (workdir / "samples.png").exists()
  _, (t_out, r_out), _ = restore_params(workdir)
  assert all(np.array_equal(t_out[k], t_sd[k]) for k in t_sd)  # DMT freezes the teacher
  assert any(not np.array_equal(r_out[k], r_sd[k]) for k in r_sd)  # and trains the RNN
  assert path == str(workdir / "config.py")


def test_unsupported_checkpoints_fail_with_one_line(tmp_path):
  t_sd, r_sd = reference_weights()
  cfg = reference_cfg()
  cfg.teacher.mem_fsq = 1.0
  with pytest.raises(import_reference.CheckpointImportError, match="mem_fsq"):
    import_reference.import_checkpoint(
      {"cfg": cfg, "teacher": t_sd, "rnn": r_sd, "itr": 3},
      pixels.get_config("smoke"),
      str(tmp_path / "a"),
    )
  bad = dict(t_sd)
  bad.pop("to_logits.bias")
  with pytest.raises(ValueError, match="to_logits.bias"):
    import_reference.import_checkpoint(
      {"cfg": reference_cfg(), "teacher": bad, "rnn": r_sd, "itr": 3},
      pixels.get_config("smoke"),
      str(tmp_path / "b"),
    )
  assert not (tmp_path / "b" / "config.json").exists()  # nothing written for a refused import
  with pytest.raises(import_reference.CheckpointImportError, match="no such file"):
    import_reference.load_checkpoint(str(tmp_path / "missing.pt"))


def test_without_torch_the_error_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  (tmp_path / "checkpoint.pt").write_bytes(b"")
  with pytest.raises(import_reference.CheckpointImportError, match=r"\[reference\]"):
    import_reference.load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_a_real_torch_checkpoint_with_an_unimportable_cfg_class(tmp_path):
  torch = pytest.importorskip("torch")
  mod = types.ModuleType("train_smt_stand_in")  # gone when the checkpoint is read
  sys.modules[mod.__name__] = mod

  @dataclasses.dataclass
  class Config:
    dataset: str = "digits"
    itr: int = 0

  Config.__module__, Config.__qualname__ = mod.__name__, "Config"
  mod.Config = Config
  t_sd, r_sd = reference_weights()
  path = tmp_path / "checkpoint.pt"
  torch.save(
    {
      "cfg": Config(),
      "itr": 5,
      "logs": [],
      "opt": {},
      "teacher": {k: torch.from_numpy(v) for k, v in t_sd.items()},
      "rnn": {k: torch.from_numpy(v) for k, v in r_sd.items()},
    },
    path,
  )
  del sys.modules[mod.__name__]
  ckpt = import_reference.load_checkpoint(str(path))
  assert ckpt["itr"] == 5 and ckpt["cfg"].dataset == "digits"
  assert all(np.array_equal(ckpt["teacher"][k], t_sd[k]) for k in t_sd)
