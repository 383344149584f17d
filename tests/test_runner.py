"""Integration: every config's smoke variant trains end to end, and a crashed run resumes."""

import json
import math
import os
import re

import jax
import numpy as np
import pytest
from conftest import read_tensorboard
from tensorboardX.proto import plugin_hparams_pb2

from experiments.configs import pixels, synthetic, text
from smt_jax import inference
from smt_jax.runner import checkpoints, experiment, metrics_io, train
from smt_jax.runner import config as config_lib
from smt_jax.runner import workdir as workdir_lib


def _rows(workdir):
  return metrics_io.read_metrics(workdir)


def _check_outputs(workdir, phases):
  rows = _rows(workdir)
  assert rows and all({"step", "phase"} <= set(r) for r in rows)
  assert {r["phase"] for r in rows} == set(phases)
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  assert evals, "no eval lines"
  train_rows = [r for r in rows if "loss" in r]
  assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_rows)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  for p in phases:
    assert np.isfinite(summary[p]["eval/rnn_nll"])
  assert summary["baseline/unigram_nll"] > 0
  bits = [k for k in summary if k.startswith("baseline/unigram_bits_per_")]
  assert [summary[k] for k in bits] == [
    pytest.approx(summary["baseline/unigram_nll"] / math.log(2))
  ]
  assert all(summary[f"{p}/tokens_per_s"] > 0 for p in phases)
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  return summary


def _expected_seq_flops(config, phase: str, f: dict) -> float:
  """SeqFLOPs of one step, written out (analysis.seq_flops_per_step's table) from unit FLOPs."""
  if phase == "smt":
    return 3 * (f["encode"] + max(f["update"], f["decode"], f["readout"]))
  if phase == "dmt":  # gradients through the rollout (the default): a chained backward
    assert not config.dmt.stop_carry_grad
    return f["encode"] + 3 * (config.dmt.rollout_length * f["update"] + f["readout"])
  return 3 * (config_lib.phase_seq_len(config, "bptt") * f["update"] + f["readout"])


def _check_compare_logs(workdir, config, bits: str, sample_tag: str | None):
  """Runs that compare: phase-free eval tags on the one global step axis (the phase its own
  field), tokens seen and SeqFLOPs as x-axes, NLL in bits beside nats, the config as HParams and
  text, samples at every eval."""
  exp = experiment.build_experiment(config)
  flops = experiment.unit_flops(exp)
  assert all(v > 0 for v in flops.values())
  rows = _rows(workdir)
  phases = list(exp.phases)
  # tokens and SeqFLOPs of every row: the steps of the phases before, then this phase's.
  for r in rows:
    before = phases[: phases.index(r["phase"])]
    cost = lambda p: (
      config[p].batch_size * config_lib.phase_seq_len(config, p),
      _expected_seq_flops(config, p, flops),
    )
    steps = [(p, config[p].steps) for p in before] + [(r["phase"], r["phase_step"])]
    assert r["step"] == sum(n for _, n in steps)
    assert r["tokens"] == sum(n * cost(p)[0] for p, n in steps)
    assert r["seqflops"] == pytest.approx(sum(n * cost(p)[1] for p, n in steps), rel=1e-9)
  evals = [r for r in rows if "eval/rnn_nll" in r]
  for r in evals:  # bits beside every NLL
    for k in [k for k in r if k.startswith("eval/") and k.endswith("_nll")]:
      assert r[k[: -len("nll")] + bits] == pytest.approx(r[k] / math.log(2), rel=1e-12)
  assert not os.path.exists(os.path.join(workdir, "wandb"))  # off unless wandb.project is set
  tb = read_tensorboard(os.path.join(workdir, "tensorboard"))
  assert not [t for t in tb if t.split("/")[0] in ("smt", "dmt", "bptt")], sorted(tb)
  for tag, x in [("eval/rnn_nll", "step"), ("eval_vs_tokens/rnn_nll", "tokens")] + [
    ("eval_vs_seqflops/rnn_nll", "seqflops"),
    (f"eval/rnn_{bits}", "step"),
  ]:
    key = "eval/rnn_" + tag.split("/rnn_")[1]
    assert [s for s, _ in tb[tag]] == [int(r[x]) for r in evals], tag
    np.testing.assert_allclose([v for _, v in tb[tag]], [r[key] for r in evals], rtol=1e-6)
  train_rows = [r for r in rows if "loss" in r]
  for p in phases:
    assert [s for s, _ in tb[f"train/{p}/loss"]] == [
      r["step"] for r in train_rows if r["phase"] == p
    ]
  steps = sorted({r["step"] for r in rows})
  assert [s for s, _ in tb["progress/phase"]] == steps  # once per step
  assert [v for _, v in tb["progress/phase"]] == [
    metrics_io.PHASE_IDS[next(r["phase"] for r in rows if r["step"] == s)] for s in steps
  ]
  assert {s for s, _ in tb["phase/text_summary"]} == {
    experiment.make_phase(exp, p).offset for p in phases
  }
  (_, start), *_ = tb["_hparams_/session_start_info"]
  hp = plugin_hparams_pb2.HParamsPluginData.FromString(start.metadata.plugin_data.content)
  assert hp.session_start_info.hparams[f"{phases[0]}.lr"].number_value == config[phases[0]].lr
  assert hp.session_start_info.hparams["model.rnn_kind"].string_value == config.model.rnn_kind
  (_, cfg), *_ = tb["config/text_summary"]
  assert f'"rnn_kind": "{config.model.rnn_kind}"' in cfg.tensor.string_val[0].decode()
  if sample_tag is None:
    assert not [t for t in tb if t.startswith("samples/")]
  else:
    assert [s for s, _ in tb[sample_tag]] == [r["step"] for r in evals]  # every eval
  return tb


