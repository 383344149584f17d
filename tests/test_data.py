"""Tests for smt_jax.data: probe targets re-derived independently, determinism, streams, loaders."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from smt_jax import data
from smt_jax.data import (
  DATASETS,
  generate_copy,
  generate_keys_values,
  generate_modular,
  generate_parity,
  generate_retrieval,
  generate_stack,
  make_source,
)

# The project's read-only shared material sits beside the repository (../shared).
MNIST_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data', 'mnist'
)
MNIST_ABSENT = 'real MNIST files absent (../shared/data/mnist)'
BATCH = 32


def _batch(source, split='train', step=0, batch_size=BATCH, seed=0, **kwargs):
  return source.batch(split=split, step=step, batch_size=batch_size, seed=seed, **kwargs)


def _check_common(source, batch):
  """Shapes, dtypes, token range, and y is either -1 or a token."""
  x, y = batch['x'], batch['y']
  assert x.dtype == np.int32 and y.dtype == np.int32
  assert x.shape == y.shape == (len(x), source.seq_len)
  assert x.min() >= 0 and x.max() < source.vocab_size
  assert ((y == -1) | ((y >= 0) & (y < source.vocab_size))).all()


@pytest.fixture(scope='module')
def text_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  rng = np.random.default_rng(0)
  words = ['the', 'cat', 'sat', 'on', 'a', 'mat', 'héllo', 'wörld', '\n']
  path.write_text(' '.join(rng.choice(words, size=2000)), encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def digits():
  return make_source('digits', seq_len=200)


# --------------------------------------------------------------------------------------------
# Probes: targets re-derived from x alone.


def test_retrieval_targets():
  source = make_source('retrieval', seq_len=20, num_tokens=5)
  assert source.vocab_size == 6
  batch = _batch(source)
  _check_common(source, batch)
  markers = []
  for x, y in zip(batch['x'], batch['y']):
    zeros = np.flatnonzero(x == 0)
    assert len(zeros) == 2 and zeros[1] == 19  # one marker, then the final query
    marker = zeros[0]
    assert marker + 1 < 20 // 2  # the needle sits in the first half
    assert y[-1] == x[marker + 1] and (y[:-1] == -1).all()
    markers.append(marker)
  assert len(set(markers)) > 1  # the marker moves


@pytest.mark.parametrize('reverse', [False, True])
def test_copy_targets(reverse):
  for seq_len in (17, 18):  # odd: exact fit; even: one trailing pad
    source = make_source('copy', seq_len=seq_len, num_tokens=7, reverse=reverse)
    batch = _batch(source)
    _check_common(source, batch)
    length = (seq_len - 1) // 2
    for x, y in zip(batch['x'], batch['y']):
      s = x[:length]
      copy = s[::-1] if reverse else s
      assert (s > 0).all() and x[length] == 0
      assert (x[length + 1 : 2 * length + 1] == copy).all()
      assert (y[length : 2 * length] == copy).all()
      assert (y[:length] == -1).all() and (y[2 * length :] == -1).all()
      # Teacher forcing: every target after the separator is the next input.
      assert (y[length : 2 * length - 1] == x[length + 1 : 2 * length]).all()
      if seq_len % 2 == 0:
        assert x[-1] == 0


def test_copy_label_noise_train_only():
  clean = make_source('copy', seq_len=201, num_tokens=50)
  noisy = make_source('copy', seq_len=201, num_tokens=50, label_noise=0.3)
  b_clean, b_noisy = _batch(clean), _batch(noisy)
  assert (b_clean['x'] == b_noisy['x']).all()  # noise only touches targets
  has_target = b_clean['y'] != -1
  assert ((b_noisy['y'] != -1) == has_target).all()
  changed = (b_clean['y'] != b_noisy['y'])[has_target].mean()
  # A replaced target keeps its value with chance 1/50: expect 0.3 * 49/50 = 0.294.
  assert 0.25 < changed < 0.34
  # The eval split is never noisy.
  assert (_batch(noisy, 'eval')['y'] == _batch(clean, 'eval')['y']).all()


@pytest.mark.parametrize('max_depth', [1, 3])
def test_stack_targets(max_depth):
  source = make_source('stack', seq_len=60, num_tokens=9, max_depth=max_depth)
  batch = _batch(source)
  _check_common(source, batch)
  depths = set()
  for x, y in zip(batch['x'], batch['y']):
    stack = []
    for token, target in zip(x, y):
      if token == 0:
        assert stack, 'popped an empty stack'
        assert target == stack.pop()
      else:
        assert target == -1
        stack.append(token)
        assert len(stack) <= max_depth
      depths.add(len(stack))
  assert max_depth in depths  # the walk reaches the cap
  if max_depth == 1:  # push, pop, push, pop, ...
    assert (batch['x'][:, 1::2] == 0).all() and (batch['x'][:, 0::2] > 0).all()


def test_keys_values_targets():
  for seq_len, num_keys in ((41, 8), (40, 30)):  # num_keys caps the pairs / the length does
    source = make_source('keys_values', seq_len=seq_len, num_keys=num_keys, num_values=5)
    assert source.vocab_size == 1 + num_keys + 5
    batch = _batch(source)
    _check_common(source, batch)
    num_pairs = min(num_keys, (seq_len - 2) // 2)
    for x, y in zip(batch['x'], batch['y']):
      sep = np.flatnonzero(x == 0)
      assert list(sep) == [2 * num_pairs]
      keys, values = x[0 : sep[0] : 2], x[1 : sep[0] : 2]
      assert ((keys >= 1) & (keys <= num_keys)).all()
      assert ((values > num_keys) & (values <= num_keys + 5)).all()
      assert len(set(keys.tolist())) == len(keys)  # distinct keys
      table = dict(zip(keys.tolist(), values.tolist()))
      queries = x[sep[0] + 1 :]
      assert len(queries) >= 1 and (y[: sep[0] + 1] == -1).all()
      assert [table[q] for q in queries.tolist()] == y[sep[0] + 1 :].tolist()


@pytest.mark.parametrize('seq_len', [30, 31])
def test_modular_targets(seq_len):
  modulus = 11
  source = make_source('modular', seq_len=seq_len, modulus=modulus)
  batch = _batch(source)
  _check_common(source, batch)
  w, b = np.meshgrid(np.arange(1, modulus), np.arange(modulus), indexing='ij')
  slopes = set()
  for x, y in zip(batch['x'], batch['y']):
    a = x[0::2]
    assert (y[1::2] == -1).all()
    assert (x[1::2] == y[0::2][: len(x[1::2])]).all()  # each answer is then read as input
    # Brute force over every hidden (w, b): exactly one explains all the targets (11 is prime).
    fits = ((w[..., None] * a + b[..., None]) % modulus == y[0::2]).all(-1)
    assert fits.sum() == 1
    slopes.add(int(w[fits][0]))
  assert len(slopes) > 1  # w is drawn per sequence


def test_modular_difficulty_draws_the_authors_few_functions():
  # difficulty 0.2 at modulus 17: w, b uniform in 0..2 (int(0.2 * 17) = 3), 9 functions.
  source = make_source('modular', seq_len=40, modulus=17, difficulty=0.2)
  batch = _batch(source, batch_size=64)
  _check_common(source, batch)
  w, b = np.meshgrid(np.arange(17), np.arange(17), indexing='ij')
  seen = set()
  for x, y in zip(batch['x'], batch['y']):
    a = x[0::2]
    fits = ((w[..., None] * a + b[..., None]) % 17 == y[0::2]).all(-1)
    ws, bs = np.nonzero(fits)
    assert fits.sum() == 1 and ws[0] < 3 and bs[0] < 3  # 17 is prime: one (w, b) fits
    seen.add((int(ws[0]), int(bs[0])))
  assert len(seen) > 5  # the functions vary per sequence
  with pytest.raises(ValueError, match='difficulty must be in'):
    make_source('modular', seq_len=10, modulus=5, difficulty=1.5)


def test_parity_targets():
  source = make_source('parity', seq_len=50)
  batch = _batch(source)
  _check_common(source, batch)
  assert source.vocab_size == 2
  for x, y in zip(batch['x'], batch['y']):
    parity = 0
    for bit, target in zip(x, y):
      parity ^= int(bit)
      assert target == parity


@pytest.mark.parametrize(
  'generate, kwargs',
  [
    (generate_retrieval, dict(seq_len=10, num_tokens=4)),
    (generate_copy, dict(seq_len=10, num_tokens=4)),
    (generate_stack, dict(seq_len=10, num_tokens=4, max_depth=2)),
    (generate_keys_values, dict(seq_len=10, num_keys=4, num_values=3)),
    (generate_modular, dict(seq_len=10, modulus=5)),
    (generate_parity, dict(seq_len=10)),
  ],
)
def test_generators_are_pure_functions_of_rng(generate, kwargs):
  x1, y1 = generate(np.random.default_rng(3), **kwargs)
  x2, y2 = generate(np.random.default_rng(3), **kwargs)
  assert x1.shape == y1.shape == (10,) and x1.dtype == y1.dtype == np.int32
  assert (x1 == x2).all() and (y1 == y2).all()


@pytest.mark.parametrize(
  'name, kwargs, argument',
  [
    ('retrieval', dict(seq_len=3), 'seq_len'),
    ('copy', dict(seq_len=2), 'seq_len'),
    ('copy', dict(label_noise=1.5), 'label_noise'),
    ('stack', dict(max_depth=0), 'max_depth'),
    ('keys_values', dict(num_keys=0), 'num_keys'),
    ('modular', dict(modulus=1), 'modulus'),
    ('parity', dict(seq_len=0), 'seq_len'),
    ('retrieval', dict(num_tokens=2.5), 'num_tokens'),
  ],
)
def test_bad_probe_arguments(name, kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    make_source(name, **kwargs)


def test_make_source_errors():
  assert set(DATASETS) == {
    'retrieval',
    'copy',
    'stack',
    'keys_values',
    'modular',
    'parity',
    'digits',
    'mnist',
    'image_folder',
    'quickdraw',
    'text',
  }
  with pytest.raises(ValueError, match='unknown dataset'):
    make_source('nope')
  with pytest.raises(ValueError, match='max_depth'):
    make_source('parity', max_depth=3)


# --------------------------------------------------------------------------------------------
# Determinism and sharding across processes.


def _all_sources(text_path, digits):
  probes = [
    make_source(name, seq_len=24)
    for name in ('retrieval', 'copy', 'stack', 'keys_values', 'modular', 'parity')
  ]
  return probes + [digits, make_source('text', seq_len=24, path=text_path)]


def test_determinism_and_process_sharding(text_path, digits):
  for source in _all_sources(text_path, digits):
    a = _batch(source, step=5, seed=1)
    _check_common(source, a)
    again = _batch(source, step=5, seed=1)
    for k in ('x', 'y'):
      assert (a[k] == again[k]).all(), source.name
    assert not (a['x'] == _batch(source, step=6, seed=1)['x']).all(), source.name
    assert not (a['x'] == _batch(source, step=5, seed=2)['x']).all(), source.name
    assert not (a['x'] == _batch(source, 'eval', step=5, seed=1)['x']).all(), source.name
    halves = [_batch(source, step=5, seed=1, process_index=i, process_count=2) for i in (0, 1)]
    for k in ('x', 'y'):
      assert (np.concatenate([h[k] for h in halves]) == a[k]).all(), source.name
    # Rows do not depend on the batch size either: a smaller batch is a prefix.
    assert (_batch(source, step=5, seed=1, batch_size=4)['x'] == a['x'][:4]).all()


@pytest.mark.parametrize(
  'kwargs, argument',
  [
    (dict(split='test'), 'split'),
    (dict(batch_size=0), 'batch_size'),
    (dict(batch_size=6, process_count=4), 'process_count'),
    (dict(process_index=2, process_count=2), 'process_index'),
    (dict(step=-1), 'step'),
    (dict(seed=-3), 'seed'),
  ],
)
def test_bad_batch_arguments(kwargs, argument):
  source = make_source('parity', seq_len=8)
  args = dict(split='train', step=0, batch_size=8, seed=0) | kwargs
  with pytest.raises(ValueError, match=argument):
    source.batch(**args)


# --------------------------------------------------------------------------------------------
# Streams: digits, MNIST (IDX and tfds), text.


def _check_stream(source, batch):
  _check_common(source, batch)
  assert (batch['y'][:, :-1] == batch['x'][:, 1:]).all()
  assert (batch['y'] >= 0).all()  # every step of a stream has a target


def _check_images_in_rows(source, batch, split):
  """BOS recurs every H*W+1 tokens, and the pixels after a BOS start a real image of the split."""
  period = int(np.prod(source.image_shape)) + 1
  flat = source.images(split).reshape(len(source.images(split)), -1).astype(np.int32)  # [N, H*W]
  checked = 0
  for row in batch['x']:
    bos = np.flatnonzero(row == source.bos)
    assert len(bos) > 0 and (np.diff(bos) == period).all()
    for start in bos:
      pixels = row[start + 1 : start + period]  # a whole image, or its start if the crop ends
      if len(pixels):
        assert (flat[:, : len(pixels)] == pixels).all(1).any()
        checked += 1
  assert checked > 0


def test_digits_stream(digits):
  assert digits.vocab_size == 18 and digits.bos == 17 and digits.levels == 17
  assert digits.image_shape == (8, 8)
  train, evaluation = digits.images('train'), digits.images('eval')
  assert train.shape == (1500, 8, 8) and evaluation.shape == (297, 8, 8)
  assert train.dtype == np.uint8 and train.max() == 16
  # The split partitions scikit-learn's images, and is the same in every process.
  from sklearn.datasets import load_digits

  everything = sorted(im.tobytes() for im in load_digits().images.astype(np.uint8))
  assert sorted(im.tobytes() for im in np.concatenate([train, evaluation])) == everything
  assert (make_source('digits', seq_len=8).images('eval') == evaluation).all()
  for split in ('train', 'eval'):
    batch = _batch(digits, split)
    _check_stream(digits, batch)
    _check_images_in_rows(digits, batch, split)
  with pytest.raises(ValueError, match='seq_len'):
    make_source('digits', seq_len=297 * 65)  # longer than the eval stream


def _write_idx(path, array, *, magic_type=0x08, compress=False):
  raw = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  raw += array.astype('>u1' if magic_type == 0x08 else '>i4').tobytes()
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(raw)


def test_idx_reader_roundtrip_and_errors(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
  _write_idx(tmp_path / 'plain', images)
  _write_idx(tmp_path / 'zipped.gz', images, compress=True)
  assert (data.read_idx(str(tmp_path / 'plain')) == images).all()
  assert (data.read_mnist_images(str(tmp_path / 'zipped.gz')) == images).all()
  ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
  _write_idx(tmp_path / 'ints', ints, magic_type=0x0C)
  assert (data.read_idx(str(tmp_path / 'ints')) == ints).all()

  (tmp_path / 'bad_magic').write_bytes(b'\x12\x34\x08\x03' + b'\0' * 100)
  with pytest.raises(ValueError, match='not an IDX file'):
    data.read_idx(str(tmp_path / 'bad_magic'))
  (tmp_path / 'truncated').write_bytes((tmp_path / 'plain').read_bytes()[:-10])
  with pytest.raises(ValueError, match='truncated'):
    data.read_idx(str(tmp_path / 'truncated'))
  (tmp_path / 'bad.gz').write_bytes(b'\x1f\x8b' + b'garbage' * 10)
  with pytest.raises(ValueError, match='gzip'):
    data.read_idx(str(tmp_path / 'bad.gz'))
  _write_idx(tmp_path / 'labels', np.zeros(5, np.uint8))
  with pytest.raises(ValueError, match=r'\[N, 28, 28\]'):
    data.read_mnist_images(str(tmp_path / 'labels'))


def test_mnist_from_idx_folder(tmp_path):
  rng = np.random.default_rng(1)
  train = rng.integers(0, 256, size=(6, 28, 28)).astype(np.uint8)
  test = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
  _write_idx(tmp_path / 'train-images-idx3-ubyte', train)
  _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', test, compress=True)
  source = make_source('mnist', seq_len=1000, path=str(tmp_path))
  assert source.vocab_size == 257 and source.bos == 256 and source.image_shape == (28, 28)
  assert (source.images('train') == train).all() and (source.images('eval') == test).all()
  for split in ('train', 'eval'):
    batch = _batch(source, split, batch_size=8)
    _check_stream(source, batch)
    _check_images_in_rows(source, batch, split)
  quantised = make_source('mnist', seq_len=1000, path=str(tmp_path), levels=16)
  assert quantised.vocab_size == 17 and quantised.bos == 16
  assert (quantised.images('train') == train // 16).all()
  _check_stream(quantised, _batch(quantised, batch_size=8))
  with pytest.raises(ValueError, match='path='):
    make_source('mnist', path=str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match='levels'):
    make_source('mnist', path=str(tmp_path), levels=300)


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason=MNIST_ABSENT)
def test_mnist_real_t10k():
  path = os.path.join(MNIST_DIR, 't10k-images-idx3-ubyte.gz')
  images = data.read_mnist_images(path)
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  with pytest.warns(UserWarning, match='9000'):
    source = make_source('mnist', seq_len=800, path=MNIST_DIR)
  assert (source.images('train') == images[:9000]).all()
  assert (source.images('eval') == images[9000:]).all()
  batch = _batch(source, 'eval', batch_size=8)
  _check_stream(source, batch)
  _check_images_in_rows(source, batch, 'eval')


def test_mnist_through_tfds_mock():
  tfds = pytest.importorskip('tensorflow_datasets')
  # USE_CODE: random examples built from the feature spec; no files, no network.
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    source = make_source('mnist', seq_len=1000)
  assert source.vocab_size == 257
  assert source.images('train').shape == (4, 28, 28) and source.images('eval').shape == (4, 28, 28)
  batch = _batch(source, batch_size=4)
  _check_stream(source, batch)
  _check_images_in_rows(source, batch, 'train')


# --------------------------------------------------------------------------------------------
# bos=False: the authors' MNIST stream (images back to back, vocab 256, no separator).


def _decode_idx_images(path):
  """An MNIST image IDX file decoded independently of smt_jax: gzip + numpy -> uint8 [N, 28, 28]."""
  raw = (gzip.open if path.endswith('.gz') else open)(path, 'rb').read()
  assert raw[:4] == b'\0\0\x08\x03'
  n, h, w = struct.unpack('>3I', raw[4:16])
  return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


def _check_windows(source, batch, stream, *, split, seed, step):
  """Row r is the window stream[s:s+T+1] (x its first T, y its last T) with s drawn from the
  row's own generator, as a pure function of (seed, split, step, r)."""
  T = source.seq_len
  for r, (x, y) in enumerate(zip(batch['x'], batch['y'])):
    rng = np.random.default_rng([seed, data.SPLITS[split], step, r])
    start = int(rng.integers(0, len(stream) - T))
    window = stream[start : start + T + 1].astype(np.int32)
    assert (x == window[:-1]).all() and (y == window[1:]).all()


