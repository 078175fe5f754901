"""A Llama-family decoder LM (llama, mistral, qwen2) as pure-functional flax.linen modules.

Parameters are a plain pytree; every entry point is a pure function of (config, params,
inputs). Layers are stacked with `nn.scan` (leading layer axis on every layer parameter),
which keeps compile time flat in depth and gives FSDP one array per weight kind.

Attention is pluggable: a `Block` computes q/k/v (with RoPE at explicit positions) and
hands them to an *attention strategy* that decides what each query sees and what per-layer
state (a KV cache, the keys of a base pass, ...) flows in and out. Two strategies live
here: `CausalAttention` (a full sequence, with padding, packed-document segments and
sliding window) and `CachedAttention` (incremental decoding with a KV cache, driven by
kv_cache.py). Quiet-STaR's thought attentions (method/attention.py) are built from the
helpers below; nothing hard-wires a plain causal mask into the only code path.

Segment ids (`segments_BxT`, int32) say which document each token belongs to: 0 is
padding, 1, 2, ... are the documents packed into a row, in order. A token attends only to
earlier tokens of its own segment, and positions restart at each segment. A bool validity
mask is the one-segment case (True = 1), so callers with padding only pass their mask.

Shape suffixes: B batch, T query length, S key length, D model width, H query heads,
G key/value heads, R = H // G queries per KV head, K head dim, F MLP width, V vocab,
L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig

Params = Any  # nested dict of arrays: {"embed_tokens": ..., "layers": ..., ...}
INIT_STD = 0.02  # normal(INIT_STD) weights, as HF initialises Llama/Mistral (initializer_range)
MASKED_SCORE = -1e30  # finite, so a fully masked (padding) query still gives finite output


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


# ----------------------------------------------------------------------------- helpers


def at_least_float32(dtype) -> jnp.dtype:
    """float32 for half-precision inputs (norms, angles, scores, logits stay accurate); float64
    stays float64, so a float64 model (numerics checks, dtype="float64") is float64 throughout."""
    return jnp.promote_types(dtype, jnp.float32)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding in the "rotate half" layout used by HF Llama checkpoints."""
    head_dim = x_BxTxHxK.shape[-1]
    angle_dtype = at_least_float32(x_BxTxHxK.dtype)
    inv_freq_K2 = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=angle_dtype) / head_dim)
    angles_BxTxK2 = positions_BxT[..., None].astype(angle_dtype) * inv_freq_K2[None, None]
    angles_BxTxK = jnp.concatenate([angles_BxTxK2, angles_BxTxK2], axis=-1)
    cos_BxTx1xK = jnp.cos(angles_BxTxK)[:, :, None, :].astype(x_BxTxHxK.dtype)
    sin_BxTx1xK = jnp.sin(angles_BxTxK)[:, :, None, :].astype(x_BxTxHxK.dtype)
    x1, x2 = jnp.split(x_BxTxHxK, 2, axis=-1)
    rotated_BxTxHxK = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxHxK * cos_BxTx1xK + rotated_BxTxHxK * sin_BxTx1xK


