"""Storage failures a user fixes outside the program (a full disk, a quota, a read-only
mount), recognised in the errors and logs of Orbax and tensorstore and reported in one line."""

from __future__ import annotations

import logging as pylogging
import warnings

# Storage failures a user fixes outside the program (free space, a writable mount), as
# Orbax and tensorstore word them: their errors are ValueErrors or RuntimeErrors that
# carry the OS error's text, raised from the background thread that did the write.
STORAGE_FAILURES = {
    "No space left on device": "no space left on device",
    "os_error_code='28'": "no space left on device",
    "Disk quota exceeded": "disk quota exceeded",
    "Read-only file system": "read-only file system",
    "Permission denied": "permission denied",
}


def storage_failure(error: BaseException) -> str | None:
    """What storage failure (ENOSPC, EDQUOT, EROFS, EACCES) `error` or its causes report, if any."""
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


def report_storage_failures_once() -> None:
    """Installs the filter above (once per process) and silences the warning Python prints
    at exit for the writes of the failed save it never ran."""
    for name in ("absl", "asyncio"):
        logger = pylogging.getLogger(name)
        if not any(isinstance(f, _StorageFailureLogs) for f in logger.filters):
            logger.addFilter(_StorageFailureLogs())
    warnings.filterwarnings("ignore", message="coroutine 'async_serialize_from_host", category=RuntimeWarning)
