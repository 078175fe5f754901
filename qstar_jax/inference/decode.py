"""Generation with a KV cache, with and without thinking.

Thinking generation follows training exactly: before each new token, the model thinks
one thought on top of the cached real prefix (start, n_ahead-3 sampled tokens, end, at
positions continuing from the last real token), mixes the post-thought hidden state with
the base hidden state of the last real token through the mixing head, samples the next
real token, and drops the thought's cache entries. Each new token therefore costs
n_ahead cached decode steps, whatever the prefix length: the prefix is never re-run.

The whole loop is one jitted `lax.scan`. Random numbers are addressed by
(new-token index, thought step), so a no-cache reference can reproduce the same tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.errors import UserError
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.gate import think_gate_scores
from qstar_jax.method.mixing import mix_hidden, thought_embeddings
from qstar_jax.method.sampling import mask_thought_tokens, sample_tokens
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.kv_cache import KVCache, decode_embeddings, embed, hoist_layers, init_cache, lm_head
from qstar_jax.models.transformer import Params

REAL_TOKEN_STREAM = 0  # fold_in index of the real token's uniform; thought steps use 1, 2, ...


def _lm(params: Params) -> Params:
    """The LM's params, from Quiet-STaR params or from a plain LM's own."""
    return params["lm"] if "lm" in params else params


def decoding_params(config: ModelConfig, params: Params) -> Params:
    """`params` (Quiet-STaR's or a plain LM's) with the LM's layer weights in kv_cache's
    decode-loop form (`hoist_layers`; unchanged for a rolled layer stack). Every decode
    entry point does this itself; a caller that decodes many times does it once, at load."""
    return {**params, "lm": hoist_layers(config, params["lm"])} if "lm" in params else hoist_layers(config, params)


def think(config: ModelConfig, qs: QuietStarConfig, params: Params, cache: KVCache, key: jax.Array):
    """One thought per row on top of `cache`; returns (h_after_end_BxD, thought_BxS, cache).

    The returned cache still holds the thought; `forget_after` drops it.
    """
    lm = params["lm"]
    start_D, end_D = thought_embeddings(qs, params)
    b = cache.valid_BxS.shape[0]
    x_Bx1xD = jnp.broadcast_to(start_D, (b, 1, config.hidden_size)).astype(jnp.dtype(config.dtype))
    sampled = []
    for step in range(1, qs.n_ahead):
        h_Bx1xD, cache = decode_embeddings(config, lm, x_Bx1xD, cache)
        if step <= qs.n_sampled:
            logits_BxV = mask_thought_tokens(lm_head(config, lm, h_Bx1xD[:, 0]), qs)
            token_B = sample_tokens(logits_BxV, jax.random.fold_in(key, step), qs.thought_temperature)
            sampled.append(token_B)
            x_Bx1xD = embed(config, lm, token_B[:, None])
        else:  # after the last sampled token comes the end token
            x_Bx1xD = jnp.broadcast_to(end_D, x_Bx1xD.shape).astype(x_Bx1xD.dtype)
    thought_BxS = jnp.stack(sampled, axis=1) if sampled else jnp.zeros((b, 0), jnp.int32)
    return h_Bx1xD[:, 0], thought_BxS, cache


def forget_after(cache: KVCache, length: jax.Array, next_position_B: jax.Array) -> KVCache:
    """Drops every cache slot from `length` on (a finished thought), restoring positions."""
    keep_S = jnp.arange(cache.valid_BxS.shape[1]) < length
    return cache._replace(valid_BxS=cache.valid_BxS & keep_S[None], length=length, next_position_B=next_position_B)


def mixed_logits(config: ModelConfig, qs: QuietStarConfig, params: Params, h_base_BxD: jax.Array,
                 h_thought_BxD: jax.Array) -> jax.Array:
    h_mix_BxD, _ = mix_hidden(config, qs, params, h_base_BxD, h_thought_BxD)
    return lm_head(config, params["lm"], h_mix_BxD)


class NextToken(NamedTuple):
    logits_BxV: jax.Array
    thought_BxS: jax.Array  # -1 where a row did not think
    thought_B: jax.Array  # bool: the row thought before this token
    cache: KVCache  # the input cache again (a thought's slots are written, then forgotten)


def token_key(rng: jax.Array, index: jax.Array) -> jax.Array:
    """The key of new token `index`: its thought's steps and its own sampling fold into it."""
    return jax.random.fold_in(rng, index)


