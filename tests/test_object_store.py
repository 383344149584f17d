"""Object-store workdirs, for real: `--workdir=gs://...` against a local GCS emulator.

The emulator (`gcp-storage-emulator`, in the test extra; see tests/fixtures/gcs_emulator.py) runs
on 127.0.0.1; gcsfs finds it through STORAGE_EMULATOR_HOST and TensorStore (orbax's array writer)
through TENSORSTORE_GCS_HTTP_URL. A run on it is SIGKILLed after its first checkpoint and rerun;
the result must equal, bit for bit, an uninterrupted run on the local disk. Then the lease (the
claim of a workdir where no flock exists) and the read-only readers.

gcsfs's newer versions ask GCS over gRPC what kind of bucket a path is in (the "storage layout"),
which an emulator does not answer: each new filesystem then stalls ~60 s before it falls back.
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns that probe off (it only matters for zonal and
hierarchical-namespace buckets, which this project does not need).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import run_helpers

from smt_jax import storage
from smt_jax.runner import checkpoints
from smt_jax.runner import workdir as workdir_lib

CONFIG = "experiments/configs/synthetic.py:parity,smoke"  # SMT 6, DMT 4; checkpoints every 3
BUCKET = "smt-test"


@pytest.fixture(scope="module")
def gcs():
  """The emulator's environment; also set in this process (the tests read the bucket too)."""
  import importlib.util

  for package in ("gcsfs", "gcp_storage_emulator"):  # not imported here: gcsfs reads env at import
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} is not installed (pip install -e '.[test]')")
  port = run_helpers.free_port()
  proc = subprocess.Popen(
    [sys.executable, os.path.join(run_helpers.ROOT, "tests", "fixtures", "gcs_emulator.py")]
    + [f"--port={port}", f"--bucket={BUCKET}"],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  if proc.stdout.readline().strip() != "ready":
    proc.kill()
    pytest.fail("the GCS emulator did not start")
  url = f"http://127.0.0.1:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no Google credentials needed
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def env(tmp_path_factory, gcs):
  return run_helpers.subprocess_env(tmp_path_factory, **gcs)


def test_killed_run_on_gcs_equals_a_local_run(tmp_path, env):
  local, remote = str(tmp_path / "local"), f"gs://{BUCKET}/run"
  args = lambda wd: [f"--config={CONFIG}", f"--workdir={wd}"]  # noqa: E731
  ref = run_helpers.Job(args(local), env, tmp_path / "ref.log", devices=1)
  assert ref.finish() == [0], ref.outputs()

  first = run_helpers.Job(args(remote), env, tmp_path / "first.log", devices=1)
  assert first.wait_for(lambda: workdir_lib.has_checkpoints(remote)), first.outputs()
  first.procs[0].kill()  # SIGKILL: no cleanup, its lease stays behind
  first.finish()
  lease = json.loads(storage.read_text(f"{remote}/{workdir_lib.LEASE_FILE}"))
  assert lease["pid"] == first.procs[0].pid

  again = run_helpers.Job(args(remote), env, tmp_path / "again.log", devices=1)
  assert again.finish() == [0], again.outputs()
  out = again.output()
  assert "Resumed from gs://" in out and "waiting up to" not in out, out  # dead pid: at once

  assert run_helpers.rows(remote) == run_helpers.rows(local)
  assert run_helpers.summary(remote) == run_helpers.summary(local)
  (s1, a, _), (s2, b, _) = run_helpers.restore(local), run_helpers.restore(remote)
  a, b = run_helpers.leaves(a), run_helpers.leaves(b)
  assert s1 == s2 and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  names = storage.list_names(remote)
  assert {"config.json", "summary.json", "metrics.jsonl", "accuracy.md"} <= set(names), names
  assert workdir_lib.LEASE_FILE not in names  # released at the end
  assert storage.list_names(f"{remote}/tensorboard"), "no TensorBoard events"
  assert (
    storage.read_text(f"{remote}/accuracy.md") == (tmp_path / "local" / "accuracy.md").read_text()
  )

  # A reader of the run: samples from gs://, through a read-only checkpoint manager.
  sample = run_helpers.Job(
    [f"--workdir={remote}", f"--out={tmp_path / 'samples'}"],
    env,
    tmp_path / "sample.log",
    devices=1,
    module="experiments.sample",
  )
  assert sample.finish() == [0], sample.outputs()
  assert (tmp_path / "samples" / "accuracy.md").exists()


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(where, request, tmp_path, capsys):
  if where == "gcs":
    request.getfixturevalue("gcs")
    workdir = f"gs://{BUCKET}/lease-{os.getpid()}"
  else:
    workdir = str(tmp_path / "run")
  ttl = 5.0  # the holder renews every 1.7 s; generous for a loaded machine (CI compiling beside)
  lease = lambda: workdir_lib.Lease(workdir, ttl_s=ttl, settle_s=0.05)  # noqa: E731

  holder = lease()
  holder.acquire()
  with pytest.raises(workdir_lib.WorkdirBusyError, match="in use by a running job"):
    lease().acquire()  # saw the holder renew (else it would have taken the lease after ttl)
  holder.release()
  assert not storage.exists(f"{workdir}/{workdir_lib.LEASE_FILE}")

  def leftover(**fields):
    left = dict(owner="x", host="another-host", pid=1, seq=0, renewed=time.time(), ttl_s=ttl)
    left.update(fields)
    storage.write_text(f"{workdir}/{workdir_lib.LEASE_FILE}", json.dumps(left))

  # Expired by its timestamp, or a dead pid on this host: taken at once.
  for fields in (dict(renewed=time.time() - 10), dict(host=socket.gethostname(), pid=2**22 + 7)):
    leftover(**fields)
    t0 = time.time()
    with lease():
      assert time.time() - t0 < ttl  # not watched for a ttl first
  # Fresh but never renewed (a VM that vanished): taken after one ttl of watching.
  leftover()
  capsys.readouterr()
  t0 = time.time()
  with lease() as taken:
    assert time.time() - t0 >= ttl
    assert json.loads(storage.read_text(taken.path))["owner"] == taken.owner
  assert "Taking over the stale lease" in capsys.readouterr().out


def test_readers_open_checkpoints_read_only(tmp_path):
  """A reader (samples, studies) never removes a live run's save in progress; a writer does."""
  import jax.numpy as jnp

  workdir = str(tmp_path / "run")
  mngr = checkpoints.make_manager(workdir, keep=2)
  checkpoints.save(mngr, 1, {"w": jnp.ones(3)}, None, phase_index=0, phase_step=1)
  mngr.wait_until_finished()
  mngr.close()
  in_progress = tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
  in_progress.mkdir()
  reader = checkpoints.make_manager(workdir, keep=2, read_only=True)
  assert reader.all_steps() == [1]
  reader.close()
  assert in_progress.exists()
  checkpoints.make_manager(workdir, keep=2).close()  # the run itself, restarting
  deadline = time.time() + 30  # orbax removes leftovers in the background
  while in_progress.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert not in_progress.exists()


def test_a_store_without_its_package_is_a_one_line_error():
  with pytest.raises(storage.StorageError, match=r"--workdir=nosuch://b/run: no filesystem"):
    storage.check_reachable("nosuch://b/run")
  storage.check_reachable("/tmp/run")  # local: nothing to check


def _corpus(seed: int, n: int = 6_000) -> bytes:
  rng = np.random.default_rng(seed)
  words = ["the", "memory", "is", "a", "state", "of", "time", "and", "token", "runs"]
  return " ".join(words[i] for i in rng.integers(0, len(words), n // 4)).encode()


def test_data_on_gcs_is_staged_once_and_reads_as_the_local_files(gcs, tmp_path, monkeypatch):
  from experiments.configs import text
  from smt_jax import data
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import experiment

  monkeypatch.setenv("SMT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  (tmp_path / "eval").mkdir()
  (tmp_path / "train.txt").write_bytes(_corpus(0))
  for i in range(2):
    (tmp_path / "eval" / f"part{i}.txt").write_bytes(_corpus(1 + i))
  bucket = f"gs://{BUCKET}/data"
  storage.write_bytes(f"{bucket}/train.txt", _corpus(0))
  for i in range(2):
    storage.write_bytes(f"{bucket}/eval/part{i}.txt", _corpus(1 + i))

  def source(path, eval_path, encoding):
    c = text.get_config("smoke")
    c.data.path, c.data.eval_path = path, eval_path
    c.data.options.text.encoding = encoding
    config_lib.validate(c)
    return c, experiment.source_of(c)

  for encoding in ("bytes", "ascii"):
    c, remote = source(f"{bucket}/train.txt", f"{bucket}/eval", encoding)
    _, local = source(str(tmp_path / "train.txt"), str(tmp_path / "eval"), encoding)
    # Bytes: the file and the folder (its files joined by a newline) read by the row; ASCII
    # filtering needs the whole corpus: staged.
    read_by_row = encoding == "bytes"
    for split in ("train", "eval"):
      assert isinstance(remote.streams[split], data.files.RemoteRecords) == read_by_row
      for step in range(3):
        a, b = (s.batch(split=split, step=step, batch_size=4, seed=0) for s in (remote, local))
        for k in a:
          np.testing.assert_array_equal(a[k], b[k], err_msg=f"{encoding} {split} {step} {k}")
    joined = np.asarray(remote.streams["eval"]).tobytes()
    assert joined == (
      _corpus(1) + b"\n" + _corpus(2) if read_by_row else local.streams["eval"].tobytes()
    )

  # Staged once: the copy is reused while the object is unchanged, and replaced when it changes.
  first = data.files.stage(f"{bucket}/train.txt")
  assert first.startswith(str(tmp_path / "cache"))
  stamp = os.stat(first).st_mtime_ns
  assert data.files.stage(f"{bucket}/train.txt") == first and os.stat(first).st_mtime_ns == stamp
  storage.write_bytes(f"{bucket}/train.txt", b"new text " * 100)
  second = data.files.stage(f"{bucket}/train.txt")
  assert second != first and open(second, "rb").read() == b"new text " * 100

  c.data.path = f"gs://{BUCKET}/nothing-here.txt"
  with pytest.raises(
    config_lib.ConfigError,
    match=f"config.data.path = 'gs://{BUCKET}/nothing-here.txt': does not",
  ):
    config_lib.validate(c)


def _two_processes_rows(remote, local, split: str, *, rows: int, seed: int, steps: int = 3):
  """Each of two processes' rows of `steps` batches from `remote`, checked equal to `local`'s;
  yields after each."""
  for step in range(steps):
    for p in range(2):
      args = dict(split=split, step=step, batch_size=2 * rows, seed=seed)
      a = remote.batch(**args, process_index=p, process_count=2)
      b = local.batch(**args, process_index=p, process_count=2)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{remote} {split} {step} {p} {k}")
      yield


def test_each_host_reads_only_its_own_rows_of_a_corpus_on_gcs(gcs, tmp_path, monkeypatch):
  """A text file on gs:// is read by range requests: each of two processes gets exactly the rows
  of the local file's batches and fetches exactly their bytes, never the whole corpus (the
  evaluation split, the file's tail, included)."""
  from experiments.configs import text
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import experiment

  monkeypatch.setenv("SMT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  corpus = _corpus(3, 1_000_000)
  (tmp_path / "corpus.txt").write_bytes(corpus)
  storage.write_bytes(f"gs://{BUCKET}/corpus.txt", corpus)

  def source(path):
    c = text.get_config("smoke")
    c.data.path = path
    config_lib.validate(c)
    return experiment.source_of(c)

  remote, local = source(f"gs://{BUCKET}/corpus.txt"), source(str(tmp_path / "corpus.txt"))
  assert remote.streams["train"].bytes_read == 0  # nothing read up front
  assert not os.path.exists(tmp_path / "cache")  # nor staged
  T, rows, read = remote.seq_len, 8, 0
  for split in ("train", "eval"):
    for _ in _two_processes_rows(remote, local, split, rows=rows, seed=5):
      read += rows * (T + 1)
      assert remote.streams[split].bytes_read == read  # this batch's rows, and nothing else
  assert read < len(corpus) / 20
  with pytest.raises(TypeError, match="slices with step 1"):
    remote.streams["train"][::2]
  np.testing.assert_array_equal(
    np.asarray(remote.streams["eval"][:100]),
    np.frombuffer(corpus, np.uint8)[-len(local.streams["eval"]) :][:100],
  )


def test_images_on_gcs_are_read_by_the_row(gcs, tmp_path, monkeypatch):
  """Raw IDX files, .npy drawings and image folders on gs:// are read image by image (the files
  of a folder decoded as read): every process's batches
  equal the local files', and what was fetched is the images under its rows' crops (a crop of
  T + 1 <= 785 tokens spans at most two images), not the files; nothing is staged."""
  import struct

  from experiments.configs import pixels
  from smt_jax.runner import config as config_lib
  from smt_jax.runner import experiment

  monkeypatch.setenv("SMT_JAX_CACHE_DIR", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  local = tmp_path / "data"
  (local / "mnist").mkdir(parents=True)
  (local / "quickdraw").mkdir()
  for name, n in (("train-images-idx3-ubyte", 2000), ("t10k-images-idx3-ubyte", 300)):
    raw = (
      struct.pack(">4B3I", 0, 0, 8, 3, n, 28, 28)
      + rng.integers(0, 256, n * 784, np.uint8).tobytes()
    )
    (local / "mnist" / name).write_bytes(raw)
    storage.write_bytes(f"gs://{BUCKET}/mnist/{name}", raw)
  for name in ("cat", "dog"):
    np.save(local / "quickdraw" / f"{name}.npy", rng.integers(0, 256, (900, 784), np.uint8))
    storage.write_bytes(
      f"gs://{BUCKET}/quickdraw/{name}.npy", (local / "quickdraw" / f"{name}.npy").read_bytes()
    )
  from PIL import Image

  for i in range(60):  # sketches of two sizes in two subfolders, and a hidden file skipped
    rel = f"{'ab'[i % 2]}/s{i:02d}.png"
    (local / "sketch" / rel).parent.mkdir(parents=True, exist_ok=True)
    size = (40, 30) if i % 3 else (28, 28)
    Image.fromarray(rng.integers(0, 256, size[::-1], np.uint8)).save(local / "sketch" / rel)
    storage.write_bytes(f"gs://{BUCKET}/sketch/{rel}", (local / "sketch" / rel).read_bytes())
  storage.write_bytes(f"gs://{BUCKET}/sketch/.hidden.png", b"not an image")
  pngs = list((local / "sketch").glob("*/*.png"))
  (local / "sketch" / ".hidden.png").write_bytes(b"not an image")

  def source(recipe, path, **options):
    c = pixels.get_config(recipe)
    c.data.path = path
    for k, v in options.items():
      c.data.options[c.data.name][k] = v
    config_lib.validate(c)
    return experiment.source_of(c)

  for recipe, folder, options in (
    ("mnist", "mnist", {"levels": 16}),  # quantised as read
    ("quickdraw", "quickdraw", {"max_per_category": 600}),
    ("sketch", "sketch", {"levels": 32}),  # decoded, resized and quantised as read
  ):
    remote = source(recipe, f"gs://{BUCKET}/{folder}", **options)
    here = source(recipe, str(local / folder), **options)
    T, rows = remote.seq_len, 4
    for split in ("train", "eval"):
      stream = remote.streams[split]
      start = stream.images.bytes_read  # shared by the splits of a file
      assert split == "eval" or start == 0  # nothing read up front, nothing staged
      assert len(list(_two_processes_rows(remote, here, split, rows=rows, seed=1))) == 6
      assert T <= stream.period  # so a crop of T + 1 tokens spans at most two images
      read = stream.images.bytes_read - start
      image = 784 if recipe != "sketch" else max(f.stat().st_size for f in pngs)  # bytes
      assert 0 < read <= 3 * 2 * rows * 2 * image  # 3 steps x 2 processes x 4 rows x 2 images
      assert split == "eval" or read < stream.images.size / 4 or recipe == "sketch"
    np.testing.assert_array_equal(np.asarray(remote.images("eval")[:5]), here.images("eval")[:5])
    # The prompts of samples: [BOS], or the image before (index arrays read the images).
    np.testing.assert_array_equal(remote.image_prefix("eval", 3), here.image_prefix("eval", 3))
  assert not os.path.exists(tmp_path / "cache" / "staged")  # (the local folder is cached)
