"""Shared tiny models for the unit tests: a Teacher and every RNN kind, split into pure functions.

Everything is small (width 8, K = 2 memory tokens, 1 layer, 2 heads, V = 6) and float32 so that
the suite runs quickly on CPU; tests that need float64 enable it locally with the `x64` fixture.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import run_helpers

# XLA's cheap CPU compile for every test, set before JAX starts its backend: the tests' programs
# are tiny and run a few steps, so their time goes into compiling (measured on the in-process
# parity, objective and teacher tests: 424 s against 311 s). The subprocess runs take it too.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {run_helpers.FAST_COMPILE}".strip()

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import smt_jax

KINDS = tuple(sorted(smt_jax.RNN_KINDS))


def pytest_configure(config):
  """A persistent compilation cache shared by the test processes: the runner tests build the same
  smoke programs many times (a new jit per run), and a cache hit skips XLA's compile."""
  del config
  cache = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "smt_jax_test_compile_cache")
  )
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The longest modules (measured with --durations), handed out first: xdist gives each worker the
# next test as it frees up, so a 3-minute test collected last leaves one core idle at the end.
LONGEST_FIRST = (
  "test_studies.py::test_smoke_core_studies",
  "test_studies.py",
  "test_sharding.py",
  "test_multiprocess.py",
  "test_benchmark.py",
  "test_kill_resume.py",
  "test_cpu_devices.py",
  "test_object_store.py",
  "test_rollout_check.py",
  "test_causal_teacher.py",
)


# Integration tests: the runner, its command lines, subprocesses and several processes end to end
# (`pytest -m integration`). Every other test is a unit test (`pytest -m unit`): the math, the
# models, the data, one function at a time, in this process.
INTEGRATION = {
  "test_benchmark.py",
  "test_cli_errors.py",
  "test_compare.py",
  "test_config_checks.py",
  "test_console.py",
  "test_cpu_devices.py",
  "test_device_check.py",
  "test_import_reference.py",
  "test_install.py",
  "test_kill_resume.py",
  "test_launch.py",
  "test_multiprocess.py",
  "test_notebook.py",
  "test_object_store.py",
  "test_plot.py",
  "test_profiling.py",
  "test_readme.py",
  "test_reliability.py",
  "test_rollout_check.py",
  "test_runner.py",
  "test_sharding.py",
  "test_studies.py",
  "test_wandb.py",
}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    item.add_marker("integration" if item.path.name in INTEGRATION else "unit")

  def rank(item):
    here = f"{item.path.name}::{item.name}"
    return next((i for i, n in enumerate(LONGEST_FIRST) if here.startswith(n)), len(LONGEST_FIRST))

  items.sort(key=rank)  # stable: the same order in every worker


@dataclasses.dataclass(frozen=True)
class Tiny:
  """Sizes of the tiny models, and builders that return (pure functions, parameters)."""

  vocab_size: int = 6
  num_memory_tokens: int = 2  # K
  width: int = 8  # d
  num_heads: int = 2
  context_length: int = 4  # Tc
  future_length: int = 2  # Tf

  def teacher(self, seed: int = 0, **overrides):
    kw = dict(
      vocab_size=self.vocab_size,
      num_memory_tokens=self.num_memory_tokens,
      width=self.width,
      encoder_depth=1,
      decoder_depth=1,
      num_heads=self.num_heads,
    )
    kw.update(overrides)
    graphdef, state = nnx.split(smt_jax.Teacher(**kw, rngs=nnx.Rngs(seed)))
    return smt_jax.teacher_fns(graphdef), state

  def rnn(self, kind: str, seed: int = 1, **overrides):
    kw = dict(
      vocab_size=self.vocab_size,
      num_memory_tokens=self.num_memory_tokens,
      width=self.width,
      depth=1,
      num_heads=self.num_heads,
      readout_depth=1,
    )
    kw.update(overrides)
    graphdef, state = nnx.split(smt_jax.make_rnn(kind, **kw, rngs=nnx.Rngs(seed)))
    return smt_jax.rnn_fns(graphdef), state

  def models(self, kind: str, seed: int = 0):
    """(teacher fns, rnn fns, params={'teacher': ..., 'rnn': ...})."""
    tfns, tstate = self.teacher(seed)
    rfns, rstate = self.rnn(kind, seed + 1)
    return tfns, rfns, {"teacher": tstate, "rnn": rstate}

  def batch(self, seed: int, batch_size: int, seq_len: int, *, mask_frac: float = 0.0):
    """Random tokens x in [0, V); y = next token, with some targets masked (-1)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, self.vocab_size, (batch_size, seq_len + 1)).astype(np.int32)
    y = x[:, 1:].copy()
    if mask_frac:
      y[rng.random(y.shape) < mask_frac] = -1
    return {"x": jnp.asarray(x[:, :-1]), "y": jnp.asarray(y)}


@pytest.fixture(scope="session")
def tiny() -> Tiny:
  return Tiny()


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting afterwards."""
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", old)


def log_softmax_np(logits: np.ndarray) -> np.ndarray:
  """Numerically stable log-softmax over the last axis, in float64 NumPy."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _path_str(path) -> str:
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def get_leaf(state, path: str) -> jax.Array:
  """The array at 'a/b/c' in a (nested) nnx.State."""
  hits = [a for p, a in jax.tree_util.tree_flatten_with_path(state)[0] if _path_str(p) == path]
  assert len(hits) == 1, f"no unique leaf {path!r}"
  return hits[0]


def with_leaf(state, path: str, fn):
  """A copy of `state` with the array at 'a/b/c' replaced by fn(array)."""
  found = []

  def visit(p, a):
    if _path_str(p) == path:
      found.append(p)
      return fn(a)
    return a

  out = jax.tree_util.tree_map_with_path(visit, state)
  assert len(found) == 1, f"no unique leaf {path!r}"
  return out


def read_tensorboard(logdir: str) -> dict[str, list[tuple[int, object]]]:
  """{tag: [(step, value), ...]} from the event files in `logdir`, read as TFRecords of Event
  protos (no TensorBoard install needed). Values: floats for scalars; the Summary.Value itself
  for images, text and the HParams plugin's entries."""
  import glob
  import struct

  from tensorboardX.proto import event_pb2

  out: dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):  # record: uint64 length, uint32 crc, data, uint32 crc
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12 : i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        scalar = v.WhichOneof("value") == "simple_value"
        out.setdefault(v.tag, []).append((event.step, v.simple_value if scalar else v))
  return out
