"""User-facing errors: one clear line, never a deep traceback.

Code raises `UserError` for anything the *user* can fix (a bad path, key, format or
checkpoint). Command-line entry points wrap their `main` with `exit_on_user_error`, which
prints `error: <message>` on one line and exits with status 2. Programming errors are
left to propagate with their traceback, because those are ours to fix.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A problem with the user's input that a one-line message fully explains."""


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorates a CLI main so a `UserError` ends the process with one line and exit code 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
