"""The "two_pass" rollout's differentiated pass: every thought step of every (pass,
position) at once, teacher-forced with the tokens a forward-only sampling scan chose."""
from __future__ import annotations

import jax.numpy as jnp

from qstar_jax.method.attention import BlockExtras, ThoughtBlockAttention
from qstar_jax.method.base_pass import LM, BasePass, rows_in_chunks, shift_left
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.heads import Rollout, make_talk_rows, reinforce_logp, rollout_of, thought_logits
from qstar_jax.method.mixing import fed_thought_embeddings, mix_hidden
from qstar_jax.models.transformer import AttentionInputs, Transformer


def teacher_forced_rollout(config, qs: QuietStarConfig, params, lm: LM, base: BasePass, sampled_SxBxT,
                            talk_distribution: bool) -> Rollout:
    """Every thought step of every (pass, position) in one pass of the layers, with the
    thought tokens given: the inputs of steps 1..n_steps are start, the sampled tokens,
    end and the first n_ahead_talk - 1 true tokens, as the scan feeds them."""
    b, n = base.positions_BxN.shape
    p, c_talk, s_all, s_sampled = qs.n_passes, qs.n_ahead_talk, qs.n_steps, qs.n_sampled
    d = config.hidden_size
    start_D, end_D = fed_thought_embeddings(config, qs, params)
    tile = lambda x_BxNx: jnp.tile(x_BxNx, (1, p) + (1,) * (x_BxNx.ndim - 2))
    inputs_SxBxTxD = jnp.concatenate([
        jnp.broadcast_to(start_D, (1, b, p * n, d)),
        lm.embed(sampled_SxBxT),
        jnp.broadcast_to(end_D, (1, b, p * n, d)),
        jnp.stack([tile(lm.embed(base.targets_CxBxN[c])) for c in range(c_talk - 1)]).reshape(c_talk - 1, b, p * n, d),
    ])
    x_BxLxD = inputs_SxBxTxD.transpose(1, 2, 0, 3).reshape(b, p * n * s_all, d)  # L = (pass, position, step)
    steps_S = jnp.arange(1, s_all + 1, dtype=jnp.int32)
    positions_BxL = (tile(base.positions_BxN)[:, :, None] + steps_S[None, None]).reshape(b, -1)
    block_model = Transformer(config, ThoughtBlockAttention(config.sliding_window, p, s_all))
    h_BxLxD, _ = block_model.apply(lm.variables, x_BxLxD, AttentionInputs(
        positions_BxL, BlockExtras(base.positions_BxN, base.segments_BxN)), base.kv, method=Transformer.transform)
    h_BxTxSxD = h_BxLxD.reshape(b, p * n, s_all, d)

    # Steps 1..n_sampled predicted the sampled tokens; their REINFORCE log-probs.
    sampled_BxTxS = sampled_SxBxT.transpose(1, 2, 0)
    def reinforce_rows(h_RxD, token_R):
        return reinforce_logp(qs, thought_logits(lm, qs, h_RxD), token_R)

    sample_logp_BxTS = rows_in_chunks(reinforce_rows, qs.logits_chunk_rows,
                                      h_BxTxSxD[:, :, :s_sampled].reshape(b, -1, d), sampled_BxTxS.reshape(b, -1))
    sample_logp_SxBxT = sample_logp_BxTS.reshape(b, p * n, s_sampled).transpose(2, 0, 1)

    # Steps n_ahead-1.. (end, then the true tokens) talk: mixed with the base at j + c.
    h_thought_BxTxCxD = h_BxTxSxD[:, :, qs.n_ahead - 2:]
    h_base_BxTxCxD = jnp.stack([tile(shift_left(base.h_BxNxD, c, 0)) for c in range(c_talk)], axis=2)
    targets_BxTxC = tile(base.targets_CxBxN.transpose(1, 2, 0))
    h_mix_BxTxCxD, w_BxTxC = mix_hidden(config, qs, params, h_base_BxTxCxD, h_thought_BxTxCxD)
    talk_out = rows_in_chunks(make_talk_rows(lm, talk_distribution), qs.logits_chunk_rows,
                              h_mix_BxTxCxD.reshape(b, -1, d), targets_BxTxC.reshape(b, -1))
    to_CxBxT = lambda x_BxTC: x_BxTC.reshape(b, p * n, c_talk).transpose(2, 0, 1)
    if talk_distribution:
        talk_logp_BxTC, logdist_BxTCxV = talk_out
        logdist_BxTxV = logdist_BxTCxV.reshape(b, p * n, c_talk, -1)[:, :, 0]
        return rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_logp_BxTC),
                           w_BxTxC.transpose(2, 0, 1), logdist_BxTxV)
    return rollout_of(qs, base, sampled_SxBxT, sample_logp_SxBxT, to_CxBxT(talk_out), w_BxTxC.transpose(2, 0, 1))
