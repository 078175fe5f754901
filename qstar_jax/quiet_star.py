"""Quiet-STaR: think (parallel thoughts), talk (mixing head), learn (REINFORCE + NLL).

The whole method is a pure function of (params, tokens, segments, rng) that `jax.jit`
and `jax.grad` accept; `segments_BxN` holds segment ids (0 = padding, 1, 2, ... = packed
documents, as in model.py) or a bool padding mask. A thought at j sees only its own
document's prefix, and talk targets never cross into the next document. The efficient part is the attention of thought tokens:

* The base sequence is run once (`CausalAttention(return_kv=True)`); its post-RoPE keys
  and values are kept for every layer.
* At thought step s, every position j of every pass p feeds one new token. Its query
  attends to (a) the base keys k <= j (padding and sliding window respected) and (b) the
  keys of its *own* earlier thought tokens (a per-position "diagonal" block) held as a
  cache of shape B x P x N x S. One softmax spans both parts. Work per step and head is
  O(N * (N + s)); no N x N*(s+1) mask is ever built (the official code builds one).
* Steps run under `lax.scan` with `jax.checkpoint`, so activation memory is one step's
  worth plus the small thought cache, and the full-vocabulary logits of a step are
  never stored for the backward pass.

Shape suffixes as in model.py, plus P passes, N sequence positions, T = P * N thought
queries per row, S thought steps, C the number of talk steps (n_ahead_talk).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from qstar_jax.config import ModelConfig, QuietStarConfig
from qstar_jax.model import (
    MASKED_SCORE,
    AttentionInputs,
    CausalAttention,
    Params,
    Transformer,
    masked_attention,
    positions_from_segments,
    same_segment,
    token_logp,
)
from qstar_jax.errors import UserError

# ------------------------------------------------------------------- thought attention


class ThoughtExtras(NamedTuple):
    """Arrays every layer needs to mask a thought step."""

    step: jax.Array  # int32 scalar, 1-based thought step being fed
    base_positions_BxN: jax.Array
    base_segments_BxN: jax.Array


def _to_groups(x_BxTxHxK: jax.Array, p: int, g: int) -> jax.Array:
    """BxTxHxK with T = P*N and H = G*R -> BxGxPxNxRxK."""
    b, t, h, k = x_BxTxHxK.shape
    return x_BxTxHxK.reshape(b, p, t // p, g, h // g, k).transpose(0, 3, 1, 2, 4, 5)


def _prefix_mask(segments_BxN: jax.Array) -> jax.Array:
    """BxNxN (thought position x base key): the base keys a thought at j may see before any
    window, index-causal (key <= j) and real tokens of j's segment."""
    index_N = jnp.arange(segments_BxN.shape[1])
    return (index_N[None, :, None] >= index_N[None, None, :]) & same_segment(segments_BxN, segments_BxN)