def masked_attention(
    q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    """Softmax attention where query t sees key s iff mask[b, t, s] (grouped-query heads).

    Scores are laid out B x G x T x R x S so both matmuls are plain batched matmuls over
    (B, G): on CPU the transposes XLA would otherwise insert around the T x S score
    tensor cost more than the matmuls themselves.
    """
    b, t, h, k = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    q_BxGxTxRxK = q_BxTxHxK.reshape(b, t, g, h // g, k).transpose(0, 2, 1, 3, 4) * jnp.asarray(k**-0.5, q_BxTxHxK.dtype)
    scores = jnp.einsum("bgtrk,bsgk->bgtrs", q_BxGxTxRxK, k_BxSxGxK, preferred_element_type=at_least_float32(q_BxGxTxRxK.dtype))
    scores = jnp.where(mask_BxTxS[:, None, :, None, :], scores, MASKED_SCORE)
    probs_BxGxTxRxS = jax.nn.softmax(scores, axis=-1).astype(v_BxSxGxK.dtype)
    out_BxGxTxRxK = jnp.einsum("bgtrs,bsgk->bgtrk", probs_BxGxTxRxS, v_BxSxGxK)
    return out_BxGxTxRxK.transpose(0, 2, 1, 3, 4).reshape(b, t, h, k)


def window_mask(q_positions_BxT: jax.Array, kv_positions_BxS: jax.Array, window: int | None) -> jax.Array:
    """True where the key lies inside the query's sliding window (distance < window)."""
    distance_BxTxS = q_positions_BxT[:, :, None] - kv_positions_BxS[:, None, :]
    if window is None:
        return jnp.ones(distance_BxTxS.shape, dtype=bool)
    return distance_BxTxS < window


def positions_from_segments(segments_BxT: jax.Array) -> jax.Array:
    """Position ids that restart at each segment and count only its real tokens.

    Segment ids must not decrease along a row (packing numbers documents 1, 2, ...); with a
    bool mask this is `positions_from_valid`, so left padding is harmless.
    """
    segments_BxT = segments_BxT.astype(jnp.int32)
    real_BxT = segments_BxT > 0
    count_BxT = jnp.cumsum(real_BxT.astype(jnp.int32), axis=1)
    seen_BxT = jax.lax.cummax(segments_BxT, axis=1)
    previous_BxT = jnp.pad(seen_BxT[:, :-1], ((0, 0), (1, 0)))
    starts_BxT = real_BxT & (segments_BxT > previous_BxT)
    count_before_start_BxT = jax.lax.cummax(jnp.where(starts_BxT, count_BxT - 1, 0), axis=1)
    return jnp.maximum(count_BxT - 1 - count_before_start_BxT, 0)


def same_segment(q_segments_BxT: jax.Array, k_segments_BxS: jax.Array) -> jax.Array:
    """BxTxS: key s is a real token of query t's segment (bool masks: key s is real)."""
    k_BxS = k_segments_BxS.astype(jnp.int32)
    return (q_segments_BxT.astype(jnp.int32)[:, :, None] == k_BxS[:, None, :]) & (k_BxS[:, None, :] > 0)


def positions_from_valid(valid_BxT: jax.Array, start_B: jax.Array | None = None) -> jax.Array:
    """Position ids that count only valid (non-padding) tokens, so left padding is harmless."""
    positions_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=1) - 1
    if start_B is not None:
        positions_BxT = positions_BxT + start_B[:, None]
    return jnp.maximum(positions_BxT, 0 if start_B is None else start_B[:, None])


# ----------------------------------------------------------------- attention strategies


class AttentionInputs(NamedTuple):
    """What every layer shares: query positions (for RoPE) and strategy-specific arrays."""

    positions_BxT: jax.Array
    extras: Any = None


@dataclasses.dataclass(frozen=True)
class CausalAttention:
    """Self-attention over one full sequence: causal by index, inside each token's segment.

    `extras` is `segments_BxT` (int ids, 0 = padding; or a bool validity mask). With `return_kv`, each layer's post-RoPE keys and
    values come back as the per-layer output, so a later pass (Quiet-STaR thoughts,
    decoding) can attend to this pass without recomputing it.
    """

    sliding_window: int | None = None
    return_kv: bool = False

    def __call__(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs: AttentionInputs):
        del layer_state
        segments_BxT = inputs.extras
        t = q_BxTxHxK.shape[1]
        index_T = jnp.arange(t)
        causal_TxT = index_T[:, None] >= index_T[None, :]
        mask_BxTxT = causal_TxT[None] & same_segment(segments_BxT, segments_BxT)
        mask_BxTxT &= window_mask(inputs.positions_BxT, inputs.positions_BxT, self.sliding_window)
        out_BxTxHxK = masked_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxT)
        return out_BxTxHxK, ((k_BxTxGxK, v_BxTxGxK) if self.return_kv else None)


class CacheExtras(NamedTuple):
    """Per-call arrays for `CachedAttention`: where to write, and what the cache then holds."""

    write_index: jax.Array  # int32 scalar: first cache slot of the new tokens
    kv_positions_BxS: jax.Array  # position of each cache slot (after this write)
    kv_valid_BxS: jax.Array  # whether each cache slot holds a real token (after this write)


