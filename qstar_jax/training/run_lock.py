"""One run per workdir: a lock that process 0 takes before anything is written.

Two trainings on one workdir would overwrite each other's checkpoints and interleave
their metrics, each exiting 0. So `train` holds WORKDIR/run.lock for its whole life; a
second run exits 2 with one line naming the holder (host, pid, start time).

* **Local (or NFS) workdir:** an `flock` on the file. The kernel drops it when the holder
  dies, even by kill -9, so no lock is ever stale; the file stays behind as a record of
  the last holder and is never deleted (deleting it would let two runs lock two files).
* **Bucket workdir (gs://):** an object created only if absent (`ifGenerationMatch=0`),
  whose holder rewrites a heartbeat into it every HEARTBEAT_S seconds. A run killed
  without releasing it (a hard-killed spot slice) leaves it behind: once its heartbeat is
  older than STALE_AFTER_S, the next run deletes that generation of it, and only that one,
  then creates its own. Recreating a TPU slice (`launch/tpu_pod.sh watch`) takes longer
  than STALE_AFTER_S, so a recreated slice finds the lock stale and takes it over.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import jax
import numpy as np

from qstar_jax import paths
from qstar_jax.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 150.0


class WorkdirLocked(UserError):
    """Another live run holds the workdir (exit 2, like every user error)."""


def _now() -> float:
    return time.time()


def _holder_record(token: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": _now()}


def _describe(holder: dict[str, Any]) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """`with RunLock(workdir):` holds the workdir's lock (process 0 only; others pass)."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.file = paths.path(workdir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------ local

    def _acquire_local(self) -> None:
        import fcntl

        self.file.parent.mkdir(parents=True, exist_ok=True)
        if self.file.exists() and not self.file.is_file():  # else reported as an unwritable workdir
            raise UserError(f"{self.file} is not a lock file (a directory or device is in its place); move it "
                            "away and rerun")
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(os.read(fd, 1 << 16))
            os.close(fd)
            raise WorkdirLocked(f"workdir {self.file.parent} is in use by another run ({_describe(holder)}); "
                                "wait for it to finish or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record(self.token)).encode(), 0)
        self._fd = fd

    # ----------------------------------------------------------------------------- bucket

    def _fs(self):
        import gcsfs  # the backend epath uses for gs:// paths

        return gcsfs.GCSFileSystem(version_aware=True)

    def _create_remote(self) -> bool:
        try:
            self._fs().pipe_file(str(self.file), json.dumps(_holder_record(self.token)).encode(), mode="create")
            return True
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or "412" in str(e) or "precondition" in str(e).lower():
                return False
            raise

    # One generation of the lock object, named by keyword: gcsfs would split a path written
    # "NAME#GENERATION" at the first '#' or '?' of a workdir whose name holds one.
    def _read_generation(self, fs, generation) -> bytes:
        return fs.cat_file(str(self.file), generation=generation)

    def _delete_generation(self, fs, generation) -> None:
        bucket, key, _ = fs.split_path(str(self.file))
        fs.call("DELETE", "b/{}/o/{}", bucket, key, generation=generation)

    def _acquire_remote(self) -> None:
        if self._create_remote():
            return
        fs = self._fs()
        info = fs.info(str(self.file))
        holder = _read_json(self._read_generation(fs, info["generation"]))
        age = _now() - float(holder.get("heartbeat", 0))
        if age < self.stale_after_s:
            raise WorkdirLocked(f"workdir {self.file.parent} is in use by another run ({_describe(holder)}, "
                                f"heartbeat {age:.0f} s ago; a lock silent for {self.stale_after_s:.0f} s is "
                                "taken over); wait for it to finish or use another --workdir")
        try:  # that generation only: a run that took it over meanwhile keeps its own
            self._delete_generation(fs, info["generation"])
        except FileNotFoundError:
            pass
        if not self._create_remote():
            raise WorkdirLocked(f"workdir {self.file.parent} was just taken over by another run; "
                                "wait for it to finish or use another --workdir")
        print(f"warning: took over the lock of a run that stopped without releasing it ({_describe(holder)}, "
              f"silent for {age:.0f} s)", flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            fs = self._fs()
            try:
                holder = _read_json(fs.cat_file(str(self.file)))
                if holder.get("token") != self.token:
                    print(f"warning: lost the workdir lock to another run ({_describe(holder)})", flush=True)
                    return
                fs.pipe_file(str(self.file), json.dumps({**holder, "heartbeat": _now()}).encode())
            except OSError as e:  # a transient storage error: try again at the next beat
                print(f"warning: workdir lock heartbeat failed ({type(e).__name__}: {e})", flush=True)

    # ------------------------------------------------------------------------------- both

    def acquire(self) -> None:
        if not paths.is_writer():
            return
        if paths.is_remote(self.file):
            self._acquire_remote()
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
        else:
            self._acquire_local()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (see the module docstring)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            fs = self._fs()
            try:
                info = fs.info(str(self.file))
                if _read_json(self._read_generation(fs, info["generation"])).get("token") == self.token:
                    self._delete_generation(fs, info["generation"])
            except FileNotFoundError:
                pass


@contextlib.contextmanager
def held(workdir: str) -> Iterator[RunLock]:
    """Holds the workdir's lock for the block. Process 0 takes it and tells every other
    process whether it could, so that all of them stop together when another run holds it."""
    lock = RunLock(workdir)
    failure: Exception | None = None
    try:
        lock.acquire()
    except WorkdirLocked as e:
        failure = e
    except OSError as e:  # the first write to the workdir: read-only, no permission, full
        failure = UserError(f"cannot write to --workdir {workdir}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 -- re-raised below, once every process knows
        failure = e
    if jax.process_count() > 1:  # the others would otherwise wait for process 0 at the first collective
        from jax.experimental import multihost_utils

        code = 0 if failure is None else 1 if isinstance(failure, WorkdirLocked) else 2
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if code == 1 and failure is None:
            failure = WorkdirLocked(f"workdir {workdir} is in use by another run (process 0 says why)")
        elif code == 2 and failure is None:
            failure = UserError(f"process 0 could not take the lock of --workdir {workdir} (its error says why)")
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        lock.release()


def _read_json(data: bytes) -> dict[str, Any]:
    try:
        record = json.loads(data.decode("utf-8"))
        return record if isinstance(record, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}