def test_pixels_smoke_smt_dmt(tmp_path, capsys):
  c = pixels.get_config("smoke")
  summary = train.train_and_evaluate(c, str(tmp_path))
  out = capsys.readouterr().out
  # The progress line: rate and the ETA over the run ('~': DMT, not yet timed, is estimated; not
  # on the first line after the compile, which has no steady rate yet, nor on the run's last).
  for step in (4, 6):
    assert re.search(
      rf"^smt step {step}/6  loss \S+  \S+ steps/s  \S+ tokens/s  eta ~\d+s$", out, re.M
    )
  assert re.search(r"^dmt step 4/4  loss \S+  \S+ steps/s  \S+ tokens/s$", out, re.M)
  _check_outputs(str(tmp_path), ["smt", "dmt"])
  tb = _check_compare_logs(str(tmp_path), c, "bits_per_dim", "samples/pixels")
  img = tb["samples/pixels"][-1][1].image
  h, w = 8, 8  # three rows (real | RNN alone | completions) of samples.num digits, 1 px apart
  assert (img.height, img.width) == (3 * h + 2, c.samples.num * (w + 1) - 1)
  assert {"eval/teacher_nll", "eval/rnn_prompted_nll", "eval/drift_1mr2"} <= set(summary["smt"])
  # DMT freezes the teacher: its eval NLL is unchanged by the DMT phase.
  assert summary["dmt"]["eval/teacher_nll"] == pytest.approx(summary["smt"]["eval/teacher_nll"])
  assert os.path.getsize(tmp_path / "samples.png") > 1000


def test_synthetic_smoke_bptt_only(tmp_path):
  c = synthetic.get_config("stack,smoke")
  c.phases = "bptt"
  summary = train.train_and_evaluate(c, str(tmp_path))
  _check_outputs(str(tmp_path), ["bptt"])
  _check_compare_logs(str(tmp_path), c, "bits_per_token", None)
  assert "eval/teacher_nll" not in summary["bptt"]  # no teacher trained: none reported
  assert "| bptt |" in open(tmp_path / "accuracy.md").read()


def test_text_smoke(tmp_path):
  c = text.get_config("smoke")  # no data.path: the built-in corpus (pydoc_data.topics)
  train.train_and_evaluate(c, str(tmp_path / "run"))
  _check_outputs(str(tmp_path / "run"), ["smt", "dmt"])
  assert "Samples from the RNN alone" in open(tmp_path / "run" / "samples.txt").read()
  tag = "samples/text/text_summary"  # tensorboardX's name for add_text("samples/text")
  tb = _check_compare_logs(str(tmp_path / "run"), c, "bits_per_byte", tag)
  assert "Samples from the RNN alone" in tb[tag][-1][1].tensor.string_val[0].decode()


def test_quickdraw_smoke_writes_samples(tmp_path):
  """A sketch source trains and draws like digits: samples.png of 28x28 images."""
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    np.save(tmp_path / f"{name}.npy", rng.integers(0, 256, (20, 784), dtype=np.uint8))
  c = pixels.get_config("quickdraw,smoke")  # 2 x 2 eval drawings: samples.num = 4
  c.data.path = str(tmp_path)
  c.data.options.quickdraw.levels = 8
  c.phases = "smt"
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert np.isfinite(summary["smt"]["eval/rnn_nll"])
  assert os.path.getsize(tmp_path / "run" / "samples.png") > 1000