@dataclasses.dataclass(frozen=True)
class CachedAttention:
    """Incremental decoding: write the new keys/values into the cache, attend over the cache.

    A query sees a slot iff the slot holds a real token at a position <= its own (and
    within the sliding window). Because visibility is decided by positions, a prefill of
    several tokens and token-by-token steps give the same result.
    """

    sliding_window: int | None = None

    def __call__(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs: AttentionInputs):
        k_cache_BxSxGxK, v_cache_BxSxGxK = layer_state
        extras: CacheExtras = inputs.extras
        k_cache_BxSxGxK = jax.lax.dynamic_update_slice_in_dim(
            k_cache_BxSxGxK, k_BxTxGxK.astype(k_cache_BxSxGxK.dtype), extras.write_index, axis=1
        )
        v_cache_BxSxGxK = jax.lax.dynamic_update_slice_in_dim(
            v_cache_BxSxGxK, v_BxTxGxK.astype(v_cache_BxSxGxK.dtype), extras.write_index, axis=1
        )
        q_pos_BxT, kv_pos_BxS = inputs.positions_BxT, extras.kv_positions_BxS
        mask_BxTxS = extras.kv_valid_BxS[:, None, :] & (kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])
        mask_BxTxS &= window_mask(q_pos_BxT, kv_pos_BxS, self.sliding_window)
        out_BxTxHxK = masked_attention(
            q_BxTxHxK, k_cache_BxSxGxK.astype(q_BxTxHxK.dtype), v_cache_BxSxGxK.astype(q_BxTxHxK.dtype), mask_BxTxS
        )
        return out_BxTxHxK, (k_cache_BxSxGxK, v_cache_BxSxGxK)


# -------------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the HF Llama family does."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale_D = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
        x32 = x_BxTxD.astype(at_least_float32(x_BxTxD.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale_D.astype(self.dtype).reshape((1,) * (x_BxTxD.ndim - 1) + (-1,))  # any leading dims
        return scale * normed.astype(self.dtype)


class Block(nn.Module):
    """One pre-norm decoder layer: attention (strategy-defined) then a SwiGLU MLP."""

    config: ModelConfig
    attention: Any

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, layer_state: Any, inputs: AttentionInputs):
        config = self.config
        dtype, param_dtype = _dtype(config.dtype), _dtype(config.param_dtype)
        dense = functools.partial(
            nn.Dense, dtype=dtype, param_dtype=param_dtype, kernel_init=nn.initializers.normal(INIT_STD)
        )
        norm = functools.partial(RMSNorm, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        b, t, _ = x_BxTxD.shape
        h, g, k = config.num_heads, config.num_kv_heads, config.head_dim

        y_BxTxD = norm(name="attn_norm")(x_BxTxD)
        q_BxTxHxK = dense(h * k, use_bias=config.qkv_bias, name="q_proj")(y_BxTxD).reshape(b, t, h, k)
        k_BxTxGxK = dense(g * k, use_bias=config.qkv_bias, name="k_proj")(y_BxTxD).reshape(b, t, g, k)
        v_BxTxGxK = dense(g * k, use_bias=config.qkv_bias, name="v_proj")(y_BxTxD).reshape(b, t, g, k)
        q_BxTxHxK = apply_rope(q_BxTxHxK, inputs.positions_BxT, config.rope_theta)
        k_BxTxGxK = apply_rope(k_BxTxGxK, inputs.positions_BxT, config.rope_theta)
        out_BxTxHxK, new_layer_state = self.attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, layer_state, inputs)
        x_BxTxD = x_BxTxD + dense(config.hidden_size, use_bias=False, name="o_proj")(out_BxTxHxK.reshape(b, t, h * k))

        y_BxTxD = norm(name="mlp_norm")(x_BxTxD)
        gate_BxTxF = dense(config.intermediate_size, use_bias=False, name="gate_proj")(y_BxTxD)
        up_BxTxF = dense(config.intermediate_size, use_bias=False, name="up_proj")(y_BxTxD)
        x_BxTxD = x_BxTxD + dense(config.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate_BxTxF) * up_BxTxF)
        return x_BxTxD, new_layer_state


