"""Sketches as pixel streams (docs/method.md section 8; the paper's second image domain).

- `image_folder`: every PNG/JPEG under a folder (e.g. the Sketchy database's sketches), turned
  grayscale, padded to a square with the background, resized by area averaging (so thin strokes
  survive as gray instead of vanishing), optionally inverted (line drawings are dark on white;
  inverted, the background is intensity 0 as in MNIST) and quantised to `levels` intensities.
  Decoding tens of thousands of images takes a while, so the quantised array is built once into
  the data cache (`smt_jax.data.files.cached_array`) and memory-mapped on later runs; on an
  object store (`gs://...`) each host fetches and decodes only the images under its rows
  (`files.RemoteImages`).
  Split: with `eval_path`, its images evaluate; otherwise an image evaluates when the CRC-32 of
  its path relative to the folder is 0 mod 10 (about 10%; stable as the folder grows).
- `quickdraw`: Google's Quick, Draw! `numpy_bitmap/<category>.npy` files (uint8 [N, 784], 28x28,
  white strokes on black): one file, or a folder of them (each a category, sorted by name).
  The first `max_per_category` drawings of each category are used (memory-mapped: only those are
  read; on an object store, read by the row: `files.RemoteRecords`); of these the last 10%
  evaluate.

Both stream their images as `PixelSource` does (`bos=True`: a BOS before each image, vocab
levels + 1; `bos=False`: images back to back, vocab levels), and keep its guarantees: every batch a
pure function of (seed, split, step, row); a file that cannot be read is an error naming it.
"""

from __future__ import annotations

import functools
import io
import os
import zlib

import numpy as np

from smt_jax import storage
from smt_jax.data import files
from smt_jax.data.base import DataPaths, check_int
from smt_jax.data.pixels import PixelSource, check_bool, quantise

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
QUICKDRAW_SHAPE = (28, 28)
EVAL_FRACTION = 0.1


def _check_levels(levels) -> int:
  levels = check_int('levels', levels, minimum=2, fix='Use 2..256 intensity levels.')
  if levels > 256:
    raise ValueError(f'levels must be <= 256, got {levels}. Use 2..256 intensity levels.')
  return levels


