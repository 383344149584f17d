"""Bad configs fail before anything is loaded or compiled, naming the field, the value and the fix.

Every rule of `smt_jax.runner.config` has a case here, run through `train.train_and_evaluate` (the
real entry point) with a guard that fails the test if data is loaded (for the rules that need no
data) or if JAX traces or compiles anything. Fast: nothing here trains.
"""

import contextlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import pixels, saved, synthetic, text
from smt_jax import data
from smt_jax.runner import config as config_lib
from smt_jax.runner import experiment, train
from smt_jax.runner import workdir as workdir_lib
from smt_jax.runner.config import ConfigError


@contextlib.contextmanager
def no_compile():
  """Counts JAX tracing/lowering/compilation events inside; fails if there were any."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.startswith("/jax/core/compile"):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, f"JAX compiled before the config was rejected: {sorted(set(events))}"


def test_the_compile_guard_sees_compiles():
  with pytest.raises(AssertionError, match="compiled"):
    with no_compile():
      jax.jit(lambda a: a * 3 + 1)(jnp.arange(7.0)).block_until_ready()


@pytest.fixture
def no_data():
  """Hooks that fail the test if the dataset is built (config-only rules must fire first)."""

  def refuse(config):
    raise AssertionError(f"data {config.data.name!r} loaded before the config was rejected")

  return train.Hooks(make_source=refuse)


def _config(base: str, overrides: dict):
  module, arg = base.split(":")
  c = {"synthetic": synthetic, "pixels": pixels, "text": text}[module].get_config(arg)
  for field, value in overrides.items():
    target = c
    *parents, leaf = field.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def _rejects(c, tmp_path, *fragments, hooks=None):
  with no_compile(), pytest.raises(ConfigError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"), hooks=hooks)
  msg = str(e.value)
  for f in fragments:
    assert f in msg, f"{f!r} not in the error: {msg}"
  assert not os.path.exists(tmp_path / "run" / "config.json"), "a rejected config took the workdir"
  return msg


# (base config, overrides, what the message must contain): field = value, and a hint of the fix.
CONFIG_ONLY = {
  # heads: rotary turns pairs in the first half of each head; one head has no output projection
  "head_dim_multiple_of_4": (
    "pixels:smoke",
    {"model.head_dim": 30},
    ["config.model.head_dim = 30", "multiple of 4"],
  ),
  "compact_heads_split_width": (
    "pixels:smoke",
    {"model.head_dim": 0, "model.width": 18},
    ["config.model.width = 18", "multiple of model.num_heads = 4"],
  ),
  "compact_heads_width_per_head": (
    "pixels:smoke",
    {"model.head_dim": 0, "model.width": 20},
    ["config.model.width = 20", "= 5 wide", "multiple of 4"],
  ),
  "one_head_width": (
    "pixels:smoke",
    {"model.num_heads": 1, "model.head_dim": 64},
    ["config.model.head_dim = 64", "must equal model.width = 16"],
  ),
  "reference_labels_need_two": (
    "pixels:smoke",
    {"dmt.reference_labels": True, "dmt.label_every": 8},
    ["config.dmt.label_every = 8", "k <= Td / 2 = 4"],
  ),
  "c_init_with_zero_memory": (
    "pixels:smoke",
    {"model.rnn_initial_memory": "zeros"},
    ["config.smt.c_init = 0.1", "smt.c_init=0"],
  ),
  # T vs Tc + Tf and Tc + Td + Tf where T is settable (episodes); streams derive T from them
  "context_past_episode": (
    "synthetic:parity,smoke",
    {"smt.context_length": 17},
    ["config.smt.context_length = 17", "data.seq_len = 16"],
  ),
  "future_past_episode": (
    "synthetic:parity,smoke",
    {"smt.future_length": 20},
    ["config.smt.future_length = 20", "<= 16"],
  ),
  "rollout_past_episode": (
    "synthetic:parity,smoke",
    {"dmt.rollout_length": 32},
    ["config.dmt.rollout_length = 32", "at most data.seq_len = 16"],
  ),
  "one_transition_needs_tc_below_t": (
    "synthetic:parity,smoke",
    {"smt.num_transitions": 1},
    ["config.smt.context_length = 16", "Tc must be < T"],
  ),
  "num_decoded_within_the_encoded_memories": (
    "synthetic:parity,smoke",
    {"smt.num_decoded": 99},
    ["config.smt.num_decoded = 99", "must be in [0, 17]"],
  ),
  "schedule_is_known": (
    "pixels:smoke",
    {"smt.schedule": "linear"},
    ["config.smt.schedule", "'constant' or 'cosine'"],
  ),
  # k divides the rollout
  "label_every_divides": (
    "pixels:smoke",
    {"dmt.label_every": 3},
    ["config.dmt.label_every = 3", "must divide dmt.rollout_length = 8"],
  ),
  "stream_start_on_episodes": (
    "synthetic:parity,smoke",
    {"dmt.streams_from_rnn_initial_memory": True},
    ["config.dmt.streams_from_rnn_initial_memory = True", "dmt.from_rnn_initial_memory says"],
  ),
  # num_transitions in range
  "transitions_zero": (
    "pixels:smoke",
    {"smt.num_transitions": 0},
    ["config.smt.num_transitions = 0", "[1, T = 20]"],
  ),
  "transitions_above_t": (
    "pixels:smoke",
    {"smt.num_transitions": 21},
    ["config.smt.num_transitions = 21", "[1, T = 20]"],
  ),
  # names: list the valid ones
  "unknown_rnn_kind": (
    "pixels:smoke",
    {"model.rnn_kind": "rwkv"},
    ["config.model.rnn_kind = 'rwkv'", "'gru'", "'transformer'"],
  ),
  "unknown_dataset": (
    "pixels:smoke",
    {"data.name": "cifar"},
    ["config.data.name = 'cifar'", "'digits'", "'text'"],
  ),
  "unknown_phase": ("pixels:smoke", {"phases": "smt,rl"}, ["unknown phase 'rl'", "'bptt'"]),
  # periods
  "negative_log_period": (
    "pixels:smoke",
    {"log_every_steps": -1},
    ["config.log_every_steps = -1", "number of steps >= 0 (0: never)"],
  ),
  "negative_checkpoint_period": (
    "pixels:smoke",
    {"checkpoint_every_steps": -5},
    ["config.checkpoint_every_steps = -5"],
  ),
  "negative_eval_period": (
    "pixels:smoke",
    {"eval.every_steps": -1},
    ["config.eval.every_steps = -1"],
  ),
  "unknown_teacher_kind": (
    "pixels:smoke",
    {"model.teacher_kind": "bidirectional"},
    ["config.model.teacher_kind = 'bidirectional'", "'causal'"],
  ),
  "phase_twice": (
    "pixels:smoke",
    {"phases": "smt,dmt,dmt"},
    ["config.phases = 'smt,dmt,dmt'", "dmt is listed twice"],
  ),
  # data paths
  "sketch_without_path": (
    "pixels:quickdraw,smoke",
    {"data.path": ""},
    ["config.data.path = ''", "quickdraw needs a numpy_bitmap/<category>.npy file"],
  ),
  "eval_path_for_a_dataset_without_one": (
    "pixels:smoke",
    {"data.eval_path": "/data/valid"},
    ["config.data.eval_path = '/data/valid'", "digits takes no separate evaluation data"],
  ),
  "text_missing_path": (
    "text:smoke",
    {"data.path": "/nonexistent/corpus.txt"},
    ["config.data.path = '/nonexistent/corpus.txt'", "does not exist"],
  ),
  "path_for_a_dataset_without_files": (
    "pixels:smoke",
    {"data.path": "/data/mnist"},
    ["config.data.path = '/data/mnist'", "ignored"],
  ),
  # mesh axes (config alone)
  "unknown_mesh_axis": (
    "pixels:smoke",
    {"mesh.model": 2},
    ["config.mesh.model = 2", "['data', 'fsdp', 'time']"],
  ),
  "two_minus_one_axes": ("pixels:smoke", {"mesh.fsdp": -1}, ["at most one axis may be -1"]),
  # the rest of the config
  "negative_seed": ("pixels:smoke", {"seed": -1}, ["config.seed = -1", "non-negative"]),
  "nan_policy": (
    "pixels:smoke",
    {"nan_policy": "ignore"},
    ["config.nan_policy = 'ignore'", "'skip'"],
  ),
  "dtype": ("pixels:smoke", {"model.dtype": "float64"}, ["config.model.dtype = 'float64'"]),
  "zero_lr": ("pixels:smoke", {"smt.lr": 0.0}, ["config.smt.lr = 0.0", "(0.0, inf)"]),
  "zero_steps": ("pixels:smoke", {"dmt.steps": 0}, ["config.dmt.steps = 0", "positive"]),
  "b2_of_one": ("pixels:smoke", {"optim.b2": 1.0}, ["config.optim.b2 = 1.0", "[0.0, 1.0)"]),
  "negative_loss_weight": ("pixels:smoke", {"smt.c_dyn": -0.1}, ["config.smt.c_dyn = -0.1"]),
  "dmt_without_smt": (
    "pixels:smoke",
    {"phases": "dmt"},
    ["config.phases = 'dmt'", "--config.phases=smt,dmt"],
  ),
  "episodic_flag_of_a_stream": (
    "pixels:smoke",
    {"data.episodic": True},
    ["config.data.episodic = True", "episodic=False"],
  ),
  "seq_len_of_a_stream": ("pixels:smoke", {"data.seq_len": 64}, ["config.data.seq_len = 64"]),
  "unknown_data_option": (
    "synthetic:parity,smoke",
    {"data.options.parity.num_tokens": 4},
    ["config.data.options.parity.num_tokens = 4", "parity takes no such option"],
  ),
  "misspelt_dataset_options": (
    "synthetic:stack,smoke",
    {"data.options.stak": {"max_depth": 4}},
    ["config.data.options.stak = ", "no such dataset; did you mean stack?"],
  ),
  "data_option_of_another_type": (
    "synthetic:stack,smoke",
    {"data.options.stack": {"max_depth": "10"}},
    ["config.data.options.stack.max_depth = '10'", "must be of type int, like 8"],
  ),
  # a misspelt field would be ignored
  "misspelt_field": (
    "pixels:smoke",
    {"model.num_head": 2},
    ["config.model.num_head = 2: no such config field; did you mean model.num_heads?"],
  ),
  "field_of_an_older_version": (
    "synthetic:parity,smoke",
    {"smt.transitions": 4},
    ["config.smt.transitions = 4: no such config field; did you mean smt.num_transitions?"],
  ),
  # each RNN kind's own options (model.rnn.<kind>): names, types and values its class checks
  "option_of_another_rnn_kind": (
    "pixels:smoke",
    {"model.rnn_kind": "gru", "model.rnn.gru.depth": 2},
    ["config.model.rnn.gru.depth = 2", "gru takes no such option", "['hidden']"],
  ),
  "rnn_option_out_of_range": (
    "pixels:smoke",
    {"model.rnn_kind": "mlp", "model.rnn.mlp.hidden": -1},
    ["config.model.rnn.mlp: hidden must be an integer >= 0"],
  ),
  "prompt_too_long": (
    "pixels:smoke",
    {"eval.prompt_length": 24},
    ["config.eval.prompt_length = 24", "[0, eval sequence length 24)"],
  ),
  "negative_truncation": (
    "synthetic:parity,smoke",
    {"phases": "bptt", "bptt.truncation": -1},
    ["config.bptt.truncation = -1"],
  ),
}


@pytest.mark.parametrize("name", sorted(CONFIG_ONLY))
def test_config_rule_fails_before_data_and_compile(name, tmp_path, no_data):
  base, overrides, fragments = CONFIG_ONLY[name]
  _rejects(_config(base, overrides), tmp_path, *fragments, hooks=no_data)


def test_empty_text_file_and_empty_folder(tmp_path, no_data):
  (tmp_path / "empty.txt").write_bytes(b"")
  _rejects(
    _config("text:smoke", {"data.path": str(tmp_path / "empty.txt")}),
    tmp_path,
    "empty file",
    hooks=no_data,
  )
  (tmp_path / "nothing").mkdir()
  (tmp_path / "nothing" / ".hidden").write_text("x")
  _rejects(
    _config("text:smoke", {"data.path": str(tmp_path / "nothing")}),
    tmp_path,
    "no files in it",
    hooks=no_data,
  )
  (tmp_path / "a_file").write_text("x" * 100)
  _rejects(
    _config("pixels:mnist", {"data.path": str(tmp_path / "a_file")}),
    tmp_path,
    "is not a folder",
    hooks=no_data,
  )


# --------------------------------------------------------------------------- needs the data


def test_corpus_too_short_for_a_phase(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("abcdefgh " * 120)  # 1080 bytes: eval holds the last 257
  c = _config(
    "text:smoke", {"data.path": str(corpus), "eval.seq_len": 300, "eval.prompt_length": 8}
  )
  _rejects(c, tmp_path, "config.eval.seq_len = 300", "eval stream holds only 257")
  corpus.write_text("tiny")  # shorter than one crop: the source itself says so
  _rejects(
    _config("text:smoke", {"data.path": str(corpus)}), tmp_path, "data 'text'", "has 4 bytes"
  )


class _OutOfVocabulary(data.Source):
  """A dataset whose tokens do not fit its vocabulary."""

  name = "out_of_vocabulary"

  def __init__(self, *, seq_len: int = 16):
    self.seq_len, self.vocab_size = seq_len, 2

  def example(self, rng, *, split):
    x = rng.integers(0, 3, self.seq_len).astype(np.int32)  # 2 is outside [0, 2)
    x[0] = 2
    return x, x


def test_tokens_outside_the_vocabulary(tmp_path):
  c = _config("synthetic:parity,smoke", {})
  _rejects(
    c,
    tmp_path,
    "outside the vocabulary [0, 2)",
    "x in [0, 2]",
    hooks=train.Hooks(make_source=lambda config: _OutOfVocabulary()),
  )


def test_mesh_larger_than_the_devices(tmp_path):
  n = jax.device_count()
  _rejects(
    _config("pixels:smoke", {"mesh.data": n + 1}),
    tmp_path,
    f"needs {n + 1} devices, but {n} are available",
  )


def _mesh(**shape):
  return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "time": 1, **shape})


def test_batch_and_transitions_must_split_over_the_mesh():
  c = _config("pixels:smoke", {"smt.batch_size": 6})
  with pytest.raises(
    ConfigError,
    match=r"config.smt.batch_size = 6: must be divisible by data x "
    r"fsdp = 4 .* e.g. smt.batch_size=8",
  ):
    config_lib.validate_with_mesh(c, _mesh(data=2, fsdp=2))
  c = _config("pixels:smoke", {"eval.batch_size": 2, "phases": "smt"})
  with pytest.raises(ConfigError, match="config.eval.batch_size = 2"):
    config_lib.validate_with_mesh(c, _mesh(data=4))
  c = _config("pixels:smoke", {"smt.num_transitions": 3, "phases": "smt"})
  with pytest.raises(
    ConfigError, match="config.smt.num_transitions = 3: must be divisible by mesh.time = 2"
  ):
    config_lib.validate_with_mesh(c, _mesh(time=2))
  c = _config("synthetic:parity,smoke", {"phases": "bptt"})
  with pytest.raises(ConfigError, match="config.mesh.time = 2: .* no SMT phase"):
    config_lib.validate_with_mesh(c, _mesh(time=2))
  config_lib.validate_with_mesh(_config("pixels:smoke", {}), _mesh(data=4))
  # Gradient accumulation: each micro-batch (batch_size / k rows) splits over the devices.
  c = _config("pixels:smoke", {"optim.grad_accum_steps": 2})  # batches of 4
  with pytest.raises(
    ConfigError,
    match=r"config.smt.batch_size = 4: must be split into optim.grad_accum_steps = 2 "
    r"micro-batches, each divisible by data x fsdp = 4 .* e.g. smt.batch_size=8",
  ):
    config_lib.validate_with_mesh(c, _mesh(data=4))
  config_lib.validate_with_mesh(c, _mesh(data=2))
  for bad in (0, -2):
    with pytest.raises(ConfigError, match=f"config.optim.grad_accum_steps = {bad}: micro-batches"):
      config_lib.validate(_config("pixels:smoke", {"optim.grad_accum_steps": bad}))


def test_validate_for_devices_checks_a_described_target_without_its_devices():
  many = {f"{p}.batch_size": 64 for p in ("smt", "dmt", "eval")}
  c = _config("pixels:smoke", {**many, "mesh.fsdp": 4})
  assert jax.device_count() < 64  # the target's devices are described, not present
  shape = config_lib.validate_for_devices(c, num_devices=64, num_processes=16)
  assert shape == {"data": 16, "fsdp": 4, "time": 1}
  with pytest.raises(
    ConfigError, match=r"config.smt.batch_size = 64: must be divisible by data x fsdp = 128"
  ):
    config_lib.validate_for_devices(c, num_devices=128, num_processes=16)
  c = _config("pixels:smoke", {"mesh.data": 2, "mesh.time": 4})  # batch sizes 4
  with pytest.raises(ConfigError, match="config.smt.batch_size = 4: .* and by 8 processes"):
    config_lib.validate_for_devices(c, num_devices=8, num_processes=8)
  with pytest.raises(ConfigError, match="needs 8 devices, but 16 are available"):
    config_lib.validate_for_devices(c, num_devices=16)
  with pytest.raises(ValueError, match="does not split over num_processes=3"):
    config_lib.validate_for_devices(c, num_devices=8, num_processes=3)
  # Config-only checks run too, and data paths (files on the target) are not looked up here.
  with pytest.raises(ConfigError, match="config.smt.lr = 0"):
    config_lib.validate_for_devices(_config("pixels:smoke", {"smt.lr": 0.0}), num_devices=4)
  c = _config("pixels:mnist", {"data.path": "/data/on/the/pod/mnist"})
  with pytest.raises(ConfigError, match="config.data.path = .*does not exist"):
    config_lib.validate(c)
  assert config_lib.validate_for_devices(c, num_devices=16, num_processes=4)["data"] == 16


def test_a_config_saved_before_newer_fields_existed_still_builds():
  # What experiments.sample and the studies read back from an older workdir's config.json.
  c = _config("pixels:smoke", {})
  with c.unlocked():
    del c.mesh["fsdp_min_size"]
    del c["profile"]
    for p in ("smt", "dmt", "bptt"):
      del c[p]["schedule"]
    del c.smt["num_decoded"]
    del c.dmt["from_rnn_initial_memory"], c.dmt["streams_from_rnn_initial_memory"]
    del c.optim["grad_accum_steps"]
    for f in ("rollout", "parallel_jacobian", "parallel_damping", "parallel_tol"):
      del c.dmt[f]
    del c.data["warmup_steps"], c.data["eval_path"], c.eval["first_step"], c["wandb"]
    c.smt.lr = 0.5  # a field the config has is kept, whatever the default
  exp = experiment.build_experiment(c)
  assert jax.tree.leaves(exp.abstract_params)
  # Every missing field reads as today's default (config_lib.complete, the one place).
  d = config_lib.default()
  assert exp.config.mesh.fsdp_min_size == d.mesh.fsdp_min_size and exp.config.smt.lr == 0.5
  assert exp.config.dmt.rollout == "sequential" and exp.config.profile == d.profile
  assert (exp.config.smt.schedule, exp.config.dmt.schedule) == ("constant", "cosine")
  full = config_lib.complete(c)
  assert set(full.to_dict()) == set(d.to_dict()) and "rollout" not in c.dmt  # c is left as it was
  assert config_lib.complete(full).to_dict() == full.to_dict()


def test_a_config_saved_before_the_rnn_kinds_had_their_own_options_reads_as_today(tmp_path):
  # Before model.rnn.<kind>, a run's config.json held model.rnn_depth, readout_depth, rnn_hidden.
  new = _config(
    "pixels:smoke", {f"model.rnn.{k}.hidden": 12 for k in ("mlp", "gru", "elman", "lstm")}
  )
  old = json.loads(new.to_json())
  rnn = old["model"].pop("rnn")
  old["model"].update(rnn_depth=rnn["transformer"]["depth"], rnn_hidden=12, readout_depth=1)
  assert config_lib.migrate(old) != old and "rnn_depth" not in config_lib.migrate(old)["model"]
  assert config_lib.complete(old).to_dict() == new.to_dict()
  # The workdir of such a run is the same run (it resumes), and a moved field that changed is not.
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert workdir_lib.check_workdir(str(tmp_path), new, overwrite=False, fork=False) == "same"
  # `--config=<workdir>` reads it with today's fields: an override names model.rnn.<kind>.
  again = saved.get_config(str(tmp_path))
  assert again.model.rnn.mlp.hidden == 12 and "rnn_hidden" not in again.model
  assert workdir_lib.check_workdir(str(tmp_path), again, overwrite=False, fork=False) == "same"
  new.model.rnn.mlp.hidden = 8
  with pytest.raises(workdir_lib.WorkdirError, match=r"model\.rnn\.mlp\.hidden: 12 -> 8"):
    workdir_lib.check_workdir(str(tmp_path), new, overwrite=False, fork=False)
  # A value of the wrong type (a hand-edited config.json) is named before anything is built.
  old["model"]["rnn_depth"] = "2"
  with pytest.raises(
    ConfigError, match=r"config.model.rnn.transformer.depth = '2': must be of type int"
  ):
    config_lib.validate(config_lib.complete(old))


def test_every_option_of_every_dataset_is_a_config_field(tmp_path):
  # One section per dataset, from its constructor: the command line sets an option the recipe
  # did not, and one whose default is None (typed by its annotation).
  from absl import flags
  from ml_collections import config_flags

  path = os.path.join(os.path.dirname(synthetic.__file__), "synthetic.py")
  argv = [
    "prog",
    f"--config={path}:stack,32",
    "--config.data.options.stack.push_prob=0.25",
    "--config.data.options.text.cache_dir=/tmp/cache",
    "--config.data.options.quickdraw.categories=cat,dog",
  ]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert dict(c.data.options.stack) == {"num_tokens": 4, "max_depth": 10, "push_prob": 0.25}
  assert (c.data.options.text.cache_dir, c.data.options.quickdraw.categories) == (
    "/tmp/cache",
    "cat,dog",
  )
  assert set(c.data.options) == set(data.DATASETS)
  source = experiment.source_of(c)
  assert source.push_prob == 0.25 and source.max_depth == 10  # data.name's section is passed
  # A config saved before the sections held the chosen dataset's options alone: it reads as today.
  old = json.loads(c.to_json())
  old["data"]["options"] = {"num_tokens": 4, "max_depth": 10, "push_prob": 0.25}
  assert config_lib.migrate(old)["data"]["options"]["stack"] == old["data"]["options"]
  assert config_lib.complete(old).data.options.stack.push_prob == 0.25
  (tmp_path / "config.json").write_text(json.dumps(old))
  c.data.options.text.cache_dir = None  # (the saved run's)
  c.data.options.quickdraw.categories = None
  assert workdir_lib.check_workdir(str(tmp_path), c, overwrite=False, fork=False) == "same"


def test_a_new_rnn_kind_is_its_class_and_a_registry_line(monkeypatch):
  # The config gets its options section, the checks read its signature, the builder builds it.
  from flax import nnx

  from smt_jax.models import rnn as rnn_lib

  class Leaky(rnn_lib.RNN):
    def __init__(self, *, vocab_size, num_memory_tokens, width, initial_memory="learned",
                 dtype=jnp.float32, rngs, leak: float = 0.5):  # fmt: skip
      super().__init__(
        num_memory_tokens=num_memory_tokens, width=width, initial_memory=initial_memory, rngs=rngs
      )
      self.check_options(leak=leak)
      self.leak = leak
      self.embed = nnx.Embed(vocab_size, width, rngs=rngs)
      self.out = nnx.Linear(width, vocab_size, rngs=rngs)

    @classmethod
    def check_options(cls, *, leak: float = 0.5):
      if not 0 <= leak < 1:
        raise ValueError(f"leak must be in [0, 1), got {leak}.")

    def update(self, memory, x):
      new = self.leak * memory + self.embed(x)[:, None]
      return new / jnp.sqrt(jnp.mean(new**2, axis=-1, keepdims=True))

    def readout(self, memory):
      return self.out(memory[:, 0])

  monkeypatch.setitem(rnn_lib.RNN_KINDS, "leaky", Leaky)
  assert config_lib.default().model.rnn.leaky.to_dict() == {"leak": 0.5}
  c = _config("pixels:smoke", {})
  with c.unlocked():
    c.model.rnn = config_lib.default().model.rnn
  c.model.rnn_kind, c.model.rnn.leaky.leak = "leaky", 0.25
  exp = experiment.build_experiment(c)
  assert nnx.merge(exp.graphdefs[1], exp.abstract_params["rnn"]).leak == 0.25
  c.model.rnn.leaky.leak = 2.0
  with pytest.raises(ConfigError, match=r"config.model.rnn.leaky: leak must be in \[0, 1\)"):
    config_lib.validate(c)


def test_a_new_dataset_is_its_class_and_a_registry_line(monkeypatch, tmp_path):
  # A source reading a folder of .npy token files: the checks read its DataPaths, the builder
  # hands it data.path and its options.
  class Tokens(data.StreamSource):
    name = "tokens"
    paths = data.DataPaths("a folder of .npy token files", folder=True)

    def __init__(self, *, seq_len: int = 32, path: str | None = None, offset: int = 0):
      files = sorted(os.listdir(path))
      stream = np.concatenate([np.load(os.path.join(path, f)) for f in files]) + offset
      cut = len(stream) * 9 // 10
      super().__init__(
        streams={"train": stream[:cut], "eval": stream[cut:]}, vocab_size=8, seq_len=seq_len
      )

  monkeypatch.setitem(data.DATASETS, "tokens", Tokens)
  c = _config("pixels:smoke", {"data.name": "tokens", "data.options.tokens.offset": 1})
  c.data.path = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="does not exist; tokens needs a folder of .npy token"):
    config_lib.validate(c)
  os.makedirs(tmp_path / "notes")
  np.save(tmp_path / "notes" / "a.npy", np.arange(4000, dtype=np.int32) % 7)
  c.data.path = str(tmp_path / "notes")
  exp = experiment.build_experiment(c)
  assert exp.source.vocab_size == 8 and exp.source.streams["train"].min() == 1
  c.data.eval_path = str(tmp_path / "notes")
  with pytest.raises(ConfigError, match=r"tokens takes no separate evaluation data"):
    config_lib.validate(c)


def test_smoke_configs_pass():
  for base in ("pixels:smoke", "synthetic:parity,smoke", "synthetic:stack,smoke"):
    c = _config(base, {})
    config_lib.validate(c)


@pytest.mark.parametrize("task", ["retrieval", "copy", "stack", "keys_values", "modular"])
@pytest.mark.parametrize("length", [32, 256])
def test_probe_configs_race_fairly_with_the_authors_tasks(task, length):
  from experiments.configs import synthetic

  c = synthetic.get_config(f"{task},{length}")
  config_lib.validate(c)
  assert c.model.teacher_kind == "causal" and c.smt.num_transitions == length
  assert 0 < c.smt.num_decoded <= length + 1
  # The same T and batch in every phase: equal steps are equal training tokens.
  assert c.bptt.steps == c.smt.steps + c.dmt.steps
  assert len({c[p].batch_size for p in ("smt", "dmt", "bptt")}) == 1
  assert c.dmt.steps == max(125, 500 * length // 64)  # DMT grows with the rollout
  earlier = synthetic.get_config(f"{task},{length},earlier")
  config_lib.validate(earlier)
  assert earlier.model.teacher_kind == "windowed" and earlier.smt.num_decoded == 0
  for cfg, want in ((c, synthetic.TASK_OPTIONS), (earlier, synthetic.EARLIER_OPTIONS)):
    assert {k: cfg.data.options[task][k] for k in want[task]} == want[task]
  if task == "stack":
    assert dict(c.data.options.stack) == {"num_tokens": 4, "max_depth": 10, "push_prob": 0.5}
  with pytest.raises(ValueError, match="unknown flags"):
    synthetic.get_config(f"{task},{length},eralier")


def test_full_supervision_on_streams_and_the_paper_configs_keep_the_published_recipe():
  from experiments.configs import pixels, text

  # The streams' Tf and decoded memories: the recipe search's winner (results.md 0d), each
  # method at its best lr of the race (0, 0a).
  full = {"digits": pixels.get_config("digits,full"), "text": text.get_config("small,full")}
  for c in full.values():
    config_lib.validate(c)
    assert c.model.teacher_kind == "causal"
    assert c.smt.num_transitions == c.smt.context_length + c.smt.future_length
    assert (c.smt.future_length, c.smt.num_decoded) == (8, 16)
    assert (c.smt.lr, c.dmt.lr, c.smt.schedule) == (3e-3, 9e-4, "cosine")
  assert (full["digits"].bptt.lr, full["text"].bptt.lr) == (1e-3, 3e-3)
  # Text's default: 16 of the 72 transitions at twice `,full`'s SMT steps, DMT from the RNN's
  # own initial memory (results.md 2d).
  small = text.get_config("small")
  config_lib.validate(small)
  assert (small.smt.num_transitions, small.smt.steps, full["text"].smt.steps) == (16, 2000, 1000)
  assert config_lib.dmt_start(small) == (-1, True)
  assert config_lib.dmt_start(full["text"]) == (None, False)
  small.update_from_flattened_dict(
    {"smt.num_transitions": 72, "smt.steps": 1000, "dmt.streams_from_rnn_initial_memory": False}
  )
  assert small.to_json() == full["text"].to_json()
  with pytest.raises(ValueError, match="'earlier' .* and 'full' contradict"):
    text.get_config("small,earlier,full")
  with pytest.raises(ValueError, match="tinystories keeps the published recipe"):
    text.get_config("tinystories,full")
  # The main job: 8 transitions per row from one causal-teacher pass (results.md 2d); `,earlier`
  # is the windowed teacher's 2 transitions with Tf 16, otherwise the same.
  digits, earlier = pixels.get_config("digits"), pixels.get_config("digits,earlier")
  config_lib.validate(digits)
  assert (digits.model.teacher_kind, digits.smt.num_transitions) == ("causal", 8)
  assert (digits.smt.future_length, digits.smt.num_decoded, digits.model.head_dim) == (8, 0, 16)
  earlier.update_from_flattened_dict(
    {
      "model.teacher_kind": "causal",
      "smt.num_transitions": 8,
      "smt.future_length": 8,
      "dmt.streams_from_rnn_initial_memory": True,
    }
  )
  assert earlier.to_json() == digits.to_json()
  with pytest.raises(ValueError, match="'earlier' .* and 'full' contradict"):
    pixels.get_config("digits,earlier,full")
  with pytest.raises(ValueError, match="mnist keeps the published recipe .*drop 'full'"):
    pixels.get_config("mnist,full")
  # The digits demo decays SMT's lr too (the main job in 5 minutes); the paper configs do not.
  for c, smt_schedule in (
    (pixels.get_config("digits,earlier"), "cosine"),
    (text.get_config("small,earlier"), "constant"),
    (pixels.get_config("mnist"), "constant"),
    (pixels.get_config("digits,reference"), "constant"),
    (text.get_config("tinystories"), "constant"),
  ):
    assert c.model.teacher_kind == "windowed" and c.smt.num_decoded == 0
    assert c.smt.schedule == smt_schedule and c.dmt.schedule == "cosine"
  assert pixels.get_config("digits,reference").model.head_dim == 64  # the reference's heads


# --------------------------------------------------------------------------- the workdir


def _fake_run(workdir, config, steps=(3,)):
  """A workdir as a run of `config` leaves it: config.json and checkpoint folders."""
  os.makedirs(workdir / "checkpoints", exist_ok=True)
  for s in steps:
    (workdir / "checkpoints" / str(s)).mkdir()
  (workdir / "config.json").write_text(config.to_json())
  (workdir / "metrics.jsonl").write_text('{"step": 2, "phase": "smt", "phase_step": 2}\n')


def test_workdir_of_another_config_is_refused_before_anything_is_built(tmp_path, no_data):
  old = _config("pixels:smoke", {})
  _fake_run(tmp_path, old)
  new = _config("pixels:smoke", {"smt.lr": 2e-4, "model.rnn_kind": "gru"})
  with no_compile(), pytest.raises(workdir_lib.WorkdirError) as e:
    train.train_and_evaluate(new, str(tmp_path), hooks=no_data)
  msg = str(e.value)
  assert "model.rnn_kind: 'transformer' -> 'gru'" in msg and "smt.lr: 0.003 -> 0.0002" in msg
  assert "--overwrite" in msg and "--fork" in msg
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(old.to_json())
  with pytest.raises(workdir_lib.WorkdirError, match="exclude each other"):
    workdir_lib.check_workdir(str(tmp_path), new, overwrite=True, fork=True)


def test_claim_workdir_same_new_overwrite_fork(tmp_path):
  old, new = _config("pixels:smoke", {}), _config("pixels:smoke", {"smt.steps": 9})
  claim = lambda wd, c, **kw: workdir_lib.claim_workdir(
    str(wd), c, overwrite=kw.get("overwrite", False), fork=kw.get("fork", False), is_main=True
  )
  assert claim(tmp_path / "fresh", old) == "new"
  assert claim(tmp_path / "fresh", old) == "same"

  _fake_run(tmp_path / "ow", old)
  assert claim(tmp_path / "ow", new, overwrite=True) == "overwrite"
  assert not (tmp_path / "ow" / "checkpoints").exists()
  assert not (tmp_path / "ow" / "metrics.jsonl").exists()
  assert json.loads((tmp_path / "ow" / "config.json").read_text())["smt"]["steps"] == 9

  _fake_run(tmp_path / "fk", old)
  assert claim(tmp_path / "fk", new, fork=True) == "fork"
  assert (tmp_path / "fk" / "checkpoints" / "3").is_dir()  # kept, to be continued
  assert json.loads((tmp_path / "fk" / "config.1.json").read_text())["smt"]["steps"] == 6
  assert json.loads((tmp_path / "fk" / "config.json").read_text())["smt"]["steps"] == 9
  assert claim(tmp_path / "fk", old, fork=True) == "fork"  # and back: the history grows
  assert (tmp_path / "fk" / "config.2.json").exists()


def test_checkpoints_without_a_config_are_refused(tmp_path):
  _fake_run(tmp_path, _config("pixels:smoke", {}))
  os.remove(tmp_path / "config.json")
  with pytest.raises(workdir_lib.WorkdirError, match="checkpoints but no config.json"):
    workdir_lib.check_workdir(
      str(tmp_path), _config("pixels:smoke", {}), overwrite=False, fork=False
    )


def test_a_second_run_in_a_busy_workdir_is_refused(tmp_path):
  with workdir_lib.workdir_lock(str(tmp_path), is_main=True):
    with pytest.raises(RuntimeError, match=f"in use by a running job \\(pid {os.getpid()}\\)"):
      with workdir_lib.workdir_lock(str(tmp_path), is_main=True):
        pass
  with workdir_lib.workdir_lock(str(tmp_path), is_main=True):  # released on exit
    pass


def test_raised_steps_only_when_nothing_else_changed():
  """A rerun continues its run when it only raised the steps of phases the run has."""
  as_json = lambda c: json.loads(c.to_json())
  old = as_json(_config("pixels:smoke", {}))
  raised = lambda overrides: workdir_lib.raised_steps(
    old, as_json(_config("pixels:smoke", overrides))
  )
  assert raised({"dmt.steps": 9}) == {"dmt": (4, 9)}
  assert raised({"smt.steps": 7, "dmt.steps": 9}) == {"smt": (6, 7), "dmt": (4, 9)}
  assert raised({"wandb.project": "p", "dmt.steps": 9}) == {"dmt": (4, 9)}  # an observer
  assert raised({}) == {}
  assert raised({"dmt.steps": 3}) == {}  # lowered
  assert raised({"smt.steps": 7, "dmt.steps": 3}) == {}
  assert raised({"dmt.steps": 9, "dmt.lr": 5e-4}) == {}  # something else too
  assert raised({"bptt.steps": 9}) == {}  # a phase the run does not have: a different config
  assert raised({"dmt.steps": 9, "phases": "smt,dmt,bptt"}) == {}
