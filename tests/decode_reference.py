"""Generation recomputed from scratch for every token and thought step (no KV cache), for tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qstar_jax.inference.decode import REAL_TOKEN_STREAM, mixed_logits
from qstar_jax.method.gate import think_gate_scores
from qstar_jax.method.mixing import thought_embeddings
from qstar_jax.method.sampling import mask_thought_tokens, sample_tokens
from qstar_jax.models.kv_cache import embed, lm_head
from qstar_jax.models.transformer import AttentionInputs, Transformer


@functools.partial(jax.jit, static_argnames=("config",))
def _last_hidden(config, lm, x_BxTxD, positions_BxT):
    valid = jnp.ones(positions_BxT.shape, bool)
    h, _ = Transformer(config).apply({"params": lm}, x_BxTxD, AttentionInputs(positions_BxT, valid),
                                     method=Transformer.transform)
    return h[:, -1]


def reference_generate(config, qs, params, prompt_BxT, rng, max_new_tokens, temperature, thinking, think_gate=None):
    """With a `think_gate` threshold, a row thinks before a token only where the gate's
    score of its last hidden state exceeds it (-1 thoughts elsewhere)."""
    lm = params["lm"] if "lm" in params else params
    b, t = prompt_BxT.shape
    seq_BxTxD = embed(config, lm, prompt_BxT)
    tokens, thoughts = [], []
    for i in range(max_new_tokens):
        key = jax.random.fold_in(rng, i)
        n = seq_BxTxD.shape[1]
        positions = jnp.broadcast_to(jnp.arange(n), (b, n))
        h_last = _last_hidden(config, lm, seq_BxTxD, positions)
        if thinking:
            start_D, end_D = thought_embeddings(qs, params)
            fed, sampled = [], []
            x = jnp.broadcast_to(start_D, (b, 1, config.hidden_size))
            for step in range(1, qs.n_ahead):
                fed.append(x)
                full = jnp.concatenate([seq_BxTxD] + fed, axis=1)
                pos = jnp.concatenate([positions, jnp.broadcast_to(n - 1 + jnp.arange(1, step + 1), (b, step))], 1)
                h = _last_hidden(config, lm, full, pos)
                if step <= qs.n_sampled:
                    tok = sample_tokens(mask_thought_tokens(lm_head(config, lm, h), qs),
                                        jax.random.fold_in(key, step), qs.thought_temperature)
                    sampled.append(tok)
                    x = embed(config, lm, tok[:, None])
                else:
                    x = jnp.broadcast_to(end_D, (b, 1, config.hidden_size))
            logits = mixed_logits(config, qs, params, h_last, h)
            thought = jnp.stack(sampled, 1)
            if think_gate is not None:
                think_B = think_gate_scores(config, qs, params, h_last) > think_gate
                logits = jnp.where(think_B[:, None], logits, lm_head(config, lm, h_last))
                thought = jnp.where(think_B[:, None], thought, -1)
            thoughts.append(thought)
        else:
            logits = lm_head(config, lm, h_last)
        if qs is not None:
            logits = mask_thought_tokens(logits, qs)
        token = sample_tokens(logits, jax.random.fold_in(key, REAL_TOKEN_STREAM), temperature)
        tokens.append(token)
        seq_BxTxD = jnp.concatenate([seq_BxTxD, embed(config, lm, token[:, None])], axis=1)
    return jnp.stack(tokens, 1), (jnp.stack(thoughts, 1) if thoughts else None)
