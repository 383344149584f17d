"""`smt_jax.runner.multihost.PeerWatch` against a fake key-value store: which peers count as gone,
and what the survivors say (the real thing, with processes, is in tests/test_multiprocess.py)."""

from __future__ import annotations

import threading
import time

import pytest

from smt_jax.runner import multihost


class FakeStore:
  """The part of jax.distributed's client that PeerWatch uses; `down` makes every call fail."""

  def __init__(self):
    self.values, self.down, self.lock = {}, False, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite
    with self.lock:
      if self.down:
        raise RuntimeError("UNAVAILABLE: failed to connect")
      self.values[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      if self.down:
        raise RuntimeError("UNAVAILABLE: failed to connect")
      return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watch(store, me=0, count=2, timeout=0.4):
  exits = []
  watch = multihost.PeerWatch(
    timeout, client=store, exit=exits.append, process=(me, count), period_s=0.02
  )
  return watch, exits


def _beat(store, q, stop):
  n = 0
  while not stop.is_set():
    n += 1
    store.key_value_set(f"smt_jax/alive/{q}", str(n), allow_overwrite=True)
    time.sleep(0.02)


def _wait(exits, seconds):
  t0 = time.time()
  while not exits and time.time() - t0 < seconds:
    time.sleep(0.01)


def test_a_beating_peer_is_alive_and_a_silent_one_is_gone():
  store, stop = FakeStore(), threading.Event()
  beater = threading.Thread(target=_beat, args=(store, 1, stop), daemon=True)
  beater.start()
  watch, exits = _watch(store)
  watch.start()
  time.sleep(1.0)  # 2.5 timeouts of a live peer
  assert exits == []
  stop.set()  # process 1 is killed: its heartbeat stops
  t0 = time.time()
  _wait(exits, 3)
  assert exits and "process 1 of 2 stopped responding" in exits[0], exits
  assert time.time() - t0 >= 0.35
  watch.done()
  assert store.values["smt_jax/alive/0"] == "done"


def test_a_failed_peer_is_quoted_and_a_finished_one_is_not_watched():
  store = FakeStore()
  watch, exits = _watch(store, me=1, count=3)
  watch.start()
  store.key_value_set("smt_jax/alive/0", "done", allow_overwrite=True)
  store.key_value_set("smt_jax/alive/2", "failed: NonFiniteError: smt step 4", allow_overwrite=True)
  _wait(exits, 2)
  assert exits == ["process 2 of 3 failed: NonFiniteError: smt step 4; process 1 exiting"]


def test_a_finished_peer_never_counts_as_gone():
  store = FakeStore()
  watch, exits = _watch(store)
  watch.start()
  store.key_value_set("smt_jax/alive/1", "done", allow_overwrite=True)
  time.sleep(1.0)
  assert exits == []
  watch.done()


def test_a_lost_coordinator_is_reported_after_the_timeout():
  store = FakeStore()
  watch, exits = _watch(store, me=1)
  watch.start()
  store.down = True
  _wait(exits, 3)
  assert exits and "lost the job's coordinator (process 0)" in exits[0], exits


def test_fail_posts_one_line_for_the_others():
  store = FakeStore()
  watch, _ = _watch(store)
  watch.start()
  watch.fail("error: workdir gs://b/run is in use\nby a running job")
  assert (
    store.values["smt_jax/alive/0"]
    == "failed: error: workdir gs://b/run is in use by a running job"
  )


def test_bad_timeout_is_refused():
  with pytest.raises(ValueError, match="must be > 0"):
    multihost.PeerWatch(0, client=FakeStore(), process=(0, 2))
