"""TPU chips and slices a run can be compiled for on a machine that has none.

libtpu (the TPU compiler, `pip install libtpu`) describes any slice topology without the
hardware: `topology_devices("v5e:8x8")` gives its 64 abstract devices, over which
`jax.jit(...).lower(abstract inputs).compile()` runs the real TPU compiler and answers
`memory_analysis()` and `cost_analysis()`. Nothing can execute on those devices.

Megacore: a v4 or v5p chip has two TensorCores that the TPU runtime presents as one JAX
device with the chip's whole HBM (a v4-8 host shows 4 devices, not 8). libtpu's default
chip configuration describes each TensorCore as a device (32 for a v4-32), so these
generations are described with `chip_config_name="megacore"`: one device per chip, as
the runtime trains on them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax
from jax.experimental import topologies

from qstar_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip: HBM, dense bfloat16 peak and HBM bandwidth (Cloud TPU's published
    per-chip figures for each generation: the v4, v5e, v5p and v6e system-architecture pages)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    megacore: bool  # two TensorCores shown as one device (see the module docstring)


GiB = 2**30
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, megacore=True),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.819e12, megacore=False),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, megacore=True),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, megacore=False),
}

# Cloud TPU accelerator types (gcloud's --accelerator-type) -> libtpu topology names. v4 and
# v5p types count TensorCores (v4-32 is 16 chips), v5e and v6e types count chips.
ACCELERATOR_TOPOLOGIES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4",
    "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4", "v5litepod-16": "v5e:4x4", "v5litepod-32": "v5e:4x8",
    "v5litepod-64": "v5e:8x8", "v5litepod-128": "v5e:8x16", "v5litepod-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8",
    "v6e-128": "v6e:8x16", "v6e-256": "v6e:16x16",
}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def topology_name(name: str) -> str:
    """libtpu's spelling of a slice: a topology name as given ("v4:2x2x4"), or the one of a
    Cloud TPU accelerator type ("v4-32")."""
    name = ACCELERATOR_TOPOLOGIES.get(name, name)
    if not _TOPOLOGY.match(name):
        raise UserError(f"unknown TPU topology {name!r}: give GENERATION:AxB[xC] with GENERATION one of "
                        f"{', '.join(CHIPS)} (e.g. v5e:8x8, v4:2x2x4) or an accelerator type "
                        f"({', '.join(list(ACCELERATOR_TOPOLOGIES)[:3])}, ...)")
    return name


def chip_of(topology: str) -> Chip:
    return CHIPS[topology_name(topology).split(":")[0]]


def topology_devices(topology: str) -> list:
    """The abstract devices of a TPU slice, one per chip, from libtpu (no TPU needed)."""
    name = topology_name(topology)
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"compiling for TPU topology {name} needs the TPU compiler: pip install libtpu==0.0.42.1")
    # Compiling claims no chip, so several processes may hold libtpu at once (by default the
    # first one locks it and every other fails with an "Internal error" about a lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options = {"chip_config_name": "megacore"} if chip_of(name).megacore else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices)
    except Exception as e:  # a shape libtpu does not know: its own words, one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot describe TPU topology {name}: {first}") from None


def peak_bytes(memory) -> int:
    """What a compiled program holds on a device at once, from its `memory_analysis()`:
    arguments + temporaries + outputs, less the outputs that reuse donated arguments' buffers."""
    return (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)


def gib(n_bytes: float) -> float:
    """GiB to 4 significant digits, as every memory report prints them."""
    return float(f"{n_bytes / GiB:.4g}")


class DoesNotFit(UserError):
    """The TPU compiler refused the program: it needs more HBM than a chip has."""


def compiled_or_refused(lowered, what: str):
    """`lowered.compile()`; a program that cannot fit a chip's HBM (the TPU compiler fails
    with RESOURCE_EXHAUSTED rather than reporting a peak) is one line naming what it needs."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        raise DoesNotFit(f"{what} does not fit: {message}") from None
