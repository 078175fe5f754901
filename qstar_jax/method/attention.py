"""Thought attention: what a thought token attends to, without an N x N*S mask.

* The base sequence is run once (`CausalAttention(return_kv=True)`); its post-RoPE keys
  and values are kept for every layer.
* At thought step s, every position j of every pass p feeds one new token. Its query
  attends to (a) the base keys k <= j (padding and sliding window respected) and (b) the
  keys of its *own* earlier thought tokens (a per-position "diagonal" block) held as a
  cache of shape B x P x N x S. One softmax spans both parts. Work per step and head is
  O(N * (N + s)); no N x N*(s+1) mask is ever built (the official code builds one:
  `DenseThoughtAttention` reproduces it for comparison).
* `ThoughtBlockAttention` does the same for every step of every thought at once (the
  two-pass rollout's differentiated pass).

Shape suffixes as in models/transformer.py, plus P passes, N sequence positions, T = P * N
thought queries per row, S thought steps, G KV heads, R query heads per KV head, M base keys.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.models.transformer import MASKED_SCORE, AttentionInputs, masked_attention, same_segment


class ThoughtExtras(NamedTuple):
    """Arrays every layer needs to mask a thought step: the base keys' positions and
    segments, and the thinking sites' (query) index, position and segment."""

    step: jax.Array  # int32 scalar, 1-based thought step being fed
    base_positions_BxN: jax.Array
    base_segments_BxN: jax.Array
    site_index_BxK: jax.Array
    site_positions_BxK: jax.Array
    site_segments_BxK: jax.Array


