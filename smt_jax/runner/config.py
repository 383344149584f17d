"""A run's config: its defaults, the one way to read it, and its checks.

- `default()`: every field a run reads, with the published values where they apply
  (docs/method.md section 6); the files in `experiments/configs/` start from it and set recipes.
  Periods are named with their units (`*_every_steps`); a period of 0 means never.
- Accessors (`phase_names`, `phase_seq_len`, `training_tokens`, `warmup_config`, ...): what a
  config says, read the one way every builder and check reads it.
- Checks, run before any data load or compile. Every error names the config field, its value
  and the fix. `validate` needs only the config (and stats data paths); `make_mesh` and
  `validate_with_mesh` check what depends on the devices; `experiment.validate_with_source` what
  depends on the dataset; `experiment.build_experiment` runs them in that order and then builds
  the run. `validate_for_devices` checks a config against a described target (so many devices over
  so many processes) without having its devices: what the launchers run before they start
  anything.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import typing

import jax
import ml_collections

from smt_jax import data, parallel, sharding, storage
from smt_jax.models import RNN_KINDS, TEACHER_KINDS, head_width, rnn_options

# ---------------------------------------------------------------------------------------------
# The default config.


def default() -> ml_collections.ConfigDict:
  """Every field a run reads; each experiment's config file starts here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.phases = "smt,dmt"  # comma-separated, run in order: any of smt, dmt, bptt

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # a key of smt_jax.data.DATASETS
  c.data.episodic = False  # True: independent sequences of data.seq_len (the probes)
  c.data.seq_len = 0  # episodic sources only: the episode length T
  # Episodes: a length curriculum. The first warmup_steps global steps (within the first phase,
  # whichever it is: SMT and BPTT see the same data) train on episodes of warmup_seq_len tokens,
  # the phase's lengths scaled to them (`config_lib.warmup_config`); 0: off.
  c.data.warmup_seq_len = 0
  c.data.warmup_steps = 0
  # The files of a source that reads them: what each takes is its class's `paths`
  # (`smt_jax.data.DataPaths`); "" = what it reads without (text: the built-in corpus).
  c.data.path = ""
  c.data.eval_path = ""  # the evaluation data ("" = held out from data.path)
  # Each dataset's own options, its constructor's keyword arguments (data.name's are passed):
  # e.g. data.options.stack.max_depth, data.options.text.encoding.
  c.data.options = {name: data_options(name) for name in data.DATASETS}

  c.model = ml_collections.ConfigDict()
  c.model.rnn_kind = "transformer"  # a key of smt_jax.models.RNN_KINDS
  # "windowed": m_t = E(x[t-Tc+1 .. t]), one encoder pass per memory (the paper's and the
  # reference's); "causal": a causal encoder labels every memory of a sequence in one pass, its
  # attention windowed to the last smt.context_length tokens (smt_jax.models.CausalTeacher).
  c.model.teacher_kind = "windowed"
  c.model.width = 256  # d: model width = memory token width
  c.model.num_memory_tokens = 16  # K
  c.model.num_heads = 8
  c.model.head_dim = 64  # per head, whatever the width (the reference's); 0: width // num_heads
  c.model.encoder_depth = 8
  c.model.decoder_depth = 4
  c.model.rnn_initial_memory = "learned"  # or "zeros" (the reference's)
  # Each RNN kind's own options, read by its constructor (the kind of model.rnn_kind is built):
  # e.g. model.rnn.transformer.depth / readout_depth, model.rnn.mlp.hidden (0: K * d).
  c.model.rnn = {kind: rnn_options(kind) for kind in RNN_KINDS}
  c.model.attention = "auto"  # "xla" (jax.nn.dot_product_attention), "explicit"; auto: CPU explicit
  c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)

  c.optim = ml_collections.ConfigDict()
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.01
  c.optim.decay_all = False  # True: decay biases and norm gains too (the reference's AdamW)
  c.optim.clip_norm = 1.0  # global-norm clip, per model
  c.optim.warmup_frac = 0.01
  # Each optimiser step as k micro-batches of batch_size / k rows, run one after another and their
  # gradients averaged before the clip (the reference's grad_accum_steps): a k-th of the memory.
  c.optim.grad_accum_steps = 1

  c.smt = ml_collections.ConfigDict()
  c.smt.steps = 150_000
  c.smt.batch_size = 128
  c.smt.lr = 3e-4
  c.smt.schedule = "constant"  # after the warm-up: "constant" or "cosine" (decay to 0)
  c.smt.context_length = 256  # Tc
  c.smt.future_length = 64  # Tf; streams train on T = Tc + Tf
  c.smt.num_transitions = 1  # 1: t = Tc-1 (published); T: all; else a random subset
  # Decoder work per sequence: 0 decodes every source memory (published); n decodes n memories,
  # those whose future window holds a target first (windows without one are an exact zero).
  c.smt.num_decoded = 0
  c.smt.c_dec = 1.0
  c.smt.c_dyn = 0.1
  c.smt.c_unif = 0.001
  c.smt.c_init = 0.1  # L_init: RNN initial memory -> E(empty) (not in the reference)
  c.smt.c_readout = 1.0  # L_readout: RNN readout on teacher memories (not in the reference)
  c.smt.gamma = 1.0
  c.smt.stop_teacher_grad = False
  c.smt.uniformity_max_samples = 512
  c.smt.uniformity_over = "tokens"
  c.smt.copy_decoder_to_readout = True  # transformer RNN: readout takes the decoder's weights

  c.dmt = ml_collections.ConfigDict()
  c.dmt.steps = 1_500
  c.dmt.batch_size = 32
  c.dmt.lr = 3e-5
  c.dmt.schedule = "cosine"
  c.dmt.rollout_length = 256  # Td; streams train on T = Tc + Td + Tf
  c.dmt.label_every = 16  # k
  c.dmt.c_dyn = 10.0
  c.dmt.c_readout = 1.0
  c.dmt.stop_carry_grad = False  # gradients through the rollout (reference); True: imitation
  c.dmt.reference_labels = False  # True: labels s = 0, k, .., Td-k and Td readouts (reference)
  # Episodes: the rollout starts from the RNN's own initial memory, where its evaluation and
  # sampling start (False: the teacher's E(empty)). Streams: the next field.
  c.dmt.from_rnn_initial_memory = True
  # Streams: True rolls out from the RNN's own initial memory before a crop's first token, where
  # the RNN alone is evaluated (eval/rnn_nll) and sampled, on crops of Td tokens; False
  # (published) from the teacher's memory of the crop's first Tc tokens, as the prompted
  # evaluation starts, on crops of Tc + Td + Tf.
  c.dmt.streams_from_rnn_initial_memory = False
  # 'parallel': the rollout (and its adjoint) by quasi-Newton iterations in parallel over time
  # (`smt_jax.parallel_rollout`): the same loss and gradients to parallel_tol, in at most Td
  # iterations; jacobian 'none' (Picard: measured the better on the trained RNNs here,
  # docs/benchmarks.md) or 'diag' (quasi-DEER, K d JVPs per state); damping shrinks the diagonal.
  # The runner's seqflops axis still counts the sequential rollout (the parallel one's depends on
  # the iterations: `python -m experiments.rollout_check`).
  c.dmt.rollout = "sequential"
  c.dmt.parallel_jacobian = "none"
  c.dmt.parallel_damping = 0.0
  c.dmt.parallel_tol = 1e-5

  c.bptt = ml_collections.ConfigDict()
  c.bptt.steps = 150_000
  c.bptt.batch_size = 128
  c.bptt.lr = 3e-4
  c.bptt.schedule = "constant"
  c.bptt.seq_len = 320  # streams only (episodic sources use data.seq_len)
  c.bptt.truncation = 0  # 0: full BPTT; k: cut the gradient every k steps

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 2_000
  c.eval.first_step = 0  # one more eval after this many steps of each phase (0: none)
  c.eval.batch_size = 64
  c.eval.num_batches = 4
  c.eval.seq_len = 512  # streams only
  c.eval.prompt_length = 128  # eval/rnn_prompted_nll starts from E(first prompt_length tokens)

  c.samples = ml_collections.ConfigDict()
  c.samples.num = 16
  c.samples.temperature = 1.0
  c.samples.at_eval = True  # samples to TensorBoard at every eval, not only at the end

  # Weights & Biases mirror of the config, metrics and samples (off while project is "";
  # needs `pip install wandb`). mode: "" (WANDB_MODE decides), "online", "offline", "disabled".
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ""
  c.wandb.entity = ""
  c.wandb.name = ""  # "" : the workdir's name
  c.wandb.mode = ""

  c.log_every_steps = 100
  c.checkpoint_every_steps = 1_000
  c.keep_checkpoints = 3
  c.nan_policy = "stop"  # "stop": halt naming the step and term; "skip": skip the update, count it

  # A jax.profiler trace of profile.num_steps train steps from global step profile.start_step,
  # written to <workdir>/profile (TensorBoard's profile plugin, or Perfetto); 0 steps: off.
  c.profile = ml_collections.ConfigDict()
  c.profile.start_step = 10
  c.profile.num_steps = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: every device not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.time = 1  # SMT's time axis: the vmapped transitions split across devices
  # fsdp shards only arrays of at least this many elements (smaller ones, e.g. biases and norm
  # gains, stay replicated); 0: every array with a dimension that divides evenly.
  c.mesh.fsdp_min_size = 2**14
  return c


