"""The data-source interface: every batch is a pure function of (seed, split, step, row).

A `Source` yields fixed-length token sequences `x` with per-step targets `y` (`y == -1`: no
target at that step). Convention: `y[t]` is what the model should predict after reading
`x[0..t]`.

Why rows own their generators: row `r` of global batch `step` is drawn from
`np.random.default_rng([seed, split_id, step, r])`. So the global batch does not depend on
how many processes share it, and a resumed run sees exactly the batches it would have seen,
with no iterator state to checkpoint (STYLE habit 6).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The value of `y` at steps that carry no target (masked out of the loss).
IGNORE = -1

# Split name -> the id mixed into every row's seed, so eval rows never repeat train rows.
SPLITS = {'train': 0, 'eval': 1}


def check_int(name: str, value, *, minimum: int, fix: str = '') -> int:
  """Returns `value` as a Python int, or raises ValueError naming `name`, the value and `fix`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{name} must be an integer, got {value!r}. {fix}'.rstrip())
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}. {fix}'.rstrip())
  return int(value)


def check_tokens(what: str, tokens, vocab_size: int) -> None:
  """Raises ValueError unless `tokens` is a 1-D integer array with every id in [0, vocab_size)."""
  # An array read on demand (files.RemoteRecords) has a dtype and ndim: never read it whole here.
  tokens = tokens if hasattr(tokens, 'dtype') and hasattr(tokens, 'ndim') else np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f'{what} must be a 1-D array of integer token ids, got {tokens.dtype} {tokens.shape}.'
    )
  # An unsigned dtype too narrow to hold vocab_size cannot go out of range: skip the O(N) scan
  # (a memory-mapped byte corpus with V = 256 is never read up front). Nor is a stream read on
  # demand: the runner checks every batch it draws (check_batch_tokens).
  if np.issubdtype(tokens.dtype, np.unsignedinteger) and np.iinfo(tokens.dtype).max < vocab_size:
    return
  if not isinstance(tokens, np.ndarray):
    return
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(
      f'{what} has token ids in [{tokens.min()}, {tokens.max()}], outside the '
      f'vocabulary [0, {vocab_size}); the data and vocab_size disagree.'
    )


def check_batch_tokens(what: str, x, y, vocab_size: int) -> None:
  """Raises ValueError unless every token id in `x` is in [0, V) and every target in `y` in
  [-1, V): an embedding lookup would otherwise clip or fill out-of-range ids silently."""
  x, y = np.asarray(x), np.asarray(y)
  if x.size and (x.min() < 0 or x.max() >= vocab_size or y.min() < IGNORE or y.max() >= vocab_size):
    raise ValueError(
      f'{what} has tokens outside the vocabulary [0, {vocab_size}) (x in [{x.min()}, '
      f'{x.max()}], targets y in [{y.min()}, {y.max()}], {IGNORE} = no target); the dataset '
      f'(or its options in config.data.options.<name>) is inconsistent.'
    )


