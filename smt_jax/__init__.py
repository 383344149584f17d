"""smt-jax: Supervised Memory Training of recurrent networks, without backpropagation through time.

The public API: the loss terms (`smt_jax.losses`), the objectives over pure model functions and
the checks of their memory contract, the optimiser recipe (`adamw_per_model`), the inference
loops, and the Flax NNX models.
"""

from smt_jax.contract import (
  MemorySpec,
  RNNFns,
  TeacherFns,
  check_memory_contract,
  check_models,
  check_tokens,
)
from smt_jax.inference import initial_memories, prompt_memory, read, write
from smt_jax.losses import (
  decoding_loss,
  drift,
  dynamics_loss,
  masked_cross_entropy,
  masked_mean,
  uniformity_loss,
)
from smt_jax.models import RNN_KINDS, CausalTeacher, Teacher, make_rnn, rnn_fns, teacher_fns
from smt_jax.objectives import bptt_loss, dmt_loss, encode_over_time, rollout, smt_loss
from smt_jax.optim import adamw_per_model
from smt_jax.parallel import parallel_rollout

__version__ = "0.1.0"

__all__ = [
  "CausalTeacher",
  "MemorySpec",
  "RNNFns",
  "Teacher",
  "TeacherFns",
  "RNN_KINDS",
  "adamw_per_model",
  "bptt_loss",
  "check_memory_contract",
  "check_models",
  "check_tokens",
  "decoding_loss",
  "dmt_loss",
  "drift",
  "dynamics_loss",
  "encode_over_time",
  "initial_memories",
  "make_rnn",
  "masked_cross_entropy",
  "masked_mean",
  "parallel_rollout",
  "prompt_memory",
  "read",
  "rnn_fns",
  "rollout",
  "smt_loss",
  "teacher_fns",
  "uniformity_loss",
  "write",
]