def complete(config) -> ml_collections.ConfigDict:
  """`config` with every field it lacks taken from `default()`, the fields it has kept as they are:
  a config saved by an older version (a run's config.json) reads as one of today's (its fields
  since moved read where they are now: `migrate`). The one place where such configs are patched;
  the builders and checks call it, so they read every field directly."""

  def merge(full: dict, given: dict) -> dict:
    for k, v in given.items():
      full[k] = merge(full[k], v) if isinstance(v, dict) and isinstance(full.get(k), dict) else v
    return full

  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  return ml_collections.ConfigDict(merge(default().to_dict(), migrate(given)))


def data_options(name: str) -> ml_collections.ConfigDict:
  """The dataset's options section: its defaults, an option whose default is None typed by its
  annotation (so the command line can set it: `--config.data.options.text.cache_dir=/tmp/c`)."""
  section = ml_collections.ConfigDict()
  for k, v in data.source_options(name).items():
    if v is None:
      hint = typing.get_type_hints(data.DATASETS[name].__init__).get(k)
      kind = next(t for t in typing.get_args(hint) + (str,) if t is not type(None))
      v = ml_collections.config_dict.placeholder(typing.get_origin(kind) or kind)
    section[k] = v
  return section


# Fields an older version had, and where each kind's options hold them now.
_MOVED_RNN_FIELDS = {
  "rnn_depth": {"transformer": "depth", "mlp": "depth"},
  "readout_depth": {"transformer": "readout_depth"},
  "rnn_hidden": {"mlp": "hidden", "gru": "hidden", "elman": "hidden", "lstm": "hidden"},
}


