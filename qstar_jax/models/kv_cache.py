"""Incremental decoding: a KV cache of every layer and the step that appends tokens to it.

Two layouts, chosen by the model's layer stack. A rolled stack (scan_unroll < num_layers,
the large models) decodes through the same `nn.scan` as training, with one stacked
LxBxSxGxK cache array. An unrolled stack (scan_unroll >= num_layers, the shallow models)
decodes as straight-line code over per-layer weights and per-layer cache arrays. XLA on
CPU does not hoist the per-layer weight slices of an unrolled scan out of a decode loop,
so the stacked form copies every layer weight once per generated token (it was most of a
token's cost on the toy model), and it re-concatenates the whole cache at every step;
`hoist_layers` slices the weights once per call instead, and a per-layer cache is
updated in place.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import (
    AttentionInputs,
    Block,
    CachedAttention,
    CacheExtras,
    Params,
    Transformer,
    positions_from_valid,
)


class KVCache(NamedTuple):
    """Keys/values of every layer for incremental decoding, plus slot bookkeeping.

    Keys and values are one stacked LxBxSxGxK array each for a rolled layer stack, or a
    tuple of L BxSxGxK arrays for an unrolled one (`layers_unrolled`)."""

    k_LxBxSxGxK: jax.Array | tuple[jax.Array, ...]
    v_LxBxSxGxK: jax.Array | tuple[jax.Array, ...]
    positions_BxS: jax.Array  # int32 position held in each slot
    valid_BxS: jax.Array  # bool: slot holds a real token
    length: jax.Array  # int32 scalar: slots written so far
    next_position_B: jax.Array  # int32: position the next real token of each row gets


def layers_unrolled(config: ModelConfig) -> bool:
    """Whether the layer scan runs every layer in one iteration, i.e. has no loop."""
    return config.scan_unroll >= config.num_layers


def hoist_layers(config: ModelConfig, params: Params) -> Params:
    """LM params whose layer weights are a tuple of per-layer trees, for an unrolled stack
    (else unchanged). Called once outside a decode loop, so each weight slice is made once
    per call, not once per token; the cost is one extra copy of the layer weights, which
    only shallow (unrolled) models pay."""
    if not layers_unrolled(config) or isinstance(params["layers"], tuple):
        return params
    stacked = params["layers"]
    return {**params, "layers": tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(config.num_layers))}


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)

    def zeros():
        if layers_unrolled(config):
            return tuple(jnp.zeros(shape[1:], dtype) for _ in range(config.num_layers))
        return jnp.zeros(shape, dtype)

    return KVCache(
        k_LxBxSxGxK=zeros(),
        v_LxBxSxGxK=zeros(),
        positions_BxS=jnp.zeros((batch, max_length), jnp.int32),
        valid_BxS=jnp.zeros((batch, max_length), bool),
        length=jnp.zeros((), jnp.int32),
        next_position_B=jnp.zeros((batch,), jnp.int32),
    )


def decode_embeddings(
    config: ModelConfig,
    params: Params,
    x_BxTxD: jax.Array,
    cache: KVCache,
    valid_BxT: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Appends T input embeddings to the cache; returns (final-normed hidden_BxTxD, cache).

    The embedding-level entry point lets Quiet-STaR feed its learned start/end vectors.
    Padding inputs (valid False) take a slot but are never attended to and do not
    advance positions. The caller keeps `cache.length + T` within the cache size. For an
    unrolled layer stack, `params` may come from `hoist_layers` (the fast form in a loop).
    """
    b, t = x_BxTxD.shape[:2]
    if valid_BxT is None:
        valid_BxT = jnp.ones((b, t), bool)
    positions_BxT = positions_from_valid(valid_BxT, cache.next_position_B)
    kv_positions_BxS = jax.lax.dynamic_update_slice_in_dim(cache.positions_BxS, positions_BxT, cache.length, 1)
    kv_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT, cache.length, 1)
    inputs = AttentionInputs(positions_BxT, CacheExtras(cache.length, kv_positions_BxS, kv_valid_BxS))
    attention = CachedAttention(config.sliding_window)
    if layers_unrolled(config):
        h_BxTxD, (k_LxBxSxGxK, v_LxBxSxGxK) = _unrolled_layers(config, hoist_layers(config, params), attention,
                                                              x_BxTxD, inputs, cache)
    else:
        h_BxTxD, (k_LxBxSxGxK, v_LxBxSxGxK) = Transformer(config, attention).apply(
            {"params": params}, x_BxTxD, inputs, (cache.k_LxBxSxGxK, cache.v_LxBxSxGxK),
            method=Transformer.transform)
    new_cache = KVCache(
        k_LxBxSxGxK,
        v_LxBxSxGxK,
        kv_positions_BxS,
        kv_valid_BxS,
        cache.length + t,
        cache.next_position_B + valid_BxT.sum(axis=1, dtype=jnp.int32),
    )
    return h_BxTxD, new_cache


def _unrolled_layers(config: ModelConfig, params: Params, attention: CachedAttention, x_BxTxD: jax.Array,
                     inputs: AttentionInputs, cache: KVCache):
    """The layers of an unrolled stack, one `Block` per layer with its own cache arrays."""
    block = Block(config, attention)
    keys, values = [], []
    for layer_params, k_BxSxGxK, v_BxSxGxK in zip(params["layers"], cache.k_LxBxSxGxK, cache.v_LxBxSxGxK):
        x_BxTxD, (k_BxSxGxK, v_BxSxGxK) = block.apply({"params": layer_params}, x_BxTxD, (k_BxSxGxK, v_BxSxGxK),
                                                       inputs)
        keys.append(k_BxSxGxK)
        values.append(v_BxSxGxK)
    h_BxTxD = Transformer(config).apply({"params": {"final_norm": params["final_norm"]}}, x_BxTxD,
                                          method=Transformer.final)
    return h_BxTxD, (tuple(keys), tuple(values))


def embed(config: ModelConfig, params: Params, tokens_BxT: jax.Array) -> jax.Array:
    return Transformer(config).apply({"params": params}, tokens_BxT, method=Transformer.embed)


def lm_head(config: ModelConfig, params: Params, h_xD: jax.Array) -> jax.Array:
    """Float32 logits from final-normed hidden states."""
    return Transformer(config).apply({"params": params}, h_xD, method=Transformer.logits)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def decode_step(
    config: ModelConfig,
    params: Params,
    tokens_BxT: jax.Array,
    cache: KVCache,
    valid_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Appends T tokens (a prefill chunk or one new token); returns (logits, hidden, cache)."""
    h_BxTxD, cache = decode_embeddings(config, params, embed(config, params, tokens_BxT), cache, valid_BxT)
    return lm_head(config, params, h_BxTxD), h_BxTxD, cache
