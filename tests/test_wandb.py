"""The optional Weights & Biases mirror, in offline mode: config, metrics and samples land in the
wandb run; off by default; a missing package is a config error before anything compiles."""

import glob
import json
import os
import struct

import pytest

from experiments.configs import pixels
from smt_jax.runner import config as config_lib
from smt_jax.runner import metrics_io, train


def _wandb_records(workdir):
  """The history rows and the config of the offline run in `workdir` (its .wandb file: wandb's
  LevelDB-style log of Record protos: a 7-byte file header, 32 KiB blocks, records with a
  7-byte header (crc, length, type) split FIRST/MIDDLE/LAST across blocks)."""
  from wandb.proto import wandb_internal_pb2

  (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))
  data = open(path, "rb").read()
  block, i, buf, history, config = 32768, 7, b"", [], None
  while i + 7 <= len(data):
    left = block - i % block
    if left < 7:  # block trailer
      i += left
      continue
    _, n, kind = struct.unpack("<IHB", data[i : i + 7])
    if kind == 0 and n == 0:  # zero padding to the block's end
      i += left
      continue
    buf, i = buf + data[i + 7 : i + 7 + n], i + 7 + n
    if kind in (1, 4):  # FULL or LAST
      r = wandb_internal_pb2.Record.FromString(buf)
      buf = b""
      if r.WhichOneof("record_type") == "history":
        history.append(
          {(x.key or "/".join(x.nested_key)): json.loads(x.value_json) for x in r.history.item}
        )
      elif r.WhichOneof("record_type") == "run" and config is None:
        config = {x.key: json.loads(x.value_json) for x in r.run.config.update}
  return history, config


def test_config_metrics_and_samples_are_mirrored_offline(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  c = pixels.get_config("smoke")
  c.phases, c.model.rnn_kind = "bptt", "elman"  # cheap to compile; pixels: image samples
  c.wandb.project = "smt-jax-test"
  train.train_and_evaluate(c, str(tmp_path))
  history, config = _wandb_records(str(tmp_path))
  assert config["bptt"]["lr"] == c.bptt.lr and config["model"]["rnn_kind"] == "elman"
  assert config["wandb"]["project"] == "smt-jax-test"
  by_step = {}
  for h in history:  # several log calls per step (train row, eval row, samples)
    by_step.setdefault(h["_step"], {}).update(h)
  rows = metrics_io.read_metrics(str(tmp_path))
  for r in rows:
    logged = by_step[r["step"]]
    assert logged["progress/tokens"] == r["tokens"]
    assert logged["progress/seqflops"] == pytest.approx(r["seqflops"])
    if "eval/rnn_nll" in r:  # phase-free names, as in TensorBoard
      assert logged["eval/rnn_nll"] == pytest.approx(r["eval/rnn_nll"])
      assert logged["eval/rnn_bits_per_dim"] == pytest.approx(r["eval/rnn_bits_per_dim"])
      assert logged["samples/pixels/_type"] == "image-file"  # samples at every eval
    if "loss" in r:
      assert logged["train/bptt/loss"] == pytest.approx(r["loss"])
  evals = [r["step"] for r in rows if "eval/rnn_nll" in r]
  assert sorted(s for s, h in by_step.items() if "samples/pixels/_type" in h) == evals
  run_id = open(tmp_path / "wandb_id").read().strip()  # a resumed run continues this wandb run
  assert glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))


def test_off_by_default_and_a_missing_package_is_a_config_error(monkeypatch):
  c = pixels.get_config("smoke")
  assert c.wandb.project == ""  # off: nothing imports wandb
  config_lib.validate(c)
  c.wandb.project = "p"
  real = config_lib.importlib.util.find_spec
  monkeypatch.setattr(
    config_lib.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "wandb" else real(name, *a),
  )
  with pytest.raises(config_lib.ConfigError, match=r"wandb.project = 'p': wandb is not installed"):
    config_lib.validate(c)
