"""Sources that read files: the data cache, text corpora (built-in, ASCII, eval_path, hf://) and
sketches (image folders, Quick, Draw! bitmaps). Everything is generated here; nothing downloads."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from smt_jax import data
from smt_jax.data import files, sketches
from smt_jax.data import text as text_lib
from smt_jax.runner import config as config_lib
from smt_jax.runner import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(source, split='train', **kw):
  kw = {'step': 3, 'batch_size': 8, 'seed': 0, **kw}
  return source.batch(split=split, **kw)


def _check_pure_and_sharded(source, *, varied=True):
  """The guarantees of every source: a batch is a pure function of (seed, split, step, row)."""
  a = _batch(source)
  assert (a['x'] == _batch(source)['x']).all()
  if varied:  # data whose crops differ
    assert not (a['x'] == _batch(source, step=4)['x']).all()
  halves = [_batch(source, process_index=i, process_count=2) for i in (0, 1)]
  assert (np.concatenate([h['x'] for h in halves]) == a['x']).all()
  assert (a['x'][:, 1:] == a['y'][:, :-1]).all()  # a stream: y is x shifted by one
  assert a['x'].max() < source.vocab_size


def _crops_in(source, split, stream: bytes):
  batch = _batch(source, split)
  for x, y in zip(batch['x'], batch['y']):
    assert bytes(np.append(x, y[-1]).astype(np.uint8)) in stream


# --------------------------------------------------------------------------------------------
# The cache of derived arrays.


def test_cached_array_builds_once_and_rebuilds_when_an_input_changes(tmp_path):
  src = tmp_path / 'input.bin'
  src.write_bytes(b'abc')
  calls = []

  def build():
    calls.append(1)
    yield np.arange(5, dtype=np.int16).reshape(5, 1) * 2
    yield np.full((2, 1), 7, np.int16)

  kw = dict(kind='t', inputs=[str(src)], options={'o': 1}, build=build, dtype=np.int16)
  a = files.cached_array(cache_dir=str(tmp_path / 'c'), **kw)
  assert isinstance(a, np.memmap) and a.shape == (7, 1) and a.dtype == np.int16
  assert a[:, 0].tolist() == [0, 2, 4, 6, 8, 7, 7]
  b = files.cached_array(cache_dir=str(tmp_path / 'c'), **kw)
  assert len(calls) == 1 and (b == a).all()
  files.cached_array(cache_dir=str(tmp_path / 'c'), **{**kw, 'options': {'o': 2}})
  assert len(calls) == 2  # other options, another entry
  src.write_bytes(b'abcd')  # the input changed: rebuilt
  files.cached_array(cache_dir=str(tmp_path / 'c'), **kw)
  assert len(calls) == 3
  assert not [f for f in os.listdir(tmp_path / 'c') if f.startswith('.tmp')]


def test_cached_array_leaves_nothing_behind_when_the_build_fails(tmp_path):
  def build():
    yield np.zeros(3, np.uint8)
    raise RuntimeError('bad file')

  with pytest.raises(RuntimeError, match='bad file'):
    files.cached_array(
      kind='t', inputs=[], options={}, build=build, dtype=np.uint8, cache_dir=str(tmp_path)
    )
  assert os.listdir(tmp_path) == []


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('SMT_JAX_CACHE_DIR', str(tmp_path / 'env'))
  assert files.cache_root() == str(tmp_path / 'env')
  assert files.cache_root(str(tmp_path / 'arg')) == str(tmp_path / 'arg')
  monkeypatch.delenv('SMT_JAX_CACHE_DIR')
  assert files.cache_root().endswith(os.path.join('.cache', 'smt_jax'))


# --------------------------------------------------------------------------------------------
# Text.


def test_builtin_corpus_is_the_standard_library_help_text():
  from pydoc_data.topics import topics

  source = data.make_source('text', seq_len=64)
  whole = bytes(np.concatenate([source.streams['train'], source.streams['eval']]))
  assert len(whole) > 400_000
  for name in ('assignment', 'for', 'with'):  # every topic, in full
    assert topics[name].strip().encode() in whole
  assert b'The "for" statement is used to iterate' in whole  # real English
  num_eval = len(whole) // 10
  assert len(source.streams['eval']) == num_eval
  _crops_in(source, 'eval', whole[-num_eval:])
  _check_pure_and_sharded(source)


def test_ascii_encoding_drops_what_the_authors_loader_drops(tmp_path):
  story = 'Once upon a time — a café, naïve “quotes” and 😀 emoji.\n' * 30
  path = tmp_path / 'story.txt'
  path.write_text(story, encoding='utf-8')
  source = data.make_source(
    'text', seq_len=32, path=str(path), encoding='ascii', cache_dir=str(tmp_path / 'cache')
  )
  expected = story.encode('ascii', errors='ignore')  # the reference's tokenizer.encode
  whole = bytes(np.concatenate([source.streams['train'], source.streams['eval']]))
  assert whole == expected
  assert isinstance(source.streams['train'], np.memmap)  # the filtered copy, memory-mapped
  raw = data.make_source('text', seq_len=32, path=str(path))  # raw bytes keep UTF-8
  assert bytes(np.concatenate([raw.streams['train'], raw.streams['eval']])) == story.encode()


def test_file_chunks_join_files_and_filter_across_chunk_edges(tmp_path):
  (tmp_path / 'a.txt').write_bytes('aé'.encode() * 10)
  (tmp_path / 'b.txt').write_bytes(b'xyz' * 5)
  paths = [str(tmp_path / 'a.txt'), str(tmp_path / 'b.txt')]
  for chunk in (1, 3, 7, 1 << 20):
    for encoding in ('bytes', 'ascii'):
      got = b''.join(bytes(c) for c in text_lib._file_chunks(paths, encoding, chunk=chunk))
      want = 'aé'.encode() * 10 + b'\n' + b'xyz' * 5
      assert got == (want.decode().encode('ascii', 'ignore') if encoding == 'ascii' else want)


def test_eval_path_is_the_evaluation_split(tmp_path):
  train, valid = tmp_path / 'train.txt', tmp_path / 'valid.txt'
  train.write_bytes(b'train story one. ' * 50)
  valid.write_bytes(b'VALID STORY TWO. ' * 20)
  source = data.make_source('text', seq_len=16, path=str(train), eval_path=str(valid))
  assert bytes(source.streams['train']) == train.read_bytes()  # all of it trains
  assert bytes(source.streams['eval']) == valid.read_bytes()
  _crops_in(source, 'eval', valid.read_bytes())
  with pytest.raises(ValueError, match='data.eval_path'):
    data.make_source('text', seq_len=16, path=str(train), eval_path=str(tmp_path / 'nope.txt'))
  valid.write_bytes(b'short')
  with pytest.raises(ValueError, match='data.eval_path'):
    data.make_source('text', seq_len=16, path=str(train), eval_path=str(valid))
  with pytest.raises(ValueError, match='data.path'):
    data.make_source('text', seq_len=16, eval_path=str(valid))


def test_a_2gb_corpus_does_not_load_at_start(tmp_path):
  big = tmp_path / 'big.txt'
  with open(big, 'wb') as f:  # sparse: 2 GiB on paper, no disk blocks
    f.truncate(2 << 30)
    f.seek((2 << 30) - 6)
    f.write(b'end.\n\n')
  source = data.make_source('text', seq_len=256, path=str(big))
  # Memory-mapped views: building the source read nothing; a batch reads only its crops.
  assert isinstance(source.streams['train'], np.memmap)
  assert len(source.streams['train']) + len(source.streams['eval']) == 2 << 30
  assert bytes(source.streams['eval'][-6:]) == b'end.\n\n'
  _check_pure_and_sharded(source, varied=False)  # almost every crop is zeros


def test_hf_paths_resolve_through_the_hub_cache_offline(tmp_path):
  """`hf://` goes through huggingface_hub; with HF_HUB_OFFLINE=1 a cached file is used and a
  missing one is a one-line error naming data.path (a fresh process: the hub reads its
  environment at import)."""
  pytest.importorskip('huggingface_hub')
  commit = 'a' * 40
  repo = tmp_path / 'hub' / 'datasets--roneneldan--TinyStories'
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  snapshot = repo / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  (snapshot / 'TinyStories-valid.txt').write_text('Once upon a time. ' * 40)
  script = (
    'from smt_jax.data import files, make_source\n'
    "s = make_source('text', seq_len=16, encoding='ascii',\n"
    "    path='hf://datasets/roneneldan/TinyStories/TinyStories-valid.txt')\n"
    'print(bytes(s.streams["train"][:9]).decode())\n'
    'try:\n'
    "  files.resolve('hf://datasets/roneneldan/TinyStories/TinyStories-train.txt')\n"
    'except ValueError as e:\n'
    '  print(e)\n'
  )
  env = dict(
    os.environ,
    HF_HUB_CACHE=str(tmp_path / 'hub'),
    HF_HUB_OFFLINE='1',
    SMT_JAX_CACHE_DIR=str(tmp_path / 'cache'),
    JAX_PLATFORMS='cpu',
  )
  out = subprocess.run(
    [sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == 'Once upon'
  assert len(lines) == 2 and lines[1].startswith("data.path='hf://datasets/roneneldan/TinyStories/")
  assert 'TinyStories-train.txt' in lines[1] and 'connect to the network once' in lines[1]


def test_hf_path_errors():
  with pytest.raises(ValueError, match=r'data.path=.*hf://datasets/<owner>/<name>'):
    files.resolve('hf://models/gpt2/config.json')
  c = _config('text.py:smoke')
  c.data.path = 'hf://datasets/roneneldan/TinyStories/TinyStories-valid.txt'
  config_lib.validate(c)  # not fetched by the config check
  c = _config('pixels.py:mnist')
  c.data.path = 'hf://datasets/ylecun/mnist/x'
  with pytest.raises(config_lib.ConfigError, match='hf:// paths are for text'):
    config_lib.validate(c)


# --------------------------------------------------------------------------------------------
# Sketches.


def _blocky(rng, side: int, block: int) -> np.ndarray:
  """A uint8 [side*block]^2 image made of constant block x block squares."""
  return np.kron(rng.integers(0, 256, (side, side)), np.ones((block, block))).astype(np.uint8)


def _write_folder(folder, n: int, rng, *, side=8):
  """n PNG images (some RGBA, one JPEG-free) under two category subfolders; returns
  relpath -> the 8x8 image they decode to after 2x2 area averaging."""
  from PIL import Image

  expected = {}
  for i in range(n):
    img = _blocky(rng, side, 2)
    rel = f'{"cat" if i % 2 else "dog"}/{i:03d}.png'
    os.makedirs(folder / os.path.dirname(rel), exist_ok=True)
    if i % 5 == 0:  # opaque RGBA: alpha compositing must not change it
      rgba = np.stack([img, img, img, np.full_like(img, 255)], -1)
      Image.fromarray(rgba, 'RGBA').save(folder / rel)
    else:
      Image.fromarray(img, 'L').save(folder / rel)
    expected[rel] = img[::2, ::2]
  return expected


def test_image_folder_decodes_inverts_quantises_and_splits_by_hash(tmp_path):
  rng = np.random.default_rng(0)
  expected = _write_folder(tmp_path / 'sk', 40, rng)
  (tmp_path / 'sk' / 'notes.txt').write_text('not an image')
  levels = 4
  kw = dict(seq_len=20, path=str(tmp_path / 'sk'), image_size=8, levels=levels)
  source = data.make_source('image_folder', cache_dir=str(tmp_path / 'cache'), **kw)
  rels = sorted(expected)
  held = [zlib.crc32(r.encode()) % 10 == 0 for r in rels]
  assert any(held) and not all(held)
  want = {
    'train': [expected[r] for r, h in zip(rels, held) if not h],
    'eval': [expected[r] for r, h in zip(rels, held) if h],
  }
  for split in ('train', 'eval'):
    got = source.images(split)
    quantised = (255 - np.stack(want[split]).astype(np.int64)) * levels // 256  # inverted
    assert got.shape == quantised.shape and (got == quantised).all(), split
  assert source.vocab_size == levels and source.bos is None
  _check_pure_and_sharded(source)
  # The second build reads the cache; an edited image rebuilds it.
  again = data.make_source('image_folder', cache_dir=str(tmp_path / 'cache'), **kw)
  assert (again.images('train') == source.images('train')).all()
  assert len(os.listdir(tmp_path / 'cache')) == 1
  from PIL import Image

  first = rels[held.index(False)]  # the first training image
  Image.fromarray(np.zeros((16, 16), np.uint8), 'L').save(tmp_path / 'sk' / first)
  edited = data.make_source('image_folder', cache_dir=str(tmp_path / 'cache'), **kw)
  assert len(os.listdir(tmp_path / 'cache')) == 2
  assert (edited.images('train')[0] == levels - 1).all()  # black, inverted: the top level
  assert (edited.images('train')[1:] == source.images('train')[1:]).all()


def test_load_image_pads_non_square_and_composites_transparency(tmp_path):
  from PIL import Image

  wide = np.zeros((4, 8), np.uint8)  # black strokes on a 4x8 sheet
  Image.fromarray(wide, 'L').save(tmp_path / 'wide.png')
  got = sketches.load_image(str(tmp_path / 'wide.png'), image_size=8, invert=True)
  # Padded with white paper above and below, then inverted: strokes 255, paper 0.
  assert (got[2:6] == 255).all() and (got[:2] == 0).all() and (got[6:] == 0).all()
  clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent: paper
  Image.fromarray(clear, 'RGBA').save(tmp_path / 'clear.png')
  assert (sketches.load_image(str(tmp_path / 'clear.png'), image_size=4, invert=True) == 0).all()


def test_image_folder_errors(tmp_path):
  rng = np.random.default_rng(1)
  _write_folder(tmp_path / 'sk', 12, rng)
  (tmp_path / 'sk' / 'cat' / 'broken.png').write_bytes(b'\x89PNG not really')
  with pytest.raises(ValueError, match='broken.png'):
    data.make_source('image_folder', path=str(tmp_path / 'sk'), cache_dir=str(tmp_path / 'c'))
  assert not os.listdir(tmp_path / 'c')  # nothing half-written left in the cache
  with pytest.raises(ValueError, match='data.path'):
    data.make_source('image_folder', path=str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='holds no'):
    data.make_source('image_folder', path=str(tmp_path / 'empty'))
  with pytest.raises(ValueError, match='levels'):
    data.make_source('image_folder', path=str(tmp_path / 'sk'), levels=300)


def test_image_folder_eval_path(tmp_path):
  rng = np.random.default_rng(2)
  train = _write_folder(tmp_path / 'train', 6, rng)
  valid = _write_folder(tmp_path / 'valid', 3, rng)
  source = data.make_source(
    'image_folder',
    seq_len=20,
    path=str(tmp_path / 'train'),
    eval_path=str(tmp_path / 'valid'),
    image_size=8,
    invert=False,
    cache_dir=str(tmp_path / 'c'),
  )
  assert (source.images('train') == np.stack([train[r] for r in sorted(train)])).all()
  assert (source.images('eval') == np.stack([valid[r] for r in sorted(valid)])).all()


def _write_quickdraw(folder, rng, counts: dict[str, int]):
  os.makedirs(folder, exist_ok=True)
  out = {}
  for name, n in counts.items():
    out[name] = rng.integers(0, 256, (n, 784), dtype=np.uint8)
    np.save(folder / f'{name}.npy', out[name])
  return out


def test_quickdraw_categories_limits_and_splits(tmp_path):
  rng = np.random.default_rng(3)
  drawn = _write_quickdraw(tmp_path / 'qd', rng, {'cat': 30, 'dog': 50, 'zebra': 20})
  source = data.make_source(
    'quickdraw', seq_len=40, path=str(tmp_path / 'qd'), categories='dog,cat', max_per_category=40
  )
  # dog: its first 40 drawings, the last 4 evaluate; cat: all 30, the last 3 evaluate.
  want_train = np.concatenate([drawn['dog'][:36], drawn['cat'][:27]]).reshape(-1, 28, 28)
  want_eval = np.concatenate([drawn['dog'][36:40], drawn['cat'][27:]]).reshape(-1, 28, 28)
  assert (source.images('train') == want_train).all()
  assert (source.images('eval') == want_eval).all()
  assert source.vocab_size == 256 and (source.streams['train'] == want_train.reshape(-1)).all()
  _check_pure_and_sharded(source)
  every = data.make_source('quickdraw', seq_len=40, path=str(tmp_path / 'qd'), levels=2, bos=True)
  assert len(every.images('train')) == 27 + 45 + 18  # all three, sorted by name
  assert (every.images('train')[:27] == drawn['cat'][:27].reshape(-1, 28, 28) // 128).all()
  assert every.vocab_size == 3  # two levels and a BOS
  one = data.make_source('quickdraw', seq_len=40, path=str(tmp_path / 'qd' / 'zebra.npy'))
  assert len(one.images('eval')) == 2


def test_quickdraw_errors(tmp_path):
  rng = np.random.default_rng(4)
  _write_quickdraw(tmp_path / 'qd', rng, {'cat': 10})
  np.save(tmp_path / 'qd' / 'bad.npy', np.zeros((5, 28, 28), np.uint8))
  with pytest.raises(ValueError, match=r'bad.npy.*expected uint8 \[N, 784\]'):
    data.make_source('quickdraw', path=str(tmp_path / 'qd'))
  with pytest.raises(ValueError, match=r"no \['horse.npy'\]"):
    data.make_source('quickdraw', path=str(tmp_path / 'qd'), categories='cat,horse')
  with pytest.raises(ValueError, match='data.path'):
    data.make_source('quickdraw', path=str(tmp_path / 'none'))
  with pytest.raises(ValueError, match='data.path is not set'):
    data.make_source('quickdraw')


# --------------------------------------------------------------------------------------------
# Configs.


def _config(spec: str):
  import importlib

  name, _, arg = spec.partition(':')
  module = importlib.import_module(f'experiments.configs.{name[:-3]}')
  return module.get_config(arg) if arg else module.get_config()


def test_config_checks_for_paths(tmp_path):
  c = _config('pixels.py:smoke')
  c.data.eval_path = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match='data.eval_path.*digits takes no'):
    config_lib.validate(c)
  c = _config('pixels.py:sketch,smoke')
  with pytest.raises(config_lib.ConfigError, match='data.path.*image_folder needs'):
    config_lib.validate(c)
  c.data.path = str(tmp_path / 'file.png')
  (tmp_path / 'file.png').write_bytes(b'x')
  with pytest.raises(config_lib.ConfigError, match='is not a folder'):
    config_lib.validate(c)
  c = _config('text.py:smoke')
  config_lib.validate(c)  # no path: the built-in corpus
  c.data.eval_path = str(tmp_path / 'missing.txt')
  with pytest.raises(config_lib.ConfigError, match='data.eval_path.*set data.path'):
    config_lib.validate(c)
  t = _config('text.py:tinystories')
  assert t.data.path.startswith('hf://') and t.data.eval_path.endswith('TinyStories-valid.txt')
  assert t.data.options.text.encoding == 'ascii'


def test_too_few_eval_images_for_the_samples_is_refused_before_training(tmp_path):
  rng = np.random.default_rng(5)
  _write_quickdraw(tmp_path, rng, {'cat': 20})  # 2 eval drawings
  c = _config('pixels.py:quickdraw,smoke')
  c.data.path = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r'config.samples.num = 4: .* has 2'):
    experiment.build_experiment(c)