def test_mnist_without_bos_is_the_concatenated_pixels(tmp_path):
  rng = np.random.default_rng(2)
  train = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
  test = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
  train[0, 0, 0], test[0, 0, 0] = 255, 0  # both extremes of the vocabulary occur
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', train, compress=True)
  _write_idx(tmp_path / 't10k-images-idx3-ubyte', test)
  decoded = {
    'train': _decode_idx_images(str(tmp_path / 'train-images-idx3-ubyte.gz')),
    'eval': _decode_idx_images(str(tmp_path / 't10k-images-idx3-ubyte')),
  }
  source = make_source('mnist', seq_len=1000, path=str(tmp_path), bos=False)
  assert source.vocab_size == 256 and source.bos is None and source.levels == 256
  for split in ('train', 'eval'):
    expected = decoded[split].reshape(-1)  # row-major pixels, image after image, nothing between
    stream = source.streams[split]
    assert stream.dtype == np.uint8 and stream.shape == expected.shape
    assert (stream == expected).all()
    for step in (0, 3):
      batch = _batch(source, split, step=step, batch_size=8, seed=4)
      _check_stream(source, batch)  # y[t] == x[t+1], every step has a target
      _check_windows(source, batch, expected, split=split, seed=4, step=step)
  # The same images with a BOS: each image after token 256, vocab 257 (unchanged default).
  with_bos = make_source('mnist', seq_len=1000, path=str(tmp_path))
  assert with_bos.vocab_size == 257 and with_bos.bos == 256
  framed = with_bos.streams['train'].reshape(len(train), 785)
  assert (framed[:, 0] == 256).all() and (framed[:, 1:] == train.reshape(len(train), -1)).all()
  # The longest window a split allows: seq_len + 1 == its token count (3 test images).
  longest = make_source('mnist', seq_len=3 * 784 - 1, path=str(tmp_path), bos=False)
  batch = _batch(longest, 'eval', batch_size=2)
  assert (batch['x'][0] == test.reshape(-1)[:-1]).all() and (
    batch['y'][0] == test.reshape(-1)[1:]
  ).all()
  with pytest.raises(ValueError, match='seq_len'):
    make_source('mnist', seq_len=3 * 784, path=str(tmp_path), bos=False)
  for bad in ('False', 0, None):
    with pytest.raises(ValueError, match='bos'):
      make_source('mnist', path=str(tmp_path), bos=bad)
  quantised = make_source('mnist', seq_len=100, path=str(tmp_path), levels=16, bos=False)
  assert (
    quantised.vocab_size == 16 and (quantised.streams['train'] == train.reshape(-1) // 16).all()
  )


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason=MNIST_ABSENT)
def test_mnist_real_t10k_without_bos():
  pixels = _decode_idx_images(os.path.join(MNIST_DIR, 't10k-images-idx3-ubyte.gz'))
  assert pixels.shape == (10000, 28, 28)
  with pytest.warns(UserWarning, match='9000'):
    source = make_source('mnist', seq_len=2 * 784, path=MNIST_DIR, bos=False)
  assert source.vocab_size == 256 and source.bos is None
  streams = {'train': pixels[:9000].reshape(-1), 'eval': pixels[9000:].reshape(-1)}
  for split, expected in streams.items():
    assert (source.streams[split] == expected).all()
    batch = _batch(source, split, step=7, batch_size=8, seed=0)
    _check_stream(source, batch)
    _check_windows(source, batch, expected, split=split, seed=0, step=7)
  # Literal values of MNIST t10k: test image 0 (a 7) has 116 nonzero pixels, the first at row 7,
  # column 6 (stream index 202), and no token is put before it.
  train = source.streams['train']
  assert int((train[:784] > 0).sum()) == 116 and int(np.flatnonzero(train)[0]) == 7 * 28 + 6
  assert list(train[202:207]) == [84, 185, 159, 151, 60]
  assert len(train) == 9000 * 784 and len(source.streams['eval']) == 1000 * 784


