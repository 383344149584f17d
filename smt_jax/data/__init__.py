"""Data sources for SMT (docs/method.md 8): synthetic probes and real token streams, in numpy.

Every source implements `Source.batch(split=, step=, batch_size=, seed=, process_index=,
process_count=) -> {'x': int32 [B/P, T], 'y': int32 [B/P, T]}` (y == -1: no target), a pure
function of its arguments. Build one by name with `make_source(name, **kwargs)`; the names are
the keys of `DATASETS`. A source's class holds all a run needs to know of it: its keyword options
(`source_options`: a run's `config.data.options.<name>`), what it reads from files (`paths`, a
`DataPaths`: `config.data.path` and `eval_path`), and what a token is (`bits_unit`); a new
dataset is its class and a line in `DATASETS`.
"""

from __future__ import annotations

import inspect

from smt_jax.data.base import (
  IGNORE,
  SPLITS,
  DataPaths,
  Source,
  StreamSource,
  check_batch_tokens,
  row_rng,
)
from smt_jax.data.pixels import (
  DigitsSource,
  MnistSource,
  PixelSource,
  image_stream,
  read_idx,
  read_mnist_images,
)
from smt_jax.data.probes import (
  CopySource,
  KeysValuesSource,
  ModularSource,
  ParitySource,
  ProbeSource,
  RetrievalSource,
  StackSource,
  generate_copy,
  generate_keys_values,
  generate_modular,
  generate_parity,
  generate_retrieval,
  generate_stack,
)
from smt_jax.data.sketches import ImageFolderSource, QuickDrawSource
from smt_jax.data.text import TextSource

# The one name -> constructor table (keyword-only constructors).
DATASETS = {
  'retrieval': RetrievalSource,
  'copy': CopySource,
  'stack': StackSource,
  'keys_values': KeysValuesSource,
  'modular': ModularSource,
  'parity': ParitySource,
  'digits': DigitsSource,
  'mnist': MnistSource,
  'image_folder': ImageFolderSource,
  'quickdraw': QuickDrawSource,
  'text': TextSource,
}


# The constructor arguments a run gives from its own fields (data.seq_len or a phase's length,
# data.path, data.eval_path), not from the source's options.
RUN_ARGS = ('seq_len', 'path', 'eval_path')


def source_options(name: str) -> dict:
  """The source's own options and their defaults: its keyword arguments beyond `RUN_ARGS`."""
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; choose one of {sorted(DATASETS)}.')
  params = inspect.signature(DATASETS[name]).parameters
  return {n: p.default for n, p in params.items() if n not in RUN_ARGS}


def make_source(name: str, **kwargs) -> Source:
  """Builds the source `name` (a key of `DATASETS`) with its keyword arguments.

  Raises:
    ValueError: unknown name, unknown keyword argument, or a bad argument value.
  """
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; choose one of {sorted(DATASETS)}.')
  constructor = DATASETS[name]
  accepted = list(inspect.signature(constructor).parameters)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise ValueError(f'dataset {name!r} takes no argument(s) {unknown}; it accepts {accepted}.')
  return constructor(**kwargs)


__all__ = [
  'DATASETS',
  'DataPaths',
  'IGNORE',
  'SPLITS',
  'Source',
  'StreamSource',
  'ProbeSource',
  'PixelSource',
  'check_batch_tokens',
  'make_source',
  'source_options',
  'RUN_ARGS',
  'row_rng',
  'RetrievalSource',
  'CopySource',
  'StackSource',
  'KeysValuesSource',
  'ModularSource',
  'ParitySource',
  'DigitsSource',
  'MnistSource',
  'ImageFolderSource',
  'QuickDrawSource',
  'TextSource',
  'generate_retrieval',
  'generate_copy',
  'generate_stack',
  'generate_keys_values',
  'generate_modular',
  'generate_parity',
  'read_idx',
  'read_mnist_images',
  'image_stream',
]
