"""config.profile: a jax.profiler trace of exactly the configured train steps, in the workdir."""

import glob
import gzip
import json
import os

import pytest

from experiments.configs import synthetic
from smt_jax import config_checks, profiling, train


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
  with pytest.raises(config_checks.ConfigError, match=message.replace(".", r"\.")):
    config_checks.validate(c)


def test_each_process_of_a_multi_process_job_traces_into_its_own_folder(monkeypatch):
  # Several processes on one host would write the same <host> files in one folder.
  assert profiling.StepTrace("w/profile", start_step=0, num_steps=1).log_dir == "w/profile"
  monkeypatch.setattr(profiling.jax, "process_count", lambda: 4)
  monkeypatch.setattr(profiling.jax, "process_index", lambda: 3)
  trace = profiling.StepTrace("gs://b/w/profile/", start_step=0, num_steps=1)
  assert trace.log_dir == "gs://b/w/profile/process_3"
