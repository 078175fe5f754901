"""The memory pre-flight: AOT-compiles loading, state initialisation and the train step for
the configured shapes on abstract inputs and reports per-device memory, before any weight
loads; and the mesh chooser built on it.

On the devices at hand the report is the local compiler's (XLA:CPU schedules for a CPU,
not for HBM). With a TPU topology (`chips.topology_devices`) it is the TPU compiler's, per
chip, against the chip's HBM, with the compiler's cost analysis and a roofline estimate of
the step time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qstar_jax.errors import UserError
from qstar_jax.models import chips, sharding
from qstar_jax.models.chips import Chip, DoesNotFit, compiled_or_refused, gib, peak_bytes
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.training import flops
from qstar_jax.training.metrics import status
from qstar_jax.method.mixing import params_shape_fn
from qstar_jax.training.step import abstract_state_and_shardings, init_train_state, make_train_step

# Share of a chip's HBM the chooser leaves free: the runtime's own buffers, the input
# pipeline's prefetched batches and allocator fragmentation are not in the compiler's peak.
HBM_MARGIN = 0.10


class Compiled(NamedTuple):
    """The AOT-compiled state initialisation and train step, and the abstract state they take."""

    init: Any
    step: Any
    state_in: Any


def compile_train_step(model_config: ModelConfig, qs: QuietStarConfig | None, optimizer, mesh,
                       cfg: ml_collections.ConfigDict) -> Compiled:
    """Compiles state initialisation (params -> params + Adam moments) and one train step
    for `mesh`'s devices (real ones, or an abstract TPU slice) on abstract inputs."""
    sharding.check_mesh_divides(mesh, cfg.batch_size // cfg.grad_accum, model_config.num_heads,
                                model_config.num_kv_heads)
    abstract_state, shardings = abstract_state_and_shardings(params_shape_fn(model_config, qs), optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.data.seq_len)
    tokens_in = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    init = jax.jit(lambda p: init_train_state(p, optimizer, jax.random.key(0)), out_shardings=shardings)
    step = make_train_step(model_config, qs, optimizer, None, shardings, batch_sharding)
    where = f"on mesh {sharding.mesh_name(tuple(mesh.shape.values()))}"
    return Compiled(compiled_or_refused(init.lower(state_in.params), f"state initialisation {where}"),
                    compiled_or_refused(step.lower(state_in, tokens_in, tokens_in), f"the train step {where}"),
                    state_in)


def memory_report(compiled: Compiled) -> dict[str, float]:
    """Per-device GB of loading (the params' shards), state initialisation and the step."""
    mem = compiled.step.memory_analysis()
    shard_bytes = sum(np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(compiled.state_in.params))
    return {
        "loaded_params_gb_per_device": gib(shard_bytes),
        "init_state_peak_gb_per_device": gib(peak_bytes(compiled.init.memory_analysis())),
        "argument_gb_per_device": gib(mem.argument_size_in_bytes),
        "temp_gb_per_device": gib(mem.temp_size_in_bytes),
        "output_gb_per_device": gib(mem.output_size_in_bytes),
        "alias_gb_per_device": gib(mem.alias_size_in_bytes),
        "peak_gb_per_device": gib(peak_bytes(mem)),
    }


