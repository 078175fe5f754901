"""Incremental decoding: a KV cache of every layer and the step that appends tokens to it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import (
    AttentionInputs,
    CachedAttention,
    CacheExtras,
    Params,
    Transformer,
    positions_from_valid,
)


class KVCache(NamedTuple):
    """Keys/values of every layer for incremental decoding, plus slot bookkeeping."""

    k_LxBxSxGxK: jax.Array
    v_LxBxSxGxK: jax.Array
    positions_BxS: jax.Array  # int32 position held in each slot
    valid_BxS: jax.Array  # bool: slot holds a real token
    length: jax.Array  # int32 scalar: slots written so far
    next_position_B: jax.Array  # int32: position the next real token of each row gets


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return KVCache(
        k_LxBxSxGxK=jnp.zeros(shape, dtype),
        v_LxBxSxGxK=jnp.zeros(shape, dtype),
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
    advance positions. The caller keeps `cache.length + T` within the cache size.
    """
    b, t = x_BxTxD.shape[:2]
    if valid_BxT is None:
        valid_BxT = jnp.ones((b, t), bool)
    positions_BxT = positions_from_valid(valid_BxT, cache.next_position_B)
    kv_positions_BxS = jax.lax.dynamic_update_slice_in_dim(cache.positions_BxS, positions_BxT, cache.length, 1)
    kv_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT, cache.length, 1)
    inputs = AttentionInputs(positions_BxT, CacheExtras(cache.length, kv_positions_BxS, kv_valid_BxS))
    model = Transformer(config, CachedAttention(config.sliding_window))
    h_BxTxD, (k_LxBxSxGxK, v_LxBxSxGxK) = model.apply(
        {"params": params}, x_BxTxD, inputs, (cache.k_LxBxSxGxK, cache.v_LxBxSxGxK), method=Transformer.transform
    )
    new_cache = KVCache(
        k_LxBxSxGxK,
        v_LxBxSxGxK,
        kv_positions_BxS,
        kv_valid_BxS,
        cache.length + t,
        cache.next_position_B + valid_BxT.sum(axis=1, dtype=jnp.int32),
    )
    return h_BxTxD, new_cache


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
