"""RNNs behind one interface: `update(m, x) -> m'`, `readout(m) -> logits`, `initial_memory()`.

The memory is the whole recurrent state, laid out [B, K, d] for every kind (for an LSTM, h and c
together: the first half of the flattened state is h, the second c). Every update ends with a
per-token RMS normalisation, so RNN states live on the teacher's memory scale.

Kinds (the explicit table `RNN_KINDS` below):
  transformer  bidirectional Transformer over [m (K tokens), embed(x)]; keep the first K outputs.
               Readout: a causal decoder over the memory tokens (same shape as the teacher's
               decoder, so it can take the decoder's weights at the end of SMT).
  mlp          deep residual MLP on [flatten(m), embed(x)] -> m + delta.
  gru          a GRU cell whose hidden state is flatten(m).
  elman        tanh RNN: m' = tanh(W flatten(m) + U embed(x) + b).
  lstm         an LSTM cell with (h, c) = flatten(m) split in two.
The recurrent kinds and mlp read out with a small MLP on flatten(m).

Every kind is built from the model-wide arguments (`SHARED_ARGS`: the memory's shape, its start,
the dtype, and for the kinds that attend the heads and the attention backend) and its own
keyword options, each with its default: `rnn_options(kind)`, which a run's config holds as
`config.model.rnn.<kind>`. A new kind is its class here and a line in `RNN_KINDS`.
"""

from __future__ import annotations

import inspect

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from smt_jax.models import layers
from smt_jax.models.teacher import DEFAULT_HEAD_DIM, Decoder

INITIAL_MEMORIES = ("learned", "zeros")


class RNN(nnx.Module):
  """Base class: the initial memory and the `update` / `readout` pair.

  initial_memory: "learned" (a parameter [K, d], RMS-normalised; SMT's L_init pulls it to the
  teacher's E(empty)) or "zeros" (the reference's BPTT and `encode_with_rnn` start; no parameter).
  """

  def __init__(
    self, *, num_memory_tokens: int, width: int, initial_memory: str = "learned", rngs: nnx.Rngs
  ):
    if initial_memory not in INITIAL_MEMORIES:
      raise ValueError(f"initial_memory must be one of {INITIAL_MEMORIES}, got {initial_memory!r}.")
    self.memory_shape = (num_memory_tokens, width)
    self.init_memory = (
      nnx.Param(jax.random.normal(rngs.params(), self.memory_shape))
      if initial_memory == "learned"
      else None
    )

  @classmethod
  def check_options(cls, **options) -> None:
    """Raises ValueError, naming the option, for a value of the kind's own options that it
    cannot be built with (its constructor calls it; a config check calls it without building)."""

  def initial_memory(self) -> jax.Array:
    """The RNN's own starting state, [K, d]."""
    if self.init_memory is None:
      return jnp.zeros(self.memory_shape, jnp.float32)
    return layers.rms_normalize(self.init_memory[...])

  def update(self, memory: jax.Array, x: jax.Array) -> jax.Array:
    """memory [B, K, d], x int [B] -> next memory [B, K, d]."""
    raise NotImplementedError

  def readout(self, memory: jax.Array) -> jax.Array:
    """memory [B, K, d] -> logits [B, V] for the next target."""
    raise NotImplementedError


def _check_positive(**values) -> None:
  for name, v in values.items():
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive integer, got {v!r}.")


def _check_hidden(hidden) -> None:
  if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0:
    raise ValueError(f"hidden must be an integer >= 0 (0: K * width), got {hidden!r}.")


