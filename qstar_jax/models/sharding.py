"""Device mesh and partition rules.

One mesh with axes (data, fsdp, tensor). Batches split over data x fsdp; parameters
and optimizer state shard by a small table of rules (regex on the parameter path ->
PartitionSpec): weight matrices split their model dimension over fsdp and
their head / MLP / vocab dimension over tensor. A dimension that a mesh axis does not
divide stays unsplit for that axis, so the same rules serve a 2-layer toy and a 7B model.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regex on "/"-joined param path, spec). Layer params carry a leading layer axis (None).
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "tensor")),
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"layers/(q_proj|k_proj|v_proj)/bias$", P(None, "tensor")),
    (r"layers/(o_proj|down_proj)/kernel$", P(None, "tensor", "fsdp")),
    (r"layers/(attn_norm|mlp_norm)/scale$", P(None, None)),
    (r"final_norm/scale$", P(None)),
    (r"mixing_head/(in|hidden)/kernel$", P("fsdp", "tensor")),
    (r"mixing_head/out/kernel$", P("fsdp", None)),
    (r"mixing_head/\w+/bias$", P(None)),
    (r"thought/(start|end)$", P(None)),
    (r"think_gate/hidden/kernel$", P("fsdp", "tensor")),
    (r"think_gate/out/kernel$", P("fsdp", None)),
    (r"think_gate/\w+/bias$", P(None)),
)


def make_mesh(data: int, fsdp: int, tensor: int, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all of them; abstract TPU
    devices from `chips.topology_devices` compile for a slice); one size may be -1 (the rest)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    count = len(devices)
    if sizes.count(-1) > 1:
        raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if count % known:
            raise UserError(f"mesh sizes {sizes} do not divide the {count} devices")
        sizes[sizes.index(-1)] = count // known
    if int(np.prod(sizes)) != count:
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {count}")
    # Auto axes: XLA propagates shardings through the model; only inputs and state are pinned.
    # Device order follows the TPU torus where each mesh axis is a product of physical axes;
    # where not (tensor 2 on a v6e-16's 4 x 4), a physical axis is split between mesh axes.
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_name(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def dividing_meshes(devices: int, batch: int, heads: int, kv_heads: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) over `devices` whose data x fsdp divides the batch (each
    device holds whole sequences) and whose tensor divides the heads and the KV heads (each
    device holds whole heads), fewest tensor ways first."""
    found = []
    for tensor in range(1, devices + 1):
        if devices % tensor or heads % tensor or kv_heads % tensor:
            continue
        rows = devices // tensor
        found += [(data, rows // data, tensor) for data in range(1, rows + 1) if rows % data == 0 and batch % rows == 0]
    return found


def check_mesh_divides(mesh: Mesh, batch: int, heads: int, kv_heads: int) -> None:
    """One line naming the meshes that would work, for a mesh that splits a sequence or a
    head across devices (XLA would fail later with a shape error, or replicate silently)."""
    shape = tuple(mesh.shape[a] for a in MESH_AXES)
    rows, tensor = shape[0] * shape[1], shape[2]
    problems = [f"data x fsdp = {rows} does not divide the batch of {batch}"] if batch % rows else []
    problems += [f"tensor {tensor} does not divide the {n} {what}" for n, what in
                 ((heads, "attention heads"), (kv_heads, "KV heads")) if n % tensor]
    if problems:
        good = dividing_meshes(mesh.size, batch, heads, kv_heads)
        offer = (f"meshes (data x fsdp x tensor) of {mesh.size} devices that would: "
                 f"{', '.join(mesh_name(m) for m in good)} (or mesh.auto=True)") if good else \
            f"no mesh of {mesh.size} devices would"
        raise UserError(f"mesh {mesh_name(shape)}: {'; '.join(problems)}; {offer}")


def host_mesh() -> Mesh:
    """A one-device mesh on the host CPU: where conversion and single-host tools build
    arrays, so that nothing is staged on an accelerator's first chip."""
    device = np.array(jax.devices("cpu")[:1]).reshape(1, 1, 1)
    return Mesh(device, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops axes that do not divide their dimension."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = 1 if axis is None else mesh.shape[axis]
        fitted.append(axis if axis is not None and dim % size == 0 else None)
    return P(*fitted)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, spec in PARTITION_RULES:
        if re.search(pattern, path):
            if len(spec) != len(shape):
                raise ValueError(f"partition rule {pattern} has rank {len(spec)}, param {path} has {shape}")
            return _fit(spec, shape, mesh)
    raise ValueError(f"no partition rule for parameter {path} {shape}")


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """A NamedSharding per parameter (same tree), from the partition rules above."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(_path_str(path), x.shape, mesh)), abstract_params
    )


def state_shardings(abstract_state, optimizer: optax.GradientTransformation, mesh: Mesh):
    """Shardings for a TrainState: params by the rules, optimizer moments like their params."""
    replicated = NamedSharding(mesh, P())
    params = param_shardings(abstract_state.params, mesh)
    opt_state = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_state.opt_state, params,
        transform_non_params=lambda _: replicated,
    )
    return abstract_state.replace(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Tokens are (accumulation, batch, seq): the batch splits over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))