def migrate(config_json: dict) -> dict:
  """A config (as a dict) saved by an older version, with the fields it names that have since
  moved put where they are now (and nothing else added): its `model.rnn_depth`,
  `model.readout_depth` and `model.rnn_hidden` become the kinds' options `model.rnn.<kind>.*`,
  and `data.options` of the chosen dataset alone (`{'max_depth': 10}`) its section
  `data.options.<data.name>` (every dataset's section then at its defaults, as it was)."""
  d = config_json.get("data")
  if isinstance(d, dict) and isinstance(d.get("options"), dict):
    options = d["options"]
    if any(not isinstance(v, dict) for v in options.values()):  # one source's option values
      sections = {name: data.source_options(name) for name in data.DATASETS}
      sections[d.get("name")] = dict(sections.get(d.get("name"), {}), **options)
      config_json = dict(config_json, data=dict(d, options=sections))
  model = config_json.get("model")
  if not isinstance(model, dict) or not set(_MOVED_RNN_FIELDS) & set(model):
    return config_json
  model = dict(model)
  rnn = {kind: dict(options) for kind, options in dict(model.get("rnn") or {}).items()}
  for old, new in _MOVED_RNN_FIELDS.items():
    if old in model:
      value = model.pop(old)
      for kind, name in new.items():
        rnn.setdefault(kind, rnn_options(kind))[name] = value
  return dict(config_json, model=dict(model, rnn=rnn))


# ---------------------------------------------------------------------------------------------
# Accessors: what a config says, read the one way every builder and check reads it.

PHASES = ("smt", "dmt", "bptt")

# On a token stream, the config fields whose sum is each phase's sequence length T
# (docs/method.md 5); an episodic source has one length for every phase, data.seq_len.
_LENGTH_FIELDS = {
  "smt": ("smt.context_length", "smt.future_length"),
  "dmt": ("smt.context_length", "dmt.rollout_length", "smt.future_length"),
  "bptt": ("bptt.seq_len",),
  "eval": ("eval.seq_len",),
}


def get_field(config, name: str):
  """config['a']['b'] for name 'a.b'."""
  value = config
  for part in name.split("."):
    value = value[part]
  return value


def fsdp_min_size(config) -> int:
  """config.mesh.fsdp_min_size; the default for a config saved before that field existed."""
  return config.mesh.fsdp_min_size


def phase_names(config) -> list[str]:
  """The phases of `config.phases` in order ('smt,dmt' -> ['smt', 'dmt']); not validated."""
  return [p.strip() for p in config.phases.split(",") if p.strip()]


def length_fields(config, phase: str) -> tuple[str, ...]:
  """The config fields that set the sequence length of `phase` (or 'eval')."""
  if config.data.episodic:
    return ("data.seq_len",)
  if phase == "dmt" and dmt_start(config)[0] == -1:  # a stream's rollout from the initial memory
    return ("dmt.rollout_length",)
  return _LENGTH_FIELDS[phase]


def dmt_start(config) -> tuple[int | None, bool]:
  """Where DMT's rollout starts: `objectives.dmt_loss`'s (start, from_rnn_initial_memory).

  Episodes start before their first token (-1): from the RNN's own initial memory
  (dmt.from_rnn_initial_memory) or the teacher's E(empty). Streams start from the teacher's
  memory of a crop's first Tc tokens (None: t0 = Tc-1, published) or, with
  dmt.streams_from_rnn_initial_memory, before the crop's first token from the RNN's own initial
  memory: where the RNN alone is evaluated and sampled."""
  d = config.dmt
  if config.data.episodic:
    return -1, bool(d.from_rnn_initial_memory)
  if d.streams_from_rnn_initial_memory:
    return -1, True
  return None, False


def phase_seq_len(config, phase: str) -> int:
  """The sequence length T that `phase` (or 'eval') trains or evaluates on."""
  return sum(get_field(config, f) for f in length_fields(config, phase))


def training_tokens(config) -> int:
  """Training tokens over every phase of `config`: steps x batch x sequence length, summed (the
  first phase's warm-up steps on their shorter episodes)."""
  names = phase_names(config)
  total = sum(config[p].steps * config[p].batch_size * phase_seq_len(config, p) for p in names)
  w, t0 = warmup(config)
  if w and names:
    total -= w * config[names[0]].batch_size * (phase_seq_len(config, names[0]) - t0)
  return total


def warmup(config) -> tuple[int, int]:
  """(data.warmup_steps, data.warmup_seq_len): (0, 0) when off (or in a config saved before)."""
  d = config.data
  w, t0 = d.warmup_steps, d.warmup_seq_len
  return (w, t0) if w and t0 else (0, 0)


