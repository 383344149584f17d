"""Defaults shared by every experiment config (the published values where they apply:
docs/method.md section 6).

Each config file starts from `base()` and overrides what its experiment needs. Periods are named
with their units (`*_every_steps`); a period of 0 means never.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.phases = "smt,dmt"  # comma-separated, run in order: any of smt, dmt, bptt

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # a key of smt_jax.data.DATASETS
  c.data.episodic = False  # True: independent sequences of data.seq_len (the probes)
  c.data.seq_len = 0  # episodic sources only: the episode length T
  # Episodes: a length curriculum. The first warmup_steps global steps (within the first phase,
  # whichever it is: SMT and BPTT see the same data) train on episodes of warmup_seq_len tokens,
  # the phase's lengths scaled to them (`experiment.warmup_config`); 0: off.
  c.data.warmup_seq_len = 0
  c.data.warmup_steps = 0
  # text: a file, folder or hf:// path ("" = the built-in corpus); mnist: a folder of IDX files
  # ("" = tensorflow-datasets); image_folder: a folder of images; quickdraw: .npy file(s).
  c.data.path = ""
  c.data.eval_path = ""  # text, image_folder: the evaluation data ("" = held out from data.path)
  c.data.options = ml_collections.ConfigDict()  # extra keyword arguments of the source

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
  c.model.rnn_depth = 8
  c.model.readout_depth = 4
  c.model.rnn_initial_memory = "learned"  # or "zeros" (the reference's)
  c.model.rnn_hidden = 0  # mlp / cell readout hidden size (0: K * d)
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
  # sampling start (False: the teacher's E(empty)). Streams start from the teacher's E(window).
  c.dmt.from_rnn_initial_memory = True
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


def full_supervision(c: ml_collections.ConfigDict, seq_len: int) -> None:
  """Every memory of a row of `seq_len` tokens trained from one causal-teacher pass, 8 of them
  decoded (those with a target in their window first), cosine decay after a 5% warm-up."""
  c.model.teacher_kind = "causal"
  c.smt.num_transitions = seq_len
  c.smt.num_decoded = min(8, seq_len + 1)
  c.smt.schedule = c.bptt.schedule = "cosine"
  c.optim.warmup_frac = 0.05


def cpu_model(
  c: ml_collections.ConfigDict, *, width: int = 64, memory_tokens: int = 4, depth: int = 2
) -> None:
  """A small model that trains in minutes on a laptop CPU."""
  c.model.width = width
  c.model.num_memory_tokens = memory_tokens
  c.model.num_heads = 4
  c.model.encoder_depth = depth
  c.model.decoder_depth = 1
  c.model.rnn_depth = depth
  c.model.readout_depth = 1


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
