"""Synthetic probes (docs/method.md 8): retrieval, copy, stack, keys_values, modular, parity.

Argument: `TASK[,T][,earlier][,smoke]`, e.g. `synthetic.py:stack` or `synthetic.py:retrieval,256`.
T is the sequence length (default 64). Every sequence is an independent episode.

The task sizes are the authors' (`config.data.options.<task>`, e.g.
--config.data.options.stack.num_tokens=32):
stack pushes 4 elements to a depth of at most 10, copy reproduces the string reversed, modular
hides (w, b) among 9 functions (difficulty 0.2 at modulus 17).

The recipe trains every memory of an episode from one teacher pass: the one-pass causal teacher
(`model.teacher_kind=causal`) labels all T+1 memories; the RNN's transition term covers every one
of them (num_transitions = T); the decoder reads `smt.num_decoded` = 8 memories per episode, those
whose future window holds a target first (a window without one adds exactly zero to L_dec, so it
is never decoded). Tc = T (each memory sees its whole prefix; set --config.smt.context_length
lower to bound the teacher's attention window on a task whose dependencies are local), Tf = T/2
for retrieval and copy (whose targets lie far from what they recall), 16 for the others. SMT and
BPTT decay their learning rate (cosine) after a 5% warm-up. DMT rolls the RNN out from its own
initial memory over the whole episode, as its evaluation does, for a number of steps that grows
with T (500 at T = 64); BPTT unrolls the whole episode for as many steps as SMT and DMT together,
on the same batch: both methods see the same training tokens.

Learning rates: 1e-3 for SMT and BPTT, 3e-4 for DMT; on stack SMT 3e-3 and DMT 9e-4 (at T = 32
and the default budget SMT->DMT's best of 1e-3, 3e-3 and 1e-2 on every one of 3 seeds, BPTT's best
staying 1e-3: docs/results.md section 0a).

Retrieval longer than 32 tokens trains with a length curriculum (`data.warmup_seq_len` = 32 for
the first `data.warmup_steps` = 500 steps, SMT's lengths scaled to them; BPTT's first 500 steps
see the same short episodes), heads of 16 and learning rate 2e-3, SMT 1000 steps: from scratch at
T = 128 the teacher stayed at chance for 1200 steps, while on 32-token episodes it finds the needle
within 500 and keeps it at T = 128 (docs/results.md, section 0b).

`showcase` (experiments.compare's default, `synthetic.py:retrieval,32,showcase`) trains SMT 500 +
DMT 125 steps against BPTT 625, SMT and BPTT at learning rate 2e-3, with heads of 16 (SMT's step
about twice as fast on a CPU as with the default 64), evaluating every 100 steps: the whole command
took 4 min 20 s on 2 cores (2026-12-04; docs/results.md section 2b).

`earlier` gives the probe settings and recipe used before the authors' (the studies of
docs/results.md that predate the fair race): stack 8 tokens and depth 4, copy forward, modular
modulus 7 with every (w, b); the windowed teacher on every transition with Tf = 8, a constant
learning rate, DMT from the teacher's E(empty) for 500 steps, BPTT 2000 steps.

Commands:
  python -m experiments.run --config=experiments/configs/synthetic.py:retrieval
  python -m experiments.run --config=experiments/configs/synthetic.py:stack,256 \\
      --config.model.rnn_kind=gru
  python -m experiments.run --config=experiments/configs/synthetic.py:copy --config.phases=bptt
  python -m experiments.run --config=experiments/configs/synthetic.py:stack,earlier
  python -m experiments.run --config=experiments/configs/synthetic.py:parity,smoke
"""

from experiments.configs import common
from smt_jax.runner import config as config_lib

RETRIEVAL_WARMUP = 32  # the episode length of retrieval's length curriculum

