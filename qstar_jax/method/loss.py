"""Learning: the Quiet-STaR objective (REINFORCE on the thoughts + NLL) from a rollout."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.method.base_pass import policy_positions_BxN, shift_left
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
    raw_reward_BxPxN: jax.Array  # the official reward: sum of the talk gains, before the baseline
    reward_BxPxN: jax.Array  # what REINFORCE uses: after the baseline and clipping, 0 where not scored
    eligible_BxN: jax.Array  # the positions REINFORCE scores (BxK sites when gated)
    think_gate_loss: jax.Array  # squared error of the gate's predicted gain (0 without a gate)


SHUFFLE_STREAM = 2**31 - 2  # fold_in index of the shuffled-reward control's permutation


def masked_mean(x, mask):
    mask = jnp.broadcast_to(mask, x.shape)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


class AtSites(NamedTuple):
    """Per-position inputs of the objective at the positions that thought: every position
    (K = N), or the gated-training sites."""

    valid_CxBxK: jax.Array  # whether each talk target is real text
    base_logp_CxBxK: jax.Array  # base log-prob of each talk target
    scored_BxK: jax.Array  # the policy positions (base_pass.policy_positions_BxN)
    gate_BxK: jax.Array | None  # the think gate's predicted gain


def at_thinking_sites(qs: QuietStarConfig, r: Rollout) -> AtSites:
    n_talk = r.target_valid_CxBxN.shape[0]
    base_logp_CxBxN = jnp.stack([shift_left(r.base_logp_BxN, c, 0.0) for c in range(n_talk)])
    scored_BxN = policy_positions_BxN(qs, r.target_valid_CxBxN)
    if r.site_index_BxK is None:
        return AtSites(r.target_valid_CxBxN, base_logp_CxBxN, scored_BxN, r.think_gate_BxN)
    at = lambda x_BxN: jnp.take_along_axis(x_BxN, r.site_index_BxK, axis=1)
    gate_BxK = None if r.think_gate_BxN is None else at(r.think_gate_BxN)
    return AtSites(jax.vmap(at)(r.target_valid_CxBxN), jax.vmap(at)(base_logp_CxBxN), at(scored_BxN), gate_BxK)


def shuffled_over_positions(reward_BxPxK: jax.Array, scored_BxK: jax.Array, rng: jax.Array) -> jax.Array:
    """The rewards of the scored (row, position) pairs permuted at random among those pairs
    (each pair's P passes move together); unscored pairs keep their reward of 0."""
    b, p, k = reward_BxPxK.shape
    flat_MxP = reward_BxPxK.transpose(0, 2, 1).reshape(b * k, p)
    scored_M = scored_BxK.reshape(-1)
    # Both orders list the scored pairs first: in place, and in a random order.
    in_place_M = jnp.argsort(~scored_M, stable=True)
    shuffled_M = jnp.argsort(jnp.where(scored_M, jax.random.uniform(rng, scored_M.shape), 2.0))
    out_MxP = jnp.zeros_like(flat_MxP).at[in_place_M].set(flat_MxP[shuffled_M])
    return out_MxP.reshape(b, k, p).transpose(0, 2, 1)


def next_token_nll_BxN(r: Rollout) -> jax.Array:
    """-log p(x_{j+1}) at every position as inference predicts it: after one thought (the
    first talk step, mean over passes) where a thought was made, the base prediction where
    gated training made none; so the mean is over the same tokens with or without gating."""
    thought_BxK = -r.talk_logp_CxBxPxN[0].mean(axis=1)
    if r.site_index_BxK is None:
        return thought_BxK
    rows_Bx1 = jnp.arange(thought_BxK.shape[0])[:, None]
    return (-r.base_logp_BxN).at[rows_Bx1, r.site_index_BxK].set(thought_BxK)


def loss_terms(qs: QuietStarConfig, r: Rollout, rng: jax.Array | None = None) -> LossTerms:
    """The Quiet-STaR objective from per-position quantities.

    reward(b, p, j) = sum_c [log p_mix,c(x_{j+1+c}) - log p_base(x_{j+1+c})], minus its
    mean over the n_passes sibling thoughts (no baseline when n_passes = 1), clipped at 0
    if configured; REINFORCE on the sampled thought tokens' log-probs at the policy
    positions; NLL of the base and of the talk predictions; with a think gate, its squared
    error against the gain before the baseline (mean over the passes). `rng` draws the
    permutation of `qs.shuffle_rewards` (the shuffled-reward control) and is needed only then.
    """
    valid_CxBxN, base_logp_CxBxN, eligible_BxN, gate_BxN = at_thinking_sites(qs, r)
    n_talk = valid_CxBxN.shape[0]
    gain_CxBxPxN = jnp.where(valid_CxBxN[:, :, None], r.talk_logp_CxBxPxN - base_logp_CxBxN[:, :, None], 0.0)
    raw_reward_BxPxN = gain_CxBxPxN.sum(axis=0)
    # A lone thought has no siblings to compare with: its baseline would be itself and every
    # reward 0, so (as the official code) it is rewarded by its raw gain over the base.
    baseline_BxPxN = raw_reward_BxPxN.mean(axis=1, keepdims=True) if raw_reward_BxPxN.shape[1] > 1 else 0.0
    reward_BxPxN = raw_reward_BxPxN - baseline_BxPxN
    if qs.clip_negative_rewards:
        reward_BxPxN = jnp.maximum(reward_BxPxN, 0.0)
    reward_BxPxN = jax.lax.stop_gradient(jnp.where(eligible_BxN[:, None], reward_BxPxN, 0.0))
    if qs.shuffle_rewards:
        if rng is None:
            raise ValueError("shuffle_rewards needs the step's rng")
        reward_BxPxN = shuffled_over_positions(reward_BxPxN, eligible_BxN, rng)

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
    raw_reward_BxPxN = jax.lax.stop_gradient(jnp.where(eligible_BxN[:, None], raw_reward_BxPxN, 0.0))
    return LossTerms(loss, nll_base, nll_talk, policy_loss, talk_gain, raw_reward_BxPxN, reward_BxPxN, eligible_BxN,
                     think_gate_loss)


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
    terms = loss_terms(qs, r, jax.random.fold_in(rng, SHUFFLE_STREAM))
    eligible = terms.eligible_BxN[:, None]

    metrics = {
        "loss": terms.loss,
        "nll_base": terms.nll_base,
        "nll_talk": terms.nll_talk,
        # What inference predicts (one thought, then the first talk step): comparable across
        # n_ahead_talk and with a plain LM's nll_next, so curriculum stages can be ranked by it.
        "nll_next": masked_mean(next_token_nll_BxN(r), r.target_valid_CxBxN[0]),
        "policy_loss": terms.policy_loss,
        # The official code logs the raw gain as "policy_reward"; REINFORCE uses the baselined one.
        "reward_raw": masked_mean(terms.raw_reward_BxPxN, eligible),
        "reward_baselined": masked_mean(terms.reward_BxPxN, eligible),
        "mixing_weight": masked_mean(r.mixing_weight_CxBxPxN, at_thinking_sites(qs, r).valid_CxBxK[:, :, None]),
        "talk_gain": terms.talk_gain,
    }
    if qs.think_gate:
        metrics["think_gate_loss"] = terms.think_gate_loss
    return terms.loss, metrics