def list_images(folder: str, *, field: str = 'data.path') -> list[str]:
  """Every non-hidden PNG/JPEG under `folder` (local or on an object store), recursively, sorted
  by relative path."""
  if not storage.is_dir(folder):
    raise ValueError(f'image_folder: {field}={folder!r} is not a folder of PNG/JPEG images.')
  found = [f for f in storage.walk_files(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
  if not found:
    raise ValueError(
      f'image_folder: {field}={folder!r} holds no {"/".join(IMAGE_EXTENSIONS)} files; point it '
      'at a folder of images (subfolders are searched).'
    )
  return sorted(found, key=lambda p: _relative(p, folder))


def _relative(path: str, folder: str) -> str:
  """`path` relative to `folder`, '/'-separated, for local paths and URLs alike."""
  if files.is_object_store(folder):
    return path[len(os.fspath(folder).rstrip('/')) + 1 :]
  return os.path.relpath(path, folder).replace(os.sep, '/')


def load_image(path: str, *, image_size: int, invert: bool, data: bytes | None = None):
  """One image file (or its bytes, `data`) -> uint8 [image_size, image_size], 0..255 (see the
  module docstring)."""
  from PIL import Image  # Pillow comes with matplotlib

  try:
    with Image.open(path if data is None else io.BytesIO(data)) as im:
      im.load()
      if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        white = Image.new('RGBA', im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)  # transparent = paper
      gray = im.convert('L')
  except Exception as e:  # truncated, not an image, unsupported mode...
    raise ValueError(
      f'image_folder: cannot read {path!r} as an image ({e}); remove or fix it.'
    ) from None
  w, h = gray.size
  side = max(w, h)
  if (w, h) != (side, side):  # pad with the background: white paper, or black when not inverted
    square = Image.new('L', (side, side), 255 if invert else 0)
    square.paste(gray, ((side - w) // 2, (side - h) // 2))
    gray = square
  pixels = np.asarray(gray.resize((image_size, image_size), Image.BOX), np.uint8)
  return 255 - pixels if invert else pixels


def load_image_folder(
  folder: str,
  *,
  image_size: int,
  invert: bool,
  levels: int,
  field: str = 'data.path',
  cache_dir: str | None = None,
) -> tuple[list[str], np.ndarray]:
  """(the image paths, their quantised pixels uint8 [N, image_size, image_size]): cached, or read
  on demand from an object store."""
  paths = list_images(folder, field=field)
  if files.is_object_store(folder):  # read on demand: each host decodes its rows' images

    def load(url, data):
      return quantise(load_image(url, image_size=image_size, invert=invert, data=data), levels)

    return paths, files.RemoteImages(paths, load, (image_size, image_size))

  def build():
    for p in paths:
      yield quantise(load_image(p, image_size=image_size, invert=invert), levels)[None]

  images = files.cached_array(
    kind='images',
    inputs=paths,
    options={'image_size': image_size, 'invert': invert, 'levels': levels, 'resize': 'box'},
    build=build,
    dtype=np.uint8,
    cache_dir=cache_dir,
  )
  return paths, images


def eval_mask(paths: list[str], folder: str) -> np.ndarray:
  """bool [N]: True where the CRC-32 of the path relative to `folder` is 0 mod 10."""
  return np.array([zlib.crc32(_relative(p, folder).encode()) % 10 == 0 for p in paths], bool)


class ImageFolderSource(PixelSource):
  """A folder of PNG/JPEG images (e.g. Sketchy sketches) as a pixel stream."""

  name = 'image_folder'
  paths = DataPaths(
    'a folder of PNG/JPEG images',
    folder=True,
    eval_what='a folder of PNG/JPEG images',
    object_store=True,
  )

  def __init__(
    self,
    *,
    seq_len: int = 784,
    path: str | None = None,
    eval_path: str | None = None,
    image_size: int = 28,
    levels: int = 256,
    invert: bool = True,
    bos: bool = False,
    cache_dir: str | None = None,
  ):
    if not path:
      raise ValueError('image_folder: data.path is not set; set it to a folder of PNG/JPEG images.')
    image_size = check_int('image_size', image_size, minimum=2)
    levels = _check_levels(levels)
    invert = check_bool('invert', invert)
    opts = dict(image_size=image_size, invert=invert, levels=levels, cache_dir=cache_dir)
    paths, images = load_image_folder(path, **opts)
    if eval_path:
      _, eval_images = load_image_folder(eval_path, field='data.eval_path', **opts)
      split = {'train': images, 'eval': eval_images}
    else:
      held_out = eval_mask(paths, path)
      if held_out.all() or not held_out.any():
        raise ValueError(
          f'image_folder: the {len(paths)} images under data.path={path!r} all fall in one split '
          '(about 1 in 10 evaluate, by a hash of the file name); add images or set '
          'data.eval_path to a folder of evaluation images.'
        )
      split = {'train': images[~held_out], 'eval': images[held_out]}
    self.path, self.eval_path = path, eval_path
    super().__init__(images=split, levels=levels, seq_len=seq_len, bos=bos)


def list_quickdraw(path: str, categories) -> list[str]:
  """The category files: `path` itself (a .npy), or the .npy files of a folder (sorted), or the
  named `categories` in it. `path` may be local or on an object store."""
  if storage.exists(path) and not storage.is_dir(path):
    if categories:
      raise ValueError(
        f'quickdraw: data.path={path!r} is one file, so options.categories={categories!r} cannot '
        'choose among categories; point data.path at the numpy_bitmap folder instead.'
      )
    return [path]
  if not storage.is_dir(path):
    raise ValueError(
      f'quickdraw: data.path={path!r} does not exist; set it to a numpy_bitmap/<category>.npy '
      'file or a folder of them.'
    )
  available = [f for f in storage.list_names(path) if f.endswith('.npy') and not f.startswith('.')]
  if categories:
    names = (
      [c.strip() for c in categories.split(',')]
      if isinstance(categories, str)
      else list(categories)
    )
    missing = [c for c in names if f'{c}.npy' not in available]
    if missing:
      raise ValueError(
        f'quickdraw: no {[m + ".npy" for m in missing]} in data.path={path!r}; options.categories '
        f'must name files there (found {len(available)}: {available[:5]}...).'
      )
    available = [f'{c}.npy' for c in names]
  if not available:
    raise ValueError(
      f'quickdraw: data.path={path!r} holds no .npy files (numpy_bitmap/<category>.npy).'
    )
  return [storage.join(path, f) for f in available]


def read_quickdraw(path: str, limit: int, transform=None):
  """The first `limit` drawings of one category file: uint8 [n, 28, 28], memory-mapped (a local
  file) or read on demand (`files.RemoteRecords`, an object store; `transform` applied as read)."""
  remote = files.is_object_store(path)
  try:
    if remote:
      head = files.RemoteRecords.file(path)
      f = io.BytesIO(np.asarray(head[: min(len(head), 4096)]).tobytes())
      fmt = np.lib.format
      read = {(1, 0): fmt.read_array_header_1_0}.get(fmt.read_magic(f), fmt.read_array_header_2_0)
      shape, fortran, dtype = read(f)
    else:
      bitmaps = np.load(path, mmap_mode='r', allow_pickle=False)
      shape, fortran, dtype = bitmaps.shape, False, bitmaps.dtype
  except Exception as e:
    raise ValueError(f'quickdraw: cannot read {path!r} as a .npy array ({e}).') from None
  if dtype != np.uint8 or len(shape) != 2 or shape[1] != 784 or fortran:
    raise ValueError(
      f'quickdraw: {path!r} holds {dtype} {shape}; expected uint8 [N, 784] '
      '(a numpy_bitmap file: 28x28 drawings, one per row).'
    )
  if shape[0] < 2:
    raise ValueError(
      f'quickdraw: {path!r} holds {shape[0]} drawing(s); need >= 2 (train and eval).'
    )
  if remote:
    n = min(shape[0], limit)
    return files.RemoteRecords.file(
      path, offset=f.tell(), count=n, shape=QUICKDRAW_SHAPE, transform=transform
    )
  drawings = np.asarray(bitmaps[:limit]).reshape(-1, *QUICKDRAW_SHAPE)
  return transform(drawings) if transform else drawings


class QuickDrawSource(PixelSource):
  """Quick, Draw! numpy bitmaps (28x28) as a pixel stream."""

  name = 'quickdraw'
  paths = DataPaths('a numpy_bitmap/<category>.npy file or a folder of them', object_store=True)

  def __init__(
    self,
    *,
    seq_len: int = 784,
    path: str | None = None,
    categories: str | list | None = None,
    max_per_category: int = 20_000,
    levels: int = 256,
    bos: bool = False,
  ):
    if not path:
      raise ValueError(
        'quickdraw: data.path is not set; set it to a numpy_bitmap/<category>.npy file or a '
        'folder of them.'
      )
    levels = _check_levels(levels)
    limit = check_int('max_per_category', max_per_category, minimum=2)
    train, held_out = [], []
    for f in list_quickdraw(path, categories):
      drawings = read_quickdraw(f, limit, functools.partial(quantise, levels=levels))
      num_eval = max(1, int(len(drawings) * EVAL_FRACTION))
      train.append(drawings[:-num_eval])
      held_out.append(drawings[-num_eval:])
    self.path, self.categories = path, categories
    join = files.RemoteRecords.concat if files.is_object_store(path) else np.concatenate
    super().__init__(
      images={'train': join(train), 'eval': join(held_out)},
      levels=levels,
      seq_len=seq_len,
      bos=bos,
    )