def thought_logits_after(config, qs, params, cache: KVCache, h_base_BxD, rng, index) -> NextToken:
    """Mixed logits after one thought per row, before new token `index`. The thought writes
    into the cache in place; resetting the slot bookkeeping afterwards (rather than
    thinking on a copy) keeps the cache a single buffer. The key is derived here, so a
    gated step that does not think does not derive it either (XLA does not sink it)."""
    h_thought_BxD, thought_BxS, thought_cache = think(config, qs, params, cache, token_key(rng, index))
    cache = forget_after(thought_cache, cache.length, cache.next_position_B)
    logits_BxV = mixed_logits(config, qs, params, h_base_BxD, h_thought_BxD)
    return NextToken(logits_BxV, thought_BxS, jnp.ones(h_base_BxD.shape[:1], bool), cache)


def gated_logits(config, qs, params, cache: KVCache, h_base_BxD, rng, index, threshold: float) -> NextToken:
    """Thinks only in the rows whose think gate predicts a gain above `threshold`; when no
    row does, no thought is computed at all (the saving), else every row's thought is and
    the others keep their base logits."""
    think_B = think_gate_scores(config, qs, params, h_base_BxD) > threshold
    base_BxV = lm_head(config, _lm(params), h_base_BxD)

    def with_thought(cache):
        nxt = thought_logits_after(config, qs, params, cache, h_base_BxD, rng, index)
        return (jnp.where(think_B[:, None], nxt.logits_BxV, base_BxV),
                jnp.where(think_B[:, None], nxt.thought_BxS, -1), nxt.cache)

    def without(cache):
        return base_BxV, jnp.full((h_base_BxD.shape[0], qs.n_sampled), -1, jnp.int32), cache

    logits_BxV, thought_BxS, cache = jax.lax.cond(jnp.any(think_B), with_thought, without, cache)
    return NextToken(logits_BxV, thought_BxS, think_B, cache)


def next_token_logits(config, qs, params, cache: KVCache, h_base_BxD, rng, index, thinking: bool,
                      think_gate: float | None = None) -> NextToken:
    """Logits for the next real token: base, mixed after one thought, or (with a
    `think_gate` threshold) mixed only where the gate says a thought pays."""
    b = h_base_BxD.shape[0]
    if not thinking:
        nxt = NextToken(lm_head(config, _lm(params), h_base_BxD), jnp.zeros((b, 0), jnp.int32),
                        jnp.zeros((b,), bool), cache)
    elif think_gate is None:
        nxt = thought_logits_after(config, qs, params, cache, h_base_BxD, rng, index)
    else:
        nxt = gated_logits(config, qs, params, cache, h_base_BxD, rng, index, think_gate)
    if qs is not None:  # thought tokens are placed, never emitted as text
        nxt = nxt._replace(logits_BxV=mask_thought_tokens(nxt.logits_BxV, qs))
    return nxt


def prefill(config: ModelConfig, lm: Params, prompt_BxT: jax.Array, valid_BxT: jax.Array, extra: int):
    """Runs a left-padded prompt into a fresh cache with room for `extra` more slots."""
    b, t = prompt_BxT.shape
    cache = init_cache(config, b, t + extra)
    h_BxTxD, cache = decode_embeddings(config, lm, embed(config, lm, prompt_BxT), cache, valid_BxT)
    return h_BxTxD[:, -1], cache


class Decoded(NamedTuple):
    tokens_BxM: jax.Array
    thoughts_BxMxS: jax.Array  # -1 where no thought was made
    thought_BxM: jax.Array  # bool: a thought preceded the token
    logits_BxMxV: jax.Array


