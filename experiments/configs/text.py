"""Byte-level language modelling (V = 256) on a local text file or folder
(TinyStories in the paper).

Argument: `small` (default; a CPU-sized model), `tinystories` (the paper's model and schedules,
SPEC section 6), or `smoke`. The corpus is required: --config.data.path=FILE_OR_FOLDER.

Commands:
  python -m experiments.run --config=experiments/configs/text.py --config.data.path=corpus.txt
  python -m experiments.run --config=experiments/configs/text.py:tinystories \
      --config.data.path=/data/TinyStories --config.model.dtype=bfloat16
  python -m experiments.sample --workdir=runs/text_small
"""

from experiments.configs import common


def get_config(arg: str = "small"):
  c = common.base()
  c.data.name = "text"
  if arg in ("small", "smoke"):
    common.cpu_model(c, width=128, memory_tokens=4)
    c.smt.steps = 2_000
    c.smt.batch_size = 32
    c.smt.lr = 1e-3
    c.smt.context_length = 128
    c.smt.future_length = 32
    c.smt.num_transitions = 4
    c.dmt.steps = 300
    c.dmt.batch_size = 16
    c.dmt.lr = 3e-4
    c.dmt.rollout_length = 64
    c.dmt.label_every = 8
    c.bptt.steps = 2_000
    c.bptt.batch_size = 32
    c.bptt.lr = 1e-3
    c.bptt.seq_len = 160
    c.eval.every_steps = 500
    c.eval.batch_size = 32
    c.eval.seq_len = 256
    c.eval.prompt_length = 128
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500
    if arg == "smoke":
      common.smoke(c)
  elif arg == "tinystories":
    c.eval.seq_len = 512
  else:
    raise ValueError(f"text.py: unknown argument {arg!r}; use small, tinystories or smoke.")
  return c