def _to_groups(x_BxTxHxK: jax.Array, p: int, g: int) -> jax.Array:
    """BxTxHxK with T = P*N and H = G*R -> BxGxPxNxRxK."""
    b, t, h, k = x_BxTxHxK.shape
    return x_BxTxHxK.reshape(b, p, t // p, g, h // g, k).transpose(0, 3, 1, 2, 4, 5)


def _prefix_mask(extras) -> jax.Array:
    """BxKxN (thinking site x base key): the base keys a thought at j may see before any
    window, index-causal (key <= j) and real tokens of j's segment."""
    key_index_N = jnp.arange(extras.base_segments_BxN.shape[1])
    causal_BxKxN = extras.site_index_BxK[:, :, None] >= key_index_N[None, None, :]
    return causal_BxKxN & same_segment(extras.site_segments_BxK, extras.base_segments_BxN)


def _thought_masks(extras: ThoughtExtras, s: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Which base keys (BxKxN, site x key) and which own-cache slots (S) a thought step sees.

    Base keys: index-causal (key <= the site's position j), real tokens of j's segment only,
    and inside the sliding window of the thought token's own position (site position + step).
    Cache slots: those of steps 1..step-1 (filled), inside the window.
    """
    base_mask_BxKxN = _prefix_mask(extras)
    slot_S = jnp.arange(s)
    cache_mask_S = slot_S < extras.step - 1
    if window is not None:
        q_pos_BxK = extras.site_positions_BxK + extras.step
        base_mask_BxKxN &= q_pos_BxK[:, :, None] - extras.base_positions_BxN[:, None, :] < window
        cache_mask_S &= extras.step - (slot_S + 1) < window
    return base_mask_BxKxN, cache_mask_S


@dataclasses.dataclass(frozen=True)
class ThoughtAttention:
    """Attention of one thought step: base prefix (causal) + own earlier thought tokens.

    `layer_state` = (base_k, base_v, cache_k, cache_v): base_* BxNxGxK from the base pass,
    cache_* BxGxPxNxSxK holding steps 1..step-1 of each position's own thought. One
    softmax spans the three key sets (base, cache, the token itself) without concatenating
    them. Scores live in B x G x P x N x R x {N, S} layouts so the big matmul is a plain
    batched matmul over (B, G). Returns this step's keys/values (BxGxPxNxK) for the cache.
    """

    sliding_window: int | None = None

    def __call__(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs: AttentionInputs):
        base_k_BxNxGxK, base_v_BxNxGxK, cache_k_BxGxPxNxSxK, cache_v_BxGxPxNxSxK = layer_state
        b, g, p, n, s, k = cache_k_BxGxPxNxSxK.shape
        h = q_BxTxHxK.shape[2]
        dtype = q_BxTxHxK.dtype
        q_BxGxPxNxRxK = _to_groups(q_BxTxHxK, p, g) * jnp.asarray(k**-0.5, dtype)
        k_now_BxGxPxNxK = _to_groups(k_BxTxGxK, p, g)[:, :, :, :, 0]
        v_now_BxGxPxNxK = _to_groups(v_BxTxGxK, p, g)[:, :, :, :, 0]
        base_mask_BxNxN, cache_mask_S = _thought_masks(inputs.extras, s, self.sliding_window)
        f32 = jnp.float32

        base_scores = jnp.einsum(
            "bgpnrk,bsgk->bgpnrs", q_BxGxPxNxRxK, base_k_BxNxGxK.astype(dtype), preferred_element_type=f32
        )
        base_scores = jnp.where(base_mask_BxNxN[:, None, None, :, None, :], base_scores, MASKED_SCORE)
        cache_scores = jnp.einsum(
            "bgpnrk,bgpnsk->bgpnrs", q_BxGxPxNxRxK, cache_k_BxGxPxNxSxK.astype(dtype), preferred_element_type=f32
        )
        cache_scores = jnp.where(cache_mask_S, cache_scores, MASKED_SCORE)
        own_score = jnp.einsum("bgpnrk,bgpnk->bgpnr", q_BxGxPxNxRxK, k_now_BxGxPxNxK, preferred_element_type=f32)

        top = jnp.maximum(jnp.maximum(base_scores.max(-1), cache_scores.max(-1)), own_score)
        base_w = jnp.exp(base_scores - top[..., None])
        cache_w = jnp.exp(cache_scores - top[..., None])
        own_w = jnp.exp(own_score - top)
        total = base_w.sum(-1) + cache_w.sum(-1) + own_w
        out_BxGxPxNxRxK = (
            jnp.einsum("bgpnrs,bsgk->bgpnrk", base_w.astype(dtype), base_v_BxNxGxK.astype(dtype))
            + jnp.einsum("bgpnrs,bgpnsk->bgpnrk", cache_w.astype(dtype), cache_v_BxGxPxNxSxK.astype(dtype))
            + own_w[..., None].astype(dtype) * v_now_BxGxPxNxK[:, :, :, :, None, :]
        ) / total[..., None].astype(dtype)
        out_BxTxHxK = out_BxGxPxNxRxK.transpose(0, 2, 3, 1, 4, 5).reshape(b, p * n, h, k)
        return out_BxTxHxK, (k_now_BxGxPxNxK, v_now_BxGxPxNxK)


@dataclasses.dataclass(frozen=True)
class DenseThoughtAttention:
    """The official algorithm, for comparison: each (pass, row) attends to *all* thought keys.

    Keys are the base sequence plus every site's thought cache and current token (M + N * (S + 1)
    keys for N sites over M base keys), hidden by a dense mask that keeps the base prefix and
    the query's own thought. Same result as `ThoughtAttention`, at O(N^2 * S) work and mask memory.
    """

    sliding_window: int | None = None

    def __call__(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs: AttentionInputs):
        base_k_BxMxGxK, base_v_BxMxGxK, cache_k_BxGxPxNxSxK, cache_v_BxGxPxNxSxK = layer_state
        b, g, p, n, s, k = cache_k_BxGxPxNxSxK.shape  # N thinking sites, M base keys
        m = base_k_BxMxGxK.shape[1]
        dtype = q_BxTxHxK.dtype
        k_now_BxGxPxNxK = _to_groups(k_BxTxGxK, p, g)[:, :, :, :, 0]
        v_now_BxGxPxNxK = _to_groups(v_BxTxGxK, p, g)[:, :, :, :, 0]

        def all_keys(base_BxMxGxK, cache_BxGxPxNxSxK, now_BxTxGxK):
            base = jnp.broadcast_to(base_BxMxGxK[:, None], (b, p, m, g, k))
            cache = cache_BxGxPxNxSxK.transpose(0, 2, 3, 4, 1, 5).reshape(b, p, n * s, g, k)
            flat = [base, cache, now_BxTxGxK.reshape(b, p, n, g, k)]
            return jnp.concatenate(flat, axis=2).astype(dtype).reshape(b * p, m + n * (s + 1), g, k)

        base_mask_BxNxN, cache_mask_S = _thought_masks(inputs.extras, s, self.sliding_window)
        same_position_NxN = jnp.eye(n, dtype=bool)
        cache_mask_NxNS = (same_position_NxN[:, :, None] & cache_mask_S[None, None]).reshape(n, n * s)
        mask_BxNxK = jnp.concatenate(
            [base_mask_BxNxN, jnp.broadcast_to(cache_mask_NxNS, (b, n, n * s)), jnp.broadcast_to(same_position_NxN, (b, n, n))],
            axis=-1,
        )
        out = masked_attention(
            q_BxTxHxK.reshape(b * p, n, *q_BxTxHxK.shape[2:]),
            all_keys(base_k_BxMxGxK, cache_k_BxGxPxNxSxK, k_BxTxGxK),
            all_keys(base_v_BxMxGxK, cache_v_BxGxPxNxSxK, v_BxTxGxK),
            jnp.repeat(mask_BxNxK, p, axis=0),
        )
        return out.reshape(q_BxTxHxK.shape), (k_now_BxGxPxNxK, v_now_BxGxPxNxK)


THOUGHT_ATTENTION = {"parallel": ThoughtAttention, "dense_mask": DenseThoughtAttention}


class BlockExtras(NamedTuple):
    """Arrays every layer needs to mask the teacher-forced pass over all thought steps (as
    `ThoughtExtras`, without a step: every step is in the sequence)."""

    base_positions_BxN: jax.Array
    base_segments_BxN: jax.Array
    site_index_BxK: jax.Array
    site_positions_BxK: jax.Array
    site_segments_BxK: jax.Array


@dataclasses.dataclass(frozen=True)
class ThoughtBlockAttention:
    """Attention of every thought step at once (the "two_pass" rollout's gradient pass).

    The sequence holds L = P x N x S tokens, (pass, position, step) in that order: step s
    (1-based) of the thought at position j. Its query sees the base keys k <= j of j's
    segment (`layer_state` = the base pass's keys and values) and the keys of steps 1..s of
    its own thought, with the sliding window measured from its own position (base
    position + s), as `ThoughtAttention` at step s. One softmax spans both key sets; the
    scores are B x G x P x N x S x R x {N, S}, so each matmul is one batched matmul over
    (B, G) whose rows are every step of every thought.
    """

    sliding_window: int | None
    n_passes: int
    n_steps: int

    def __call__(self, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, layer_state, inputs: AttentionInputs):
        base_k_BxMxGxK, base_v_BxMxGxK = layer_state  # M base keys; N thinking sites
        b, l, h, k = q_BxLxHxK.shape
        g, p, s = k_BxLxGxK.shape[2], self.n_passes, self.n_steps
        n = l // (p * s)
        dtype, f32 = q_BxLxHxK.dtype, jnp.float32
        q_BxGxPxNxSxRxK = q_BxLxHxK.reshape(b, p, n, s, g, h // g, k).transpose(0, 4, 1, 2, 3, 5, 6)
        q_BxGxPxNxSxRxK = q_BxGxPxNxSxRxK * jnp.asarray(k**-0.5, dtype)
        own_k_BxGxPxNxSxK = k_BxLxGxK.reshape(b, p, n, s, g, k).transpose(0, 4, 1, 2, 3, 5)
        own_v_BxGxPxNxSxK = v_BxLxGxK.reshape(b, p, n, s, g, k).transpose(0, 4, 1, 2, 3, 5)

        extras: BlockExtras = inputs.extras
        base_mask_BxNx1xM = _prefix_mask(extras)[:, :, None]
        step_S = jnp.arange(1, s + 1)
        own_mask_SxS = step_S[:, None] >= step_S[None, :]
        if self.sliding_window is not None:
            q_pos_BxNxS = extras.site_positions_BxK[:, :, None] + step_S[None, None]
            base_mask_BxNx1xM = base_mask_BxNx1xM & (
                q_pos_BxNxS[..., None] - extras.base_positions_BxN[:, None, None, :] < self.sliding_window)
            own_mask_SxS &= step_S[:, None] - step_S[None, :] < self.sliding_window

        base_scores = jnp.einsum("bgpnsrk,bmgk->bgpnsrm", q_BxGxPxNxSxRxK, base_k_BxMxGxK.astype(dtype),
                                 preferred_element_type=f32)
        base_scores = jnp.where(base_mask_BxNx1xM[:, None, None, :, :, None, :], base_scores, MASKED_SCORE)
        own_scores = jnp.einsum("bgpnsrk,bgpntk->bgpnsrt", q_BxGxPxNxSxRxK, own_k_BxGxPxNxSxK,
                                preferred_element_type=f32)
        own_scores = jnp.where(own_mask_SxS[:, None, :], own_scores, MASKED_SCORE)
        top = jnp.maximum(base_scores.max(-1), own_scores.max(-1))[..., None]
        base_w, own_w = jnp.exp(base_scores - top), jnp.exp(own_scores - top)
        total = base_w.sum(-1) + own_w.sum(-1)
        out_BxGxPxNxSxRxK = (
            jnp.einsum("bgpnsrm,bmgk->bgpnsrk", base_w.astype(dtype), base_v_BxMxGxK.astype(dtype))
            + jnp.einsum("bgpnsrt,bgpntk->bgpnsrk", own_w.astype(dtype), own_v_BxGxPxNxSxK)
        ) / total[..., None].astype(dtype)
        return out_BxGxPxNxSxRxK.transpose(0, 2, 3, 4, 1, 5, 6).reshape(b, l, h, k), None
