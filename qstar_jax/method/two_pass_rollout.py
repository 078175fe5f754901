"""The "two_pass" rollout's differentiated pass: every thought step of every (pass,
position) at once, teacher-forced with the tokens a forward-only sampling scan chose."""

from __future__ import annotations

import jax.numpy as jnp

from qstar_jax.method.attention import BlockExtras, ThoughtBlockAttention
from qstar_jax.method.base_pass import LM, BasePass, Sites, rows_in_chunks
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.heads import Rollout, make_talk_rows, reinforce_logp, rollout_of, thought_logits
from qstar_jax.method.mixing import fed_thought_embeddings, mix_hidden
from qstar_jax.models.transformer import AttentionInputs, Transformer


def teacher_forced_rollout(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sites: Sites, sampled_SxBxT,
                           talk_distribution: bool) -> Rollout:
    """Every thought step of every (pass, position) in one pass of the layers, with the
    thought tokens given (think), then the REINFORCE log-probs of the sampled tokens and the
    mixed talk predictions from its hidden states (talk)."""
    h_BxTxSxD = think_all_steps(config, qs, params, lm, base, sites, sampled_SxBxT)
    sample_logp_SxBxT = sampled_logp(qs, lm, h_BxTxSxD, sampled_SxBxT)
    return talk(config, qs, params, lm, base, sites, h_BxTxSxD, sampled_SxBxT, sample_logp_SxBxT, talk_distribution)


def tile_passes(qs: QuietStarConfig, x_BxNx):
    """BxNx... -> BxTx... with T = P * N: every pass sees the same text."""
    return jnp.tile(x_BxNx, (1, qs.n_passes) + (1,) * (x_BxNx.ndim - 2))


def think_all_steps(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sites: Sites, sampled_SxBxT):
    """Hidden states BxTxSxD of thought steps 1..n_steps, whose inputs are start, the sampled
    tokens, end and the first n_ahead_talk - 1 true tokens, as the scan feeds them; one
    sequence of L = (pass, position, step) tokens through `ThoughtBlockAttention`."""
    b, n = sites.index_BxK.shape
    t, s_all, d = qs.n_passes * n, qs.n_steps, config.hidden_size
    start_D, end_D = fed_thought_embeddings(config, qs, params)
    true_CxBxTxD = jnp.stack([tile_passes(qs, lm.embed(sites.targets_CxBxK[c])) for c in range(qs.n_ahead_talk - 1)])
    inputs_SxBxTxD = jnp.concatenate([jnp.broadcast_to(start_D, (1, b, t, d)), lm.embed(sampled_SxBxT),
                                      jnp.broadcast_to(end_D, (1, b, t, d)), true_CxBxTxD.reshape(-1, b, t, d)])
    x_BxLxD = inputs_SxBxTxD.transpose(1, 2, 0, 3).reshape(b, t * s_all, d)
    steps_S = jnp.arange(1, s_all + 1, dtype=jnp.int32)
    positions_BxL = (tile_passes(qs, sites.positions_BxK)[:, :, None] + steps_S[None, None]).reshape(b, -1)
    block_model = Transformer(config, ThoughtBlockAttention(config.sliding_window, qs.n_passes, s_all))
    extras = BlockExtras(base.positions_BxN, base.segments_BxN, sites.index_BxK, sites.positions_BxK,
                         sites.segments_BxK)
    h_BxLxD, _ = block_model.apply(lm.variables, x_BxLxD, AttentionInputs(positions_BxL, extras), base.kv,
                                   method=Transformer.transform)
    return h_BxLxD.reshape(b, t, s_all, d)


def sampled_logp(qs: QuietStarConfig, lm: LM, h_BxTxSxD, sampled_SxBxT):
    """REINFORCE log-probs (SxBxT) of the sampled tokens, predicted by steps 1..n_sampled."""
    b, t, _, d = h_BxTxSxD.shape
    s_sampled = qs.n_sampled

    def reinforce_rows(h_RxD, token_R):
        return reinforce_logp(qs, thought_logits(lm, qs, h_RxD), token_R)

    h_RxD = h_BxTxSxD[:, :, :s_sampled].reshape(b, -1, d)
    sample_logp_BxTS = rows_in_chunks(reinforce_rows, qs.logits_chunk_rows, h_RxD,
                                      sampled_SxBxT.transpose(1, 2, 0).reshape(b, -1))
    return sample_logp_BxTS.reshape(b, t, s_sampled).transpose(2, 0, 1)


def talk(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sites: Sites, h_BxTxSxD, sampled_SxBxT,
         sample_logp_SxBxT, talk_distribution: bool) -> Rollout:
    """Steps n_ahead-1.. (end, then the true tokens) talk: mixed with the base at j + c."""
    b, t, _, d = h_BxTxSxD.shape
    c_talk = qs.n_ahead_talk
    h_thought_BxTxCxD = h_BxTxSxD[:, :, qs.n_ahead - 2:]
    h_base_BxTxCxD = jnp.stack([tile_passes(qs, sites.h_base_CxBxKxD[c]) for c in range(c_talk)], axis=2)
    targets_BxTxC = tile_passes(qs, sites.targets_CxBxK.transpose(1, 2, 0))
    h_mix_BxTxCxD, w_BxTxC = mix_hidden(config, qs, params, h_base_BxTxCxD, h_thought_BxTxCxD)
    talk_out = rows_in_chunks(make_talk_rows(lm, talk_distribution), qs.logits_chunk_rows,
                              h_mix_BxTxCxD.reshape(b, -1, d), targets_BxTxC.reshape(b, -1))
    to_CxBxT = lambda x_BxTC: x_BxTC.reshape(b, t, c_talk).transpose(2, 0, 1)
    w_CxBxT = w_BxTxC.transpose(2, 0, 1)
    if not talk_distribution:
        return rollout_of(qs, base, t // qs.n_passes, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_out), w_CxBxT)
    talk_logp_BxTC, logdist_BxTCxV = talk_out
    logdist_BxTxV = logdist_BxTCxV.reshape(b, t, c_talk, -1)[:, :, 0]
    return rollout_of(qs, base, t // qs.n_passes, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_logp_BxTC), w_CxBxT,
                      logdist_BxTxV)