def chip_report(compiled: Compiled, chip: Chip, n_chips: int, model_config: ModelConfig, qs: QuietStarConfig | None,
                cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The step against one TPU chip: HBM capacity, the compiler's cost analysis and a
    roofline estimate.

    The compiler counts each loop body (layer scan, thought-step scan, accumulation) once,
    so its FLOPs and bytes are per-iteration figures, not the step's. The roofline therefore
    takes the step's executed FLOPs from `training/flops.py` (counted from the shapes,
    rematerialisation included) and the compiler's bytes as a lower bound on HBM traffic;
    interconnect time (FSDP's weight gathers) is not in it, so the real step is slower.
    """
    cost = compiled.step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    peak = peak_bytes(compiled.step.memory_analysis())
    batch, seq = cfg.batch_size, cfg.data.seq_len
    if qs is None:
        model = executed = flops.lm_step_flops(model_config, batch, seq)
    else:
        counted = flops.step_flops(model_config, qs, batch, seq)
        model, executed = counted["model_flops_per_step"], counted["executed_flops_per_step"]
    compute_s = executed / (n_chips * chip.peak_bf16_flops)
    step_s = max(compute_s, float(cost.get("bytes accessed", 0.0)) / chip.hbm_bytes_per_s)
    return {
        "chip": chip.name,
        "hbm_gb_per_chip": gib(chip.hbm_bytes),
        "hbm_used": round(peak / chip.hbm_bytes, 3),
        "fits": peak <= chip.hbm_bytes * (1 - HBM_MARGIN),
        "compiler_flops_per_chip_loop_bodies_once": float(cost.get("flops", 0.0)),
        "compiler_bytes_accessed_per_chip_loop_bodies_once": float(cost.get("bytes accessed", 0.0)),
        "model_flops_per_step": float(model),
        "executed_flops_per_step": float(executed),
        "estimate_roofline_step_s": float(f"{step_s:.4g}"),
        "estimate_roofline_mfu": round(model / (step_s * n_chips * chip.peak_bf16_flops), 3),
    }


def step_report(compiled: Compiled, mesh, model_config: ModelConfig, qs: QuietStarConfig | None,
                cfg: ml_collections.ConfigDict, chip: Chip | None = None) -> dict[str, Any]:
    """Per-device memory (GB) of loading and of the train step; on a TPU slice (`chip`
    given) also per-chip capacity, cost and a roofline estimate."""
    report = {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "compiler": "tpu" if chip is not None else jax.devices()[0].platform,
        "params_billion": round(sum(np.prod(a.shape) for a in jax.tree.leaves(compiled.state_in.params)) / 1e9, 3),
        **memory_report(compiled),
    }
    if chip is not None:
        report.update(chip_report(compiled, chip, mesh.size, model_config, qs, cfg))
    return report


def candidate_meshes(devices: int, model_config: ModelConfig, cfg: ml_collections.ConfigDict) -> list[tuple]:
    """The meshes worth compiling: one per tensor size that divides the shapes, with data 1.
    For a given tensor size data x fsdp is fixed, so each device holds the same activations
    whatever the split, and data > 1 only replicates state that fsdp would shard: never a
    lower peak."""
    dividing = sharding.dividing_meshes(devices, cfg.batch_size // cfg.grad_accum, model_config.num_heads,
                                        model_config.num_kv_heads)
    return [m for m in dividing if m[0] == 1]


def choose_mesh(devices: list, model_config: ModelConfig, qs: QuietStarConfig | None, optimizer,
                cfg: ml_collections.ConfigDict, capacity_bytes: int | None) -> tuple[Any, Compiled, list[dict]]:
    """(the mesh with the lowest compiled per-device peak that fits `capacity_bytes` less
    HBM_MARGIN, its compiled step, every candidate's figures). Without a capacity (CPU
    devices) the lowest peak."""
    candidates = candidate_meshes(len(devices), model_config, cfg)
    if not candidates:
        raise UserError(f"no (data, fsdp, tensor) mesh of {len(devices)} devices divides the batch of "
                        f"{cfg.batch_size // cfg.grad_accum} and the {model_config.num_heads} heads / "
                        f"{model_config.num_kv_heads} KV heads")
    tried, fitting = [], []
    for shape in candidates:
        mesh = sharding.make_mesh(*shape, devices=devices)
        try:
            compiled = compile_train_step(model_config, qs, optimizer, mesh, cfg)
        except DoesNotFit as e:
            tried.append({"mesh": sharding.mesh_name(shape), "fits": False, "error": str(e)})
            status(str(e))
            continue
        peak = peak_bytes(compiled.step.memory_analysis())
        fits = capacity_bytes is None or peak <= capacity_bytes * (1 - HBM_MARGIN)
        tried.append({"mesh": sharding.mesh_name(shape), "peak_gb_per_device": gib(peak), "fits": fits})
        status(f"mesh {sharding.mesh_name(shape)}: peak {gib(peak)} GiB per device")
        if fits and (not fitting or peak < fitting[0]):
            fitting = [peak, mesh, compiled]
    if not fitting:
        room = f"{gib(capacity_bytes)} GiB per device with {HBM_MARGIN:.0%} free" if capacity_bytes else "the devices"
        raise DoesNotFit(f"no mesh fits {room}: " + ", ".join(
            f"{t['mesh']} peaks at {t['peak_gb_per_device']} GiB" if "error" not in t else t["error"] for t in tried))
    return fitting[1], fitting[2], tried


def configured_shapes(cfg: ml_collections.ConfigDict) -> tuple[ModelConfig, QuietStarConfig | None]:
    """The model and method a pre-flight compiles: the config's architecture with its
    `preflight_vocab_size` (no checkpoint or tokenizer is read)."""
    model_config = ModelConfig(**{**cfg.model.to_dict(), "vocab_size": cfg.preflight_vocab_size})
    if cfg.method == "ntp":  # its step also takes the teacher's per-token signal
        raise UserError("--preflight and mesh.auto compile quiet_star and lm runs; method=ntp is not covered")
    if cfg.method != "quiet_star":
        return model_config, None
    vocab = model_config.vocab_size
    return model_config, QuietStarConfig(**cfg.quiet_star.to_dict(), start_token_id=vocab - 2, end_token_id=vocab - 1)


def device_capacity(device) -> int | None:
    """Bytes of memory a real accelerator device can allocate; None on CPU devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats.get("bytes_limit") if stats else None


def configured_mesh(cfg: ml_collections.ConfigDict, devices: list, capacity_bytes: int | None, optimizer):
    """`cfg.mesh` over `devices`, or with mesh.auto the chooser's pick for the config's shapes."""
    if not cfg.mesh.auto:
        return sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    model_config, qs = configured_shapes(cfg)
    mesh = choose_mesh(devices, model_config, qs, optimizer, cfg, capacity_bytes)[0]
    status(f"mesh.auto chose {sharding.mesh_name(tuple(mesh.shape.values()))} (data x fsdp x tensor)")
    return mesh


def run_preflight(cfg: ml_collections.ConfigDict, optimizer, topology: str | None = None) -> dict[str, Any]:
    """`--preflight [--topology NAME]`: the report for the configured (or chosen) mesh over
    the devices at hand, or over a TPU slice compiled with the TPU compiler."""
    devices = chips.topology_devices(topology) if topology else jax.devices()
    chip = chips.chip_of(topology) if topology else None
    capacity = chip.hbm_bytes if chip else device_capacity(devices[0])
    model_config, qs = configured_shapes(cfg)
    if cfg.mesh.auto:
        mesh, compiled, tried = choose_mesh(devices, model_config, qs, optimizer, cfg, capacity)
    else:
        mesh, tried = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices), None
        compiled = compile_train_step(model_config, qs, optimizer, mesh, cfg)
    report = step_report(compiled, mesh, model_config, qs, cfg, chip)
    if tried is not None:
        report["candidates"] = tried
    if topology:
        report["topology"] = chips.topology_name(topology)
    return report
