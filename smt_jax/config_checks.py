"""Config validation, run before any data load or compile.

Every error names the config field, its value and the fix. `validate` needs only the config;
`validate_with_source` and `validate_with_mesh` check what depends on the dataset and the devices.
"""

from __future__ import annotations

from smt_jax.models import UPDATERS


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def _fail(field: str, value, fix: str) -> None:
  raise ConfigError(f"config.{field} = {value!r}: {fix}")


def _positive_int(c, field: str) -> None:
  v = c
  for part in field.split("."):
    v = v[part]
  if isinstance(v, bool) or not isinstance(v, int) or v < 1:
    _fail(field, v, "must be a positive integer.")


def validate(config, phases: list[str]) -> None:
  """Checks the config on its own (no data, no devices)."""
  from smt_jax.data import DATASETS
  c = config
  if c.data.name not in DATASETS:
    _fail("data.name", c.data.name, f"unknown dataset; valid names: {sorted(DATASETS)}.")
  if c.model.rnn_kind not in UPDATERS:
    _fail("model.rnn_kind", c.model.rnn_kind, f"unknown RNN kind; valid kinds: {sorted(UPDATERS)}.")
  for f in ("model.width", "model.num_memory_tokens", "model.num_heads", "model.encoder_depth",
            "model.decoder_depth", "model.rnn_depth", "model.readout_depth", "log_every_steps",
            "checkpoint_every_steps", "keep_checkpoints", "eval.every_steps", "eval.batch_size",
            "eval.num_batches"):
    _positive_int(c, f)
  if c.model.width % (2 * c.model.num_heads):
    _fail("model.width", c.model.width,
          f"must be a multiple of 2 * model.num_heads = {2 * c.model.num_heads} (rotary "
          f"embedding needs an even head width).")
  if c.model.rnn_kind == "lstm" and (c.model.width * c.model.num_memory_tokens) % 2:
    _fail("model.num_memory_tokens", c.model.num_memory_tokens,
          "lstm splits the memory into (h, c): K * width must be even.")
  if c.model.dtype not in ("float32", "bfloat16", "float16"):
    _fail("model.dtype", c.model.dtype, "use float32, bfloat16 or float16.")
  if c.nan_policy not in ("stop", "skip"):
    _fail("nan_policy", c.nan_policy, "use 'stop' or 'skip'.")
  if c.data.name == "text" and not c.data.path:
    _fail("data.path", c.data.path, "text needs a corpus: --config.data.path=FILE_OR_FOLDER.")
  if c.data.episodic and c.data.seq_len < 2:
    _fail("data.seq_len", c.data.seq_len, "episodes need at least 2 tokens.")
  for p in phases:
    _positive_int(c, f"{p}.steps")
    _positive_int(c, f"{p}.batch_size")
    if not c[p].lr > 0:
      _fail(f"{p}.lr", c[p].lr, "must be > 0.")
  if "smt" in phases or "dmt" in phases:
    _positive_int(c, "smt.context_length")
    _positive_int(c, "smt.future_length")
  if "smt" in phases:
    _validate_smt(c)
  if "dmt" in phases:
    _validate_dmt(c)
  if "bptt" in phases:
    if not c.data.episodic:
      _positive_int(c, "bptt.seq_len")
    if c.bptt.truncation < 0:
      _fail("bptt.truncation", c.bptt.truncation, "0 for full BPTT, or a positive window.")
  if not c.data.episodic:
    _positive_int(c, "eval.seq_len")
  if c.eval.prompt_length < 0 or c.eval.prompt_length >= _eval_len(c):
    _fail("eval.prompt_length", c.eval.prompt_length,
          f"must be in [0, eval sequence length {_eval_len(c)}); 0 turns prompted eval off.")


def _eval_len(c) -> int:
  return c.data.seq_len if c.data.episodic else c.eval.seq_len


def _validate_smt(c) -> None:
  s = c.smt
  t = c.data.seq_len if c.data.episodic else s.context_length + s.future_length
  if not 1 <= s.num_transitions <= t:
    _fail("smt.num_transitions", s.num_transitions,
          f"must be in [1, T = {t}] (1: the published single transition; {t}: every one).")
  if s.num_transitions == 1 and t < s.context_length + 1:
    _fail("smt.context_length", s.context_length,
          f"num_transitions=1 uses t = Tc-1 and input x[Tc], so Tc must be < T = {t}.")
  if s.uniformity_over not in ("tokens", "states"):
    _fail("smt.uniformity_over", s.uniformity_over, "use 'tokens' or 'states'.")
  if s.uniformity_max_samples < 2:
    _fail("smt.uniformity_max_samples", s.uniformity_max_samples, "must be >= 2.")
  if not s.gamma > 0:
    _fail("smt.gamma", s.gamma, "must be > 0 (1 weighs every future step equally).")


def _validate_dmt(c) -> None:
  d = c.dmt
  _positive_int(c, "dmt.rollout_length")
  _positive_int(c, "dmt.label_every")
  if d.rollout_length % d.label_every:
    _fail("dmt.label_every", d.label_every,
          f"must divide dmt.rollout_length = {d.rollout_length} (labels every k steps).")
  if c.data.episodic and d.rollout_length > c.data.seq_len:
    _fail("dmt.rollout_length", d.rollout_length,
          f"episodic rollouts start at the initial memory: at most data.seq_len = "
          f"{c.data.seq_len}.")


def validate_with_source(config, phases: list[str], source) -> None:
  """Checks that need the dataset: token range of a real batch, stream lengths."""
  from smt_jax import train
  c = config
  for phase in phases + ["eval"]:
    s = train.with_seq_len(source, train.phase_seq_len(c, phase))
    batch = s.batch(split="train" if phase != "eval" else "eval", step=0, batch_size=1,
                    seed=c.seed)
    x, y = batch["x"], batch["y"]
    if x.shape[1] != s.seq_len:
      raise ConfigError(f"data: {c.data.name} gave sequences of length {x.shape[1]} for {phase}, "
                        f"expected {s.seq_len}.")
    if x.min() < 0 or x.max() >= source.vocab_size or y.min() < -1 or y.max() >= source.vocab_size:
      raise ConfigError(
          f"data: {c.data.name} produced tokens outside [0, vocab_size={source.vocab_size}) "
          f"(x in [{x.min()}, {x.max()}], y in [{y.min()}, {y.max()}]); fix the dataset options.")


def validate_with_mesh(config, phases: list[str], mesh) -> None:
  """Batch sizes must split over the batch axes, and SMT's transitions over `time`."""
  import jax
  c = config
  b = mesh.shape["data"] * mesh.shape["fsdp"]
  for p in phases:
    if c[p].batch_size % b or c[p].batch_size % jax.process_count():
      _fail(f"{p}.batch_size", c[p].batch_size,
            f"must be divisible by data x fsdp = {b} devices and by {jax.process_count()} "
            f"processes (config.mesh = {dict(mesh.shape)}).")
  if c.eval.batch_size % b:
    _fail("eval.batch_size", c.eval.batch_size, f"must be divisible by data x fsdp = {b}.")
  t = mesh.shape["time"]
  if t > 1:
    if "smt" not in phases:
      _fail("mesh.time", t, "the time axis splits SMT's transitions; this run has no SMT phase.")
    n = c.smt.num_transitions
    if n % t:
      _fail("smt.num_transitions", n, f"must be divisible by mesh.time = {t}.")