def _decode_loop(config, qs, params, prompt_BxT, valid_BxT, rng, steps, temperature, thinking, forced_BxM=None,
                 think_gate: float | None = None) -> Decoded:
    """The generation loop; with `forced_BxM` the real tokens are given (scoring), not sampled."""
    params = decoding_params(config, params)  # outside the loop: once per call, not per token
    lm = _lm(params)
    thought_slots = qs.n_ahead if thinking else 0
    h_last_BxD, cache = prefill(config, lm, prompt_BxT, valid_BxT, steps + thought_slots)

    def one_token(carry, xs):
        index, forced_B = xs
        cache, h_last_BxD = carry
        nxt = next_token_logits(config, qs, params, cache, h_last_BxD, rng, index, thinking, think_gate)
        if forced_B is None:
            sample_key = jax.random.fold_in(token_key(rng, index), REAL_TOKEN_STREAM)
            token_B = sample_tokens(nxt.logits_BxV, sample_key, temperature)
        else:
            token_B = forced_B
        h_Bx1xD, cache = decode_embeddings(config, lm, embed(config, lm, token_B[:, None]), nxt.cache)
        return (cache, h_Bx1xD[:, 0]), (token_B, nxt.thought_BxS, nxt.thought_B, nxt.logits_BxV)

    xs = (jnp.arange(steps), None if forced_BxM is None else forced_BxM.T)
    _, (tokens_MxB, thoughts_MxBxS, thought_MxB, logits_MxBxV) = jax.lax.scan(one_token, (cache, h_last_BxD), xs)
    return Decoded(tokens_MxB.T, thoughts_MxBxS.transpose(1, 0, 2), thought_MxB.T, logits_MxBxV.transpose(1, 0, 2))


def prompt_room(config: ModelConfig, qs: QuietStarConfig | None, new_tokens: int, thinking: bool) -> int:
    """How many prompt tokens fit in the model's context (`max_position_embeddings`) with
    `new_tokens` generated after them and, when thinking, one thought's slots. Callers
    reject a longer prompt (generate) or keep its last tokens (evaluate); past the context
    positions leave what the model was trained on, and memory grows with the length."""
    slots = qs.n_ahead if thinking and qs is not None else 0
    room = config.max_position_embeddings - new_tokens - slots
    if room < 1:
        raise UserError(f"{new_tokens} new tokens{f' and {slots} thought slots' if slots else ''} leave no room for a "
                        f"prompt in the model's context of {config.max_position_embeddings} tokens")
    return room


@functools.partial(jax.jit, static_argnames=("config", "qs", "max_new_tokens", "temperature", "thinking",
                                             "think_gate"))
def generate_decoded(
    config: ModelConfig,
    qs: QuietStarConfig | None,
    params: Params,
    prompt_BxT: jax.Array,
    valid_BxT: jax.Array,
    rng: jax.Array,
    max_new_tokens: int,
    temperature: float,
    thinking: bool,
    think_gate: float | None = None,
) -> Decoded:
    """Samples `max_new_tokens` after left-padded prompts. With thinking and a `think_gate`
    threshold (a model trained with quiet_star.think_gate), thinks only before the tokens
    whose predicted gain exceeds it; `thought_BxM` says where."""
    if think_gate is not None and (not thinking or qs is None or not qs.think_gate):
        raise UserError("a think-gate threshold needs thinking and a model trained with quiet_star.think_gate")
    return _decode_loop(config, qs, params, prompt_BxT, valid_BxT, rng, max_new_tokens, temperature, thinking,
                        think_gate=think_gate)


def generate(config, qs, params, prompt_BxT, valid_BxT, rng, max_new_tokens: int, temperature: float,
             thinking: bool) -> tuple[jax.Array, jax.Array]:
    """(tokens_BxM, thoughts_BxMxS) of `generate_decoded`, thinking before every token or never."""
    decoded = generate_decoded(config, qs, params, prompt_BxT, valid_BxT, rng, max_new_tokens, temperature, thinking)
    return decoded.tokens_BxM, decoded.thoughts_BxMxS


@functools.partial(jax.jit, static_argnames=("config", "qs", "thinking", "think_gate"))
def continuation_decoded(
    config: ModelConfig,
    qs: QuietStarConfig | None,
    params: Params,
    prompt_BxT: jax.Array,
    valid_BxT: jax.Array,
    continuation_BxM: jax.Array,
    rng: jax.Array,
    thinking: bool,
    think_gate: float | None = None,
) -> Decoded:
    """Next-token logits before each given continuation token (thinking before each, or
    where a `think_gate` threshold says), and where a thought was made."""
    steps = continuation_BxM.shape[1]
    return _decode_loop(config, qs, params, prompt_BxT, valid_BxT, rng, steps, 0.0, thinking, continuation_BxM,
                        think_gate)
