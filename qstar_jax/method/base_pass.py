"""Step 0 of the rollout: the text through the LM once, with what every thought step needs
from it (keys and values of every layer, hidden states, talk targets); and the LM's
embedding and head as functions, and the chunked application of the head to many rows.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import AttentionInputs, CausalAttention, Params, Transformer, positions_from_segments, token_logp


def shift_left(x_BxN: jax.Array, shift: int, fill) -> jax.Array:
    """x[:, j + shift] at j, `fill` past the end."""
    if shift == 0:
        return x_BxN
    pad = jnp.full((x_BxN.shape[0], shift) + x_BxN.shape[2:], fill, x_BxN.dtype)
    return jnp.concatenate([x_BxN[:, shift:], pad], axis=1)


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
    targets = jnp.stack([shift_left(tokens_BxN, c + 1, 0) for c in range(n_talk)])
    valid = jnp.stack([(shift_left(segments_BxN, c + 1, 0) == segments_BxN) & (segments_BxN > 0)
                       for c in range(n_talk)])
    return targets, valid


def policy_positions_BxN(qs: QuietStarConfig, target_valid_CxBxN: jax.Array) -> jax.Array:
    """The positions REINFORCE scores (and the think gate learns at): every talk target real.

    The official code scores j = 0 .. N-2-C of a row of N tokens (C = n_ahead_talk): its
    reward slice ends one position before the last whole talk horizon. `policy_positions
    = "official"` keeps that cut; "full_horizon" also scores j = N-1-C.
    """
    eligible_BxN = target_valid_CxBxN.all(axis=0)
    if qs.policy_positions == "official":
        n = eligible_BxN.shape[1]
        eligible_BxN = eligible_BxN & (jnp.arange(n) <= n - 2 - target_valid_CxBxN.shape[0])[None, :]
    return eligible_BxN


class BasePass(NamedTuple):
    """Step 0, and what every thought step needs from it."""

    h_BxNxD: jax.Array  # final-norm hidden states of the text
    kv: tuple[jax.Array, jax.Array]  # every layer's post-RoPE keys and values, LxBxNxGxK
    positions_BxN: jax.Array
    segments_BxN: jax.Array
    targets_CxBxN: jax.Array  # talk targets x_{j+1+c}
    target_valid_CxBxN: jax.Array
    logp_BxN: jax.Array  # log p_base(x_{j+1} | x_<=j)


class Sites(NamedTuple):
    """The K positions per row that think (all N of them unless training is gated) and what
    a thought there needs from the base pass: its position and segment (for RoPE and the
    masks), the base hidden states at j + c it is mixed with, and its talk targets."""

    index_BxK: jax.Array  # int32 position j of each site in its row
    positions_BxK: jax.Array
    segments_BxK: jax.Array
    h_base_CxBxKxD: jax.Array  # base hidden state at j + c (0 past the end)
    targets_CxBxK: jax.Array
    target_valid_CxBxK: jax.Array


def all_sites(base: BasePass) -> Sites:
    """Every position thinks (the papers' method)."""
    b, n = base.positions_BxN.shape
    h_base_CxBxNxD = jnp.stack([shift_left(base.h_BxNxD, c, 0) for c in range(base.targets_CxBxN.shape[0])])
    index_BxN = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    return Sites(index_BxN, base.positions_BxN, base.segments_BxN, h_base_CxBxNxD, base.targets_CxBxN,
                 base.target_valid_CxBxN)


def chosen_sites(base: BasePass, index_BxK: jax.Array) -> Sites:
    """Only positions `index_BxK` of each row think (gated training): `all_sites` at them."""
    every = all_sites(base)
    row = lambda x_BxN: jnp.take_along_axis(x_BxN, index_BxK, axis=1)
    return Sites(index_BxK, row(every.positions_BxK), row(every.segments_BxK),
                 jnp.take_along_axis(every.h_base_CxBxKxD, index_BxK[None, :, :, None], axis=2),
                 jax.vmap(row)(every.targets_CxBxK), jax.vmap(row)(every.target_valid_CxBxK))


class LM(NamedTuple):
    """The LM's variables, and its embedding and LM head as functions of them."""

    variables: dict
    embed: Any
    logits: Any


def lm_functions(config: ModelConfig, lm_params: Params) -> LM:
    variables = {"params": lm_params}
    return LM(variables, lambda tokens: Transformer(config).apply(variables, tokens, method=Transformer.embed),
               lambda h: Transformer(config).apply(variables, h, method=Transformer.logits))


def base_pass(config: ModelConfig, qs: QuietStarConfig, lm: LM, tokens_BxN, segments_BxN) -> BasePass:
    positions_BxN = positions_from_segments(segments_BxN)
    base_model = Transformer(config, CausalAttention(config.sliding_window, return_kv=True))
    h_BxNxD, kv = base_model.apply(lm.variables, lm.embed(tokens_BxN), AttentionInputs(positions_BxN, segments_BxN),
                                   method=Transformer.transform)
    targets_CxBxN, valid_CxBxN = talk_targets(tokens_BxN, segments_BxN, qs.n_ahead_talk)
    logp_BxN = rows_in_chunks(lambda h, t: token_logp(lm.logits(h), t), qs.logits_chunk_rows, h_BxNxD, targets_CxBxN[0])
    return BasePass(h_BxNxD, kv, positions_BxN, segments_BxN, targets_CxBxN, valid_CxBxN, logp_BxN)
