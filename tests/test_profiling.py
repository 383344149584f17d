"""config.profile: a jax.profiler trace of exactly the configured train steps, in the workdir."""

import glob
import gzip
import json
import os

import pytest

from experiments.configs import synthetic
from smt_jax.runner import config as config_lib
from smt_jax.runner import profiling, train


def _traced_steps(profile_dir: str) -> list[int]:
  """The global steps of the 'train' step annotations in the run's Perfetto trace."""
  (path,) = glob.glob(
    os.path.join(profile_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")
  )
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")


def test_profile_traces_the_configured_steps_into_the_workdir(tmp_path):
  c = synthetic.get_config("parity,smoke")  # BPTT, 6 steps: the cheapest run there is
  c.phases, c.model.rnn_kind = "bptt", "elman"
  c.profile.start_step, c.profile.num_steps = 2, 2
  train.train_and_evaluate(c, str(tmp_path))
  runs = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs  # one trace, where TensorBoard's profile plugin looks for it
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))  # the profile plugin's file
  assert _traced_steps(str(tmp_path / "profile")) == [2, 3]  # Perfetto's, steps 2 and 3 only


def test_profile_is_off_by_default_and_a_trace_cut_short_still_stops(tmp_path, monkeypatch):
  calls, perfetto = [], []

  def start_trace(log_dir, *, create_perfetto_trace):
    calls.append("start")
    perfetto.append(create_perfetto_trace)

  monkeypatch.setattr(profiling.jax.profiler, "start_trace", start_trace)
  monkeypatch.setattr(profiling.jax.profiler, "stop_trace", lambda: calls.append("stop"))
  off = profiling.StepTrace(str(tmp_path), start_step=0, num_steps=0, say=lambda m: None)
  for s in range(3):
    off.before(s)
    off.after(s, None)
  assert calls == []
  assert synthetic.get_config("parity").profile.num_steps == 0  # configs do not trace unless asked

  resumed = profiling.StepTrace(str(tmp_path), start_step=2, num_steps=4, say=lambda m: None)
  for s in (4, 5):  # resumed inside the window: traces what is left of it, then stops there
    resumed.before(s)
    resumed.after(s, None)
  assert calls == ["start", "stop"] and resumed.done
  resumed.before(6)
  resumed.stop()
  assert calls == ["start", "stop"]

  # An object-store workdir: no Perfetto export (JAX writes that file with local file I/O only).
  cut = profiling.StepTrace("gs://bucket/run/profile", start_step=0, num_steps=10, say=print)
  cut.before(0)
  cut.after(0, None)
  cut.stop()  # the run ended (an error, SIGTERM) inside the window
  assert calls == ["start", "stop", "start", "stop"] and not cut.tracing
  assert perfetto == [True, False]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("num_steps", -1, "config.profile.num_steps = -1: a number of steps >= 0"),
    ("start_step", -3, "config.profile.start_step = -3: a number of steps >= 0"),
    ("start_step", 6, "config.profile.start_step = 6: the run has 6 steps in all"),
  ],
)
def test_bad_profile_fields_fail_naming_the_field(field, value, message):
  c = synthetic.get_config("parity,smoke")
  c.phases = "bptt"  # 6 steps
  c.profile.num_steps = 2
  c.profile[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate(c)


def test_each_process_of_a_multi_process_job_traces_into_its_own_folder(monkeypatch):
  # Several processes on one host would write the same <host> files in one folder.
  assert profiling.StepTrace("w/profile", start_step=0, num_steps=1).log_dir == "w/profile"
  monkeypatch.setattr(profiling.jax, "process_count", lambda: 4)
  monkeypatch.setattr(profiling.jax, "process_index", lambda: 3)
  trace = profiling.StepTrace("gs://b/w/profile/", start_step=0, num_steps=1)
  assert trace.log_dir == "gs://b/w/profile/process_3"


@pytest.mark.parametrize(
  "name, kind",
  [
    ("ynn_fusion.197", "matmul"),
    ("dot.98", "matmul"),
    ("all-reduce.65", "collective"),
    ("Rendezvous", "collective"),
    ("transpose_copy_fusion.16", "layout"),
    ("slice_concatenate_fusion", "layout"),
    ("add_pad_fusion.3", "layout"),
    ("negate_exponential_fusion.4", "elementwise"),
    ("multiply_add_fusion", "elementwise"),
    ("while.63", "loop"),
  ],
)
def test_op_kind_reads_xla_thunk_names(name, kind):
  assert profiling.op_kind(name) == kind


def test_op_split_sums_each_kind_per_step_and_device(tmp_path):
  ev = lambda name, dur: {"ph": "X", "name": name, "dur": dur, "ts": 0, "pid": 1, "tid": 1}
  events = [
    ev("ThunkExecutor::Execute", 1e6),  # the executor around the ops: not an op
    ev("ynn_fusion.1", 3000),
    ev("dot.2", 1000),
    ev("transpose_copy_fusion", 2000),
    ev("add_multiply_fusion", 500),
    ev("all-reduce.3", 700),
    ev("while.4", 9000),  # its body's thunks are counted themselves
    {"ph": "i", "name": "ynn_fusion.1", "ts": 0},  # not a complete event
  ]
  run = tmp_path / "plugins" / "profile" / "run"
  run.mkdir(parents=True)
  with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  split = profiling.op_split(str(tmp_path), steps=2, devices=2)  # microseconds -> ms/step/device
  assert split["matmul"] == pytest.approx(1.0)
  assert split["layout"] == pytest.approx(0.5)
  assert split["elementwise"] == pytest.approx(0.125)
  assert split["collective"] == pytest.approx(0.175)
  assert [n for n, _ in split["top"]] == [
    "ynn_fusion.1",
    "transpose_copy_fusion",
    "dot.2",
    "all-reduce.3",
    "add_multiply_fusion",
  ]
