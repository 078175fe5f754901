"""Environment for the CLI processes the tests start."""

from __future__ import annotations

import os


def forced_devices(count: int) -> str:
    """XLA_FLAGS for a process with `count` host CPU devices, keeping the session's own
    flags (tests/conftest.py), so a subprocess compiles like the test process."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()


def without_compilation_cache(env: dict) -> dict:
    """`env` minus the session's JAX compilation cache (tests/conftest.py).

    Multi-process runs compile without it: in the pod rehearsal, a resumed 2-process run
    whose process 0 read its programs from the cache had process 1 miss gloo's 30 s
    rendezvous at the first step (twice, both times with other jobs loading the CPU). Only
    process 0 ever writes the cache; until the asymmetry is understood, every process of a
    multi-process test compiles for itself, as before the cache.
    """
    return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
