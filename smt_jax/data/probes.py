"""Synthetic probes (docs/method.md section 8), generated on the fly from a seeded generator.

Each probe is a `generate_<name>(rng, **kwargs) -> (x, y)` for ONE sequence (x, y: int32 [T],
y == -1 where there is no target) plus a `Source` wrapping it. The generators check their
arguments, so the Sources check them once at construction by generating a throwaway sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from smt_jax.data.base import IGNORE, Source, check_batch_tokens, check_int, check_tokens


def _check_seq_len(probe: str, seq_len, minimum: int, why: str) -> int:
  return check_int(
    'seq_len',
    seq_len,
    minimum=minimum,
    fix=f'The {probe} probe needs seq_len >= {minimum} ({why}); raise seq_len.',
  )


def _empty_targets(seq_len: int) -> np.ndarray:
  return np.full(seq_len, IGNORE, np.int32)


# --------------------------------------------------------------------------------------------
# One-sequence generators.


def generate_retrieval(
  rng: np.random.Generator, *, seq_len: int, num_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
  """Needle retrieval: find the token that followed the marker, asked for at the very end.

  x: random tokens 1..n; x[p] = 0 (marker) and x[p+1] = needle with p+1 < T//2 (first half);
  x[T-1] = 0 (query). y: -1 everywhere except y[T-1] = needle. Vocab n+1.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len(
    'retrieval', seq_len, 4, 'marker and needle in the first half, then a query'
  )
  num_tokens = check_int('num_tokens', num_tokens, minimum=1)
  x = rng.integers(1, num_tokens + 1, size=seq_len).astype(np.int32)
  marker = int(rng.integers(0, seq_len // 2 - 1))  # so the needle, at marker+1, is < T//2
  x[marker] = 0
  x[-1] = 0
  y = _empty_targets(seq_len)
  y[-1] = x[marker + 1]
  return x, y


def generate_copy(
  rng: np.random.Generator,
  *,
  seq_len: int,
  num_tokens: int,
  reverse: bool = False,
  label_noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
  """String copy: read s, a separator 0, then reproduce s (reversed if `reverse`), LM-style.

  With L = (seq_len-1)//2 and c = s or s[::-1]:
    x = [s_0..s_{L-1}, 0, c_0..c_{L-1}, (0 if seq_len is even)]
    y[L+j] = c_j for j < L (from the separator on, the next token of the copy); -1 elsewhere,
  so targets sit only in the second half and the trailing pad is never read before a target.
  `label_noise`: each target is independently replaced, with this probability, by a uniform
  token 1..n (the inputs x keep the clean copy). The noise is drawn after s, so x does not
  depend on `label_noise`. Vocab n+1.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len('copy', seq_len, 3, 'a string of length >= 1, a separator and its copy')
  num_tokens = check_int('num_tokens', num_tokens, minimum=1)
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f'label_noise must be in [0, 1], got {label_noise}.')
  length = (seq_len - 1) // 2
  s = rng.integers(1, num_tokens + 1, size=length).astype(np.int32)
  copy = s[::-1] if reverse else s
  x = np.zeros(seq_len, np.int32)
  x[:length] = s
  x[length + 1 : 2 * length + 1] = copy
  y = _empty_targets(seq_len)
  targets = copy.copy()
  if label_noise > 0:
    noisy = rng.random(length) < label_noise
    targets = np.where(noisy, rng.integers(1, num_tokens + 1, size=length), targets)
  y[length : 2 * length] = targets
  return x, y


def generate_stack(
  rng: np.random.Generator, *, seq_len: int, num_tokens: int, max_depth: int, push_prob: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
  """Stack: each step pushes a token 1..n or pops (input 0); a pop's target is the popped token.

  The stack starts empty; an empty stack always pushes, a full one (depth == max_depth) always
  pops, otherwise push with probability `push_prob`. y = -1 on pushes. Vocab n+1.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len('stack', seq_len, 2, 'a push then a pop')
  num_tokens = check_int('num_tokens', num_tokens, minimum=1)
  max_depth = check_int('max_depth', max_depth, minimum=1)
  if not 0.0 < push_prob < 1.0:
    raise ValueError(f'push_prob must be in (0, 1), got {push_prob}.')
  # Draw everything up front (vectorised); the walk itself is inherently sequential.
  wants_push = rng.random(seq_len) < push_prob
  tokens = rng.integers(1, num_tokens + 1, size=seq_len)
  x = np.zeros(seq_len, np.int32)
  y = _empty_targets(seq_len)
  stack: list[int] = []
  for t in range(seq_len):
    if not stack or (len(stack) < max_depth and wants_push[t]):
      stack.append(int(tokens[t]))
      x[t] = tokens[t]
    else:
      y[t] = stack.pop()  # x[t] stays 0: the pop token
  return x, y


def generate_keys_values(
  rng: np.random.Generator, *, seq_len: int, num_keys: int, num_values: int
) -> tuple[np.ndarray, np.ndarray]:
  """Associative recall: P key/value pairs, a separator, then queries of stored keys.

  Tokens: 0 separator, keys 1..num_keys, values num_keys+1..num_keys+num_values (disjoint
  ranges). P = min(num_keys, (T-2)//2) distinct keys, each with a uniform value; then 0; then
  Q = T - 2P - 1 >= 1 query keys drawn uniformly (with replacement) from the P stored keys.
    x = [k_1, v_1, ..., k_P, v_P, 0, q_1, ..., q_Q]
    y = -1 except at each query: the value stored with that key.
  Vocab 1 + num_keys + num_values.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len('keys_values', seq_len, 4, 'one pair, a separator and a query')
  num_keys = check_int('num_keys', num_keys, minimum=1)
  num_values = check_int('num_values', num_values, minimum=1)
  num_pairs = min(num_keys, (seq_len - 2) // 2)
  keys = 1 + rng.choice(num_keys, size=num_pairs, replace=False)
  values = 1 + num_keys + rng.integers(0, num_values, size=num_pairs)
  asked = rng.integers(0, num_pairs, size=seq_len - 2 * num_pairs - 1)  # indices into the pairs
  x = np.zeros(seq_len, np.int32)
  x[0 : 2 * num_pairs : 2] = keys
  x[1 : 2 * num_pairs : 2] = values
  x[2 * num_pairs + 1 :] = keys[asked]  # x[2P] stays 0: the separator
  y = _empty_targets(seq_len)
  y[2 * num_pairs + 1 :] = values[asked]
  return x, y


def generate_modular(
  rng: np.random.Generator, *, seq_len: int, modulus: int, difficulty: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
  """In-context modular regression: pairs (a, (w*a + b) mod m) with w, b hidden per sequence.

  difficulty 0: w is uniform in 1..m-1 and b in 0..m-1 (m (m-1) hidden functions). difficulty
  f in (0, 1]: w and b are uniform in 0..n-1 with n = max(1, int(f m)), as in the authors' code
  (n**2 functions: 9 at m = 17, f = 0.2; w = 0 gives a constant). Each a is uniform in 0..m-1.
    x = [a_0, f(a_0), a_1, f(a_1), ...][:T]
    y[2i] = f(a_i) (predicted after reading a_i), y[2i+1] = -1.
  For an odd T the last input is an a whose answer is only a target. Vocab m (a and f(a) share
  the tokens 0..m-1). With a prime m, every w is invertible, so (w, b) is identifiable.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len('modular', seq_len, 2, 'one (a, f(a)) pair')
  modulus = check_int('modulus', modulus, minimum=2)
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(
      f'difficulty must be in [0, 1] (0: every w in 1..m-1 and b), got {difficulty}.'
    )
  if difficulty:
    n = max(1, int(difficulty * modulus))
    w, b = (int(v) for v in rng.integers(0, n, size=2))
  else:
    w = int(rng.integers(1, modulus))
    b = int(rng.integers(0, modulus))
  num_pairs = (seq_len + 1) // 2
  a = rng.integers(0, modulus, size=num_pairs)
  fa = (w * a + b) % modulus
  x = np.empty(2 * num_pairs, np.int32)
  x[0::2], x[1::2] = a, fa
  y = np.full(2 * num_pairs, IGNORE, np.int32)
  y[0::2] = fa
  return x[:seq_len], y[:seq_len]


def generate_parity(rng: np.random.Generator, *, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Running parity: x uniform bits, y[t] = (x[0] + ... + x[t]) mod 2 at every step. Vocab 2.

  Returns: x, y: int32 [seq_len].
  """
  seq_len = _check_seq_len('parity', seq_len, 1, 'at least one bit')
  x = rng.integers(0, 2, size=seq_len).astype(np.int32)
  return x, (np.cumsum(x) % 2).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Sources wrapping the generators.


class ProbeSource(Source):
  """A `Source` whose rows are `generate(rng, **kwargs)`; `eval_kwargs` may differ (no noise)."""

  def __init__(
    self,
    generate: Callable[..., tuple[np.ndarray, np.ndarray]],
    *,
    vocab_size: int,
    train_kwargs: dict,
    eval_kwargs: dict | None = None,
  ):
    self._generate = generate
    self._kwargs = {
      'train': train_kwargs,
      'eval': train_kwargs if eval_kwargs is None else eval_kwargs,
    }
    # Dry run: the generator raises ValueError on bad arguments, now rather than mid-training;
    # and its tokens must fit the vocabulary (x in [0, V), targets y in [-1, V)).
    for kwargs in self._kwargs.values():
      x, y = (np.asarray(a) for a in generate(np.random.default_rng(0), **kwargs))
      check_tokens(f'{generate.__name__}: x', x, int(vocab_size))
      if y.shape != x.shape:
        raise ValueError(f'{generate.__name__}: targets y {y.shape} do not fit x {x.shape}.')
      check_batch_tokens(generate.__name__, x, y, int(vocab_size))
    self.seq_len = int(train_kwargs['seq_len'])
    self.vocab_size = int(vocab_size)

  def example(self, rng, *, split):
    return self._generate(rng, **self._kwargs[split])


class RetrievalSource(ProbeSource):
  """Needle retrieval (`generate_retrieval`); vocab num_tokens+1."""

  name = 'retrieval'

  def __init__(self, *, seq_len: int = 64, num_tokens: int = 16):
    super().__init__(
      generate_retrieval,
      vocab_size=num_tokens + 1,
      train_kwargs=dict(seq_len=seq_len, num_tokens=num_tokens),
    )
    self.num_tokens = num_tokens


class CopySource(ProbeSource):
  """String copy (`generate_copy`); label noise on the train split only; vocab num_tokens+1."""

  name = 'copy'

  def __init__(
    self,
    *,
    seq_len: int = 64,
    num_tokens: int = 16,
    reverse: bool = False,
    label_noise: float = 0.0,
  ):
    train = dict(seq_len=seq_len, num_tokens=num_tokens, reverse=reverse, label_noise=label_noise)
    super().__init__(
      generate_copy,
      vocab_size=num_tokens + 1,
      train_kwargs=train,
      eval_kwargs={**train, 'label_noise': 0.0},
    )  # eval measures the clean task
    self.num_tokens, self.reverse, self.label_noise = num_tokens, reverse, label_noise


class StackSource(ProbeSource):
  """Stack push/pop (`generate_stack`); vocab num_tokens+1."""

  name = 'stack'

  def __init__(
    self, *, seq_len: int = 64, num_tokens: int = 16, max_depth: int = 8, push_prob: float = 0.5
  ):
    super().__init__(
      generate_stack,
      vocab_size=num_tokens + 1,
      train_kwargs=dict(
        seq_len=seq_len, num_tokens=num_tokens, max_depth=max_depth, push_prob=push_prob
      ),
    )
    self.num_tokens, self.max_depth, self.push_prob = num_tokens, max_depth, push_prob


class KeysValuesSource(ProbeSource):
  """Associative recall (`generate_keys_values`); vocab 1+num_keys+num_values."""

  name = 'keys_values'

  def __init__(self, *, seq_len: int = 64, num_keys: int = 16, num_values: int = 16):
    super().__init__(
      generate_keys_values,
      vocab_size=1 + num_keys + num_values,
      train_kwargs=dict(seq_len=seq_len, num_keys=num_keys, num_values=num_values),
    )
    self.num_keys, self.num_values = num_keys, num_values


class ModularSource(ProbeSource):
  """In-context modular arithmetic (`generate_modular`); vocab modulus."""

  name = 'modular'

  def __init__(self, *, seq_len: int = 64, modulus: int = 17, difficulty: float = 0.0):
    super().__init__(
      generate_modular,
      vocab_size=modulus,
      train_kwargs=dict(seq_len=seq_len, modulus=modulus, difficulty=difficulty),
    )
    self.modulus, self.difficulty = modulus, difficulty


class ParitySource(ProbeSource):
  """Running parity (`generate_parity`); vocab 2."""

  name = 'parity'

  def __init__(self, *, seq_len: int = 64):
    super().__init__(generate_parity, vocab_size=2, train_kwargs=dict(seq_len=seq_len))