class MLPReadout(nnx.Module):
  """logits = W2 gelu(W1 flatten(m))."""

  def __init__(self, size: int, hidden: int, vocab_size: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(size, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, memory: jax.Array) -> jax.Array:
    h = einops.rearrange(memory, "b k d -> b (k d)")
    return self.fc2(jax.nn.gelu(self.fc1(h))).astype(jnp.float32)


class TransformerRNN(RNN):
  """The paper's updater: a bidirectional Transformer over [m, embed(x)], keeping the first K
  outputs (no residual from m), and a causal-Transformer readout of the teacher decoder's shape."""

  def __init__(
    self,
    *,
    vocab_size: int,
    num_memory_tokens: int,
    width: int,
    num_heads: int = 8,
    head_dim: int = DEFAULT_HEAD_DIM,
    attention: str | None = None,
    initial_memory: str = "learned",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    depth: int = 8,
    readout_depth: int = 4,
  ):
    self.check_options(depth=depth, readout_depth=readout_depth)
    super().__init__(
      num_memory_tokens=num_memory_tokens, width=width, initial_memory=initial_memory, rngs=rngs
    )
    self.embed = layers.embedding(vocab_size, width, dtype=dtype, rngs=rngs)
    self.rnn = layers.Transformer(
      width, depth, num_heads, head_dim, attention=attention, dtype=dtype, rngs=rngs
    )
    self.decoder = Decoder(
      vocab_size=vocab_size,
      width=width,
      depth=readout_depth,
      num_heads=num_heads,
      head_dim=head_dim,
      attention=attention,
      dtype=dtype,
      rngs=rngs,
    )

  @classmethod
  def check_options(cls, *, depth: int, readout_depth: int) -> None:
    _check_positive(depth=depth, readout_depth=readout_depth)

  def update(self, memory, x):
    k = memory.shape[1]
    h = jnp.concatenate(
      [
        memory.astype(self.embed.dtype or memory.dtype),
        layers.embed_tokens(self.embed, x)[:, None],
      ],
      axis=1,
    )  # [B, K+1, d]
    h = self.rnn(h, None, outputs=slice(0, k))  # bidirectional: no mask; keep the K rows
    return layers.rms_normalize(h).astype(memory.dtype)

  def readout(self, memory):
    return self.decoder.next_logits(memory, self.embed.dtype or memory.dtype)


class MLPRNN(RNN):
  """m' = rmsnorm(m + MLP([flatten(m), embed(x)])), a deep residual MLP."""

  def __init__(
    self,
    *,
    vocab_size: int,
    num_memory_tokens: int,
    width: int,
    initial_memory: str = "learned",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    depth: int = 8,
    hidden: int = 0,
  ):
    self.check_options(depth=depth, hidden=hidden)
    super().__init__(
      num_memory_tokens=num_memory_tokens, width=width, initial_memory=initial_memory, rngs=rngs
    )
    size = num_memory_tokens * width
    hidden = hidden or size
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
    self.inp = nnx.Linear(size + width, hidden, dtype=dtype, rngs=rngs)
    self.norms = nnx.List([nnx.RMSNorm(hidden, dtype=dtype, rngs=rngs) for _ in range(depth)])
    self.fc1 = nnx.List(
      [nnx.Linear(hidden, 2 * hidden, dtype=dtype, rngs=rngs) for _ in range(depth)]
    )
    self.fc2 = nnx.List(
      [nnx.Linear(2 * hidden, hidden, dtype=dtype, rngs=rngs) for _ in range(depth)]
    )
    self.out = nnx.Linear(hidden, size, dtype=dtype, rngs=rngs)
    self.head = MLPReadout(size, hidden, vocab_size, dtype=dtype, rngs=rngs)

  @classmethod
  def check_options(cls, *, depth: int, hidden: int) -> None:
    _check_positive(depth=depth)
    _check_hidden(hidden)

  def update(self, memory, x):
    flat = einops.rearrange(memory, "b k d -> b (k d)")
    h = self.inp(
      jnp.concatenate(
        [flat.astype(self.embed.dtype or flat.dtype), layers.embed_tokens(self.embed, x)], axis=-1
      )
    )
    for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
      h = h + fc2(jax.nn.gelu(fc1(norm(h))))
    delta = einops.rearrange(self.out(h), "b (k d) -> b k d", k=memory.shape[1])
    return layers.rms_normalize(memory + delta.astype(memory.dtype))

  def readout(self, memory):
    return self.head(memory)


class _CellRNN(RNN):
  """Shared plumbing for the classic cells: embedding of x, flat state, MLP readout."""

  def __init__(
    self,
    *,
    vocab_size: int,
    num_memory_tokens: int,
    width: int,
    initial_memory: str = "learned",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
    hidden: int = 0,
  ):
    self.check_options(hidden=hidden)
    super().__init__(
      num_memory_tokens=num_memory_tokens, width=width, initial_memory=initial_memory, rngs=rngs
    )
    self.size = num_memory_tokens * width
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
    self.head = MLPReadout(self.size, hidden or self.size, vocab_size, dtype=dtype, rngs=rngs)
    self.build_cell(width, dtype=dtype, rngs=rngs)

  @classmethod
  def check_options(cls, *, hidden: int) -> None:
    _check_hidden(hidden)

  def build_cell(self, width, *, dtype, rngs):
    raise NotImplementedError

  def step(self, flat, inputs):
    """flat state [B, Z], inputs [B, d] -> new flat state [B, Z]."""
    raise NotImplementedError

  def update(self, memory, x):
    flat = einops.rearrange(memory, "b k d -> b (k d)")  # the cell's state
    new = self.step(flat, layers.embed_tokens(self.embed, x))
    new = einops.rearrange(new, "b (k d) -> b k d", k=memory.shape[1])
    return layers.rms_normalize(new.astype(memory.dtype))

  def readout(self, memory):
    return self.head(memory)


class GRURNN(_CellRNN):
  def build_cell(self, width, *, dtype, rngs):
    self.cell = nnx.GRUCell(width, self.size, dtype=dtype, rngs=rngs)

  def step(self, flat, inputs):
    return self.cell(flat, inputs)[0]


class ElmanRNN(_CellRNN):
  def build_cell(self, width, *, dtype, rngs):
    self.recurrent = nnx.Linear(
      self.size,
      self.size,
      use_bias=False,
      dtype=dtype,
      rngs=rngs,
      kernel_init=nnx.initializers.orthogonal(),
    )
    self.inp = nnx.Linear(width, self.size, dtype=dtype, rngs=rngs)

  def step(self, flat, inputs):
    return jnp.tanh(self.recurrent(flat) + self.inp(inputs))


class LSTMRNN(_CellRNN):
  def build_cell(self, width, *, dtype, rngs):
    if self.size % 2:
      raise ValueError(f"lstm needs an even memory size K*d to hold (h, c), got {self.size}.")
    self.cell = nnx.LSTMCell(width, self.size // 2, dtype=dtype, rngs=rngs)

  def step(self, flat, inputs):
    h, c = jnp.split(flat, 2, axis=-1)
    (c, h), _ = self.cell((c, h), inputs)
    return jnp.concatenate([h, c], axis=-1)


# The one table of RNN kinds: name -> constructor.
RNN_KINDS = {
  "transformer": TransformerRNN,
  "mlp": MLPRNN,
  "gru": GRURNN,
  "elman": ElmanRNN,
  "lstm": LSTMRNN,
}

# The model-wide arguments a kind is built with (those its constructor takes): the rest of its
# keyword arguments are its own options.
SHARED_ARGS = (
  "vocab_size",
  "num_memory_tokens",
  "width",
  "num_heads",
  "head_dim",
  "attention",
  "initial_memory",
  "dtype",
  "rngs",
)


def _parameters(kind: str) -> dict[str, inspect.Parameter]:
  if kind not in RNN_KINDS:
    raise ValueError(f"Unknown RNN kind {kind!r}; valid kinds: {sorted(RNN_KINDS)}.")
  params = inspect.signature(RNN_KINDS[kind].__init__).parameters  # (nnx wraps the class's own)
  return {n: p for n, p in params.items() if n != "self"}


def rnn_options(kind: str) -> dict:
  """The kind's own options and their defaults (its keyword arguments beyond `SHARED_ARGS`)."""
  return {n: p.default for n, p in _parameters(kind).items() if n not in SHARED_ARGS}


def make_rnn(kind: str, **kwargs) -> RNN:
  """Builds the RNN of the given kind from the arguments it takes (a model-wide one it does not
  take, e.g. num_heads for a GRU, and another kind's options are left out, so one call builds
  any kind); a name no kind takes is an error."""
  accepted = _parameters(kind)
  known = set(SHARED_ARGS).union(*(rnn_options(k) for k in RNN_KINDS))
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f"no RNN kind takes {unknown}; {kind} takes {sorted(accepted)}.")
  return RNN_KINDS[kind](**{k: v for k, v in kwargs.items() if k in accepted})
