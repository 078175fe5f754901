import os
import signal
import sys
import tempfile

# Tests import helpers (hf_models.py, ...) that live next to them.
sys.path.insert(0, os.path.dirname(__file__))

# One JAX compilation cache for the whole session, inherited by every subprocess: the many
# CLI runs of the same tiny shapes (train, resume, two processes, curriculum stages, seeds)
# compile each program once. Entries are keyed by program, options and versions, so a hit
# is the same executable; set before any test module imports JAX. An explicit
# JAX_COMPILATION_CACHE_DIR (a warm cache between local runs) is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qstar_jax_test_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The suite is compile-bound: a few steps of tiny models after compiles of tens of seconds.
# XLA's backend (LLVM) optimisation level 0 compiles about 2-3x faster and runs tiny
# steps slower. HLO optimisations and sharding are unchanged, and every tolerance holds.
# Subprocesses keep the flag (tests/process_env.py).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# libtpu is installed for the TPU-compiler tests (test_tpu_compile.py), and with it every
# process's first JAX call probes for a TPU (about 2 s, with warnings). The tests compile for
# TPU topologies explicitly and run on the CPU; subprocesses inherit the setting.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# An implicit broadcast between arrays of different ranks is an error in every test and
# every subprocess: shapes in this code base say what they are, and broadcasting says so too.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"


def pytest_unconfigure(config):
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if os.path.basename(cache).startswith("qstar_jax_test_jax_cache_"):
        import shutil

        shutil.rmtree(cache, ignore_errors=True)

# Ctrl-C and a closed terminal are tested as a terminal delivers them. A launcher may have
# ignored them (a background job of a non-interactive shell ignores SIGINT, nohup SIGHUP),
# and an ignored disposition is inherited through exec, where the run would rightly keep
# it: so the suite starts from the dispositions a terminal gives, whatever launched it.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
