"""Recipes the experiment configs share: the reference's published choices, full supervision,
a CPU-sized model and a smoke-test size. Each config file starts from
`smt_jax.runner.config.default()` (every field a run reads) and applies these.
"""

import ml_collections


def reference_recipe(c: ml_collections.ConfigDict) -> None:
  """Every published choice of the reference implementation at once (docs/parity.md).

  The losses are then the reference's `forward_smt` / `forward_dmt` / `forward_bptt`: no L_init and
  no L_readout in SMT (the readout takes the decoder's weights at the end of SMT and learns in
  DMT), DMT labels s = 0, k, .., Td-k with gradients through the rollout, the RNN (and BPTT)
  starting from a zero memory, one transition per sequence, 64-wide heads.
  """
  c.model.head_dim = 64
  c.model.teacher_kind = "windowed"
  c.model.rnn_initial_memory = "zeros"
  c.optim.decay_all = True
  c.smt.num_transitions = 1
  c.smt.num_decoded = 0
  c.smt.schedule, c.dmt.schedule, c.bptt.schedule = "constant", "cosine", "constant"
  c.optim.warmup_frac = 0.01
  c.smt.c_dec, c.smt.c_dyn, c.smt.c_unif = 1.0, 0.1, 0.001
  c.smt.c_init = 0.0
  c.smt.c_readout = 0.0
  c.smt.gamma = 1.0
  c.smt.stop_teacher_grad = False
  c.smt.uniformity_over = "tokens"
  c.smt.uniformity_max_samples = 512
  c.smt.copy_decoder_to_readout = True
  c.dmt.c_dyn, c.dmt.c_readout = 10.0, 1.0
  c.dmt.reference_labels = True
  c.dmt.stop_carry_grad = False
  c.dmt.from_rnn_initial_memory = False  # the rollout starts from the teacher's memory
  c.dmt.streams_from_rnn_initial_memory = False


def full_supervision(c: ml_collections.ConfigDict, seq_len: int, num_decoded: int = 8) -> None:
  """Every memory of a row of `seq_len` tokens trained from one causal-teacher pass,
  `num_decoded` of them decoded (those with a target in their window first), cosine decay after
  a 5% warm-up."""
  c.model.teacher_kind = "causal"
  c.smt.num_transitions = seq_len
  c.smt.num_decoded = min(num_decoded, seq_len + 1)
  c.smt.schedule = c.bptt.schedule = "cosine"
  c.optim.warmup_frac = 0.05


def full_supervision_stream(c: ml_collections.ConfigDict) -> None:
  """The streams' `,full` recipe (pixels.py:digits,full, text.py:small,full): `full_supervision`
  of rows of Tc + Tf tokens with Tf 8 and 16 memories decoded per row, the recipe search's winner
  on both (docs/results.md 0c, 0d: at equal tokens, digits 1.641 against Tf 16 with 8 decoded's
  1.711 nats on 3 seeds, text 1.815 against 2.029 on 2)."""
  c.smt.future_length = 8
  full_supervision(c, c.smt.context_length + c.smt.future_length, num_decoded=16)


def check_recipe_flags(config_file: str, arg: str, flags, recipe_args: tuple[str, ...]) -> None:
  """`,earlier` and `,full` (a stream's recipe before and with full supervision): one at a time,
  and only on the small configs `recipe_args`; the paper-scale ones keep the published recipe."""
  picked = sorted({"earlier", "full"} & set(flags))
  if len(picked) == 2:
    raise ValueError(f"{config_file}: 'earlier' (2 transitions) and 'full' contradict: keep one.")
  if picked and arg not in recipe_args:
    raise ValueError(
      f"{config_file}: 'earlier' and 'full' are for {' and '.join(recipe_args)}; {arg} keeps the "
      f"published recipe (drop {','.join(picked)!r})."
    )


def cpu_model(
  c: ml_collections.ConfigDict, *, width: int = 64, memory_tokens: int = 4, depth: int = 2
) -> None:
  """A small model that trains in minutes on a laptop CPU."""
  c.model.width = width
  c.model.num_memory_tokens = memory_tokens
  c.model.num_heads = 4
  c.model.encoder_depth = depth
  c.model.decoder_depth = 1
  rnn_depth(c, depth, readout_depth=1)


def rnn_depth(
  c: ml_collections.ConfigDict, depth: int, *, readout_depth: int | None = None
) -> None:
  """The RNN's depth (and its readout's) for every kind that has one, whichever the run picks."""
  for options in c.model.rnn.values():
    if "depth" in options:
      options.depth = depth
    if readout_depth is not None and "readout_depth" in options:
      options.readout_depth = readout_depth


def smoke(c: ml_collections.ConfigDict) -> None:
  """A tiny model and a handful of steps of every phase: runs in seconds (used by the tests)."""
  cpu_model(c, width=16, memory_tokens=2, depth=1)
  c.smt.steps, c.dmt.steps, c.bptt.steps = 6, 4, 6
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = c.eval.batch_size = 4
  c.smt.future_length = 4
  c.eval.num_batches = 1
  c.eval.every_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.samples.num = 4
  if not c.data.episodic:  # streams: short windows
    c.smt.context_length = 16
    # Full supervision (a decoded subset) keeps every transition; else two of them.
    c.smt.num_transitions = 16 + c.smt.future_length if c.smt.num_decoded else 2
    c.smt.num_decoded = min(c.smt.num_decoded, 4)
    c.dmt.rollout_length, c.dmt.label_every = 8, 4
    c.bptt.seq_len = c.eval.seq_len = 24
    c.eval.prompt_length = 8
