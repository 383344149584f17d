"""Where a source's files come from: local paths, `hf://` paths, and a cache of derived arrays.

- `resolve(path)`: a local path as is; `hf://datasets/<owner>/<name>[@<revision>]/<file>` is
  downloaded once through `huggingface_hub` (into its own cache, `HF_HUB_CACHE`) and its local
  path returned. With `HF_HUB_OFFLINE=1`, or no network, a file already in that cache is used.
- `RemoteRecords`: files on an object store (`gs://...`, `s3://...`: any store
  `smt_jax.storage` reaches) as a read-only array that fetches only what is indexed, by range
  requests: text files' bytes, MNIST's raw IDX images, Quick, Draw!'s `.npy` drawings;
  `RemoteImages` the same for a folder of image files, decoded as read. A source over them reads
  just the crops of its own rows, so each host of a pod reads its rows, never the whole dataset.
- `stage(url)`: a file or folder on an object store copied once into the cache folder and its
  local path returned, for data that cannot be read by the row (ASCII filtering, gzipped IDX
  files); the copy is reused while every object keeps its size and modification time. Each
  host stages its own copy (the sources then read the rows they need from the local file).
- `cached_array(...)`: a derived array (a corpus filtered to ASCII, a folder's files joined, a
  folder of images decoded and quantised) built once, chunk by chunk, into a `.npy` file under the
  cache folder and memory-mapped from then on, so a corpus larger than RAM trains and a 2 GB file
  is not read into memory at start. The cache key covers the inputs' paths, sizes and
  modification times and the options, so editing a file rebuilds. Several processes building the
  same entry at once are safe: each writes a private temporary file and renames it into place
  (the contents are identical).

The cache folder is `cache_dir` when given, else `$SMT_JAX_CACHE_DIR`, else `~/.cache/smt_jax`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from smt_jax import storage

HF_PREFIX = "hf://"
# hf://datasets/<owner>/<name>[@<revision>]/<path in the repository>
_HF_PATH = re.compile(r"^hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?/(.+)$")

# Bumped when the layout of a cached array changes, so old entries are not reused.
CACHE_VERSION = 1


def is_remote(path: str) -> bool:
  """True for paths this module downloads (`hf://...`)."""
  return str(path).startswith(HF_PREFIX)


def resolve(path: str, *, field: str = "data.path") -> str:
  """A local path for `path`, downloading an `hf://` file first (see the module docstring).

  Raises:
    ValueError: a malformed `hf://` path, `huggingface_hub` missing, or the file neither in the
      hub cache nor downloadable (offline), each naming `field` and what to do.
  """
  path = os.fspath(path)
  if not is_remote(path):
    return path
  match = _HF_PATH.match(path)
  if not match:
    raise ValueError(
      f"{field}={path!r}: hf:// paths have the form "
      "hf://datasets/<owner>/<name>[@<revision>]/<file>, e.g. "
      "hf://datasets/roneneldan/TinyStories/TinyStories-valid.txt."
    )
  repo_id, revision, filename = match.groups()
  try:
    import huggingface_hub  # lazy: only hf:// paths need it
  except ImportError:
    raise ValueError(
      f"{field}={path!r}: hf:// paths need huggingface_hub; pip install 'smt-jax[hf]' (or "
      "download the file and pass its local path)."
    ) from None
  try:
    return huggingface_hub.hf_hub_download(
      repo_id=repo_id, filename=filename, repo_type="dataset", revision=revision
    )
  except Exception as e:  # offline and not cached, no such file, no access, ...
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
      f"{field}={path!r}: could not fetch {filename} from the dataset {repo_id} "
      f"({type(e).__name__}: {reason}); connect to the network once (the file is then cached "
      "in HF_HUB_CACHE), or download it and pass its local path."
    ) from None


def is_object_store(path: str) -> bool:
  """True for object-store URLs that `stage` copies (`gs://...`), not hf:// or local paths."""
  return storage.is_remote(path) and not is_remote(path)


def _read_index(array, index) -> np.ndarray:
  """`array[index]` read (an int or an index array of a RemoteRecords or RemoteImages)."""
  rows = array.read_many([(i, i + 1) for i in np.ravel(index)])
  out = np.concatenate(rows) if rows else np.zeros((0, *array.shape[1:]), np.uint8)
  return out.reshape(*np.shape(index), *array.shape[1:])


