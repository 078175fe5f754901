"""Quiet-STaR and Fast Quiet-STaR in JAX/Flax.

Importing the package sets one XLA flag before JAX starts its CPU backend: XLA:CPU's
concurrency-optimised scheduler lets the CPU "devices" of one process issue independent
collectives in different orders, and a sharded two_pass train step (8 CPU devices,
data 2 x fsdp 4) deadlocked on an all-reduce over 4 devices against a collective-permute
over 8 in 4 runs of 4; with the flag off, 5 runs of 5 finished with one device's losses.
The flag concerns only the CPU backend (TPU and GPU compile as before), and a single CPU
device's step time did not move measurably. An explicit setting in XLA_FLAGS is kept.
"""

import os

CPU_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"

if CPU_SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{CPU_SCHEDULER_FLAG}=false".strip()
