"""Pixel streams (docs/method.md 8): images as raster-scan intensity tokens in one stream.

With `bos=True` (the default) each image becomes [BOS, p_0, ..., p_{H*W-1}] with BOS = levels
(one past the largest intensity), so vocab = levels + 1 and BOS recurs every H*W + 1 tokens.
With `bos=False` the stream is the images' pixels alone, concatenated with no separator, and
vocab = levels: for MNIST that is the authors' stream exactly (every image's 784 uint8 pixels in
row-major order, one image after another, vocabulary 256). A batch row is a random crop of T+1
tokens of its split's stream (`StreamSource`), x = crop[:-1], y = crop[1:].

- `digits`: scikit-learn's bundled 8x8 digits (17 levels), offline.
- `mnist`: 28x28, 256 levels, from IDX files in `path` or through tensorflow-datasets.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import warnings

import numpy as np

from smt_jax import storage
from smt_jax.data import files
from smt_jax.data.base import SPLITS, DataPaths, StreamSource, check_int

# IDX type byte -> numpy dtype (IDX data is big-endian).
_IDX_DTYPES = {
  0x08: np.dtype('u1'),
  0x09: np.dtype('i1'),
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}

# The standard MNIST image files, looked up in the folder with or without '.gz'.
MNIST_FILES = {'train': 'train-images-idx3-ubyte', 'eval': 't10k-images-idx3-ubyte'}

# Fixed digits split: the first 1500 images of a seed-0 shuffle train, the other 297 evaluate.
DIGITS_TRAIN_IMAGES = 1500


def check_bool(name: str, value) -> bool:
  """Returns `value` as a Python bool, or raises ValueError (a string 'False' is not a bool)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f'{name} must be True or False, got {value!r}.')
  return bool(value)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped or not, detected from its content) into a native-endian array.

  Raises:
    ValueError: not an IDX file (wrong magic), or the data size does not match the header.
  """
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] == b'\x1f\x8b':  # gzip magic, whatever the file is called
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise ValueError(f'{path}: corrupt gzip data ({e}); download the file again.') from e
  if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] not in _IDX_DTYPES:
    raise ValueError(
      f'{path}: not an IDX file (magic bytes {raw[:4].hex()!r}; expected 0000 then a type '
      f'byte in {[hex(k) for k in _IDX_DTYPES]} and the number of dims, e.g. 00000803 for '
      'MNIST images); point path at the original MNIST files.'
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f'{path}: truncated IDX header ({len(raw)} bytes, need {header}).')
  shape = struct.unpack(f'>{ndim}I', raw[4:header])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
      f'{path}: the IDX header says shape {shape} ({expected} data bytes) but '
      f'{len(raw) - header} bytes follow; the file is truncated or corrupt, download it again.'
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def read_mnist_images(path: str) -> np.ndarray:
  """Reads an MNIST image IDX file: uint8 [N, 28, 28], or ValueError naming what is wrong."""
  images = read_idx(path)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(
      f'{path}: expected uint8 images [N, 28, 28], got {images.dtype} '
      f'{images.shape}; is this an MNIST images (not labels) file?'
    )
  return images


def image_stream(images: np.ndarray, bos: int | None) -> np.ndarray:
  """images int [N, H, W] -> the split's token stream, each image in raster order.

  bos an int: uint16 [N * (H*W + 1)], each image after a `bos` token.
  bos None: [N * H*W], the images' pixels concatenated with no separator (uint8 when the
  pixels fit in a byte, as MNIST's do, else uint16).
  """
  n = len(images)
  pixels = images.reshape(n, -1)
  if bos is None:
    dtype = np.uint8 if pixels.size == 0 or int(pixels.max()) < 256 else np.uint16
    return pixels.astype(dtype).reshape(-1)
  bos_column = np.full((n, 1), bos, np.uint16)
  return np.concatenate([bos_column, pixels.astype(np.uint16)], axis=1).reshape(-1)


def _on_demand(images) -> bool:
  """Whether `images` are read on demand (`files.RemoteRecords`, `files.RemoteImages`)."""
  return hasattr(images, 'read_many')


class ImageStream:
  """What `image_stream` builds, without building it: the stream of images read on demand
  (`files.RemoteRecords`, `files.RemoteImages`), whose `crops` read only the images under each
  crop."""

  ndim = 1

  def __init__(self, images, bos: int | None):
    self.images, self.bos = images, bos
    self.period = int(np.prod(images.shape[1:])) + (bos is not None)  # tokens per image
    self.dtype = np.dtype(np.uint16 if bos is not None else np.uint8)

  def __len__(self) -> int:
    return len(self.images) * self.period

  @property
  def shape(self) -> tuple[int]:
    return (len(self),)

  def crops(self, starts, length: int) -> np.ndarray:
    """[len(starts), length]: row i is the stream's tokens [starts[i], starts[i] + length)."""
    first = [int(s) // self.period for s in starts]
    ranges = [(a, (int(s) + length - 1) // self.period + 1) for a, s in zip(first, starts)]
    rows = [
      image_stream(im, self.bos)[s - a * self.period :][:length]
      for s, a, im in zip(starts, first, self.images.read_many(ranges))
    ]
    return np.stack(rows) if rows else np.zeros((0, length), self.dtype)


def _check_images(images: dict[str, np.ndarray], levels: int) -> None:
  """Every split: integer images [N >= 1, H, W] of one common (H, W), values in [0, levels)
  (images read on demand: their shape and dtype; the runner checks every batch's tokens)."""
  if sorted(images) != sorted(SPLITS):
    raise ValueError(f'images must have the splits {sorted(SPLITS)}, got {sorted(images)}.')
  shapes = set()
  for split, im in images.items():
    im = im if _on_demand(im) else np.asarray(im)
    if im.ndim != 3 or not len(im) or not np.issubdtype(im.dtype, np.integer):
      raise ValueError(
        f'{split} images must be integer intensities [N >= 1, H, W], got '
        f'{im.dtype} {im.shape}; quantise float images to 0..levels-1 first.'
      )
    if not _on_demand(im) and (im.min() < 0 or im.max() >= levels):
      raise ValueError(
        f'{split} images hold intensities in [{im.min()}, {im.max()}], outside '
        f'[0, levels={levels}); quantise them (or raise levels), never clip.'
      )
    shapes.add(im.shape[1:])
  if len(shapes) != 1:
    raise ValueError(f'train and eval images differ in shape: {sorted(shapes)}; one (H, W).')


class PixelSource(StreamSource):
  """Next-token prediction on concatenated raster-scanned images.

  Attributes:
    image_shape: (H, W).
    levels: intensity tokens are 0..levels-1.
    bos: the token before each image (= levels; vocab_size = levels + 1), or None when the
      source was built with `bos=False` (images back to back; vocab_size = levels).
  """

  bits_unit = 'bits_per_dim'  # a token is one pixel's intensity

  def __init__(self, *, images: dict[str, np.ndarray], levels: int, seq_len: int, bos: bool = True):
    levels = check_int('levels', levels, minimum=2)
    bos = check_bool('bos', bos)
    _check_images(images, levels)
    self._images = images
    self.image_shape = tuple(images['train'].shape[1:])
    self.levels = levels
    self.bos = levels if bos else None
    streams = {  # images read on demand stay there: their stream is read by the crop
      split: ImageStream(im, self.bos) if _on_demand(im) else image_stream(im, self.bos)
      for split, im in images.items()
    }
    super().__init__(streams=streams, vocab_size=levels + int(bos), seq_len=seq_len)

  def images(self, split: str) -> np.ndarray:
    """The split's images as tokens (quantised to `levels`): uint8 [N, H, W] (uint16 if
    levels > 256)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
    return self._images[split]

  def image_prefix(self, split: str, n: int) -> np.ndarray:
    """What precedes image i of `split` in its stream, for i < n: int32 [n, P].

    With a BOS: [BOS] (P = 1). Without one the stream marks no image boundary, so the prefix is
    the whole image before it (image i-1; image 0 gets the split's last image; P = H*W): a model
    that has read it is at the start of an image. Prompts for sampling images start with it.
    """
    images = self.images(split)
    n = check_int('n', n, minimum=1)
    if n > len(images):
      raise ValueError(f'n={n} is more than the {len(images)} {split} images.')
    if self.bos is not None:
      return np.full((n, 1), self.bos, np.int32)
    return images[np.arange(-1, n - 1)].reshape(n, -1).astype(np.int32)


class DigitsSource(PixelSource):
  """scikit-learn's 8x8 handwritten digits (1797 images, 17 levels; BOS 17 and vocab 18, or
  with `bos=False` no BOS and vocab 17)."""

  name = 'digits'

  def __init__(self, *, seq_len: int = 256, bos: bool = True):
    from sklearn.datasets import load_digits  # lazy: only this source needs scikit-learn

    images = load_digits().images.astype(np.uint8)  # [1797, 8, 8], values 0..16
    order = np.random.default_rng(0).permutation(len(images))  # fixed: same split everywhere
    super().__init__(
      images={
        'train': images[order[:DIGITS_TRAIN_IMAGES]],
        'eval': images[order[DIGITS_TRAIN_IMAGES:]],
      },
      levels=17,
      seq_len=seq_len,
      bos=bos,
    )


def _find_mnist_file(folder: str, split: str) -> str | None:
  for name in (MNIST_FILES[split], MNIST_FILES[split] + '.gz'):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def load_mnist_idx(folder: str) -> dict[str, np.ndarray]:
  """MNIST images from IDX files in `folder`: {'train', 'eval'} -> uint8 [N, 28, 28].

  With only one of the two files present, that file serves both splits: its first 90% train,
  its last 10% evaluate (t10k alone: 9000 / 1000), with a warning.
  """
  if not os.path.isdir(folder):
    raise ValueError(
      f'mnist: path={folder!r} is not a folder; pass the folder holding '
      f'{MNIST_FILES["train"]}(.gz) and {MNIST_FILES["eval"]}(.gz), or path=None '
      'to load MNIST through tensorflow-datasets.'
    )
  paths = {split: _find_mnist_file(folder, split) for split in SPLITS}
  if paths['train'] and paths['eval']:
    return {split: read_mnist_images(path) for split, path in paths.items()}
  found = paths['train'] or paths['eval']
  if found is None:
    raise ValueError(
      f'mnist: path={folder!r} holds neither {MNIST_FILES["train"]}(.gz) nor '
      f'{MNIST_FILES["eval"]}(.gz); put the MNIST IDX files there, or pass '
      'path=None to load MNIST through tensorflow-datasets.'
    )
  images = read_mnist_images(found)
  num_eval = len(images) // 10
  warnings.warn(
    f'mnist: only {os.path.basename(found)} found in {folder!r}; using its first '
    f'{len(images) - num_eval} images to train and its last {num_eval} to evaluate.',
    stacklevel=2,
  )
  return {'train': images[: len(images) - num_eval], 'eval': images[len(images) - num_eval :]}


def quantise(pixels: np.ndarray, levels: int) -> np.ndarray:
  """uint8 intensities 0..255 -> 0..levels-1 (v * levels // 256: equal-width bins)."""
  if levels == 256:
    return np.asarray(pixels, np.uint8)
  return (pixels.astype(np.uint16) * levels // 256).astype(np.uint8)


def remote_idx_images(url: str, transform=None) -> files.RemoteRecords:
  """The images [N, H, W] of a raw (not gzipped) uint8 IDX file on an object store, read on
  demand; ValueError when it is not one."""
  head = np.asarray(files.RemoteRecords.file(url)[:16]).tobytes()
  if len(head) < 16 or head[:4] != b'\0\0\x08\x03':
    raise ValueError(f'{url}: not a raw uint8 IDX images file (magic {head[:4].hex()!r}).')
  n, h, w = struct.unpack('>3I', head[4:16])
  images = files.RemoteRecords.file(url, offset=16, shape=(h, w), transform=transform)
  if len(images) != n:
    raise ValueError(f'{url}: the IDX header says {n} images, the file holds {len(images)}.')
  return images


def load_mnist_remote(url: str, levels: int) -> dict:
  """MNIST's two raw IDX files in the object-store folder `url`, read on demand (each host
  reads its rows' images); else (gzipped files, or one of the two) the folder staged whole."""
  q = functools.partial(quantise, levels=levels)
  names = {split: storage.join(url, MNIST_FILES[split]) for split in SPLITS}
  if all(storage.exists(n) for n in names.values()):
    return {split: remote_idx_images(n, q) for split, n in names.items()}
  return {split: q(im) for split, im in load_mnist_idx(files.stage(url)).items()}


def load_mnist_tfds() -> dict[str, np.ndarray]:
  """MNIST images through `tfds.data_source` (random access; no TensorFlow needed).

  Returns: {'train', 'eval'} -> uint8 [N, 28, 28] (tfds 'train' and 'test').
  """
  import tensorflow_datasets as tfds  # lazy: heavy, and only this path needs it

  images = {}
  for split, tfds_split in (('train', 'train'), ('eval', 'test')):
    try:
      source = tfds.data_source('mnist', split=tfds_split)
    except Exception as e:  # no network, no prepared copy, ...: say what else would work
      raise ValueError(
        f'mnist: tensorflow-datasets could not provide mnist/{tfds_split} ({e}); '
        'pass path=<folder with the MNIST IDX files> instead.'
      ) from e
    images[split] = np.stack(
      [np.asarray(source[i]['image'], np.uint8).reshape(28, 28) for i in range(len(source))]
    )
  return images


class MnistSource(PixelSource):
  """MNIST as pixel streams: 28x28, `levels` intensities (256: raw).

  `bos=False` with levels=256 is the authors' stream: vocab 256, images back to back, no
  separator (`experiments/configs/pixels.py:mnist`). `bos=True` puts BOS = levels before each
  image (vocab levels + 1).
  """

  name = 'mnist'
  paths = DataPaths(
    'a folder of MNIST IDX files', when_empty='tensorflow-datasets', folder=True, object_store=True
  )

  def __init__(
    self, *, seq_len: int = 784, path: str | None = None, levels: int = 256, bos: bool = True
  ):
    levels = check_int('levels', levels, minimum=2, fix='Use 2..256 intensity levels.')
    if levels > 256:
      raise ValueError(f'levels must be <= 256, got {levels}. Use 2..256 intensity levels.')
    if path is not None and files.is_object_store(path):
      images = load_mnist_remote(path, levels)  # quantised as read
    else:
      images = load_mnist_tfds() if path is None else load_mnist_idx(path)
      images = {split: quantise(im, levels) for split, im in images.items()}
    super().__init__(images=images, levels=levels, seq_len=seq_len, bos=bos)