TASK_OPTIONS = {  # the authors' sizes
  "retrieval": {"num_tokens": 16},
  "copy": {"num_tokens": 8, "reverse": True},
  "stack": {"num_tokens": 4, "max_depth": 10},
  "keys_values": {"num_keys": 8, "num_values": 8},
  "modular": {"modulus": 17, "difficulty": 0.2},
  "parity": {},
}
EARLIER_OPTIONS = {  # `earlier`: the sizes used before the authors'
  "retrieval": {"num_tokens": 16},
  "copy": {"num_tokens": 8},
  "stack": {"num_tokens": 8, "max_depth": 4},
  "keys_values": {"num_keys": 8, "num_values": 8},
  "modular": {"modulus": 7},
  "parity": {},
}
# Tf: a fraction of T (float) or a horizon (int, capped at T).
FUTURE = {
  "retrieval": 0.5,
  "copy": 0.5,
  "stack": 16,
  "keys_values": 16,
  "modular": 16,
  "parity": 16,
}


def get_config(arg: str = "retrieval"):
  parts = [p for p in arg.split(",") if p]
  task = parts[0] if parts else "retrieval"
  if task not in TASK_OPTIONS:
    raise ValueError(f"synthetic.py: unknown task {task!r}; choose one of {sorted(TASK_OPTIONS)}.")
  flags = [p for p in parts[1:] if not p.isdigit()]
  if set(flags) - {"earlier", "smoke", "showcase"}:
    raise ValueError(
      f"synthetic.py: unknown flags {sorted(set(flags) - {'earlier', 'smoke', 'showcase'})}; the "
      f"flags are 'earlier', 'showcase' and 'smoke' (e.g. synthetic.py:stack,128,earlier)."
    )
  smoke, earlier = "smoke" in flags, "earlier" in flags
  lengths = [int(p) for p in parts[1:] if p.isdigit()]
  seq_len = lengths[0] if lengths else (16 if smoke else 64)

  c = config_lib.default()
  c.data.name = task
  c.data.episodic = True
  c.data.seq_len = seq_len
  c.data.options[task].update((EARLIER_OPTIONS if earlier else TASK_OPTIONS)[task])
  common.cpu_model(c)
  c.smt.batch_size = c.dmt.batch_size = c.bptt.batch_size = 32
  c.smt.lr = c.bptt.lr = 1e-3
  c.dmt.lr = 3e-4
  c.smt.context_length = seq_len
  c.smt.num_transitions = seq_len
  c.dmt.rollout_length = seq_len
  c.dmt.label_every = 4
  if earlier:
    c.smt.future_length = 8
    c.smt.steps, c.dmt.steps, c.bptt.steps = 2_000, 500, 2_000
    c.dmt.from_rnn_initial_memory = False
  else:
    common.full_supervision(c, seq_len)
    f = FUTURE[task]
    c.smt.future_length = max(1, int(seq_len * f)) if isinstance(f, float) else min(f, seq_len)
    c.smt.steps = 2_000
    c.dmt.steps = max(125, 500 * seq_len // 64)  # the rollout's drift grows with T
    if task == "retrieval" and seq_len > RETRIEVAL_WARMUP:
      # A length curriculum: the teacher finds the needle among 32 keys, then keeps it at T.
      c.data.warmup_seq_len, c.data.warmup_steps = RETRIEVAL_WARMUP, 500
      c.model.head_dim = 16
      c.smt.lr = c.bptt.lr = 2e-3
      c.smt.steps = 1_000
    if task == "stack":  # each method at its best lr (docs/results.md 0a: 3 seeds at T = 32)
      c.smt.lr, c.dmt.lr = 3e-3, 9e-4
    c.bptt.steps = c.smt.steps + c.dmt.steps  # the same tokens (same T and batch)
  c.eval.every_steps = 500
  if "showcase" in flags:  # experiments.compare's default: under 5 minutes on 2 cores
    c.model.head_dim = 16
    c.smt.lr = c.bptt.lr = 2e-3
    c.smt.steps, c.dmt.steps = 500, 125
    c.bptt.steps = c.smt.steps + c.dmt.steps
    c.eval.every_steps = 100
    c.eval.first_step = 50
  c.eval.batch_size = 64
  c.eval.num_batches = 4
  c.eval.prompt_length = 0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  if smoke:
    common.smoke(c)
    c.smt.num_decoded = min(c.smt.num_decoded, 4)
    if c.data.warmup_steps:
      c.data.warmup_seq_len, c.data.warmup_steps = min(8, seq_len // 2), 2
  return c
