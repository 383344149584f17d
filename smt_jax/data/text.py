"""Byte-level text (docs/method.md section 8): next-byte prediction (vocab 256).

Where the text comes from (`path`, and optionally `eval_path`):
- `path=None`: the English text every Python ships, the standard library's `pydoc_data.topics`
  (the help pages of the language reference, about 0.5 MB), so a text run needs no download.
  A smoke-scale corpus: enough to learn words and punctuation, far too small for stories.
- a file, or a folder (every non-hidden text file under it, recursively, sorted by relative path
  and joined with a newline), or an `hf://datasets/<owner>/<name>/<file>` path (fetched once
  through `huggingface_hub`, see `smt_jax.data.files`).
- Splits: with `eval_path`, train on all of `path` and evaluate on `eval_path` (e.g. TinyStories'
  official validation file); without it, the last 10% of the bytes (at least seq_len+1) evaluate.

Bytes (`encoding`):
- 'bytes' (the default): the files' raw bytes (UTF-8 text stays multi-byte).
- 'ascii': every byte >= 128 dropped, as the authors' TinyStories loader does
  (`str.encode('ascii', errors='ignore')` on UTF-8 text drops exactly these bytes).

Object stores (`gs://...`): a file or a folder read as raw bytes is read by the row, by range
requests (`smt_jax.data.files.RemoteRecords`), so each host of a pod fetches only the crops it
trains on; ASCII filtering needs the whole corpus, so it is staged once per host (`files.stage`).
For a pod, store the corpus as the bytes to train on (e.g. filtered to ASCII once, beforehand).

Memory: a single file read as raw bytes is memory-mapped directly. A folder, or ASCII filtering,
derives a new byte array: it is built once, in 64 MiB chunks, into the data cache and
memory-mapped from there (`smt_jax.data.files.cached_array`). So a 2 GB training file costs no
RAM at start; the first ASCII run over it spends a few seconds filtering.
"""

from __future__ import annotations

import os

import numpy as np

from smt_jax import storage
from smt_jax.data import files
from smt_jax.data.base import DataPaths, StreamSource, check_int

# Fraction of the corpus (its tail) held out for evaluation when there is no eval_path.
EVAL_FRACTION = 0.1
ENCODINGS = ('bytes', 'ascii')
# The corpus of path=None.
BUILTIN_CORPUS = 'pydoc_data.topics'
_CHUNK = 64 << 20  # bytes per chunk when deriving a corpus


def _is_text_file(path: str) -> bool:
  """A file counts as text unless its first 8 KiB hold a NUL byte (the usual binary test)."""
  with open(path, 'rb') as f:
    return b'\0' not in f.read(8192)


