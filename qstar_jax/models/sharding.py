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


def make_mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 (the rest)."""
    sizes = [data, fsdp, tensor]
    count = jax.device_count()
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
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


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