def test_digits_bos_option(digits):
  framed = make_source('digits', seq_len=200, bos=True)  # the default, spelled out
  assert framed.vocab_size == digits.vocab_size == 18 and framed.bos == digits.bos == 17
  for split in ('train', 'eval'):
    assert (framed.streams[split] == digits.streams[split]).all()
    for k in ('x', 'y'):
      assert (_batch(framed, split)[k] == _batch(digits, split)[k]).all()
  bare = make_source('digits', seq_len=200, bos=False)
  assert bare.vocab_size == 17 and bare.bos is None
  for split in ('train', 'eval'):
    images = bare.images(split)
    assert (images == digits.images(split)).all()
    assert (bare.streams[split] == images.reshape(-1)).all()
    batch = _batch(bare, split, step=2, seed=3)
    _check_stream(bare, batch)
    assert batch['x'].max() < 17
    _check_windows(bare, batch, images.reshape(-1), split=split, seed=3, step=2)


def test_image_prefix_puts_a_model_at_an_image_start(digits):
  assert (digits.image_prefix('eval', 3) == 17).all() and digits.image_prefix('eval', 3).shape == (
    3,
    1,
  )
  bare = make_source('digits', seq_len=200, bos=False)
  for source in (digits, bare):
    images = source.images('eval').reshape(len(source.images('eval')), -1)
    prefix = source.image_prefix('eval', 5)
    assert prefix.dtype == np.int32
    stream = source.streams['eval'].astype(np.int32)
    per_image = len(stream) // len(images)
    for i in range(1, 5):  # prefix then image i is exactly the stream's run up to image i's end
      end = (i + 1) * per_image
      run = np.concatenate([prefix[i], images[i]])
      assert (stream[end - len(run) : end] == run).all()
  assert (bare.image_prefix('eval', 2)[0] == bare.images('eval')[-1].reshape(-1)).all()
  with pytest.raises(ValueError, match='images'):
    bare.image_prefix('eval', 10_000)


