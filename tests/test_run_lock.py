"""The workdir lock on a bucket (the local flock is tested through `train` in test_train.py)."""

from __future__ import annotations

import json
import time

import pytest
from gcs_emulator import emulator_in_this_process

from qstar_jax.training import run_lock

BUCKET = "lock-test"


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    with emulator_in_this_process(BUCKET, str(tmp_path), monkeypatch):
        yield f"gs://{BUCKET}/odd [a]*?#% :é/run"  # gcsfs reads '#' and '?' in a path as a generation


def _record(workdir):
    import gcsfs

    return json.loads(gcsfs.GCSFileSystem().cat_file(f"{workdir}/{run_lock.LOCK_FILE}"))


def test_bucket_lock_refuses_a_live_holder_and_takes_over_a_silent_one(bucket, capsys):
    first = run_lock.RunLock(bucket, heartbeat_s=0.2)
    first.acquire()
    started = _record(bucket)
    time.sleep(1.0)
    assert _record(bucket)["heartbeat"] > started["heartbeat"]  # the holder keeps it fresh
    with pytest.raises(run_lock.WorkdirLocked, match=r"in use by another run \(host .*, pid \d+.*heartbeat \d+ s ago"):
        run_lock.RunLock(bucket).acquire()

    # The holder dies without releasing (its heartbeat stops): after stale_after_s, taken over.
    first._stop.set()
    first._thread.join()
    second = run_lock.RunLock(bucket, heartbeat_s=0.2, stale_after_s=0.5)
    with pytest.raises(run_lock.WorkdirLocked):
        second.acquire()  # still fresh
    time.sleep(0.8)
    second.acquire()
    assert "took over the lock of a run that stopped without releasing it" in capsys.readouterr().out
    assert _record(bucket)["token"] == second.token
    second.release()
    third = run_lock.RunLock(bucket)
    third.acquire()  # released: free again, no takeover
    assert "took over" not in capsys.readouterr().out
    third.release()


def test_bucket_lock_holder_that_was_taken_over_leaves_the_new_lock_alone(bucket, capsys):
    """A run that stalled past stale_after_s (its lock taken over) and then wakes up stops
    beating and, on release, does not delete the new holder's lock."""
    first = run_lock.RunLock(bucket, heartbeat_s=0.2)
    first.acquire()
    first._stop.set()  # the stall
    first._thread.join()
    time.sleep(0.3)
    second = run_lock.RunLock(bucket, heartbeat_s=0.2, stale_after_s=0.1)
    second.acquire()
    first._stop.clear()  # the wake-up
    first._thread = run_lock.threading.Thread(target=first._heartbeat, daemon=True)
    first._thread.start()
    first._thread.join(timeout=5)
    assert not first._thread.is_alive()  # it stopped beating instead of overwriting the new holder
    assert "lost the workdir lock to another run" in capsys.readouterr().out
    first.release()
    assert _record(bucket)["token"] == second.token
    second.release()