def list_text_files(folder: str) -> list[str]:
  """Every non-hidden text file under `folder`, recursively, sorted by relative path."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith('.')]  # skip .git and the like
    found += [os.path.join(root, f) for f in names if not f.startswith('.')]
  return sorted((p for p in found if _is_text_file(p)), key=lambda p: os.path.relpath(p, folder))


def remote_text_folder(url: str, *, field: str = 'data.path'):
  """What `read_corpus` makes of a local folder, for one on an object store, read on demand:
  its text files (no NUL in the first 8 KiB, read at once for all) joined with a newline."""
  whole = files.RemoteRecords.folder(url, field=field)
  parts = whole.parts()
  starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
  heads = whole.read_many([(a, a + min(len(p), 8192)) for a, p in zip(starts, parts)])
  text = [p for p, head in zip(parts, heads) if 0 not in head]
  if not text:
    raise ValueError(
      f'text: {field}={url!r} is a folder with no text files; point it at a text file or a '
      'folder holding some.'
    )
  return files.RemoteRecords.concat(text, separator=b'\n')


def builtin_corpus() -> bytes:
  """`pydoc_data.topics` as UTF-8: every help topic, sorted by name, each after a title line."""
  from pydoc_data.topics import topics  # standard library

  return '\n\n'.join(f'{name}\n\n{topics[name].strip()}' for name in sorted(topics)).encode('utf-8')


def ascii_only(raw: np.ndarray) -> np.ndarray:
  """The bytes < 128 of `raw`, in order (what `.encode('ascii', errors='ignore')` keeps)."""
  return raw[raw < 128]


def _file_chunks(paths: list[str], encoding: str, chunk: int = _CHUNK):
  """The bytes of `paths` joined with b'\\n', in chunks of <= `chunk` (ASCII only if asked)."""
  for i, path in enumerate(paths):
    if i:
      yield np.frombuffer(b'\n', np.uint8)
    raw = (
      np.memmap(path, dtype=np.uint8, mode='r') if os.path.getsize(path) else np.zeros(0, np.uint8)
    )
    for start in range(0, len(raw), chunk):
      part = np.asarray(raw[start : start + chunk])
      yield ascii_only(part) if encoding == 'ascii' else part


def read_corpus(
  path: str | None,
  *,
  encoding: str = 'bytes',
  field: str = 'data.path',
  cache_dir: str | None = None,
) -> np.ndarray:
  """The corpus at `path` (see the module docstring) as uint8 [N], memory-mapped where possible.

  Raises:
    ValueError: the path does not exist, or holds no text file, naming `field`.
  """
  if encoding not in ENCODINGS:
    raise ValueError(f"text: encoding={encoding!r}; choose one of {list(ENCODINGS)}.")
  if path is None:
    raw = np.frombuffer(builtin_corpus(), np.uint8)
    return ascii_only(raw) if encoding == 'ascii' else raw
  if files.is_object_store(path) and encoding == 'bytes':  # read by the row
    if storage.path(path).is_file():
      return files.RemoteRecords.file(path, field=field)
    return remote_text_folder(path, field=field)
  if files.is_object_store(path):
    local = files.stage(path, field=field, cache_dir=cache_dir)
  else:
    local = files.resolve(os.fspath(path), field=field)
  if not os.path.exists(local):
    raise ValueError(
      f'text: {field}={path!r} does not exist; set {field} to a text file or a folder of '
      'text files.'
    )
  if os.path.isfile(local):
    if encoding == 'bytes':
      if os.path.getsize(local) == 0:
        return np.zeros(0, np.uint8)
      return np.memmap(local, dtype=np.uint8, mode='r')
    paths = [local]
  else:
    paths = list_text_files(local)
    if not paths:
      raise ValueError(
        f'text: {field}={path!r} is a folder with no text files; point it at a text file or '
        'a folder holding some.'
      )
  return files.cached_array(
    kind=f'text-{encoding}',
    inputs=paths,
    options={'encoding': encoding, 'join': 'newline'},
    build=lambda: _file_chunks(paths, encoding),
    dtype=np.uint8,
    cache_dir=cache_dir,
  )


class TextSource(StreamSource):
  """Byte-level language modelling; tokens are bytes, vocab 256.

  Attributes:
    path, eval_path, encoding: as given (`path=None`: the built-in corpus, `BUILTIN_CORPUS`).
  """

  name = 'text'
  paths = DataPaths(
    'a text file, a folder of text files or an hf:// path',
    when_empty='the built-in corpus',
    hub=True,
    eval_what='a text file, a folder of text files or an hf:// path',
    object_store=True,
  )
  bits_unit = 'bits_per_byte'

  def __init__(
    self,
    *,
    seq_len: int = 256,
    path: str | None = None,
    eval_path: str | None = None,
    encoding: str = 'bytes',
    cache_dir: str | None = None,
  ):
    seq_len = check_int('seq_len', seq_len, minimum=1)
    if eval_path is not None and path is None:
      raise ValueError(
        f'text: data.eval_path={eval_path!r} is set but data.path is not; set data.path to the '
        'training corpus too (or unset data.eval_path to use the built-in corpus).'
      )
    corpus = read_corpus(path, encoding=encoding, cache_dir=cache_dir)
    where = f'data.path={path!r}' if path is not None else f'the built-in corpus ({BUILTIN_CORPUS})'
    kept = ' of ASCII' if encoding == 'ascii' else ''
    if eval_path is not None:
      streams = {
        'train': corpus,
        'eval': read_corpus(
          eval_path, encoding=encoding, field='data.eval_path', cache_dir=cache_dir
        ),
      }
      for split, field, p in (('train', 'data.path', path), ('eval', 'data.eval_path', eval_path)):
        if len(streams[split]) < seq_len + 1:
          raise ValueError(
            f'text: {field}={p!r} holds {len(streams[split])} bytes{kept}, fewer than '
            f'one crop of seq_len+1 = {seq_len + 1}; use a larger file (or lower seq_len).'
          )
    else:
      need = 2 * (seq_len + 1)  # each split must hold one crop of seq_len+1 bytes
      if len(corpus) < need:
        raise ValueError(
          f'text: {where} has {len(corpus)} bytes{kept}, fewer than the {need} needed '
          f'for a train and an eval crop of seq_len+1 = {seq_len + 1} bytes; point data.path at '
          'a larger corpus (or lower seq_len).'
        )
      num_eval = max(int(len(corpus) * EVAL_FRACTION), seq_len + 1)
      streams = {
        'train': corpus[: len(corpus) - num_eval],
        'eval': corpus[len(corpus) - num_eval :],
      }
    self.path, self.eval_path, self.encoding = path, eval_path, encoding
    super().__init__(streams=streams, vocab_size=256, seq_len=seq_len)

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