def test_itstime_periods_and_zero_means_never():
  due = lambda every, total, last: [
    s for s in range(1, total + 1) if train.itstime(s, every, total, last=last)
  ]
  assert due(3, 10, last=False) == [3, 6, 9]
  assert due(3, 9, last=False) == [3, 6]  # the final step is the phase's own (eval, checkpoint)
  assert due(3, 9, last=True) == [3, 6, 9]
  assert due(0, 10, last=True) == []


def test_periods_of_zero_never_fire(tmp_path):
  c = synthetic.get_config("parity,smoke")  # BPTT 6 steps; logs every 2, checkpoints every 3
  c.phases, c.model.rnn_kind = "bptt", "elman"
  c.checkpoint_every_steps = c.eval.every_steps = c.log_every_steps = 0
  train.train_and_evaluate(c, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["6"]  # the phase boundary's only
  rows = _rows(str(tmp_path))
  assert [r["step"] for r in rows] == [6] and "eval/rnn_nll" in rows[0] and "loss" not in rows[0]


def test_a_stream_trains_with_the_causal_teacher(tmp_path):
  # Streams: the causal teacher's attention is windowed to smt.context_length; DMT's labels and
  # the prompted eval come from one pass too.
  c = pixels.get_config("smoke")
  c.model.teacher_kind, c.model.encoder_depth = "causal", 2
  summary = train.train_and_evaluate(c, str(tmp_path))
  _check_outputs(str(tmp_path), ["smt", "dmt"])
  assert np.isfinite(summary["dmt"]["eval/rnn_prompted_nll"])


@pytest.mark.parametrize("from_rnn", [True, False])
def test_dmt_on_a_stream_starts_where_the_rnn_alone_is_evaluated(from_rnn):
  # dmt.streams_from_rnn_initial_memory: the rollout reads a crop of Td tokens from the RNN's own
  # initial memory, so its readout term is the RNN-alone evaluation's NLL on that crop, and the
  # initial memory learns; else it starts from the teacher's memory of the first Tc tokens.
  c = pixels.get_config("smoke")
  c.dmt.streams_from_rnn_initial_memory = from_rnn
  exp = experiment.build_experiment(c)
  phase = experiment.make_phase(exp, "dmt")
  params = exp.init_params()
  batch = phase.batch(7)
  td, tc, tf = c.dmt.rollout_length, c.smt.context_length, c.smt.future_length
  assert batch["x"].shape[1] == (td if from_rnn else tc + td + tf)
  (_, metrics), grads = jax.jit(jax.value_and_grad(phase.loss_fn, has_aux=True))(
    params, batch, None
  )
  alone = inference.read(params, batch, rnn=exp.fns[1])
  nll = float((alone["nll"] * alone["mask"]).sum() / alone["mask"].sum())
  assert np.isclose(float(metrics["readout_loss"]), nll, rtol=1e-5) == from_rnn
  m0 = [g for path, g in jax.tree.leaves_with_path(grads["rnn"]) if "init_memory" in str(path)]
  assert m0 and (float(sum(np.abs(g).sum() for g in m0)) > 0) == from_rnn


def test_a_rerun_that_raises_steps_continues_the_run(tmp_path, capsys):
  """A finished run rerun with more DMT steps (its own config read back from the workdir, as
  `--config=<workdir>` does) continues DMT from its end, with the optimiser
  state the end kept: bit for bit the run that had those steps from the start (constant lr, no
  warm-up, so that the schedule does not depend on the length). Raising SMT's steps once the run
  is past SMT, or lowering any, is refused and leaves the workdir as it was."""
  import orbax.checkpoint as ocp
  import run_helpers

  def config(smt_steps=6, dmt_steps=4):
    c = synthetic.get_config("parity,smoke")
    c.dmt.schedule, c.optim.warmup_frac = "constant", 0.0
    c.smt.steps, c.dmt.steps = smt_steps, dmt_steps
    return c

  wd, ref = str(tmp_path / "run"), str(tmp_path / "ref")
  train.train_and_evaluate(config(), wd)
  capsys.readouterr()
  # `--config=<workdir>`: the run's own config, read back (no overrides retyped), raised.
  from experiments import cli
  from experiments.configs import saved

  arg = cli.resolve_config(wd)
  assert arg == f"experiments/configs/saved.py:{wd}" and cli.default_workdir(arg) == wd
  again = saved.get_config(wd)
  again.dmt.steps = 8
  train.train_and_evaluate(again, wd)
  out = capsys.readouterr().out
  assert "Continuing the run with dmt.steps 4 -> 8" in out and "at dmt step 4." in out
  assert "starts afresh" not in out
  assert json.load(open(f"{wd}/config.1.json"))["dmt"]["steps"] == 4
  assert json.load(open(f"{wd}/config.json"))["dmt"]["steps"] == 8
  train.train_and_evaluate(config(dmt_steps=8), ref)
  (sa, a, _), (sb, b, _) = run_helpers.restore(wd), run_helpers.restore(ref)
  assert sa == sb == 14
  la, lb = run_helpers.leaves(a), run_helpers.leaves(b)
  for name, leaves in ((wd, la), (ref, lb)):  # the optimiser state the end kept, too
    mngr = checkpoints.make_manager(name, keep=1, read_only=True)
    end = ocp.args.Composite(**{checkpoints.END_OPT_STATE: ocp.args.StandardRestore()})
    leaves.update(run_helpers.leaves(mngr.restore(14, args=end)[checkpoints.END_OPT_STATE]))
    mngr.close()
  assert la.keys() == lb.keys() and len(la) > 2 * len(run_helpers.leaves(a))
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
  assert run_helpers.rows(wd) == run_helpers.rows(ref)

  saved = open(f"{wd}/config.json").read()
  with pytest.raises(workdir_lib.WorkdirError, match=r"smt.steps raised 6 -> 9, but the run is "):
    train.train_and_evaluate(config(smt_steps=9, dmt_steps=8), wd)
  with pytest.raises(workdir_lib.WorkdirError, match=r"dmt.steps: 8 -> 6"):
    train.train_and_evaluate(config(dmt_steps=6), wd)
  assert open(f"{wd}/config.json").read() == saved and not os.path.exists(f"{wd}/config.2.json")


@pytest.mark.parametrize("phases", ["smt,dmt", "bptt"])
def test_a_length_curriculum_trains_the_first_steps_on_shorter_episodes(tmp_path, capsys, phases):
  # data.warmup_*: the first steps (of SMT, or of BPTT: the same data) on episodes of 8 tokens.
  c = synthetic.get_config("retrieval,16,smoke")
  c.phases = phases
  c.data.warmup_seq_len, c.data.warmup_steps = 8, 3
  lengths = []

  def train_batch(step, rows):
    lengths.append((step, rows["x"].shape[1]))
    return rows

  summary = train.train_and_evaluate(c, str(tmp_path), hooks=train.Hooks(train_batch=train_batch))
  first = phases.split(",")[0]
  assert lengths[:4] == [(0, 8), (1, 8), (2, 8), (3, 16)], lengths
  assert all(t == 16 for _, t in lengths[4:])
  assert f"{first}: episodes of 16 tokens from step 3 (compiling)" in capsys.readouterr().out
  assert np.isfinite(summary[first]["eval/rnn_nll"])
  # Tokens count each step at its own length, and the run's total is training_tokens'.
  rows = {r["step"]: r for r in _rows(str(tmp_path)) if "loss" in r and r["phase"] == first}
  b = c[first].batch_size
  assert rows[2]["tokens"] == 2 * b * 8 and rows[4]["tokens"] == 3 * b * 8 + b * 16
  last = max(r["tokens"] for r in _rows(str(tmp_path)))
  assert last == config_lib.training_tokens(c)
  assert config_lib.training_tokens(c) < config_lib.training_tokens(
    synthetic.get_config("retrieval,16,smoke")
  )


def test_the_short_episodes_config_scales_smt_lengths():
  c = synthetic.get_config("retrieval,128")
  c.data.warmup_seq_len, c.data.warmup_steps = 32, 500
  s = config_lib.warmup_config(c)
  assert (s.data.seq_len, s.smt.context_length, s.smt.future_length) == (32, 32, 16)
  assert (s.smt.num_transitions, s.smt.num_decoded, s.data.warmup_steps) == (32, 8, 0)
  config_lib.validate(c)
  for field, value, message in [
    ("data.warmup_seq_len", 128, "must be in [2, data.seq_len = 128)"),
    ("data.warmup_steps", 10**6, "must be at most the first phase's steps (smt.steps"),
  ]:
    bad = c.copy_and_resolve_references()
    section, name = field.split(".")
    bad[section][name] = value
    with pytest.raises(
      config_lib.ConfigError, match=re.escape(f"config.{field} = {value}: {message}")
    ):
      config_lib.validate(bad)
  stream = pixels.get_config("smoke")
  stream.data.warmup_seq_len, stream.data.warmup_steps = 8, 2
  with pytest.raises(config_lib.ConfigError, match="is a stream: the curriculum shortens"):
    config_lib.validate(stream)
  half = c.copy_and_resolve_references()
  half.data.warmup_steps = 0
  with pytest.raises(config_lib.ConfigError, match="set data.warmup_steps and data.warmup_seq"):
    config_lib.validate(half)
