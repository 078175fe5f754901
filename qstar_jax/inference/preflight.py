"""The decoding pre-flight: AOT-compiles thinking generation (prefill and the KV-cache decode
loop of `decode.generate_decoded`) for a mesh of real or abstract devices, with the params
sharded as `generate` and `evaluate` load them (FSDP over every device), and reports
per-device memory. On an abstract TPU host (`chips.topology_devices("v5e:2x4")`) these are
the TPU compiler's figures, before any slice exists."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qstar_jax.inference.decode import generate_decoded
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.mixing import params_shape_fn
from qstar_jax.models import sharding
from qstar_jax.models.chips import compiled_or_refused, gib, peak_bytes
from qstar_jax.models.config import ModelConfig


def abstract_decode_inputs(config: ModelConfig, qs: QuietStarConfig | None, mesh, batch: int, prompt_len: int):
    """(params, prompt_BxT, valid_BxT, rng) as sharded abstract arrays: params by the
    partition rules (as `load_for_inference` restores them), prompts and key replicated."""
    params = jax.eval_shape(params_shape_fn(config, qs))
    shardings = sharding.param_shardings(params, mesh)
    params_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    replicated = NamedSharding(mesh, P())
    key = jax.eval_shape(lambda: jax.random.key(0))
    return (params_in, jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=replicated),
            jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=replicated),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated))


def compile_decode(config: ModelConfig, qs: QuietStarConfig | None, mesh, batch: int, prompt_len: int,
                   new_tokens: int, thinking: bool = True):
    """The compiled generation program (thinking before every token when `thinking`)."""
    params, prompt, valid, key = abstract_decode_inputs(config, qs, mesh, batch, prompt_len)
    lowered = generate_decoded.lower(config, qs, params, prompt, valid, key, new_tokens, 1.0, thinking)
    return compiled_or_refused(lowered, f"generation of {batch} x ({prompt_len} + {new_tokens}) tokens")


def decode_preflight(config: ModelConfig, qs: QuietStarConfig | None, mesh, batch: int, prompt_len: int,
                     new_tokens: int, thinking: bool = True) -> dict[str, Any]:
    """Per-device GB of the generation program: params' shards (arguments), the KV cache and
    activations (temporaries), and the peak."""
    memory = compile_decode(config, qs, mesh, batch, prompt_len, new_tokens, thinking).memory_analysis()
    params = jax.eval_shape(params_shape_fn(config, qs))
    return {
        "devices": mesh.size,
        "mesh": dict(mesh.shape),
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "thinking": thinking,
        "params_billion": round(sum(np.prod(a.shape) for a in jax.tree.leaves(params)) / 1e9, 3),
        "argument_gb_per_device": gib(memory.argument_size_in_bytes),
        "temp_gb_per_device": gib(memory.temp_size_in_bytes),
        "output_gb_per_device": gib(memory.output_size_in_bytes),
        "peak_gb_per_device": gib(peak_bytes(memory)),
    }
