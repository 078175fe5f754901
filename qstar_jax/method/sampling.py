"""Sampling: thought tokens (training and decoding) and the next real token when decoding."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qstar_jax.errors import UserError
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import MASKED_SCORE


def mask_thought_tokens(logits_xV: jax.Array, qs: QuietStarConfig) -> jax.Array:
    """Start/end tokens are never sampled (they are placed, not predicted)."""
    vocab_V = jnp.arange(logits_xV.shape[-1])
    thought_V = (vocab_V == qs.start_token_id) | (vocab_V == qs.end_token_id)
    return jnp.where(thought_V, MASKED_SCORE, logits_xV)


def check_thought_ids(config: ModelConfig, qs: QuietStarConfig) -> None:
    ids = (qs.start_token_id, qs.end_token_id)
    if not all(0 <= i < config.vocab_size for i in ids) or ids[0] == ids[1]:
        raise UserError(
            f"start/end thought token ids {ids} must be two distinct ids in [0, {config.vocab_size}); "
            "add the thought tokens to the tokenizer and grow the vocab first"
        )


def sample_thought_tokens(logits_RxV: jax.Array, uniform_R: jax.Array, temperature: float) -> jax.Array:
    """Samples from softmax(logits / temperature) by inverting the CDF at `uniform_R`.

    One uniform per row instead of V Gumbel draws: on CPU, drawing a RxV Gumbel array
    costs ~10x the LM-head matmul at V=32k. The CDF is inverted in two levels (blocks
    of ~sqrt(V) ids, then ids inside the chosen block) so no length-V cumsum is needed.
    Shapes: R rows, Z blocks of W ids each (Z * W >= V, the tail padded).
    """
    r, v = logits_RxV.shape
    block = math.isqrt(v - 1) + 1
    n_blocks = -(-v // block)
    scaled_RxV = logits_RxV.astype(jnp.float32) / temperature
    scaled_RxV = jnp.pad(scaled_RxV, ((0, 0), (0, n_blocks * block - v)), constant_values=-jnp.inf)
    probs_RxZxW = jnp.exp(scaled_RxV - scaled_RxV.max(axis=-1, keepdims=True)).reshape(r, n_blocks, block)
    block_cdf_RxZ = jnp.cumsum(probs_RxZxW.sum(axis=-1), axis=-1)
    target_R = uniform_R * block_cdf_RxZ[:, -1]
    chosen_R = jnp.minimum(jnp.sum(block_cdf_RxZ < target_R[:, None], axis=-1), n_blocks - 1)
    before_R = jnp.take_along_axis(block_cdf_RxZ, jnp.maximum(chosen_R - 1, 0)[:, None], axis=-1)[:, 0]
    before_R = jnp.where(chosen_R > 0, before_R, 0.0)
    inside_RxW = jnp.take_along_axis(probs_RxZxW, chosen_R[:, None, None], axis=1)[:, 0]
    inside_cdf_RxW = before_R[:, None] + jnp.cumsum(inside_RxW, axis=-1)
    offset_R = jnp.minimum(jnp.sum(inside_cdf_RxW < target_R[:, None], axis=-1), block - 1)
    return jnp.minimum(chosen_R * block + offset_R, v - 1).astype(jnp.int32)


def thought_uniforms(rng: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The uniforms that pick thought step `step`'s tokens (shape-addressable for tests)."""
    return jax.random.uniform(jax.random.fold_in(rng, step), shape)


def sample_tokens(logits_BxV: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Greedy for temperature <= 0, else a sample from softmax(logits / temperature)."""
    if temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    uniform_B = jax.random.uniform(key, logits_BxV.shape[:1])
    return sample_thought_tokens(logits_BxV, uniform_B, temperature)