def check_split(split: str) -> int:
  """Returns the id of `split` ('train' or 'eval'), or raises ValueError."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
  return SPLITS[split]


def row_rng(*, seed: int, split: str, step: int, row: int) -> np.random.Generator:
  """The generator that alone decides row `row` (global index) of batch `step` of `split`."""
  return np.random.default_rng([seed, check_split(split), step, row])


@dataclasses.dataclass(frozen=True)
class DataPaths:
  """What a source that reads files takes as `path` (a run's `config.data.path`) and, where it
  takes separate evaluation data, `eval_path` (`config.data.eval_path`); both constructor
  arguments.

  Attributes:
    what: what `path` must be, said in an error ('a folder of MNIST IDX files').
    when_empty: what the source reads without a path ('' : a path is required).
    folder: `path` must be a folder.
    hub: `path` may be an hf:// path of the Hugging Face hub.
    eval_what: what `eval_path` must be ('' : the source takes no eval_path).
    object_store: the source takes object-store URLs (gs://...) itself, reading a file by the row
      where it can (`files.RemoteRecords`); False: the runner stages a local copy first.
  """

  what: str
  when_empty: str = ''
  folder: bool = False
  hub: bool = False
  eval_what: str = ''
  object_store: bool = False


class Source:
  """A seeded, stateless supplier of `{'x', 'y'}` batches.

  Subclasses set `name`, `vocab_size`, `seq_len` and implement `example`, which turns one
  row's generator into one sequence; `batch` does the rest.

  Attributes:
    name: the key of this source in `DATASETS`.
    vocab_size: tokens are ints in [0, vocab_size).
    seq_len: length T of every sequence this source yields.
    paths: what it reads from files (None: nothing; it generates or embeds its data).
    bits_unit: what one target token is, for an NLL in bits ('bits_per_token', 'bits_per_dim'
      for a pixel's intensity, 'bits_per_byte' for a byte of text).
  """

  name: str
  vocab_size: int
  seq_len: int
  paths: DataPaths | None = None
  bits_unit: str = 'bits_per_token'

  def example(self, rng: np.random.Generator, *, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One sequence drawn from `rng`: (x, y), both int [T]."""
    raise NotImplementedError

  def batch(
    self,
    *,
    split: str,
    step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`.

    Args:
      split: 'train' or 'eval'.
      step: index of the global batch (>= 0).
      batch_size: global batch size B, divisible by `process_count`.
      seed: experiment seed (>= 0).
      process_index: which slice of rows to return, in [0, process_count).
      process_count: number of processes sharing the global batch.

    Returns:
      {'x': int32 [B/P, T], 'y': int32 [B/P, T]}: global rows
      [process_index*B/P, (process_index+1)*B/P); y == -1 means no target.
    """
    check_split(split)
    step = check_int('step', step, minimum=0)
    seed = check_int('seed', seed, minimum=0, fix='Use a non-negative seed.')
    batch_size = check_int('batch_size', batch_size, minimum=1)
    process_count = check_int('process_count', process_count, minimum=1)
    process_index = check_int('process_index', process_index, minimum=0)
    if process_index >= process_count:
      raise ValueError(f'process_index={process_index} must be < process_count={process_count}.')
    if batch_size % process_count:
      raise ValueError(
        f'batch_size={batch_size} is not divisible by process_count={process_count}; '
        'choose a global batch_size that is a multiple of the number of processes.'
      )
    rows = batch_size // process_count
    first = process_index * rows
    x = np.empty((rows, self.seq_len), np.int32)
    y = np.empty((rows, self.seq_len), np.int32)
    rngs = [row_rng(seed=seed, split=split, step=step, row=first + i) for i in range(rows)]
    for i, (xi, yi) in enumerate(self.examples(rngs, split=split)):
      # Row assignment would broadcast a short row and truncate floats: check instead.
      for name, v in (('x', xi), ('y', yi)):
        if np.shape(v) != (self.seq_len,) or not np.issubdtype(np.asarray(v).dtype, np.integer):
          raise ValueError(
            f'{self.name}: example() returned {name} of shape {np.shape(v)} and dtype '
            f'{np.asarray(v).dtype}; expected integers of shape ({self.seq_len},) (seq_len).'
          )
      x[i], y[i] = xi, yi
    return {'x': x, 'y': y}

  def examples(self, rngs, *, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One `example` per generator, in order (a source reading remote files fetches them
    together)."""
    return [self.example(rng, split=split) for rng in rngs]

  def __repr__(self) -> str:
    return (
      f'{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, '
      f'seq_len={self.seq_len})'
    )


class StreamSource(Source):
  """Next-token prediction on one long token stream per split.

  A row is a random crop of T+1 consecutive tokens: x = crop[:-1], y = crop[1:].
  """

  def __init__(
    self, *, streams: dict[str, np.ndarray], vocab_size: int, seq_len: int, fix: str = ''
  ):
    """Args: streams: split -> int [N] tokens; fix: advice appended to a too-short error."""
    self.seq_len = check_int('seq_len', seq_len, minimum=1)
    self.vocab_size = check_int('vocab_size', vocab_size, minimum=1)
    for split in SPLITS:
      check_tokens(
        f"{getattr(self, 'name', type(self).__name__)}: the {split} stream",
        streams[split],
        vocab_size,
      )
      n = len(streams[split])
      if n < self.seq_len + 1:
        raise ValueError(
          f'{self.name}: the {split} stream has {n} tokens, fewer than seq_len+1 = '
          f'{self.seq_len + 1}. Lower seq_len. {fix}'.rstrip()
        )
    self.streams = streams

  def example(self, rng, *, split):
    return self.examples([rng], split=split)[0]

  def examples(self, rngs, *, split):
    stream = self.streams[split]
    # Crops start anywhere, so a row may begin mid-image / mid-word; that is the LM setting.
    starts = [int(rng.integers(0, len(stream) - self.seq_len)) for rng in rngs]
    if hasattr(stream, 'crops'):  # a file read on demand (files.RemoteRecords): one fetch of all
      crops = stream.crops(starts, self.seq_len + 1).astype(np.int32)
    else:
      crops = [np.asarray(stream[s : s + self.seq_len + 1], dtype=np.int32) for s in starts]
    return [(crop[:-1], crop[1:]) for crop in crops]
