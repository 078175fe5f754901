"""The memory pre-flight: AOT-compiles state initialisation and the train step for the
configured shapes on abstract inputs and reports per-device memory, before any weight loads."""

from __future__ import annotations

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np

from qstar_jax.models import sharding
from qstar_jax.training.setup import params_shape_fn
from qstar_jax.training.step import abstract_state_and_shardings, init_train_state, make_train_step


def preflight(model_config, qs, optimizer, mesh, cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Per-device memory (GB) of loading and of the train step, from AOT compiles on abstract
    inputs: the loaded params' shards, the state initialisation they feed (params -> params
    + Adam moments), and one train step."""
    abstract_state, shardings = abstract_state_and_shardings(params_shape_fn(model_config, qs), optimizer, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    shape = (cfg.grad_accum, cfg.batch_size // cfg.grad_accum, cfg.data.seq_len)
    abstract_in = lambda dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    init = jax.jit(lambda p: init_train_state(p, optimizer, jax.random.key(0)), out_shardings=shardings)
    init_mem = init.lower(state_in.params).compile().memory_analysis()
    compiled = make_train_step(model_config, qs, optimizer, None, shardings, batch_sharding).lower(
        state_in, abstract_in(jnp.int32, batch_sharding), abstract_in(jnp.int32, batch_sharding)
    ).compile()
    mem = compiled.memory_analysis()
    gb = lambda x: float(f"{x / 2**30:.4g}")
    peak = lambda m: m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    shard_bytes = sum(np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                      for leaf in jax.tree.leaves(state_in.params))
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "params_billion": round(sum(np.prod(a.shape) for a in jax.tree.leaves(abstract_state.params)) / 1e9, 3),
        "loaded_params_gb_per_device": gb(shard_bytes),
        "init_state_peak_gb_per_device": gb(peak(init_mem)),
        "argument_gb_per_device": gb(mem.argument_size_in_bytes),
        "temp_gb_per_device": gb(mem.temp_size_in_bytes),
        "output_gb_per_device": gb(mem.output_size_in_bytes),
        "alias_gb_per_device": gb(mem.alias_size_in_bytes),
        "peak_gb_per_device": gb(peak(mem)),
    }