class Transformer(nn.Module):
    """Embedding, a scanned stack of `Block`s, final RMSNorm and LM head.

    Methods are separate so callers (Quiet-STaR) can substitute embeddings, run the
    layers under their own attention strategy, and apply the LM head in chunks.
    """

    config: ModelConfig
    attention: Any = None

    def setup(self):
        config = self.config
        dtype, param_dtype = _dtype(config.dtype), _dtype(config.param_dtype)
        attention = self.attention or CausalAttention(config.sliding_window)
        self.embed_tokens = nn.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=nn.initializers.normal(INIT_STD),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        block = nn.remat(Block, prevent_cse=False) if config.remat else Block
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=config.num_layers,
            unroll=config.scan_unroll,
        )(config, attention)
        self.final_norm = RMSNorm(config.rms_norm_eps, dtype, param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Dense(
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.initializers.normal(INIT_STD),
            )

    def embed(self, tokens_BxT: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens_BxT)

    def transform(self, x_BxTxD: jax.Array, inputs: AttentionInputs, layer_states: Any = None):
        """Runs all layers; returns final-normed hidden states and the stacked per-layer outputs."""
        x_BxTxD, new_layer_states = self.layers(x_BxTxD, layer_states, inputs)
        return self.final(x_BxTxD), new_layer_states

    def final(self, x_BxTxD: jax.Array) -> jax.Array:
        """The final norm alone, for callers that run the layers themselves (kv_cache.py)."""
        return self.final_norm(x_BxTxD)

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            logits_BxTxV = self.embed_tokens.attend(h_BxTxD)
        else:
            logits_BxTxV = self.lm_head(h_BxTxD)
        return logits_BxTxV.astype(at_least_float32(logits_BxTxV.dtype))

    def __call__(self, tokens_BxT: jax.Array, inputs: AttentionInputs, layer_states: Any = None):
        h_BxTxD, new_layer_states = self.transform(self.embed(tokens_BxT), inputs, layer_states)
        return self.logits(h_BxTxD), h_BxTxD, new_layer_states


# ------------------------------------------------------------------------- entry points


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) weights, unit norms), as HF initialises Llama models."""
    tokens_1x1 = jnp.zeros((1, 1), jnp.int32)
    inputs = AttentionInputs(jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
    return Transformer(config).init(rng, tokens_1x1, inputs)["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def forward(
    config: ModelConfig,
    params: Params,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array | None = None,
    segments_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Full-sequence forward; returns (float32 logits_BxTxV, final-normed hidden_BxTxD).

    `segments_BxT`: segment ids (0 = padding, hidden from every query) or a bool validity
    mask. When positions are not given they restart at each segment and count its real
    tokens, so left- or right-padding is harmless.
    """
    chex.assert_rank(tokens_BxT, 2)
    if segments_BxT is None:
        segments_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
        positions_BxT = positions_from_segments(segments_BxT)
    inputs = AttentionInputs(positions_BxT, segments_BxT)
    logits_BxTxV, h_BxTxD, _ = Transformer(config).apply({"params": params}, tokens_BxT, inputs)
    return logits_BxTxV, h_BxTxD


def apply_lm(
    config: ModelConfig,
    params: Params,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array | None = None,
    segments_BxL: jax.Array | None = None,
) -> jax.Array:
    """Float32 next-token logits_BxLxV for a batch of token ids (public API); `segments_BxL`
    as in `forward` (segment ids, or a bool padding mask)."""
    return forward(config, params, jnp.asarray(tokens_BxL), positions_BxL, segments_BxL)[0]


def token_logp(logits_xV: jax.Array, tokens_x: jax.Array) -> jax.Array:
    """log softmax(logits)[token], picked with a one-hot compare rather than a gather:
    its gradient is then elementwise, not a scatter (scatters are slow on CPU)."""
    vocab_V = jnp.arange(logits_xV.shape[-1])
    vocab_xV = vocab_V.reshape((1,) * tokens_x.ndim + (-1,))
    picked_x = jnp.sum(jnp.where(vocab_xV == tokens_x[..., None], logits_xV, 0.0), axis=-1)
    return picked_x - jax.nn.logsumexp(logits_xV, axis=-1)


def next_token_mask(segments_BxT: jax.Array) -> jax.Array:
    """Bx(T-1): token t+1 is a real token of token t's segment (a next-token target)."""
    segments_BxT = segments_BxT.astype(jnp.int32)
    return (segments_BxT[:, 1:] == segments_BxT[:, :-1]) & (segments_BxT[:, 1:] > 0)


def next_token_loss(
    config: ModelConfig, params: Params, tokens_BxT: jax.Array, segments_BxT: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Plain language-model loss: mean NLL of each real token given its segment before it."""
    logits_BxTxV, _ = forward(config, params, tokens_BxT, None, segments_BxT)
    picked_BxT = token_logp(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
    mask_BxT = next_token_mask(segments_BxT)
    nll = -jnp.sum(jnp.where(mask_BxT, picked_BxT, 0.0)) / jnp.maximum(mask_BxT.sum(), 1)
    return nll, {"loss": nll, "nll_base": nll, "nll_next": nll}


