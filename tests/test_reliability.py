"""Numerical guards, unreadable checkpoints, bad data and bad library inputs.

The training tests run the real shell in-process on the cheapest config there is (the parity probe's
smoke variant, BPTT alone, an Elman RNN: seconds to compile), with a NaN injected at a chosen step
through an extra batch field that scales the loss. Everything else here compiles nothing or little.
(Crash/kill/SIGTERM/corruption of a real run: tests/test_kill_resume.py.)
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import synthetic
from smt_jax import data, losses, objectives
from smt_jax.data.pixels import PixelSource
from smt_jax.runner import checkpoints, experiment, metrics_io, train


def _bptt_config(**overrides):
  c = synthetic.get_config("parity,smoke")  # BPTT 6 steps; logs every 2, checkpoints every 3
  c.phases = "bptt"
  c.model.rnn_kind = "elman"
  for k, v in overrides.items():
    c[k] = v
  return c


def _inject(*, nan_at: int, crash_at: int | None = None) -> train.Hooks:
  """Train step `nan_at` (0-based global) gets a NaN loss term; `crash_at` dies before its batch."""

  def train_batch(step, rows):
    if step == crash_at:
      raise KeyboardInterrupt("simulated crash")
    poison = np.full(len(rows["x"]), np.nan if step == nan_at else 1.0, np.float32)
    return dict(rows, poison=poison)

  def wrap_loss(loss_fn):
    def poisoned(params, batch, key):
      loss, m = loss_fn(params, {"x": batch["x"], "y": batch["y"]}, key)
      p = batch["poison"][0]
      return loss * p, dict(m, loss=m["loss"] * p, readout_loss=m["readout_loss"] * p)

    return poisoned

  return train.Hooks(train_batch=train_batch, wrap_loss=wrap_loss)


def _meta(workdir, step):
  with open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")) as f:
    return json.load(f)


def test_nan_stops_naming_step_phase_and_term_and_keeps_the_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(experiment.NonFiniteError) as e:  # step 5, after the checkpoint at step 3
    train.train_and_evaluate(_bptt_config(), wd, hooks=_inject(nan_at=4))
  msg = str(e.value)
  assert msg.startswith("bptt step 5: non-finite value in grad_norm, loss, readout_loss;"), msg
  assert "last good checkpoint is kept" in msg and "nan_policy=skip" in msg
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  assert max(r["step"] for r in metrics_io.read_metrics(wd)) == 4
  mngr = checkpoints.make_manager(wd, keep=3)
  state = mngr.restore(3)["state"]
  mngr.close()
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state))

  # Forked under a model of another width: refused, not mistaken for corruption.
  wider = _bptt_config()
  wider.model.width = 32
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"checkpoint 3 .* holds parameters of other shapes .*\(rnn/embed/"
    r"embedding/value: \(2, 16\) saved, \(2, 32\) now",
  ):
    train.train_and_evaluate(wider, wd, fork=True)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))  # left in place, and the workdir
  with open(os.path.join(wd, "config.json")) as f:  # still the old config's
    assert json.load(f)["model"]["width"] == 16

  # No readable checkpoint left: the run refuses to start over silently.
  for d, _, files in os.walk(os.path.join(wd, "checkpoints", "3")):
    for f in files:
      if os.path.basename(d) == "d":
        os.truncate(os.path.join(d, f), 0)
  with pytest.raises(
    checkpoints.CheckpointError,
    match=r"holds checkpoints \[3\] but none is "
    r"readable .* --overwrite",
  ):
    train.train_and_evaluate(_bptt_config(), wd)


def test_nan_skip_policy_skips_and_counts_across_a_resume(tmp_path, capsys):
  wd, c = str(tmp_path), _bptt_config(nan_policy="skip")
  with pytest.raises(KeyboardInterrupt):  # NaN at step 2; dies after the checkpoint at 3
    train.train_and_evaluate(c, wd, hooks=_inject(nan_at=1, crash_at=4))
  assert _meta(wd, 3)["skipped_steps"] == 1
  summary = train.train_and_evaluate(c, wd, hooks=_inject(nan_at=1))
  assert summary["bptt/skipped_steps"] == 1
  out = capsys.readouterr().out
  assert "Resumed from" in out and "bptt step 4/6  loss" in out
  assert "(1 non-finite steps skipped)" in out
  assert "nan steps/s" not in out  # step 4, a log step, is the first after the restart
  rows = {r["step"]: r for r in metrics_io.read_metrics(wd) if "loss" in r}
  assert np.isnan(rows[2]["loss"]) and np.isfinite(rows[4]["loss"]) and np.isfinite(rows[6]["loss"])
  assert "steps_per_s" not in rows[4] and rows[6]["steps_per_s"] > 0
  mngr = checkpoints.make_manager(wd, keep=3)
  state = mngr.restore(mngr.latest_step())["state"]
  mngr.close()
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state))


def test_train_step_drops_a_non_finite_update():
  p = {"w": jnp.ones(3)}
  opt = optax.sgd(1e38)  # finite loss and gradients, but the update overflows
  step = experiment.make_train_step(
    lambda q, b, k: (jnp.sum(q["w"] ** 2), {"loss": jnp.sum(q["w"])}), opt
  )
  state = {"params": p, "opt_state": opt.init(p)}
  new, m = jax.jit(step)(state, None, None)
  assert not bool(m["finite"]) and np.isfinite(float(m["grad_norm"]))
  np.testing.assert_array_equal(new["params"]["w"], p["w"])


# ------------------------------------------------------------------------------- bad data


def test_runtime_batches_with_tokens_outside_the_vocabulary_are_refused():
  source = data.make_source("parity", seq_len=8)
  exp = experiment.build_experiment(_bptt_config())
  exp.batch(source, split="train", step=3, batch_size=2)  # a good batch passes

  def set_token(field, row, t, value):
    def transform(step, rows):
      rows[field][row, t] = value
      return rows

    return transform

  with pytest.raises(
    ValueError,
    match=r"parity train batch 7 has tokens outside the vocabulary "
    r"\[0, 2\) \(x in \[0, 2\]",
  ):
    exp.batch(source, split="train", step=7, batch_size=2, transform=set_token("x", 1, 4, 2))
  with pytest.raises(ValueError, match=r"targets y in \[-2, 1\]"):  # only -1 means "no target"
    exp.batch(source, split="eval", step=0, batch_size=2, transform=set_token("y", 0, 0, -2))


def _images(n=3, h=4, w=4, high=5, dtype=np.uint8):
  return np.random.default_rng(0).integers(0, high, (n, h, w)).astype(dtype)


def test_pixel_sources_reject_bad_images():
  ok = {"train": _images(), "eval": _images()}
  assert PixelSource(images=ok, levels=5, seq_len=8).vocab_size == 6
  cases = [
    (
      {"train": _images(high=9), "eval": _images()},
      r"intensities in \[0, 8\], outside \[0, "
      r"levels=5\); quantise them .* never clip",
    ),
    (
      {"train": _images(dtype=np.float32), "eval": _images()},
      r"integer intensities \[N >= 1, "
      r"H, W\], got float32",
    ),
    ({"train": _images()[:, 0], "eval": _images()}, r"got uint8 \(3, 4\)"),
    ({"train": _images(), "eval": _images(w=5)}, r"differ in shape: \[\(4, 4\), \(4, 5\)\]"),
    ({"train": _images(n=0), "eval": _images()}, r"N >= 1"),
    ({"train": _images()}, r"must have the splits \['eval', 'train'\]"),
  ]
  for images, match in cases:
    with pytest.raises(ValueError, match=match):
      PixelSource(images=images, levels=5, seq_len=8)


def test_streams_and_examples_must_fit_the_vocabulary_and_shape():
  class Stream(data.StreamSource):
    name = "stream"

  ok = np.arange(40) % 7
  assert Stream(streams={"train": ok, "eval": ok}, vocab_size=7, seq_len=8).vocab_size == 7
  with pytest.raises(
    ValueError,
    match=r"the eval stream has token ids in \[-1, 5\], outside the "
    r"vocabulary \[0, 7\)",
  ):
    Stream(streams={"train": ok, "eval": ok - 1}, vocab_size=7, seq_len=8)
  with pytest.raises(ValueError, match=r"1-D array of integer token ids, got float64"):
    Stream(streams={"train": ok * 1.0, "eval": ok}, vocab_size=7, seq_len=8)
  with pytest.raises(ValueError, match="fewer than seq_len"):
    Stream(streams={"train": ok[:5], "eval": ok}, vocab_size=7, seq_len=8)

  with pytest.raises(
    ValueError,
    match=r"generate_parity: x has token ids in \[0, 1\], outside "
    r"the vocabulary \[0, 1\)",
  ):
    data.ProbeSource(data.generate_parity, vocab_size=1, train_kwargs={"seq_len": 8})

  class Short(data.Source):  # numpy would broadcast a short row into the batch
    name, vocab_size, seq_len = "short", 4, 6

    def example(self, rng, *, split):
      return np.zeros(1, np.int32), np.zeros(6, np.int32)

  with pytest.raises(
    ValueError,
    match=r"returned x of shape \(1,\) .* expected integers of "
    r"shape \(6,\)",
  ):
    Short().batch(split="train", step=0, batch_size=2, seed=0)


def test_empty_and_short_text_files(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="has 0 bytes"):
    data.make_source("text", seq_len=8, path=str(tmp_path / "empty.txt"))
  (tmp_path / "short.txt").write_bytes(b"0123456789abcdef")
  with pytest.raises(ValueError, match=r"has 16 bytes, fewer than the 18 needed"):
    data.make_source("text", seq_len=8, path=str(tmp_path / "short.txt"))


# ------------------------------------------------------------------------------- metrics


def test_metrics_rows_after_the_checkpoint_and_cut_lines_are_dropped(tmp_path):
  w = metrics_io.MetricsWriter(str(tmp_path), enabled=True)
  for s in (2, 4, 6):
    w.write(s, "smt", s, {"loss": 1.0 / s})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "phase": "smt", "loss": 0.1')  # a crash mid-write
  w = metrics_io.MetricsWriter(str(tmp_path), enabled=True, purge_step=5)
  w.truncate_after(4)
  assert [r["step"] for r in metrics_io.read_metrics(str(tmp_path))] == [2, 4]
  w.truncate_after(0)  # a fresh start (no checkpoint): nothing from the dead run survives
  assert metrics_io.read_metrics(str(tmp_path)) == []
  w.close()


# ------------------------------------------------------------------------------- library inputs


def test_losses_reject_non_boolean_masks_and_non_float_values():
  v = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="mask must be a boolean array .* got dtype float32"):
    losses.masked_mean(v, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="values must be a floating-point array"):
    losses.masked_mean(jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match=r"same shape \(no broadcasting\)"):
    losses.masked_mean(v, jnp.ones((1, 3), bool))
  m = jnp.zeros((2, 3, 2, 4))
  with pytest.raises(ValueError, match="mask must be a boolean array"):
    losses.dynamics_loss(m, m, jnp.ones((2, 3), jnp.int32))


def test_objectives_reject_wrong_containers_and_batch_sizes():
  update = lambda p, m, x: m  # never reached: the checks run first, while tracing
  x = jnp.zeros((3, 6), jnp.int32)
  batch = {"x": x, "y": x}
  m0 = jnp.zeros((3, 2, 8))
  with pytest.raises(
    ValueError,
    match=r"memory must be \[B, K, d\] with the inputs' batch size "
    r"B = 3 \(no broadcasting\), got \(1, 2, 8\)",
  ):
    objectives.rollout({}, m0[:1], x, update=update)
  with pytest.raises(ValueError, match=r"inputs must be int \[B, L\], got float32"):
    objectives.rollout({}, m0, x.astype(jnp.float32), update=update)
  with pytest.raises(ValueError, match="stop_gradient_every must be a positive integer"):
    objectives.rollout({}, m0, x, update=update, stop_gradient_every=0)
  with pytest.raises(
    ValueError,
    match=r"bptt_loss: params must be a mapping with entries "
    r"\['rnn'\]",
  ):
    objectives.bptt_loss({"embed": {}}, batch, rnn=None)  # the RNN's state, not {'rnn': state}
  with pytest.raises(
    ValueError,
    match=r"smt_loss: params must be a mapping with entries "
    r"\['teacher', 'rnn'\]",
  ):
    objectives.smt_loss(
      {"rnn": {}}, batch, None, teacher=None, rnn=None, context_length=2, future_length=2
    )
  with pytest.raises(ValueError, match=r"batch must be a mapping \{'x': int \[B, T\]"):
    objectives.bptt_loss({"rnn": {}}, (x, x), rnn=None)
  with pytest.raises(ValueError, match=r"context must be int \[B, N, Tc\]"):
    objectives.encode_over_time(None, None, x)


def test_a_finished_run_forked_with_a_phase_appended_trains_it_afresh(tmp_path):
  # The end of a run keeps its last phase's optimiser state (so that raising its steps continues
  # it); a fork that appends a phase starts that phase with its own, fresh optimiser state.
  wd = str(tmp_path)
  c = synthetic.get_config("parity,smoke")
  c.model.rnn_kind = "elman"
  c.phases = "smt"
  first = train.train_and_evaluate(c, wd)
  c.phases = "smt,dmt"
  summary = train.train_and_evaluate(c, wd, fork=True)
  assert summary["smt"] == first["smt"]  # SMT is not rerun
  assert np.isfinite(summary["dmt"]["eval/rnn_nll"])
  assert summary["dmt/skipped_steps"] == 0
