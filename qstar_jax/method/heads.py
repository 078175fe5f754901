"""The LM head inside a thought (sampling, REINFORCE log-probs) and at talk steps, and the
`Rollout` record both rollout algorithms fill."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qstar_jax.method.base_pass import LM, BasePass
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.sampling import mask_thought_tokens
from qstar_jax.models.transformer import token_logp


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
    # the think gate's predicted gain at each position (None without a gate)
    think_gate_BxN: jax.Array | None = None
    # gated training: the K positions per row that thought; the per-thought fields above are
    # then BxPxK (site k is position site_index_BxK[b, k]). None: every position thought.
    site_index_BxK: jax.Array | None = None


def thought_logits(lm: LM, qs: QuietStarConfig, h_RxD):
    """Next-token logits inside a thought: the start/end ids are never sampled."""
    return mask_thought_tokens(lm.logits(h_RxD), qs)


def reinforce_logp(qs: QuietStarConfig, thought_logits_RxV, token_R):
    """REINFORCE's log-prob of a thought token: log softmax(logits / reinforce_temperature)."""
    return token_logp(thought_logits_RxV / qs.reinforce_temperature, token_R)


def make_talk_rows(lm: LM, talk_distribution: bool):
    """Per row: log p(target), and with `talk_distribution` also the whole log-distribution."""
    def talk_rows(h_RxD, target_R):
        logits_RxV = lm.logits(h_RxD)
        logp_R = token_logp(logits_RxV, target_R)
        return (logp_R, jax.nn.log_softmax(logits_RxV.astype(jnp.float32), axis=-1)) if talk_distribution else logp_R

    return talk_rows


def rollout_of(qs: QuietStarConfig, base: BasePass, n: int, sampled_SxBxT, sample_logp_SxBxT, talk_logp_CxBxT,
               w_CxBxT, talk_logdist_BxTxV=None) -> Rollout:
    """The Rollout of T = P x n thoughts per row (n sites: every position, or the chosen ones)."""
    b = base.positions_BxN.shape[0]
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
