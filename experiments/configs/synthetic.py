"""Synthetic probes (SPEC section 8): retrieval, copy, stack, keys_values, modular, parity.

Argument: `TASK[,T][,smoke]`, e.g. `synthetic.py:stack` or `synthetic.py:retrieval,256`. T is the
sequence length (default 64). Every sequence is an independent episode: SMT trains every transition
of it (num_transitions = T, context Tc = T so each memory sees the whole prefix), DMT rolls the RNN
out from its initial memory over the whole episode, BPTT unrolls the whole episode. Task sizes are
in `config.data.options` (e.g. --config.data.options.num_tokens=32).

Commands:
  python -m experiments.run --config=experiments/configs/synthetic.py:retrieval
  python -m experiments.run --config=experiments/configs/synthetic.py:stack,256 \\
      --config.model.rnn_kind=gru
  python -m experiments.run --config=experiments/configs/synthetic.py:copy --config.phases=bptt
  python -m experiments.run --config=experiments/configs/synthetic.py:parity,smoke
"""

from experiments.configs import common

TASK_OPTIONS = {
  "retrieval": {"num_tokens": 16},
  "copy": {"num_tokens": 8},
  "stack": {"num_tokens": 8, "max_depth": 4},
  "keys_values": {"num_keys": 8, "num_values": 8},
  "modular": {"modulus": 7},
  "parity": {},
}


def get_config(arg: str = "retrieval"):
  parts = [p for p in arg.split(",") if p]
  task = parts[0] if parts else "retrieval"
  if task not in TASK_OPTIONS:
    raise ValueError(f"synthetic.py: unknown task {task!r}; choose one of {sorted(TASK_OPTIONS)}.")
  smoke = "smoke" in parts[1:]
  lengths = [int(p) for p in parts[1:] if p.isdigit()]
  seq_len = lengths[0] if lengths else (16 if smoke else 64)

  c = common.base()
  c.data.name = task
  c.data.episodic = True
  c.data.seq_len = seq_len
  c.data.options.update(TASK_OPTIONS[task])
  common.cpu_model(c)
  c.smt.steps = 2_000
  c.smt.batch_size = 32
  c.smt.lr = 1e-3
  c.smt.context_length = seq_len
  c.smt.future_length = 8
  c.smt.num_transitions = seq_len
  c.dmt.steps = 500
  c.dmt.batch_size = 32
  c.dmt.lr = 3e-4
  c.dmt.rollout_length = seq_len
  c.dmt.label_every = 4
  c.bptt.steps = 2_000
  c.bptt.batch_size = 32
  c.bptt.lr = 1e-3
  c.eval.every_steps = 500
  c.eval.batch_size = 64
  c.eval.num_batches = 4
  c.eval.prompt_length = 0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  if smoke:
    common.smoke(c)
  return c