def test_mnist_config_streams_as_the_reference(tmp_path):
  from experiments.configs import pixels

  c = pixels.get_config('mnist')
  assert c.data.options.mnist.bos is False
  assert c.eval.seq_len == 2 * 784 and c.eval.prompt_length == 784 + 392
  images = np.random.default_rng(3).integers(0, 256, size=(2, 28, 28)).astype(np.uint8)
  for name in ('train-images-idx3-ubyte', 't10k-images-idx3-ubyte'):
    _write_idx(tmp_path / name, images)
  source = make_source(c.data.name, path=str(tmp_path), **dict(c.data.options.mnist))
  assert source.vocab_size == 256 and (source.streams['train'] == images.reshape(-1)).all()
  assert pixels.get_config('digits').data.options.digits.bos is True  # digits keeps its BOS


def test_text_stream_decodes_to_corpus(text_path):
  with open(text_path, 'rb') as f:
    corpus = f.read()
  source = make_source('text', seq_len=64, path=text_path)
  assert source.vocab_size == 256
  num_eval = len(corpus) // 10
  train, evaluation = corpus[:-num_eval], corpus[-num_eval:]
  for split, part in (('train', train), ('eval', evaluation)):
    batch = _batch(source, split, batch_size=8)
    _check_stream(source, batch)
    for x, y in zip(batch['x'], batch['y']):
      crop = bytes(np.append(x, y[-1]).astype(np.uint8))
      assert crop in part
  assert source.decode(np.frombuffer(corpus, np.uint8)) == corpus.decode('utf-8')
  with pytest.raises(ValueError, match='decode'):
    source.decode(np.array([104, -1]))


