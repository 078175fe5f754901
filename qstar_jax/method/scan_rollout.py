"""The "scan" rollout: one thought step at a time under `lax.scan`, differentiated through
the scan (with `jax.checkpoint` per step, activation memory is one step's worth plus the
small thought cache, and a step's full-vocabulary logits are never stored)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.method.attention import THOUGHT_ATTENTION, ThoughtExtras
from qstar_jax.method.base_pass import LM, BasePass, Sites, rows_in_chunks
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.heads import Rollout, make_talk_rows, reinforce_logp, rollout_of, thought_logits
from qstar_jax.method.mixing import fed_thought_embeddings, mix_hidden
from qstar_jax.method.sampling import sample_thought_tokens, thought_uniforms
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import AttentionInputs, Transformer


def thought_stepper(config: ModelConfig, qs: QuietStarConfig, lm: LM, base: BasePass, sites: Sites):
    """think(x_BxTxD, step, cache) -> (h_BxTxD, cache): feeds one token per (pass, site)
    at thought step `step` and writes its keys/values into the cache."""
    thought_model = Transformer(config, THOUGHT_ATTENTION[qs.attention_impl](config.sliding_window))
    positions_BxT = jnp.tile(sites.positions_BxK, (1, qs.n_passes))

    def think(x_BxTxD, step, cache):
        extras = ThoughtExtras(step, base.positions_BxN, base.segments_BxN, sites.index_BxK, sites.positions_BxK,
                               sites.segments_BxK)
        inputs = AttentionInputs(positions_BxT + step, extras)
        h_BxTxD, (k_LxBxGxPxNxK, v_LxBxGxPxNxK) = thought_model.apply(
            lm.variables, x_BxTxD, inputs, base.kv + cache, method=Transformer.transform
        )

        def write(cache_LxBxGxPxNxSxK, new_LxBxGxPxNxK):
            new = new_LxBxGxPxNxK[:, :, :, :, :, None].astype(cache_LxBxGxPxNxSxK.dtype)
            return jax.lax.dynamic_update_slice_in_dim(cache_LxBxGxPxNxSxK, new, step - 1, axis=5)

        return h_BxTxD, (write(cache[0], k_LxBxGxPxNxK), write(cache[1], v_LxBxGxPxNxK))

    return think


def sampling_scan(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sites: Sites, think, rng,
                  forced_SxBxT):
    """Thought steps 1..n_ahead-3: feed start / the previous token, sample the next one.
    Returns (sampled_SxBxT, sample_logp_SxBxT, the last token's embedding, the cache)."""
    b, n = sites.index_BxK.shape
    t = qs.n_passes * n
    maybe_remat = jax.checkpoint if qs.remat_steps else (lambda f: f)

    def sample_rows(h_RxD, uniform_R, forced_R=None):
        logits_RxV = thought_logits(lm, qs, h_RxD)
        if forced_R is None:
            forced_R = sample_thought_tokens(jax.lax.stop_gradient(logits_RxV), uniform_R, qs.thought_temperature)
        return forced_R, reinforce_logp(qs, logits_RxV, forced_R)

    @maybe_remat
    def sample_step(carry, xs):
        step, forced_BxT = xs
        x_BxTxD, cache = carry
        h_BxTxD, cache = think(x_BxTxD, step, cache)
        rows = (h_BxTxD, thought_uniforms(rng, step, (b, t))) + (() if forced_BxT is None else (forced_BxT,))
        sampled_BxT, sample_logp_BxT = rows_in_chunks(sample_rows, qs.logits_chunk_rows, *rows)
        return (lm.embed(sampled_BxT), cache), (sampled_BxT, sample_logp_BxT)

    start_D, _ = fed_thought_embeddings(config, qs, params)
    shape = (config.num_layers, b, config.num_kv_heads, qs.n_passes, n, qs.n_steps, config.head_dim)
    cache = (jnp.zeros(shape, base.kv[0].dtype), jnp.zeros(shape, base.kv[1].dtype))
    x_BxTxD = jnp.broadcast_to(start_D, (b, t, config.hidden_size))
    steps = jnp.arange(1, qs.n_ahead - 2, dtype=jnp.int32)
    (x_BxTxD, cache), (sampled_SxBxT, sample_logp_SxBxT) = jax.lax.scan(
        sample_step, (x_BxTxD, cache), (steps, forced_SxBxT))
    return sampled_SxBxT, sample_logp_SxBxT, x_BxTxD, cache


def scan_rollout(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sites: Sites, rng, forced_SxBxT,
                 talk_distribution: bool) -> Rollout:
    b, n = sites.index_BxK.shape
    p, c_talk = qs.n_passes, qs.n_ahead_talk
    maybe_remat = jax.checkpoint if qs.remat_steps else (lambda f: f)
    think = thought_stepper(config, qs, lm, base, sites)
    sampled_SxBxT, sample_logp_SxBxT, x_BxTxD, cache = sampling_scan(
        config, qs, params, lm, base, sites, think, rng, forced_SxBxT)
    # Step n_ahead-2 feeds the last sampled token (or the start token if none are sampled);
    # its output predicts nothing, so it skips the LM head.
    _, cache = maybe_remat(think)(x_BxTxD, jnp.int32(qs.n_ahead - 2), cache)

    # Talk steps: feed end, then x_{j+1}..x_{j+C-1}; mix with the base hidden at j+c.
    _, end_D = fed_thought_embeddings(config, qs, params)
    tile = lambda x_BxNxD: jnp.tile(x_BxNxD, (1, p, 1))
    talk_inputs_CxBxTxD = jnp.stack([jnp.broadcast_to(end_D, (b, p * n, config.hidden_size))]
                                    + [tile(lm.embed(sites.targets_CxBxK[c])) for c in range(c_talk - 1)])
    h_base_CxBxTxD = jnp.stack([tile(sites.h_base_CxBxKxD[c]) for c in range(c_talk)])
    targets_CxBxT = jnp.tile(sites.targets_CxBxK, (1, 1, p))
    talk_rows = make_talk_rows(lm, talk_distribution)

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
        return rollout_of(qs, base, n, sampled_SxBxT, sample_logp_SxBxT, talk_logp_CxBxT, w_CxBxT, logdist_CxBxTxV[0])
    return rollout_of(qs, base, n, sampled_SxBxT, sample_logp_SxBxT, talk_out_C, w_CxBxT)
