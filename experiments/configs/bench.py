"""The benchmark configuration of the speed targets (issue: scale out), on a 2-core CPU.

The reference implementation's model and losses (`common.reference_recipe`: 64-wide heads, the
published loss terms, DMT labels and zero initial memory), so step times compare with it directly:
vocab 17, width 64, 4 memory tokens of 64, teacher encoder depth 2, RNN depth 2, decoder depth 1,
4 heads (of 64), batch 32, float32, AdamW; 298,833 teacher and 298,577 RNN parameters, as the
reference's at this size. SMT: Tc 64, Tf 32, one transition per sequence. DMT: Tc 64,
Td 32, Tf 32, k 4. BPTT: T 64. Data: the 8x8 digits stream without BOS (vocab 17, offline); the
benchmark times uniform random tokens of that vocabulary, as step time does not depend on them.

`bench.py:paper` is the paper's configuration at parity (`config_lib.default()` with the reference
recipe: width 256, 16 memory tokens, 8 heads of 64, encoder and RNN depth 8, decoder 4; SMT batch
128 with Tc 256, Tf 64; DMT batch 32, Td 256, k 16; BPTT batch 128, T 320) in bfloat16, timed
on 256-token vocabularies (the authors' MNIST): what `experiments.device_check` measures on an
accelerator. `bench.py:paper,tiny` is its few-second CPU version (the tests').

Commands:
  python -m experiments.device_check --out=runs/device_check   # the paper config on a GPU/TPU
  python -m experiments.reference.compare_speed --rounds=3   # side by side with the reference
  python -m experiments.benchmark --config=experiments/configs/bench.py --out=bench.json
  python -m experiments.benchmark --config=experiments/configs/bench.py --sweep=seq_len
"""

from experiments.configs import common
from smt_jax.runner import config as config_lib


def get_config(arg: str = ""):
  arg, *flags = arg.split(",") if arg else [""]
  if arg not in ("", "paper") or set(flags) - {"tiny"} or (flags and arg != "paper"):
    raise ValueError(
      f"bench.py: unknown argument {arg!r}; use bench.py, bench.py:paper or :paper,tiny."
    )
  if arg == "paper":
    return paper("tiny" in flags)
  c = config_lib.default()
  c.data.name = "digits"  # a real offline stream (crops of the phases' lengths); vocab 17
  c.data.episodic = False
  c.data.options.digits.bos = False
  common.cpu_model(c, width=64, memory_tokens=4, depth=2)
  common.reference_recipe(c)
  for p in ("smt", "dmt", "bptt"):
    c[p].batch_size = 32
    c[p].steps = 1_000
  c.smt.context_length = 64
  c.smt.future_length = 32
  c.smt.num_transitions = 1
  c.dmt.rollout_length = 32
  c.dmt.label_every = 4
  c.bptt.seq_len = 64
  c.eval.seq_len = 64
  c.eval.prompt_length = 0
  return c


def paper(tiny: bool = False):
  """The paper's model and phases at parity, in bfloat16 (tiny: a few-second CPU version)."""
  c = config_lib.default()
  common.reference_recipe(c)
  c.data.options.digits.bos = False
  c.phases = "smt,dmt,bptt"
  c.model.dtype = "bfloat16"
  if tiny:
    common.cpu_model(c, width=16, memory_tokens=2, depth=1)
    c.model.head_dim = 8
    for p in ("smt", "dmt", "bptt", "eval"):
      c[p].batch_size = 4
    c.smt.context_length, c.smt.future_length = 16, 8
    c.dmt.rollout_length, c.dmt.label_every = 8, 4
    c.bptt.seq_len = c.eval.seq_len = 24
    c.eval.prompt_length = 8
  return c