def test_text_folder_is_sorted_recursive_and_skips_binary(tmp_path):
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'two.txt').write_text('second file ' * 20)
  (tmp_path / 'a.md').write_text('first file ' * 20)
  (tmp_path / 'blob.bin').write_bytes(b'\0\1\2' * 100)
  (tmp_path / '.hidden').write_text('secret')
  source = make_source('text', seq_len=16, path=str(tmp_path))
  whole = np.concatenate([source.streams['train'], source.streams['eval']])
  assert source.decode(whole) == 'first file ' * 20 + '\n' + 'second file ' * 20


def test_text_errors(tmp_path):
  with pytest.raises(ValueError, match='data.path'):
    make_source('text', path=str(tmp_path / 'missing.txt'))
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(ValueError, match='data.path'):
    make_source('text', path=str(tmp_path / 'empty.txt'))
  with pytest.raises(ValueError, match='data.path'):
    make_source('text', path=str(tmp_path))  # a folder whose only file is empty
  (tmp_path / 'short.txt').write_bytes(b'x' * 100)
  with pytest.raises(ValueError, match='data.path'):
    make_source('text', seq_len=64, path=str(tmp_path / 'short.txt'))
  with pytest.raises(ValueError, match='data.path'):
    make_source('text', seq_len=300_000, path=None)  # the built-in corpus is ~0.5 MB
