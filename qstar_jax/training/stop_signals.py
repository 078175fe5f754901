"""The signals that stop a run (hooks.Preemption acts on them), and those that arrive
before it can: while Python imports JAX and the run starts, a stop signal would otherwise
have its default effect (killed with status 143 and no word; Ctrl-C, a KeyboardInterrupt
traceback). `python -m qstar_jax.train` holds them from its first line instead, and the
run's handler takes them over when it is installed, as if they had come just then."""

from __future__ import annotations

import signal

# What each stop signal means, as the run's last line says it.
STOP_SIGNALS = {signal.SIGTERM: "preempted", signal.SIGHUP: "hung up", signal.SIGINT: "interrupted"}

_held: list[int] = []


def hold_early() -> None:
    """Keeps every stop signal the process does not ignore (SIGHUP under nohup, SIGINT in a
    background job stay ignored) until `take_held` hands them over."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, lambda signum, frame: _held.append(signum))


def take_held() -> list[int]:
    """The stop signals held so far, oldest first (and no longer held)."""
    held = list(_held)
    _held.clear()
    return held