def warmup_config(config):
  """The config of the length curriculum's first steps (the first phase's): episodes of
  data.warmup_seq_len, SMT's context, future and transitions scaled to them (Tc and the
  transitions capped at T0, Tf in proportion, every transition kept when all were trained)."""
  c = config.copy_and_resolve_references()
  t, (_, t0) = c.data.seq_len, warmup(c)
  s = c.smt
  s.num_transitions = t0 if s.num_transitions == t else min(s.num_transitions, t0)
  s.context_length = min(s.context_length, t0)
  s.future_length = max(1, s.future_length * t0 // t)
  s.num_decoded = min(s.num_decoded, t0 + 1)
  c.data.seq_len = t0
  c.data.warmup_seq_len = c.data.warmup_steps = 0
  c.phases = phase_names(c)[0]  # the phase the warm-up is in
  return c


def grad_accum_steps(config) -> int:
  """`optim.grad_accum_steps` (1 for configs saved before it existed)."""
  return config.optim.grad_accum_steps


# ---------------------------------------------------------------------------------------------
# Checks.

# Config fields that feed a source's constructor arguments (so they may not be given as options).
_SOURCE_ARGS_FROM_CONFIG = {
  "seq_len": "data.seq_len (episodic sources) or the phases' lengths",
  "path": "data.path",
  "eval_path": "data.eval_path",
}


class ConfigError(ValueError):
  """A config field has a value the run cannot use."""


def _fail(field: str, value, fix: str) -> None:
  raise ConfigError(f"config.{field} = {value!r}: {fix}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(c, field: str) -> None:
  v = get_field(c, field)
  if not _is_int(v) or v < 1:
    _fail(field, v, "must be a positive integer.")


def _number_in(
  c, field: str, lo: float, hi: float, *, lo_open=False, hi_open=True, why: str = ""
) -> None:
  v = get_field(c, field)
  ok = (
    isinstance(v, (int, float))
    and not isinstance(v, bool)
    and math.isfinite(v)
    and (v > lo if lo_open else v >= lo)
    and (v < hi if hi_open else v <= hi)
  )
  if not ok:
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _fail(field, v, f"must be a number in {interval}{'; ' + why if why else ''}.")


def validate_phases(config) -> list[str]:
  """The phases of `config.phases`, each known and named once."""
  phases = phase_names(config)
  if not phases:
    _fail("phases", config.phases, "no phase to run; e.g. --config.phases=smt,dmt.")
  for p in phases:
    if p not in PHASES:
      _fail(
        "phases",
        config.phases,
        f"unknown phase {p!r}; valid phases: {list(PHASES)} (e.g. "
        f"--config.phases=smt,dmt or --config.phases=bptt).",
      )
    if phases.count(p) > 1:
      _fail(
        "phases",
        config.phases,
        f"{p} is listed twice; each phase has one config section (config.{p}): list it once.",
      )
  return phases


def _validate_wandb(c) -> None:
  """The optional Weights & Biases mirror: its package only when asked for (no import here)."""
  w = c.wandb
  if not w.project:
    return
  if w.mode not in ("", "online", "offline", "disabled"):
    _fail("wandb.mode", w.mode, "use '' (WANDB_MODE decides), 'online', 'offline' or 'disabled'.")
  if importlib.util.find_spec("wandb") is None:
    _fail(
      "wandb.project",
      w.project,
      "wandb is not installed: pip install wandb (or pip install -e '.[wandb]'), or leave "
      "wandb.project empty.",
    )


def validate(config, *, check_paths: bool = True) -> None:
  """Checks the config on its own (no data loaded, no devices touched).

  check_paths: whether data paths must exist here (False: they name files on another machine).
  """
  c = complete(config)
  phases = validate_phases(c)
  if not _is_int(c.seed) or c.seed < 0:
    _fail("seed", c.seed, "must be a non-negative integer.")
  if c.data.name not in data.DATASETS:
    _fail("data.name", c.data.name, f"unknown dataset; valid names: {sorted(data.DATASETS)}.")
  if c.model.rnn_kind not in RNN_KINDS:
    _fail(
      "model.rnn_kind", c.model.rnn_kind, f"unknown RNN kind; valid kinds: {sorted(RNN_KINDS)}."
    )
  for f in (
    "model.width",
    "model.num_memory_tokens",
    "model.num_heads",
    "model.encoder_depth",
    "model.decoder_depth",
    "eval.batch_size",
    "eval.num_batches",
    "keep_checkpoints",
    "samples.num",
  ):
    _positive_int(c, f)
  for f in ("log_every_steps", "checkpoint_every_steps", "eval.every_steps"):
    v = get_field(c, f)
    if not _is_int(v) or v < 0:
      _fail(f, v, "a period is a number of steps >= 0 (0: never).")
  if not _is_int(c.eval.first_step) or c.eval.first_step < 0:
    _fail("eval.first_step", c.eval.first_step, "a number of steps >= 0 (0: no early eval).")
  _validate_rnn_options(c)
  _validate_heads(c)
  if c.model.attention not in ("auto", "xla", "explicit"):
    _fail(
      "model.attention",
      c.model.attention,
      "use 'auto' (explicit on CPU, jax.nn.dot_product_attention elsewhere), 'xla' or 'explicit'.",
    )
  if c.model.teacher_kind not in TEACHER_KINDS:
    _fail(
      "model.teacher_kind",
      c.model.teacher_kind,
      f"use one of {sorted(TEACHER_KINDS)} ('windowed': the paper's; 'causal': every memory of a "
      f"sequence in one pass).",
    )
  if c.model.rnn_initial_memory not in ("learned", "zeros"):
    _fail(
      "model.rnn_initial_memory",
      c.model.rnn_initial_memory,
      "use 'learned' (trained towards E(empty) by smt.c_init) or 'zeros' (the reference's).",
    )
  if c.model.dtype not in ("float32", "bfloat16", "float16"):
    _fail("model.dtype", c.model.dtype, "use float32, bfloat16 or float16.")
  if c.nan_policy not in ("stop", "skip"):
    _fail("nan_policy", c.nan_policy, "use 'stop' or 'skip'.")
  _number_in(c, "samples.temperature", 0.0, math.inf, lo_open=True)
  _validate_wandb(c)
  if not isinstance(c.samples.at_eval, bool):
    _fail("samples.at_eval", c.samples.at_eval, "use True (samples at every eval) or False.")
  _validate_optim(c)
  _validate_data(c, check_paths=check_paths)
  try:
    sharding.check_mesh_spec(mesh_axes(c))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  v = fsdp_min_size(c)
  if not _is_int(v) or v < 0:
    _fail(
      "mesh.fsdp_min_size",
      v,
      "the size (in elements) from which fsdp shards an array: an integer >= 0 (0: every array).",
    )

  k = grad_accum_steps(c)
  if not _is_int(k) or k < 1:
    _fail("optim.grad_accum_steps", k, "micro-batches per optimiser step: an integer >= 1.")
  for p in phases:
    _positive_int(c, f"{p}.steps")
    _positive_int(c, f"{p}.batch_size")
    _number_in(c, f"{p}.lr", 0.0, math.inf, lo_open=True)
    schedule = c[p].schedule
    if schedule not in ("constant", "cosine"):
      _fail(f"{p}.schedule", schedule, "use 'constant' or 'cosine' (after the linear warm-up).")
  if "smt" in phases or "dmt" in phases:
    _positive_int(c, "smt.context_length")
    _positive_int(c, "smt.future_length")
  if "smt" in phases:
    _validate_smt(c)
  if "dmt" in phases:
    if "smt" not in phases[: phases.index("dmt")]:
      _fail(
        "phases",
        c.phases,
        "dmt imitates the teacher that smt trains; without an smt phase "
        "before it the teacher is untrained. Use --config.phases=smt,dmt.",
      )
    _validate_dmt(c)
  if "bptt" in phases:
    if not c.data.episodic:
      _positive_int(c, "bptt.seq_len")
    if not _is_int(c.bptt.truncation) or c.bptt.truncation < 0:
      _fail("bptt.truncation", c.bptt.truncation, "0 for full BPTT, or a positive window.")
  if not c.data.episodic:
    _positive_int(c, "eval.seq_len")
  t = phase_seq_len(c, "eval")
  if not _is_int(c.eval.prompt_length) or not 0 <= c.eval.prompt_length < t:
    _fail(
      "eval.prompt_length",
      c.eval.prompt_length,
      f"must be in [0, eval sequence length {t}); 0 turns prompted eval off.",
    )
  _validate_profile(c, phases)
  _validate_warmup(c, phases, check_paths=check_paths)
  _validate_fields(c)  # last: the checks above say more of the fields they know (mesh axes)


def _validate_warmup(c, phases: list[str], *, check_paths: bool) -> None:
  """The length curriculum: episodes, shorter ones, within the first phase, and the short steps'
  config valid too (its errors named as the warm-up's)."""
  d = c.data
  w, t0 = d.warmup_steps, d.warmup_seq_len
  for f, v in (("data.warmup_steps", w), ("data.warmup_seq_len", t0)):
    if not _is_int(v) or v < 0:
      _fail(f, v, "an integer >= 0 (0: no length curriculum).")
  if not w and not t0:
    return
  if not (w and t0):
    _fail(
      "data.warmup_steps" if t0 else "data.warmup_seq_len",
      w if t0 else t0,
      "set data.warmup_steps and data.warmup_seq_len together (both 0: no length curriculum).",
    )
  if not d.episodic:
    _fail("data.warmup_seq_len", t0, f"{d.name} is a stream: the curriculum shortens episodes.")
  if not 2 <= t0 < d.seq_len:
    _fail("data.warmup_seq_len", t0, f"must be in [2, data.seq_len = {d.seq_len}).")
  first = phases[0]
  if w > c[first].steps:
    _fail(
      "data.warmup_steps",
      w,
      f"must be at most the first phase's steps ({first}.steps = {c[first].steps}).",
    )
  try:
    validate(warmup_config(c), check_paths=check_paths)
  except ConfigError as e:
    raise ConfigError(f"{e} (in the warm-up, on episodes of data.warmup_seq_len = {t0})") from None


# Sections whose keys are the datasets' and the RNN kinds' options (checked by their signatures).
_OPEN_SECTIONS = ("data.options", "model.rnn")


def _validate_fields(c) -> None:
  """Every field is one `default()` has: a misspelt one (`c.model.update(rnn_dept=2)`, a field
  set in a recipe that no longer exists) would otherwise be ignored."""

  def walk(given: dict, known: dict, prefix: str) -> None:
    for k, v in given.items():
      field = prefix + k
      if field in _OPEN_SECTIONS:
        continue
      if k not in known:
        near = difflib.get_close_matches(k, list(known), n=1)
        hint = f"did you mean {prefix}{near[0]}?" if near else f"the fields there: {sorted(known)}."
        _fail(field, v, f"no such config field; {hint}")
      if isinstance(v, dict) and isinstance(known[k], dict):
        walk(v, known[k], field + ".")

  walk(c.to_dict(), default().to_dict(), "")


def _check_options(section: str, owner: str, given, options: dict, shared: str) -> None:
  """`given` (a section of `owner`'s options) holds only names of `options`, each of its
  default's type (an int where a float is, any where the default is None)."""
  for name, value in given.items():
    if name not in options:
      _fail(
        f"{section}.{name}",
        value,
        f"{owner} takes no such option; its options are {sorted(options)} (the shared ones "
        f"are {shared}).",
      )
    default = options[name]
    if default is not None and not (
      type(value) is type(default) or (type(default) is float and type(value) is int)
    ):
      _fail(
        f"{section}.{name}", value, f"must be of type {type(default).__name__}, like {default!r}."
      )


def _validate_rnn_options(c) -> None:
  """The chosen kind's options (`model.rnn.<kind>`): the names and types its constructor takes,
  and the values it accepts."""
  kind = c.model.rnn_kind
  section = f"model.rnn.{kind}"
  given = c.model.rnn[kind]  # complete() gave every registered kind its section
  _check_options(section, kind, given, rnn_options(kind), "model.*")
  try:
    RNN_KINDS[kind].check_options(**given)
  except ValueError as e:
    raise ConfigError(f"config.{section}: {e}") from None


def _validate_optim(c) -> None:
  _number_in(c, "optim.b1", 0.0, 1.0)
  _number_in(c, "optim.b2", 0.0, 1.0)
  _number_in(c, "optim.weight_decay", 0.0, math.inf)
  _number_in(c, "optim.clip_norm", 0.0, math.inf, lo_open=True)
  _number_in(c, "optim.warmup_frac", 0.0, 1.0, why="the fraction of a phase spent warming up")


def _validate_profile(c, phases: list[str]) -> None:
  for f in ("profile.start_step", "profile.num_steps"):
    v = get_field(c, f)
    if not _is_int(v) or v < 0:
      _fail(f, v, "a number of steps >= 0 (profile.num_steps=0: no trace).")
  total = sum(c[p].steps for p in phases)
  if c.profile.num_steps and c.profile.start_step >= total:
    _fail(
      "profile.start_step",
      c.profile.start_step,
      f"the run has {total} steps in all ({' + '.join(f'{p}.steps' for p in phases)}), so no "
      f"trace would be written; use a global step < {total} (a few steps in, past compilation).",
    )


def _validate_data(c, *, check_paths: bool = True) -> None:
  d = c.data
  constructor = data.DATASETS[d.name]
  is_stream = issubclass(constructor, data.StreamSource)
  if d.episodic == is_stream:
    _fail(
      "data.episodic",
      d.episodic,
      f"{d.name} is {'a token stream (random crops)' if is_stream else 'episodic'}; set "
      f"--config.data.episodic={not is_stream}.",
    )
  if d.episodic:
    if not _is_int(d.seq_len) or d.seq_len < 2:
      _fail("data.seq_len", d.seq_len, "the episode length T must be an integer >= 2.")
  elif d.seq_len:
    _fail(
      "data.seq_len",
      d.seq_len,
      f"{d.name} is a stream: its lengths are smt.context_length + smt.future_length (SMT), "
      f"+ dmt.rollout_length (DMT), bptt.seq_len and eval.seq_len; set data.seq_len=0.",
    )
  for name, section in d.options.items():
    if name not in data.DATASETS:
      near = difflib.get_close_matches(name, list(data.DATASETS), n=1)
      _fail(
        f"data.options.{name}",
        section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section,
        f"no such dataset; {f'did you mean {near[0]}?' if near else sorted(data.DATASETS)}",
      )
  given = d.options[d.name]  # complete() gave every dataset its section
  for k, v in given.items():
    if k in _SOURCE_ARGS_FROM_CONFIG:
      _fail(f"data.options.{d.name}.{k}", v, f"set it through {_SOURCE_ARGS_FROM_CONFIG[k]}.")
  _check_options(f"data.options.{d.name}", d.name, given, data.source_options(d.name), "data.*")
  _validate_path(d.name, constructor.paths, d.path, check_exists=check_paths)
  _validate_eval_path(d.name, constructor.paths, d.path, d.eval_path, check_exists=check_paths)


def _validate_path(name: str, paths, path: str, *, check_exists: bool = True) -> None:
  """`data.path` against what the source reads (`paths`, its `data.DataPaths`)."""
  if paths is None:
    if path:
      readers = sorted(n for n, s in data.DATASETS.items() if s.paths)
      _fail(
        "data.path",
        path,
        f"{name} reads no files, so this path would be ignored; remove it (data.path is for "
        f"{readers}).",
      )
    return
  needs = f"{name} needs {paths.what}" + (
    f' (or "" for {paths.when_empty})' if paths.when_empty else ""
  )
  if not path:
    if not paths.when_empty:
      _fail("data.path", path, f"{needs}: --config.data.path=...")
    return
  if data.files.is_remote(path):
    if not paths.hub:
      _fail("data.path", path, f"hf:// paths are for {_hub_readers()}; {needs}.")
    return  # fetched (or found in the hub's cache) when the source is built
  if data.files.is_object_store(path):
    _validate_object_store("data.path", path, check_exists=check_exists)
    return  # staged when the source is built
  if not check_exists:
    return
  if not os.path.exists(path):
    _fail("data.path", path, f"does not exist; {needs}.")
  if paths.folder and not os.path.isdir(path):
    _fail("data.path", path, f"is not a folder; {needs}.")
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    _fail("data.path", path, "is an empty file; point it at the data.")
  if os.path.isdir(path) and not any(
    not f.startswith(".") for _, _, names in os.walk(path) for f in names
  ):
    _fail("data.path", path, f"is a folder with no files in it; {needs}.")


def _hub_readers() -> str:
  return ", ".join(sorted(n for n, s in data.DATASETS.items() if s.paths and s.paths.hub))


def _validate_eval_path(name: str, paths, path: str, eval_path: str, *, check_exists=True) -> None:
  if not eval_path:
    return
  if paths is None or not paths.eval_what:
    readers = sorted(n for n, s in data.DATASETS.items() if s.paths and s.paths.eval_what)
    _fail(
      "data.eval_path",
      eval_path,
      f"{name} takes no separate evaluation data (data.eval_path is for {readers}); remove it.",
    )
  if not path:
    _fail("data.eval_path", eval_path, "set data.path (the training data) too.")
  if data.files.is_remote(eval_path):
    if not paths.hub:
      _fail(
        "data.eval_path", eval_path, f"hf:// paths are for {_hub_readers()}; use a local folder."
      )
    return
  if data.files.is_object_store(eval_path):
    _validate_object_store("data.eval_path", eval_path, check_exists=check_exists)
    return
  if check_exists and not os.path.exists(eval_path):
    _fail("data.eval_path", eval_path, f"does not exist; it must be {paths.eval_what}.")


def _validate_object_store(field: str, url: str, *, check_exists: bool) -> None:
  """An object-store data URL, when it is read from here: its store reachable from this install
  and the file or folder there (not checked for a launch: it names data the target reads)."""
  if not check_exists:
    return
  try:
    storage.check_reachable(url, field=f"config.{field}")
  except storage.StorageError as e:
    raise ConfigError(str(e)) from None
  if not storage.exists(url):
    _fail(field, url, "does not exist; point it at the data (a file or a folder of files).")


def _validate_smt(c) -> None:
  s = c.smt
  t = phase_seq_len(c, "smt")
  if c.data.episodic:
    for f, v in (("smt.context_length", s.context_length), ("smt.future_length", s.future_length)):
      if v > t:
        _fail(
          f,
          v,
          f"longer than the episode (data.seq_len = {t}): the windows would be padding "
          f"past T; set it <= {t}.",
        )
  if not _is_int(s.num_transitions) or not 1 <= s.num_transitions <= t:
    _fail(
      "smt.num_transitions",
      s.num_transitions,
      f"must be in [1, T = {t}] (1: the published single transition; {t}: every one).",
    )
  if s.num_transitions == 1 and t < s.context_length + 1:
    _fail(
      "smt.context_length",
      s.context_length,
      f"num_transitions=1 uses t = Tc-1 and input x[Tc], so Tc must be < T = {t}.",
    )
  encoded = t + 1 if s.num_transitions == t else s.num_transitions
  nd = s.num_decoded
  if not _is_int(nd) or not 0 <= nd <= encoded:
    _fail(
      "smt.num_decoded",
      nd,
      f"must be in [0, {encoded}] (the memories encoded per sequence; 0: every source memory).",
    )
  if s.uniformity_over not in ("tokens", "states"):
    _fail("smt.uniformity_over", s.uniformity_over, "use 'tokens' or 'states'.")
  if not _is_int(s.uniformity_max_samples) or s.uniformity_max_samples < 2:
    _fail("smt.uniformity_max_samples", s.uniformity_max_samples, "must be an integer >= 2.")
  _number_in(
    c,
    "smt.gamma",
    0.0,
    math.inf,
    lo_open=True,
    why="the discount of future steps (1 weighs every one equally)",
  )
  for f in ("c_dec", "c_dyn", "c_init", "c_unif", "c_readout"):
    _number_in(c, f"smt.{f}", 0.0, math.inf, why="a loss weight (0 turns the term off)")
  if s.c_init and c.model.rnn_initial_memory == "zeros":
    _fail(
      "smt.c_init",
      s.c_init,
      "a zero initial memory has nothing to train: set smt.c_init=0 "
      "or model.rnn_initial_memory='learned'.",
    )


def _validate_heads(c) -> None:
  m = c.model
  if not _is_int(m.head_dim) or m.head_dim < 0:
    _fail(
      "model.head_dim", m.head_dim, "must be >= 0 (64: the reference's; 0: width // num_heads)."
    )
  if not m.head_dim and m.width % m.num_heads:
    _fail(
      "model.width",
      m.width,
      f"with model.head_dim=0 the heads split the width: use a "
      f"multiple of model.num_heads = {m.num_heads}.",
    )
  width = head_width(m.width, m.num_heads, m.head_dim)
  if width % 4:
    why = (
      "the head width must be a multiple of 4 (rotary embedding turns pairs in the first "
      "half of each head)"
    )
    if m.head_dim:
      _fail("model.head_dim", m.head_dim, why + ".")
    _fail(
      "model.width",
      m.width,
      f"with model.head_dim=0 each head is model.width / "
      f"model.num_heads = {m.width // m.num_heads} wide: {why}.",
    )
  if m.num_heads == 1 and width != m.width:
    _fail(
      "model.head_dim",
      m.head_dim,
      f"one head has no output projection (as in the "
      f"reference): its width must equal model.width = "
      f"{m.width}; use more heads or model.head_dim=0.",
    )


def _validate_dmt(c) -> None:
  d = c.dmt
  _positive_int(c, "dmt.rollout_length")
  _positive_int(c, "dmt.label_every")
  if d.rollout_length % d.label_every:
    _fail(
      "dmt.label_every",
      d.label_every,
      f"must divide dmt.rollout_length = {d.rollout_length} (labels every k steps).",
    )
  if c.data.episodic and d.streams_from_rnn_initial_memory:
    _fail(
      "dmt.streams_from_rnn_initial_memory",
      True,
      "token streams only; an episode's rollout starts as dmt.from_rnn_initial_memory says.",
    )
  if c.data.episodic and d.rollout_length > c.data.seq_len:
    _fail(
      "dmt.rollout_length",
      d.rollout_length,
      f"episodic rollouts start at the initial memory: at most data.seq_len = {c.data.seq_len}.",
    )
  for f in ("c_dyn", "c_readout"):
    _number_in(c, f"dmt.{f}", 0.0, math.inf, why="a loss weight (0 turns the term off)")
  if d.rollout not in ("sequential", "parallel"):
    _fail("dmt.rollout", d.rollout, "use 'sequential' (lax.scan) or 'parallel' (fixed-point).")
  if d.rollout == "parallel":
    if d.parallel_jacobian not in parallel.JACOBIANS:
      _fail(
        "dmt.parallel_jacobian",
        d.parallel_jacobian,
        "use 'none' (Picard iterations) or 'diag' (quasi-DEER: the Jacobian's diagonal).",
      )
    _number_in(c, "dmt.parallel_damping", 0.0, math.inf, why="the diagonal is divided by 1 + it")
    _number_in(
      c,
      "dmt.parallel_tol",
      0.0,
      1.0,
      lo_open=True,
      why="the iterations' relative change to stop at",
    )
  if d.reference_labels and d.rollout_length < 2 * d.label_every:
    _fail(
      "dmt.label_every",
      d.label_every,
      f"with dmt.reference_labels the labels are s = 0, k, .., Td-k: use k <= Td / 2 = "
      f"{d.rollout_length // 2} so that at least one labels a state the RNN wrote.",
    )


def mesh_axes(config) -> dict[str, int]:
  """The axis sizes of config.mesh ({axis: size}), without its other fields (fsdp_min_size)."""
  return {k: v for k, v in config.mesh.items() if k != "fsdp_min_size"}


def make_mesh(config) -> jax.sharding.Mesh:
  """The mesh of config.mesh on this job's devices; ConfigError when they do not fit."""
  try:
    return sharding.make_mesh(mesh_axes(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_with_mesh(config, mesh) -> None:
  """Batch sizes must split over the batch axes and processes, SMT's transitions over `time`."""
  _validate_mesh_shape(config, dict(mesh.shape), jax.process_count())


def validate_for_devices(config, *, num_devices: int, num_processes: int = 1) -> dict[str, int]:
  """`validate` and `validate_with_mesh` for a described target, without its devices.

  The seam the launchers use before they create anything: the config is checked as
  `build_experiment` would check it on a job of `num_devices` devices driven by `num_processes`
  processes (e.g. a v5litepod-16: 16 and 4), except for what needs the data (its paths, which
  name files on the target, are not looked up here). Returns the mesh shape the target gets.
  """
  if not _is_int(num_devices) or not _is_int(num_processes) or not 1 <= num_processes:
    raise ValueError(f"num_devices={num_devices!r}, num_processes={num_processes!r}: positive ints")
  if num_devices % num_processes:
    raise ValueError(
      f"num_devices={num_devices} does not split over num_processes={num_processes} (each "
      f"process drives the same number of devices)"
    )
  config = complete(config)
  validate(config, check_paths=False)
  try:
    shape = dict(zip(sharding.AXES, sharding.mesh_shape(mesh_axes(config), num_devices)))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _validate_mesh_shape(config, shape, num_processes)
  return shape


def _validate_mesh_shape(config, shape: dict[str, int], num_processes: int) -> None:
  c = config
  phases = phase_names(c)
  b = shape["data"] * shape["fsdp"]
  n = num_processes
  k = grad_accum_steps(c)
  for p in phases + ["eval"]:
    bs, parts = c[p].batch_size, (1 if p == "eval" else k)
    if bs % (b * parts) or bs % (n * parts):
      each = (
        f"split into optim.grad_accum_steps = {k} micro-batches, each divisible by "
        if parts > 1
        else "divisible by "
      )
      _fail(
        f"{p}.batch_size",
        bs,
        f"must be {each}data x fsdp = {b} devices and by {n} processes "
        f"(config.mesh = {shape}); e.g. {p}.batch_size={_round_up(bs, b * parts, n * parts)}.",
      )
  t = shape["time"]
  if t > 1:
    if "smt" not in phases:
      _fail("mesh.time", t, "the time axis splits SMT's transitions; this run has no SMT phase.")
    nt = c.smt.num_transitions
    if nt % t:
      _fail("smt.num_transitions", nt, f"must be divisible by mesh.time = {t}.")
    nd = c.smt.num_decoded
    if nd % t:
      _fail("smt.num_decoded", nd, f"must be divisible by mesh.time = {t}.")


def _round_up(v: int, *divisors: int) -> int:
  m = math.lcm(*divisors)
  return max(m, -(-v // m) * m)