def _thought_masks(extras: ThoughtExtras, n: int, s: int, window: int | None) -> tuple[jax.Array, jax.Array]:
    """Which base keys (BxNxN, query x key) and which own-cache slots (S) a thought step sees.

    Base keys: index-causal (key <= query position j), real tokens of j's segment only,
    and inside the sliding window of the thought token's own position (base position + step). Cache
    slots: those of steps 1..step-1 (filled), inside the window.
    """
    base_mask_BxNxN = _prefix_mask(extras.base_segments_BxN)
    slot_S = jnp.arange(s)
    cache_mask_S = slot_S < extras.step - 1
    if window is not None:
        q_pos_BxN = extras.base_positions_BxN + extras.step
        base_mask_BxNxN &= q_pos_BxN[:, :, None] - extras.base_positions_BxN[:, None, :] < window
        cache_mask_S &= extras.step - (slot_S + 1) < window
    return base_mask_BxNxN, cache_mask_S


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
        base_mask_BxNxN, cache_mask_S = _thought_masks(inputs.extras, n, s, self.sliding_window)
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

    Keys are the base sequence plus every position's thought cache and current token
    (N * (S + 2) keys), hidden by a dense mask that keeps the base prefix and the query's
    own thought. Same result as `ThoughtAttention`, at O(N^2 * S) work and mask memory.
    """

    sliding_window: int | None = None

    def __call__(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs: AttentionInputs):
        base_k_BxNxGxK, base_v_BxNxGxK, cache_k_BxGxPxNxSxK, cache_v_BxGxPxNxSxK = layer_state
        b, g, p, n, s, k = cache_k_BxGxPxNxSxK.shape
        dtype = q_BxTxHxK.dtype
        k_now_BxGxPxNxK = _to_groups(k_BxTxGxK, p, g)[:, :, :, :, 0]
        v_now_BxGxPxNxK = _to_groups(v_BxTxGxK, p, g)[:, :, :, :, 0]

        def all_keys(base_BxNxGxK, cache_BxGxPxNxSxK, now_BxTxGxK):
            base = jnp.broadcast_to(base_BxNxGxK[:, None], (b, p, n, g, k))
            cache = cache_BxGxPxNxSxK.transpose(0, 2, 3, 4, 1, 5).reshape(b, p, n * s, g, k)
            flat = [base, cache, now_BxTxGxK.reshape(b, p, n, g, k)]
            return jnp.concatenate(flat, axis=2).astype(dtype).reshape(b * p, n * (s + 2), g, k)

        base_mask_BxNxN, cache_mask_S = _thought_masks(inputs.extras, n, s, self.sliding_window)
        same_position_NxN = jnp.eye(n, dtype=bool)
        cache_mask_NxNS = (same_position_NxN[:, :, None] & cache_mask_S).reshape(n, n * s)
        mask_BxNxK = jnp.concatenate(
            [base_mask_BxNxN, jnp.broadcast_to(cache_mask_NxNS, (b, n, n * s)), jnp.broadcast_to(same_position_NxN, (b, n, n))],
            axis=-1,
        )
        out = masked_attention(
            q_BxTxHxK.reshape(b * p, n, *q_BxTxHxK.shape[2:]),
            all_keys(base_k_BxNxGxK, cache_k_BxGxPxNxSxK, k_BxTxGxK),
            all_keys(base_v_BxNxGxK, cache_v_BxGxPxNxSxK, v_BxTxGxK),
            jnp.repeat(mask_BxNxK, p, axis=0),
        )
        return out.reshape(q_BxTxHxK.shape), (k_now_BxGxPxNxK, v_now_BxGxPxNxK)


THOUGHT_ATTENTION = {"parallel": ThoughtAttention, "dense_mask": DenseThoughtAttention}


class BlockExtras(NamedTuple):
    """Arrays every layer needs to mask the teacher-forced pass over all thought steps."""

    base_positions_BxN: jax.Array
    base_segments_BxN: jax.Array


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
        base_k_BxMxGxK, base_v_BxMxGxK = layer_state  # M: the N base keys
        b, l, h, k = q_BxLxHxK.shape
        g, p, s = k_BxLxGxK.shape[2], self.n_passes, self.n_steps
        n = l // (p * s)
        dtype, f32 = q_BxLxHxK.dtype, jnp.float32
        q_BxGxPxNxSxRxK = q_BxLxHxK.reshape(b, p, n, s, g, h // g, k).transpose(0, 4, 1, 2, 3, 5, 6)
        q_BxGxPxNxSxRxK = q_BxGxPxNxSxRxK * jnp.asarray(k**-0.5, dtype)
        own_k_BxGxPxNxSxK = k_BxLxGxK.reshape(b, p, n, s, g, k).transpose(0, 4, 1, 2, 3, 5)
        own_v_BxGxPxNxSxK = v_BxLxGxK.reshape(b, p, n, s, g, k).transpose(0, 4, 1, 2, 3, 5)

        extras: BlockExtras = inputs.extras
        base_mask_BxNx1xM = _prefix_mask(extras.base_segments_BxN)[:, :, None]
        step_S = jnp.arange(1, s + 1)
        own_mask_SxS = step_S[:, None] >= step_S[None, :]
        if self.sliding_window is not None:
            q_pos_BxNxS = extras.base_positions_BxN[:, :, None] + step_S
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

# ------------------------------------------------------------------------------- params


class MixingHead(nn.Module):
    """w = MLP([h_base ; h_thought]): Linear(2D->D)+ReLU, Linear(D->D)+ReLU, Linear(D->1).

    The last layer is zero-initialised, so w = 0 and training starts exactly at the base
    model. w is used unsquashed, as in the official code, unless `nonnegative`: then its
    magnitude, so that a head that learns a negative weight cannot invert the reward (a
    negative w makes the thoughts that help least score best; docs/method.md). |w| is 0 at
    the start like w, and unlike max(w, 0) its gradient never vanishes (1 at w = 0, written
    out rather than left to abs's convention), so the head cannot get stuck at 0.
    """

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    nonnegative: bool = False

    @nn.compact
    def __call__(self, h_base_xD: jax.Array, h_thought_xD: jax.Array) -> jax.Array:
        dense = lambda features, **kw: nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
        x = jnp.concatenate([h_base_xD, h_thought_xD], axis=-1)
        x = nn.relu(dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="in")(x))
        x = nn.relu(dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="hidden")(x))
        w_x = dense(1, use_bias=False, kernel_init=nn.initializers.zeros, name="out")(x)[..., 0]
        return jnp.where(w_x >= 0, w_x, -w_x) if self.nonnegative else w_x


def mixing_head_module(config: ModelConfig, qs: QuietStarConfig) -> MixingHead:
    return MixingHead(config.hidden_size, jnp.dtype(config.dtype), jnp.dtype(config.param_dtype),
                      qs.nonnegative_mixing_weight)


def init_quiet_star_params(
    config: ModelConfig, qs: QuietStarConfig, lm_params: Params, init_embedding_D: jax.Array, rng: jax.Array
) -> Params:
    """Adds the mixing head and the start/end thought embeddings to an LM's params.

    Both thought embeddings start at `init_embedding_D` (the official code uses the
    embedding of "---") and are *stored* divided by `embedding_scale` and used multiplied
    by it, which scales their gradient (and, under Adam, their effective step) by it.
    """
    d = config.hidden_size
    mixing = mixing_head_module(config, qs).init(rng, jnp.zeros((1, d)), jnp.zeros((1, d)))["params"]
    stored_D = (init_embedding_D / qs.embedding_scale).astype(jnp.dtype(config.param_dtype))
    # Two buffers, not one shared array: a donated train state must not alias itself.
    return {"lm": lm_params, "mixing_head": mixing, "thought": {"start": stored_D, "end": jnp.copy(stored_D)}}


# ------------------------------------------------------------------------------ rollout


class Rollout(NamedTuple):
    """Per-position quantities of one Quiet-STaR forward pass (what the loss is made of)."""

    base_logp_BxN: jax.Array  # log p_base(x_{j+1} | x_<=j)
    target_valid_CxBxN: jax.Array  # talk target x_{j+1+c} exists, is real and in x_j's segment
    sampled_SxBxPxN: jax.Array  # sampled thought tokens (S = n_ahead - 3)
    sample_logp_SxBxPxN: jax.Array  # log softmax(logits / reinforce_temperature)[sampled]
    talk_logp_CxBxPxN: jax.Array  # log p_mix(x_{j+1+c}) after the thought
    mixing_weight_CxBxPxN: jax.Array  # w of the mixing head at talk step c
    # log p_mix(. | x_<=j, thought) over the whole vocabulary at the first talk step; only
    # with rollout(talk_distribution=True) (the NTP stage's KL teacher), else None
    talk_logdist_BxPxNxV: jax.Array | None = None


def _shift_left(x_BxN: jax.Array, shift: int, fill) -> jax.Array:
    """x[:, j + shift] at j, `fill` past the end."""
    if shift == 0:
        return x_BxN
    pad = jnp.full((x_BxN.shape[0], shift) + x_BxN.shape[2:], fill, x_BxN.dtype)
    return jnp.concatenate([x_BxN[:, shift:], pad], axis=1)


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
    """
    r, v = logits_RxV.shape
    block = math.isqrt(v - 1) + 1
    n_blocks = -(-v // block)
    scaled_RxV = logits_RxV.astype(jnp.float32) / temperature
    scaled_RxV = jnp.pad(scaled_RxV, ((0, 0), (0, n_blocks * block - v)), constant_values=-jnp.inf)
    probs_RxBxK = jnp.exp(scaled_RxV - scaled_RxV.max(axis=-1, keepdims=True)).reshape(r, n_blocks, block)
    block_cdf_RxB = jnp.cumsum(probs_RxBxK.sum(axis=-1), axis=-1)
    target_R = uniform_R * block_cdf_RxB[:, -1]
    chosen_R = jnp.minimum(jnp.sum(block_cdf_RxB < target_R[:, None], axis=-1), n_blocks - 1)
    before_R = jnp.take_along_axis(block_cdf_RxB, jnp.maximum(chosen_R - 1, 0)[:, None], axis=-1)[:, 0]
    before_R = jnp.where(chosen_R > 0, before_R, 0.0)
    inside_RxK = jnp.take_along_axis(probs_RxBxK, chosen_R[:, None, None], axis=1)[:, 0]
    inside_cdf_RxK = before_R[:, None] + jnp.cumsum(inside_RxK, axis=-1)
    offset_R = jnp.minimum(jnp.sum(inside_cdf_RxK < target_R[:, None], axis=-1), block - 1)
    return jnp.minimum(chosen_R * block + offset_R, v - 1).astype(jnp.int32)


def thought_uniforms(rng: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The uniforms that pick thought step `step`'s tokens (shape-addressable for tests)."""
    return jax.random.uniform(jax.random.fold_in(rng, step), shape)


def rows_in_chunks(fn, chunk_rows: int, *arrays_BxTx):
    """Applies `fn` to the B*T rows of `arrays` in checkpointed chunks of `chunk_rows`.

    For functions that build RxV logits from hidden states: the forward pass holds one
    chunk's logits at a time, and the backward pass recomputes them chunk by chunk rather
    than keeping B*T*V floats alive. `chunk_rows <= 0` applies `fn` to all rows at once.
    """
    b, t = arrays_BxTx[0].shape[:2]
    rows = b * t
    flat = [a.reshape((rows,) + a.shape[2:]) for a in arrays_BxTx]
    if chunk_rows <= 0 or rows <= chunk_rows:
        out = fn(*flat)
    else:
        n_chunks = -(-rows // chunk_rows)
        pad = n_chunks * chunk_rows - rows
        chunked = [
            jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((n_chunks, chunk_rows) + a.shape[1:])
            for a in flat
        ]
        out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(chunked))
        out = jax.tree.map(lambda x: x.reshape((n_chunks * chunk_rows,) + x.shape[2:])[:rows], out)
    return jax.tree.map(lambda x: x.reshape((b, t) + x.shape[1:]), out)


def talk_targets(tokens_BxN: jax.Array, segments_BxN: jax.Array, n_talk: int) -> tuple[jax.Array, jax.Array]:
    """Targets x_{j+1+c} (CxBxN) and whether each exists and is a real token of x_j's segment."""
    segments_BxN = segments_BxN.astype(jnp.int32)
    targets = jnp.stack([_shift_left(tokens_BxN, c + 1, 0) for c in range(n_talk)])
    valid = jnp.stack([(_shift_left(segments_BxN, c + 1, 0) == segments_BxN) & (segments_BxN > 0)
                       for c in range(n_talk)])
    return targets, valid


class _BasePass(NamedTuple):
    """Step 0, and what every thought step needs from it."""

    h_BxNxD: jax.Array  # final-norm hidden states of the text
    kv: tuple[jax.Array, jax.Array]  # every layer's post-RoPE keys and values, LxBxNxGxK
    positions_BxN: jax.Array
    segments_BxN: jax.Array
    targets_CxBxN: jax.Array  # talk targets x_{j+1+c}
    target_valid_CxBxN: jax.Array
    logp_BxN: jax.Array  # log p_base(x_{j+1} | x_<=j)


class _LM(NamedTuple):
    """The LM's variables, and its embedding and LM head as functions of them."""

    variables: dict
    embed: Any
    logits: Any


def _lm(config: ModelConfig, lm_params: Params) -> _LM:
    variables = {"params": lm_params}
    return _LM(variables, lambda tokens: Transformer(config).apply(variables, tokens, method=Transformer.embed),
               lambda h: Transformer(config).apply(variables, h, method=Transformer.logits))


def _base_pass(config: ModelConfig, qs: QuietStarConfig, lm: _LM, tokens_BxN, segments_BxN) -> _BasePass:
    positions_BxN = positions_from_segments(segments_BxN)
    base_model = Transformer(config, CausalAttention(config.sliding_window, return_kv=True))
    h_BxNxD, kv = base_model.apply(lm.variables, lm.embed(tokens_BxN), AttentionInputs(positions_BxN, segments_BxN),
                                   method=Transformer.transform)
    targets_CxBxN, valid_CxBxN = talk_targets(tokens_BxN, segments_BxN, qs.n_ahead_talk)
    logp_BxN = rows_in_chunks(lambda h, t: token_logp(lm.logits(h), t), qs.logits_chunk_rows, h_BxNxD, targets_CxBxN[0])
    return _BasePass(h_BxNxD, kv, positions_BxN, segments_BxN, targets_CxBxN, valid_CxBxN, logp_BxN)


def thought_embeddings(qs: QuietStarConfig, params: Params) -> tuple[jax.Array, jax.Array]:
    """Start and end embeddings as fed (training and decoding): stored / embedding_scale,
    used x embedding_scale."""
    return params["thought"]["start"] * qs.embedding_scale, params["thought"]["end"] * qs.embedding_scale


def _thought_embeddings(config: ModelConfig, qs: QuietStarConfig, params: Params) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.dtype(config.dtype)
    return tuple(x.astype(dtype) for x in thought_embeddings(qs, params))


def mix_hidden(config: ModelConfig, qs: QuietStarConfig, params: Params, h_base_xD, h_thought_xD):
    """(h_mix, w): h_mix = (1 - w) h_base + w h_thought, w from the mixing head; the one
    mixing formula of training and decoding."""
    w_x = mixing_head_module(config, qs).apply({"params": params["mixing_head"]}, h_base_xD, h_thought_xD)
    w_xx1 = w_x[..., None].astype(h_base_xD.dtype)
    return (1 - w_xx1) * h_base_xD + w_xx1 * h_thought_xD, w_x.astype(jnp.float32)


def _talk_rows(lm: _LM, talk_distribution: bool):
    """Per row: log p(target), and with `talk_distribution` also the whole log-distribution."""
    def talk_rows(h_RxD, target_R):
        logits_RxV = lm.logits(h_RxD)
        logp_R = token_logp(logits_RxV, target_R)
        return (logp_R, jax.nn.log_softmax(logits_RxV.astype(jnp.float32), axis=-1)) if talk_distribution else logp_R

    return talk_rows


def _thought_logits(lm: _LM, qs: QuietStarConfig, h_RxD):
    """Next-token logits inside a thought: the start/end ids are never sampled."""
    return mask_thought_tokens(lm.logits(h_RxD), qs)


def _reinforce_logp(qs: QuietStarConfig, thought_logits_RxV, token_R):
    """REINFORCE's log-prob of a thought token: log softmax(logits / reinforce_temperature)."""
    return token_logp(thought_logits_RxV / qs.reinforce_temperature, token_R)


def rollout(
    config: ModelConfig,
    qs: QuietStarConfig,
    params: Params,
    tokens_BxN: jax.Array,
    segments_BxN: jax.Array,
    rng: jax.Array,
    forced_thoughts_SxBxPxN: jax.Array | None = None,
    talk_distribution: bool = False,
) -> Rollout:
    """Thinks at every position (n_passes thoughts each) and talks; all in parallel.

    With `forced_thoughts_SxBxPxN` the given thought tokens are fed instead of sampled
    (their log-probs are still computed): scoring fixed thoughts, and isolation tests.
    `talk_distribution` also returns the whole mixed next-token distribution (B x P x N x V
    floats, for the NTP stage's full-distribution teacher; not for training).

    `qs.rollout_impl` picks how; both compute the same quantities (tested). "scan" feeds
    one thought step at a time and differentiates through the scan. "two_pass" samples the
    thoughts in a forward-only scan on stop-gradient parameters (REINFORCE scores the
    sampled tokens; no gradient flows through choosing them, so that scan keeps nothing
    for the backward pass), then feeds every step of every thought at once, teacher-forced,
    through one pass of the layers: the differentiated work is a few large matmuls instead
    of n_steps small ones.
    """
    chex.assert_rank(tokens_BxN, 2)
    chex.assert_equal_shape([tokens_BxN, segments_BxN])
    check_thought_ids(config, qs)
    b, n = tokens_BxN.shape
    forced_SxBxT = None
    if forced_thoughts_SxBxPxN is not None:
        chex.assert_shape(forced_thoughts_SxBxPxN, (qs.n_sampled, b, qs.n_passes, n))
        forced_SxBxT = forced_thoughts_SxBxPxN.reshape(qs.n_sampled, b, qs.n_passes * n)
    lm = _lm(config, params["lm"])
    base = _base_pass(config, qs, lm, tokens_BxN, segments_BxN)
    if qs.rollout_impl == "scan":
        return _scan_rollout(config, qs, params, lm, base, rng, forced_SxBxT, talk_distribution)
    if forced_SxBxT is None:
        frozen = jax.lax.stop_gradient(params)
        frozen_lm, frozen_base = _lm(config, frozen["lm"]), jax.lax.stop_gradient(base)
        think = _thought_stepper(config, qs, frozen_lm, frozen_base)
        forced_SxBxT = _sampling_scan(config, qs, frozen, frozen_lm, frozen_base, think, rng, None)[0]
    return _teacher_forced_rollout(config, qs, params, lm, base, forced_SxBxT, talk_distribution)


def _rollout_of(qs: QuietStarConfig, base: _BasePass, sampled_SxBxT, sample_logp_SxBxT, talk_logp_CxBxT, w_CxBxT,
                talk_logdist_BxTxV=None) -> Rollout:
    b, n = base.positions_BxN.shape
    p = qs.n_passes
    per_pass = lambda x_xBxT: x_xBxT.reshape(x_xBxT.shape[:2] + (p, n))
    return Rollout(
        base_logp_BxN=base.logp_BxN,
        target_valid_CxBxN=base.target_valid_CxBxN,
        sampled_SxBxPxN=per_pass(sampled_SxBxT),
        sample_logp_SxBxPxN=per_pass(sample_logp_SxBxT),
        talk_logp_CxBxPxN=per_pass(talk_logp_CxBxT),
        mixing_weight_CxBxPxN=per_pass(w_CxBxT),
        talk_logdist_BxPxNxV=None if talk_logdist_BxTxV is None else talk_logdist_BxTxV.reshape(b, p, n, -1),
    )


# ------------------------------------------------------------ rollout, one step at a time


def _thought_stepper(config: ModelConfig, qs: QuietStarConfig, lm: _LM, base: _BasePass):
    """think(x_BxTxD, step, cache) -> (h_BxTxD, cache): feeds one token per (pass,
    position) at thought step `step` and writes its keys/values into the cache."""
    thought_model = Transformer(config, THOUGHT_ATTENTION[qs.attention_impl](config.sliding_window))
    positions_BxT = jnp.tile(base.positions_BxN, (1, qs.n_passes))

    def think(x_BxTxD, step, cache):
        inputs = AttentionInputs(positions_BxT + step, ThoughtExtras(step, base.positions_BxN, base.segments_BxN))
        h_BxTxD, (k_LxBxGxPxNxK, v_LxBxGxPxNxK) = thought_model.apply(
            lm.variables, x_BxTxD, inputs, base.kv + cache, method=Transformer.transform
        )

        def write(cache_LxBxGxPxNxSxK, new_LxBxGxPxNxK):
            new = new_LxBxGxPxNxK[:, :, :, :, :, None].astype(cache_LxBxGxPxNxSxK.dtype)
            return jax.lax.dynamic_update_slice_in_dim(cache_LxBxGxPxNxSxK, new, step - 1, axis=5)

        return h_BxTxD, (write(cache[0], k_LxBxGxPxNxK), write(cache[1], v_LxBxGxPxNxK))

    return think


def _sampling_scan(config, qs: QuietStarConfig, params, lm: _LM, base: _BasePass, think, rng, forced_SxBxT):
    """Thought steps 1..n_ahead-3: feed start / the previous token, sample the next one.
    Returns (sampled_SxBxT, sample_logp_SxBxT, the last token's embedding, the cache)."""
    b, n = base.positions_BxN.shape
    t = qs.n_passes * n
    maybe_remat = jax.checkpoint if qs.remat_steps else (lambda f: f)

    def sample_rows(h_RxD, uniform_R, forced_R=None):
        logits_RxV = _thought_logits(lm, qs, h_RxD)
        if forced_R is None:
            forced_R = sample_thought_tokens(jax.lax.stop_gradient(logits_RxV), uniform_R, qs.thought_temperature)
        return forced_R, _reinforce_logp(qs, logits_RxV, forced_R)

    @maybe_remat
    def sample_step(carry, xs):
        step, forced_BxT = xs
        x_BxTxD, cache = carry
        h_BxTxD, cache = think(x_BxTxD, step, cache)
        rows = (h_BxTxD, thought_uniforms(rng, step, (b, t))) + (() if forced_BxT is None else (forced_BxT,))
        sampled_BxT, sample_logp_BxT = rows_in_chunks(sample_rows, qs.logits_chunk_rows, *rows)
        return (lm.embed(sampled_BxT), cache), (sampled_BxT, sample_logp_BxT)

    start_D, _ = _thought_embeddings(config, qs, params)
    shape = (config.num_layers, b, config.num_kv_heads, qs.n_passes, n, qs.n_steps, config.head_dim)
    cache = (jnp.zeros(shape, base.kv[0].dtype), jnp.zeros(shape, base.kv[1].dtype))
    x_BxTxD = jnp.broadcast_to(start_D, (b, t, config.hidden_size))
    steps = jnp.arange(1, qs.n_ahead - 2, dtype=jnp.int32)
    (x_BxTxD, cache), (sampled_SxBxT, sample_logp_SxBxT) = jax.lax.scan(
        sample_step, (x_BxTxD, cache), (steps, forced_SxBxT))
    return sampled_SxBxT, sample_logp_SxBxT, x_BxTxD, cache


def _scan_rollout(config, qs: QuietStarConfig, params, lm: _LM, base: _BasePass, rng, forced_SxBxT,
                  talk_distribution: bool) -> Rollout:
    b, n = base.positions_BxN.shape
    p, c_talk = qs.n_passes, qs.n_ahead_talk
    maybe_remat = jax.checkpoint if qs.remat_steps else (lambda f: f)
    think = _thought_stepper(config, qs, lm, base)
    sampled_SxBxT, sample_logp_SxBxT, x_BxTxD, cache = _sampling_scan(
        config, qs, params, lm, base, think, rng, forced_SxBxT)
    # Step n_ahead-2 feeds the last sampled token (or the start token if none are sampled);
    # its output predicts nothing, so it skips the LM head.
    _, cache = maybe_remat(think)(x_BxTxD, jnp.int32(qs.n_ahead - 2), cache)

    # Talk steps: feed end, then x_{j+1}..x_{j+C-1}; mix with the base hidden at j+c.
    _, end_D = _thought_embeddings(config, qs, params)
    tile = lambda x_BxNxD: jnp.tile(x_BxNxD, (1, p, 1))
    talk_inputs_CxBxTxD = jnp.stack([jnp.broadcast_to(end_D, (b, p * n, config.hidden_size))]
                                    + [tile(lm.embed(base.targets_CxBxN[c])) for c in range(c_talk - 1)])
    h_base_CxBxTxD = jnp.stack([tile(_shift_left(base.h_BxNxD, c, 0)) for c in range(c_talk)])
    targets_CxBxT = jnp.tile(base.targets_CxBxN, (1, 1, p))
    talk_rows = _talk_rows(lm, talk_distribution)

    @maybe_remat
    def talk_step(cache, xs):
        step, x_BxTxD, h_base_BxTxD, target_BxT = xs
        h_thought_BxTxD, cache = think(x_BxTxD, step, cache)
        h_mix_BxTxD, w_BxT = mix_hidden(config, qs, params, h_base_BxTxD, h_thought_BxTxD)
        return cache, (rows_in_chunks(talk_rows, qs.logits_chunk_rows, h_mix_BxTxD, target_BxT), w_BxT)

    talk_steps_C = jnp.arange(qs.n_ahead - 1, qs.n_ahead - 1 + c_talk, dtype=jnp.int32)
    _, (talk_out_C, w_CxBxT) = jax.lax.scan(
        talk_step, cache, (talk_steps_C, talk_inputs_CxBxTxD, h_base_CxBxTxD, targets_CxBxT))
    if talk_distribution:
        talk_logp_CxBxT, logdist_CxBxTxV = talk_out_C
        return _rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, talk_logp_CxBxT, w_CxBxT, logdist_CxBxTxV[0])
    return _rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, talk_out_C, w_CxBxT)


# ------------------------------------------------------ rollout, every step at once


def _teacher_forced_rollout(config, qs: QuietStarConfig, params, lm: _LM, base: _BasePass, sampled_SxBxT,
                            talk_distribution: bool) -> Rollout:
    """Every thought step of every (pass, position) in one pass of the layers, with the
    thought tokens given: the inputs of steps 1..n_steps are start, the sampled tokens,
    end and the first n_ahead_talk - 1 true tokens, as the scan feeds them."""
    b, n = base.positions_BxN.shape
    p, c_talk, s_all, s_sampled = qs.n_passes, qs.n_ahead_talk, qs.n_steps, qs.n_sampled
    d = config.hidden_size
    start_D, end_D = _thought_embeddings(config, qs, params)
    tile = lambda x_BxNx: jnp.tile(x_BxNx, (1, p) + (1,) * (x_BxNx.ndim - 2))
    inputs_SxBxTxD = jnp.concatenate([
        jnp.broadcast_to(start_D, (1, b, p * n, d)),
        lm.embed(sampled_SxBxT),
        jnp.broadcast_to(end_D, (1, b, p * n, d)),
        jnp.stack([tile(lm.embed(base.targets_CxBxN[c])) for c in range(c_talk - 1)]).reshape(c_talk - 1, b, p * n, d),
    ])
    x_BxLxD = inputs_SxBxTxD.transpose(1, 2, 0, 3).reshape(b, p * n * s_all, d)  # L = (pass, position, step)
    steps_S = jnp.arange(1, s_all + 1, dtype=jnp.int32)
    positions_BxL = (tile(base.positions_BxN)[:, :, None] + steps_S).reshape(b, -1)
    block_model = Transformer(config, ThoughtBlockAttention(config.sliding_window, p, s_all))
    h_BxLxD, _ = block_model.apply(lm.variables, x_BxLxD, AttentionInputs(
        positions_BxL, BlockExtras(base.positions_BxN, base.segments_BxN)), base.kv, method=Transformer.transform)
    h_BxTxSxD = h_BxLxD.reshape(b, p * n, s_all, d)

    # Steps 1..n_sampled predicted the sampled tokens; their REINFORCE log-probs.
    sampled_BxTxS = sampled_SxBxT.transpose(1, 2, 0)
    def reinforce_rows(h_RxD, token_R):
        return _reinforce_logp(qs, _thought_logits(lm, qs, h_RxD), token_R)

    sample_logp_BxTS = rows_in_chunks(reinforce_rows, qs.logits_chunk_rows,
                                      h_BxTxSxD[:, :, :s_sampled].reshape(b, -1, d), sampled_BxTxS.reshape(b, -1))
    sample_logp_SxBxT = sample_logp_BxTS.reshape(b, p * n, s_sampled).transpose(2, 0, 1)

    # Steps n_ahead-1.. (end, then the true tokens) talk: mixed with the base at j + c.
    h_thought_BxTxCxD = h_BxTxSxD[:, :, qs.n_ahead - 2:]
    h_base_BxTxCxD = jnp.stack([tile(_shift_left(base.h_BxNxD, c, 0)) for c in range(c_talk)], axis=2)
    targets_BxTxC = tile(base.targets_CxBxN.transpose(1, 2, 0))
    h_mix_BxTxCxD, w_BxTxC = mix_hidden(config, qs, params, h_base_BxTxCxD, h_thought_BxTxCxD)
    talk_out = rows_in_chunks(_talk_rows(lm, talk_distribution), qs.logits_chunk_rows,
                              h_mix_BxTxCxD.reshape(b, -1, d), targets_BxTxC.reshape(b, -1))
    to_CxBxT = lambda x_BxTC: x_BxTC.reshape(b, p * n, c_talk).transpose(2, 0, 1)
    if talk_distribution:
        talk_logp_BxTC, logdist_BxTCxV = talk_out
        logdist_BxTxV = logdist_BxTCxV.reshape(b, p * n, c_talk, -1)[:, :, 0]
        return _rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_logp_BxTC),
                           w_BxTxC.transpose(2, 0, 1), logdist_BxTxV)
    return _rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_out), w_BxTxC.transpose(2, 0, 1))


