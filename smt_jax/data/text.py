"""Byte-level text (SPEC 8): next-byte prediction (vocab 256) on a local corpus.

The corpus is one file, or every text file under a folder (recursively, sorted by path, joined
with a newline). Eval is the last 10% of bytes (at least seq_len+1), train the rest.
"""

from __future__ import annotations

import os

import numpy as np

from smt_jax.data.base import StreamSource, check_int

# Fraction of the corpus (its tail) held out for evaluation.
EVAL_FRACTION = 0.1


def _is_text_file(path: str) -> bool:
  """A file counts as text unless its first 8 KiB hold a NUL byte (the usual binary test)."""
  with open(path, 'rb') as f:
    return b'\0' not in f.read(8192)


def list_text_files(folder: str) -> list[str]:
  """Every non-hidden text file under `folder`, recursively, sorted by relative path."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith('.')]  # skip .git and the like
    found += [os.path.join(root, f) for f in files if not f.startswith('.')]
  return sorted((p for p in found if _is_text_file(p)), key=lambda p: os.path.relpath(p, folder))


def read_corpus(path: str) -> np.ndarray:
  """The bytes of a file, or of the text files under a folder joined with b'\\n': uint8 [N].

  A single file is memory-mapped, so large corpora (e.g. TinyStories) cost no RAM up front.
  """
  if not os.path.exists(path):
    raise ValueError(
      f'text: data.path={path!r} does not exist; set data.path to a text file or '
      'a folder of text files.'
    )
  if os.path.isfile(path):
    if os.path.getsize(path) == 0:
      return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode='r')
  parts = []
  for name in list_text_files(path):
    with open(name, 'rb') as f:
      parts.append(f.read())
  return np.frombuffer(b'\n'.join(parts), np.uint8)


class TextSource(StreamSource):
  """Byte-level language modelling on a local corpus; tokens are bytes, vocab 256."""

  name = 'text'

  def __init__(self, *, seq_len: int = 256, path: str | None = None):
    seq_len = check_int('seq_len', seq_len, minimum=1)
    if path is None:
      raise ValueError(
        'text: data.path is not set; set data.path to a text file or a folder of text files.'
      )
    corpus = read_corpus(os.fspath(path))
    need = 2 * (seq_len + 1)  # each split must hold one crop of seq_len+1 bytes
    if len(corpus) < need:
      raise ValueError(
        f'text: the corpus at data.path={path!r} has {len(corpus)} bytes, fewer than the '
        f'{need} needed for a train and an eval crop of seq_len+1 = {seq_len + 1} bytes; '
        'point data.path at a larger corpus (or lower seq_len).'
      )
    num_eval = max(int(len(corpus) * EVAL_FRACTION), seq_len + 1)
    self.path = path
    super().__init__(
      streams={'train': corpus[: len(corpus) - num_eval], 'eval': corpus[len(corpus) - num_eval :]},
      vocab_size=256,
      seq_len=seq_len,
    )

  @staticmethod
  def decode(tokens) -> str:
    """Byte tokens int [N] in [0, 256) -> text (invalid UTF-8 shown as U+FFFD)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > 255):
      raise ValueError(
        f'decode: tokens must be bytes in [0, 256), got range '
        f'[{tokens.min()}, {tokens.max()}]; drop masked (-1) entries first.'
      )
    return tokens.astype(np.uint8).tobytes().decode('utf-8', errors='replace')
