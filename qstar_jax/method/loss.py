"""Learning: the Quiet-STaR objective (REINFORCE on the thoughts + NLL) from a rollout."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.method.base_pass import shift_left
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.heads import Rollout
from qstar_jax.method.rollout import rollout
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params


class LossTerms(NamedTuple):
    loss: jax.Array
    nll_base: jax.Array
    nll_talk: jax.Array
    policy_loss: jax.Array
    talk_gain: jax.Array  # mean log p_mix - log p_base over real talk targets (0 at init)
    reward_BxPxN: jax.Array  # after the baseline and clipping; 0 where not eligible (BxPxK when gated)
    eligible_BxN: jax.Array  # thoughts whose whole talk horizon is real text (BxK sites when gated)
    think_gate_loss: jax.Array  # squared error of the gate's predicted gain (0 without a gate)


def masked_mean(x, mask):
    mask = jnp.broadcast_to(mask, x.shape)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def at_thinking_sites(r: Rollout) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(talk-target validity CxBxK, base log-prob of each talk target CxBxK, gate score BxK)
    at the positions that thought: every position (K = N), or the gated-training sites."""
    n_talk = r.target_valid_CxBxN.shape[0]
    base_logp_CxBxN = jnp.stack([shift_left(r.base_logp_BxN, c, 0.0) for c in range(n_talk)])
    if r.site_index_BxK is None:
        return r.target_valid_CxBxN, base_logp_CxBxN, r.think_gate_BxN
    at = lambda x_BxN: jnp.take_along_axis(x_BxN, r.site_index_BxK, axis=1)
    gate_BxK = None if r.think_gate_BxN is None else at(r.think_gate_BxN)
    return jax.vmap(at)(r.target_valid_CxBxN), jax.vmap(at)(base_logp_CxBxN), gate_BxK


def next_token_nll_BxN(r: Rollout) -> jax.Array:
    """-log p(x_{j+1}) at every position as inference predicts it: after one thought (the
    first talk step, mean over passes) where a thought was made, the base prediction where
    gated training made none; so the mean is over the same tokens with or without gating."""
    thought_BxK = -r.talk_logp_CxBxPxN[0].mean(axis=1)
    if r.site_index_BxK is None:
        return thought_BxK
    rows_Bx1 = jnp.arange(thought_BxK.shape[0])[:, None]
    return (-r.base_logp_BxN).at[rows_Bx1, r.site_index_BxK].set(thought_BxK)


def loss_terms(qs: QuietStarConfig, r: Rollout) -> LossTerms:
    """The Quiet-STaR objective from per-position quantities.

    reward(b, p, j) = sum_c [log p_mix,c(x_{j+1+c}) - log p_base(x_{j+1+c})], minus its
    mean over the n_passes sibling thoughts (no baseline when n_passes = 1), clipped at 0
    if configured; REINFORCE on the sampled thought tokens' log-probs; NLL of the base and
    of the talk predictions; with a think gate, its squared error against the gain before
    the baseline (mean over the passes).
    """
    valid_CxBxN, base_logp_CxBxN, gate_BxN = at_thinking_sites(r)
    n_talk = valid_CxBxN.shape[0]
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

    think_gate_loss = jnp.zeros((), jnp.float32)
    if gate_BxN is not None:  # the gate learns the gain a thought brings at j (its input is stop-gradient)
        gain_BxN = jax.lax.stop_gradient(raw_reward_BxPxN.mean(axis=1))
        think_gate_loss = qs.think_gate_loss_weight * masked_mean(jnp.square(gate_BxN - gain_BxN), eligible_BxN)

    if r.sample_logp_SxBxPxN.shape[0]:
        thought_logp_BxPxN = r.sample_logp_SxBxPxN.mean(axis=0)
        policy_loss = qs.policy_loss_weight * masked_mean(-reward_BxPxN * thought_logp_BxPxN, eligible_BxN[:, None])
    else:
        policy_loss = jnp.zeros((), jnp.float32)
    nll_base = masked_mean(-r.base_logp_BxN, r.target_valid_CxBxN[0])  # every position, thinking or not
    nll_talk = jnp.mean(
        jnp.stack([masked_mean(-r.talk_logp_CxBxPxN[c], valid_CxBxN[c][:, None]) for c in range(n_talk)])
    )
    loss = qs.base_loss_weight * nll_base + (1 - qs.base_loss_weight) * nll_talk + policy_loss + think_gate_loss
    talk_gain = masked_mean(gain_CxBxPxN, valid_CxBxN[:, :, None])
    return LossTerms(loss, nll_base, nll_talk, policy_loss, talk_gain, reward_BxPxN, eligible_BxN, think_gate_loss)


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
        "nll_next": masked_mean(next_token_nll_BxN(r), r.target_valid_CxBxN[0]),
        "policy_loss": terms.policy_loss,
        "reward": masked_mean(terms.reward_BxPxN, eligible),
        "mixing_weight": masked_mean(r.mixing_weight_CxBxPxN, at_thinking_sites(r)[0][:, :, None]),
        "talk_gain": terms.talk_gain,
    }
    if qs.think_gate:
        metrics["think_gate_loss"] = terms.think_gate_loss
    return terms.loss, metrics
