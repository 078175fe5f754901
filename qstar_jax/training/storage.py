"""Storage failures a user fixes outside the program (a full disk, a quota, a read-only
mount, a file-size limit), recognised in the errors and logs of Orbax and tensorstore and
reported in one line."""

from __future__ import annotations

import contextlib
import gc
import logging as pylogging
import sys
import traceback
import warnings
from typing import Any, BinaryIO, Callable, Iterator

# Storage failures a user fixes outside the program (free space, a writable mount), as
# Orbax and tensorstore word them: their errors are ValueErrors or RuntimeErrors that
# carry the OS error's text, raised from the background thread that did the write.
STORAGE_FAILURES = {
    "No space left on device": "no space left on device",
    "os_error_code='28'": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
    "Read-only file system": "read-only file system",
    "Permission denied": "permission denied",
    "File too large": "file too large (a file-size limit: ulimit -f)",
    "os_error_code='27'": "file too large (a file-size limit: ulimit -f)",
}


def storage_failure(error: BaseException) -> str | None:
    """What storage failure (ENOSPC, EDQUOT, EROFS, EACCES, EFBIG) `error` or its causes report, if any."""
    while error is not None:
        text = str(error)
        for signature, name in STORAGE_FAILURES.items():
            if signature in text:
                return name
        error = error.__cause__ or error.__context__
    return None


class _StorageFailureLogs(pylogging.Filter):
    """Drops the logs of a storage failure: each of Orbax's writer threads logs the same
    ENOSPC with a traceback (through absl), and at exit asyncio logs every write it had
    not finished; `TrainCheckpoints` reports the failure in one line instead."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        exception = record.exc_info[1] if record.exc_info else None
        return not (any(signature in record.getMessage() for signature in STORAGE_FAILURES)
                    or (exception is not None and storage_failure(exception) is not None))


class _LateWritesOfAFailedSave:
    """A `sys.unraisablehook` that drops what the writes of a failed save report after it:
    when one write fails (a full disk, a file-size limit), Orbax closes the event loop that
    awaited the save's writes, and tensorstore, finishing each remaining write, cannot hand
    its result to the closed loop (`RuntimeError: Event loop is closed`, raised in a callback
    with no caller: a traceback apiece, hundreds of lines). Any other exception is shown."""

    def __init__(self, shown: Callable[[Any], None]):
        self.shown = shown

    def __call__(self, unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            self.shown(unraisable)


def report_storage_failures_once() -> None:
    """Installs the filters above (once per process) and silences the warning Python prints
    at exit for the writes of the failed save it never ran."""
    for name in ("absl", "asyncio"):
        logger = pylogging.getLogger(name)
        if not any(isinstance(f, _StorageFailureLogs) for f in logger.filters):
            logger.addFilter(_StorageFailureLogs())
    if not isinstance(sys.unraisablehook, _LateWritesOfAFailedSave):
        sys.unraisablehook = _LateWritesOfAFailedSave(sys.unraisablehook)
    warnings.filterwarnings("ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning)


def append(file: BinaryIO, data: bytes) -> None:
    """Appends all of `data` to a file opened unbuffered (`buffering=0`): a write that fails
    (a full disk) leaves nothing in a buffer for Python to retry, and fail on, at exit."""
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


@contextlib.contextmanager
def unraisable_reports_held() -> Iterator[list[str]]:
    """Collects, as text, what Python reports through sys.unraisablehook meanwhile. Orbax
    reads arrays in coroutines: when a read fails because its step is being deleted, the
    other reads' errors are reported that way as they are collected, each with pages of
    TensorStore spec. The caller prints them when the read succeeds after all and drops
    them when it fails (that failure has its own line)."""
    held: list[str] = []

    def hold(unraisable) -> None:
        held.append(f"{unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}\n" + "".join(
            traceback.format_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))

    previous, sys.unraisablehook = sys.unraisablehook, hold
    try:
        yield held
    finally:
        gc.collect()  # a failed read's coroutines report now, not once the hook is restored
        sys.unraisablehook = previous