# --------------------------------------------------------------------------------- learn


class LossTerms(NamedTuple):
    loss: jax.Array
    nll_base: jax.Array
    nll_talk: jax.Array
    policy_loss: jax.Array
    talk_gain: jax.Array  # mean log p_mix - log p_base over real talk targets (0 at init)
    reward_BxPxN: jax.Array  # after the baseline and clipping; 0 where not eligible
    eligible_BxN: jax.Array  # positions whose whole talk horizon is real text


def _masked_mean(x, mask):
    mask = jnp.broadcast_to(mask, x.shape)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def loss_terms(qs: QuietStarConfig, r: Rollout) -> LossTerms:
    """The Quiet-STaR objective from per-position quantities.

    reward(b, p, j) = sum_c [log p_mix,c(x_{j+1+c}) - log p_base(x_{j+1+c})], minus its
    mean over the n_passes sibling thoughts (no baseline when n_passes = 1), clipped at 0
    if configured; REINFORCE on the
    sampled thought tokens' log-probs; NLL of the base and of the talk predictions.
    """
    valid_CxBxN = r.target_valid_CxBxN
    n_talk = valid_CxBxN.shape[0]
    base_logp_CxBxN = jnp.stack([_shift_left(r.base_logp_BxN, c, 0.0) for c in range(n_talk)])
    gain_CxBxPxN = jnp.where(valid_CxBxN[:, :, None], r.talk_logp_CxBxPxN - base_logp_CxBxN[:, :, None], 0.0)
    raw_reward_BxPxN = gain_CxBxPxN.sum(axis=0)
    # A lone thought has no siblings to compare with: its baseline would be itself and every
    # reward 0, so (as the official code) it is rewarded by its raw gain over the base.
    baseline_BxPxN = raw_reward_BxPxN.mean(axis=1, keepdims=True) if raw_reward_BxPxN.shape[1] > 1 else 0.0
    reward_BxPxN = raw_reward_BxPxN - baseline_BxPxN
    if qs.clip_negative_rewards:
        reward_BxPxN = jnp.maximum(reward_BxPxN, 0.0)
    eligible_BxN = jnp.all(valid_CxBxN, axis=0)
    reward_BxPxN = jax.lax.stop_gradient(jnp.where(eligible_BxN[:, None], reward_BxPxN, 0.0))

    if r.sample_logp_SxBxPxN.shape[0]:
        thought_logp_BxPxN = r.sample_logp_SxBxPxN.mean(axis=0)
        policy_loss = qs.policy_loss_weight * _masked_mean(-reward_BxPxN * thought_logp_BxPxN, eligible_BxN[:, None])
    else:
        policy_loss = jnp.zeros((), jnp.float32)
    nll_base = _masked_mean(-r.base_logp_BxN, valid_CxBxN[0])
    nll_talk = jnp.mean(
        jnp.stack([_masked_mean(-r.talk_logp_CxBxPxN[c], valid_CxBxN[c][:, None]) for c in range(n_talk)])
    )
    loss = qs.base_loss_weight * nll_base + (1 - qs.base_loss_weight) * nll_talk + policy_loss
    talk_gain = _masked_mean(gain_CxBxPxN, valid_CxBxN[:, :, None])
    return LossTerms(loss, nll_base, nll_talk, policy_loss, talk_gain, reward_BxPxN, eligible_BxN)


def quiet_star_loss(
    config: ModelConfig,
    qs: QuietStarConfig,
    params: Params,
    tokens_BxN: jax.Array,
    segments_BxN: jax.Array,
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and metrics; differentiable in `params`."""
    r = rollout(config, qs, params, tokens_BxN, segments_BxN, rng)
    terms = loss_terms(qs, r)
    eligible = terms.eligible_BxN[:, None]
    metrics = {
        "loss": terms.loss,
        "nll_base": terms.nll_base,
        "nll_talk": terms.nll_talk,
        # What inference predicts (one thought, then the first talk step): comparable across
        # n_ahead_talk and with a plain LM's nll_next, so curriculum stages can be ranked by it.
        "nll_next": _masked_mean(-r.talk_logp_CxBxPxN[0], r.target_valid_CxBxN[0][:, None]),
        "policy_loss": terms.policy_loss,
        "reward": _masked_mean(terms.reward_BxPxN, eligible),
        "mixing_weight": _masked_mean(r.mixing_weight_CxBxPxN, r.target_valid_CxBxN[:, :, None]),
        "talk_gain": terms.talk_gain,
    }
    return terms.loss, metrics