class RemoteRecords:
  """Records of one shape, stored back to back in object-store files (`gs://...`), as a
  read-only uint8 array [N, *shape] that reads only what is asked for, by range requests.

  `RemoteRecords.file(url)` is a file's bytes ([N]); `.file(url, offset=16, shape=(28, 28))` the
  images of an IDX file; `concat` joins arrays (each file a segment). A slice is a lazy view (no
  read); `np.asarray(view)`, an index or `read_many(ranges)` fetch, all ranges of one call
  concurrently (fsspec's `cat_ranges`), and `transform` (e.g. a quantisation) is applied to what
  was read. `crops(starts, n)` is a byte stream's rows. `bytes_read` counts the bytes fetched
  through an array and all its views: what lets a test see that a host read only its own rows.
  """

  dtype = np.dtype(np.uint8)

  def __init__(self, fs, segments, shape, transform=None, counter=None):
    """segments: ((path, byte offset, number of records), ...), in order."""
    self._fs, self._segments, self._shape = fs, tuple(segments), tuple(shape)
    self._transform, self._counter = transform, counter or [0]

  @classmethod
  def file(cls, url, *, offset=0, count=None, shape=(), field="data.path", transform=None):
    """The records of file `url` from byte `offset` (`count` of them; None: to its end)."""
    import fsspec

    try:
      storage.check_reachable(url, field=field)
    except storage.StorageError as e:
      raise ValueError(str(e)) from None
    fs, path = fsspec.core.url_to_fs(os.fspath(url))
    if not fs.isfile(path):
      raise ValueError(f"{field}={url}: is not a file; point it at the data.")
    size = int(np.prod(shape, dtype=np.int64))
    count = (int(fs.size(path)) - offset) // size if count is None else count
    return cls(fs, [(path, offset, count)], shape, transform)

  @classmethod
  def folder(cls, url, *, field="data.path") -> RemoteRecords:
    """The bytes of every file under folder `url` whose name and folders do not start with '.',
    sorted by path, back to back ([N]; one listing, nothing read)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(url))
    found = fs.find(root, detail=True)
    keep = lambda p: not any(n.startswith(".") for n in p[len(root) :].split("/"))  # noqa: E731
    segments = [(p, 0, int(info["size"])) for p, info in sorted(found.items()) if keep(p)]
    if not segments:
      raise ValueError(f"{field}={url}: is a folder with no files in it; point it at the data.")
    return cls(fs, segments, ())

  def parts(self) -> list[RemoteRecords]:
    """One array per segment (per file), sharing this one's counter."""
    return [
      RemoteRecords(self._fs, [s], self._shape, self._transform, self._counter)
      for s in self._segments
    ]

  @classmethod
  def concat(cls, parts, separator: bytes | None = None) -> RemoteRecords:
    """`parts` back to back, with the records of `separator` (e.g. b'\\n') between two."""
    first, segments = parts[0], []
    for i, p in enumerate(parts):
      if i and separator:  # a constant segment: (None, its bytes, its number of records)
        segments.append((None, separator, len(separator) // first._record_size()))
      segments += p._segments
    return cls(first._fs, segments, first._shape, first._transform, first._counter)

  def _record_size(self) -> int:
    return int(np.prod(self._shape, dtype=np.int64))

  @property
  def bytes_read(self) -> int:
    return self._counter[0]

  @property
  def shape(self) -> tuple:
    return (len(self), *self._shape)

  @property
  def ndim(self) -> int:
    return 1 + len(self._shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def __len__(self) -> int:
    return sum(n for _, _, n in self._segments)

  def __getitem__(self, key):
    if isinstance(key, slice):
      if key.step not in (None, 1):
        raise TypeError(f"RemoteRecords takes slices with step 1 (a[i:j]), not {key!r}.")
      start, stop, _ = key.indices(len(self))
      pieces = self._pieces(start, max(start, stop))
      return RemoteRecords(self._fs, pieces, self._shape, self._transform, self._counter)
    return _read_index(self, np.arange(len(self))[key])  # an int or an index array

  def __array__(self, dtype=None, copy=None):
    return self.read_many([(0, len(self))])[0].astype(dtype or np.uint8, copy=False)

  def _pieces(self, start: int, stop: int) -> list:
    """The segments' parts holding records [start, stop)."""
    size, out, first = self._record_size(), [], 0
    for path, offset, n in self._segments:
      lo, hi = max(start, first), min(stop, first + n)
      if lo < hi and path is None:  # constant: offset holds the bytes
        out.append((None, offset[(lo - first) * size : (hi - first) * size], hi - lo))
      elif lo < hi:
        out.append((path, offset + (lo - first) * size, hi - lo))
      first += n
    return out

  def read_many(self, ranges) -> list[np.ndarray]:
    """Records [a, b) for each (a, b) of `ranges`: uint8 [b - a, *shape] each, one fetch."""
    size, n = self._record_size(), len(self)
    if any(not 0 <= a <= b <= n for a, b in ranges):
      raise IndexError(f"a range of {list(ranges)[:4]}... runs outside [0, {n}).")
    pieces = [self._pieces(a, b) for a, b in ranges]
    flat = [p for ps in pieces for p in ps if p[2] and p[0] is not None]
    raws = iter(
      self._fs.cat_ranges(
        [p for p, _, _ in flat], [o for _, o, _ in flat], [o + c * size for _, o, c in flat]
      )
      if flat
      else []
    )
    out = []
    for ps in pieces:
      parts = []
      for path, offset, count in (p for p in ps if p[2]):
        if path is None:
          parts.append(np.frombuffer(offset, np.uint8))
          continue
        raw = next(raws)
        if isinstance(raw, Exception) or len(raw) != count * size:
          raise OSError(f"a range read returned {raw!r:.80} instead of {count * size} bytes.")
        self._counter[0] += len(raw)
        parts.append(np.frombuffer(raw, np.uint8))
      rows = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
      rows = rows.reshape(-1, *self._shape)
      out.append(self._transform(rows) if self._transform else rows)
    return out

  def crops(self, starts, length: int) -> np.ndarray:
    """uint8 [len(starts), length, *shape]: row i is self[starts[i] : starts[i] + length]."""
    rows = self.read_many([(int(s), int(s) + length) for s in starts])
    return np.stack(rows) if rows else np.zeros((0, length, *self._shape), np.uint8)

  def __repr__(self) -> str:
    return f"RemoteRecords({len(self._segments)} segment(s), shape {self.shape})"


class RemoteImages:
  """Image files on an object store, one record each, as a read-only uint8 array [N, *shape]
  that fetches (concurrently) and decodes only the images asked for: `load(url, data: bytes)`
  turns a file's bytes into its record. Slices and boolean masks are lazy views; an index (or
  index array) reads; the rest as `RemoteRecords` (`read_many`, `np.asarray`, `bytes_read`)."""

  dtype = np.dtype(np.uint8)

  def __init__(self, urls, load, shape, *, fs=None, counter=None):
    import fsspec

    self.urls, self._load, self._shape = list(urls), load, tuple(shape)
    self._fs = fs or (fsspec.core.url_to_fs(self.urls[0])[0] if self.urls else None)
    self._counter = counter or [0]

  bytes_read = RemoteRecords.bytes_read
  shape = RemoteRecords.shape
  ndim = RemoteRecords.ndim
  size = RemoteRecords.size

  def __len__(self) -> int:
    return len(self.urls)

  def __getitem__(self, key):
    index = np.arange(len(self))[key]
    if isinstance(key, slice) or np.asarray(key).dtype == bool:  # a lazy view
      urls = [self.urls[i] for i in index]
      return RemoteImages(urls, self._load, self._shape, fs=self._fs, counter=self._counter)
    return _read_index(self, index)  # an int or an index array

  def __array__(self, dtype=None, copy=None):
    return self.read_many([(0, len(self))])[0].astype(dtype or np.uint8, copy=False)

  def read_many(self, ranges) -> list[np.ndarray]:
    """Images [a, b) for each (a, b) of `ranges`: uint8 [b - a, *shape] each, one fetch."""
    if any(not 0 <= a <= b <= len(self) for a, b in ranges):
      raise IndexError(f"a range of {list(ranges)[:4]}... runs outside [0, {len(self)}).")
    wanted = sorted({self.urls[i] for a, b in ranges for i in range(a, b)})
    keys = [self._fs._strip_protocol(u) for u in wanted]  # how `cat` names what it returns
    raw = self._fs.cat(keys) if keys else {}
    self._counter[0] += sum(len(raw[k]) for k in keys)
    loaded = {u: self._load(u, raw[k]) for u, k in zip(wanted, keys)}
    empty = np.zeros((0, *self._shape), np.uint8)
    return [
      np.stack([loaded[self.urls[i]] for i in range(a, b)]) if b > a else empty for a, b in ranges
    ]


def stage(url: str, *, field: str = "data.path", cache_dir: str | None = None) -> str:
  """A local copy of the object-store file or folder `url` (see the module docstring).

  Raises:
    ValueError: the store's package is missing, or `url` does not exist or holds no files, each
      naming `field` and what to do.
  """
  try:
    storage.check_reachable(url, field=field)
  except storage.StorageError as e:
    raise ValueError(str(e)) from None
  src = storage.path(url)
  if not src.exists():
    raise ValueError(f"{field}={url}: does not exist; point it at the data.")
  if src.is_dir():
    entries = [storage.path(f) for f in storage.walk_files(url)]
    if not entries:
      raise ValueError(f"{field}={url}: is a folder with no files in it; point it at the data.")
  else:
    entries = [src]
  stamps = []
  for p in entries:
    st = p.stat()
    stamps.append([os.fspath(p), st.length, st.mtime])
  digest = hashlib.sha256(json.dumps([CACHE_VERSION, url, stamps]).encode()).hexdigest()[:20]
  staged = os.path.join(cache_root(cache_dir), "staged", digest)
  name = src.name or "data"
  if not os.path.isdir(staged):
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(staged), prefix=".tmp-")
    try:
      for p in entries:
        rel = os.path.relpath(os.fspath(p), os.fspath(src)) if src.is_dir() else ""
        dest = os.path.join(tmp, name, rel) if rel else os.path.join(tmp, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with p.open("rb") as fin, open(dest, "wb") as fout:
          while chunk := fin.read(1 << 24):
            fout.write(chunk)
      os.rename(tmp, staged)  # atomic; another process staging the same copy may win the race
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.isdir(staged):
        raise
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)  # a partial copy is never left behind
      raise
  return os.path.join(staged, name)


def cache_root(cache_dir: str | None = None) -> str:
  """The cache folder: `cache_dir`, else $SMT_JAX_CACHE_DIR, else ~/.cache/smt_jax."""
  if cache_dir:
    return os.fspath(cache_dir)
  return os.environ.get("SMT_JAX_CACHE_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "smt_jax"
  )


def file_stamp(path: str) -> list:
  """What identifies a file's version for the cache key: [absolute path, size, mtime_ns]."""
  st = os.stat(path)
  return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def cached_array(
  *,
  kind: str,
  inputs: Iterable[str],
  options: dict,
  build: Callable[[], Iterator[np.ndarray]],
  dtype,
  cache_dir: str | None = None,
) -> np.ndarray:
  """The array `build` yields (concatenated along axis 0), built once and memory-mapped.

  Args:
    kind: a short name for the cache file (e.g. 'text-ascii').
    inputs: the files the array is derived from (their stamps enter the key).
    options: everything else the result depends on (JSON-serialisable).
    build: yields the array's chunks in order (each of `dtype`, equal trailing shape), so the
      result never needs to fit in memory at once.
    dtype: the array's dtype.
  Returns:
    a read-only memory map of the cached array.
  """
  dtype = np.dtype(dtype)
  key = json.dumps(
    [CACHE_VERSION, kind, [file_stamp(p) for p in inputs], options, dtype.str], sort_keys=True
  )
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  root = cache_root(cache_dir)
  final = os.path.join(root, f"{kind}-{digest}.npy")
  if not os.path.exists(final):
    try:
      os.makedirs(root, exist_ok=True)
      _write_npy(final, build(), dtype)
    except OSError as e:
      raise ValueError(
        f"could not write the data cache {final!r} ({e}); set SMT_JAX_CACHE_DIR to a writable "
        "folder with room for the derived data."
      ) from None
  return np.load(final, mmap_mode="r")


def _write_npy(final: str, chunks: Iterator[np.ndarray], dtype: np.dtype) -> None:
  """Streams `chunks` into a private temporary .npy beside `final`, then renames it into place."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(final), prefix=".tmp-", suffix=".npy")
  try:
    with os.fdopen(fd, "wb") as f:
      # The header is written last, once the length is known: reserve room for it first.
      header_room = 128
      f.write(b"\0" * header_room)
      length, trailing = 0, None
      for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype)
        if trailing is None:
          trailing = chunk.shape[1:]
        elif chunk.shape[1:] != trailing:
          raise ValueError(f"cached_array: chunk shapes differ ({trailing} vs {chunk.shape[1:]})")
        f.write(chunk.tobytes())
        length += len(chunk)
      shape = (length, *(trailing or ()))
      header = _npy_header(dtype, shape, header_room)
      f.seek(0)
      f.write(header)
    os.replace(tmp, final)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _npy_header(dtype: np.dtype, shape: tuple, size: int) -> bytes:
  """A .npy version-1.0 header padded to exactly `size` bytes (the format allows padding)."""
  body = repr(
    {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
  )
  prefix = b"\x93NUMPY\x01\x00"
  pad = size - len(prefix) - 2 - len(body) - 1
  if pad < 0:
    raise ValueError(f"npy header for shape {shape} does not fit in {size} bytes")
  text = (body + " " * pad + "\n").encode("latin1")
  return prefix + len(text).to_bytes(2, "little") + text
