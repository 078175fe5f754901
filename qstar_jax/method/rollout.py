"""Thinking at every position, then talking: the rollout, all positions in parallel.

The whole method is a pure function of (params, tokens, segments, rng) that `jax.jit`
and `jax.grad` accept; `segments_BxN` holds segment ids (0 = padding, 1, 2, ... = packed
documents, as in models/transformer.py) or a bool padding mask. A thought at j sees only
its own document's prefix, and talk targets never cross into the next document.
Named steps: `base_pass` (step 0), then thinking and talking by one of two algorithms
(`scan_rollout`, `two_pass_rollout`), whose per-position outputs fill a `Rollout`.
"""
from __future__ import annotations

import chex
import jax

from qstar_jax.method.base_pass import (
    LM, BasePass, Sites, all_sites, base_pass, chosen_sites, lm_functions, policy_positions_BxN,
)
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.gate import SITE_STREAM, choose_sites, think_gate_scores
from qstar_jax.method.heads import Rollout
from qstar_jax.method.sampling import check_thought_ids
from qstar_jax.method.scan_rollout import sampling_scan, scan_rollout, thought_stepper
from qstar_jax.method.two_pass_rollout import teacher_forced_rollout
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params


def rollout(
    config: ModelConfig,
    qs: QuietStarConfig,
    params: Params,
    tokens_BxN: jax.Array,
    segments_BxN: jax.Array,
    rng: jax.Array,
    forced_thoughts_SxBxPxK: jax.Array | None = None,
    talk_distribution: bool = False,
    sites_BxK: jax.Array | None = None,
) -> Rollout:
    """Thinks at every position (n_passes thoughts each) and talks; all in parallel.

    With `forced_thoughts_SxBxPxK` the given thought tokens are fed instead of sampled
    (their log-probs are still computed): scoring fixed thoughts, and isolation tests.
    `talk_distribution` also returns the whole mixed next-token distribution (B x P x N x V
    floats, for the NTP stage's full-distribution teacher; not for training). With
    `qs.think_share` < 1 only K positions per row think (gated training: the think gate's
    choice plus exploration, `gate.choose_sites`), or the given `sites_BxK` (tests).

    `qs.rollout_impl` picks how; both compute the same quantities (tested). "scan" feeds
    one thought step at a time and differentiates through the scan. "two_pass" samples the
    thoughts in a forward-only scan on stop-gradient parameters (REINFORCE scores the
    sampled tokens; no gradient flows through choosing them, so that scan keeps nothing
    for the backward pass), then feeds every step of every thought at once, teacher-forced,
    through one pass of the layers: the differentiated work is a few large matmuls instead
    of n_steps small ones.
    """
    chex.assert_rank(tokens_BxN, 2)
    chex.assert_equal_shape([tokens_BxN, segments_BxN])
    check_thought_ids(config, qs)
    lm = lm_functions(config, params["lm"])
    base = base_pass(config, qs, lm, tokens_BxN, segments_BxN)
    gate_BxN = think_gate_scores(config, qs, params, base.h_BxNxD) if qs.think_gate else None
    if sites_BxK is None and qs.think_share < 1.0:
        eligible_BxN = policy_positions_BxN(qs, base.target_valid_CxBxN)
        sites_BxK = choose_sites(qs, gate_BxN, eligible_BxN, jax.random.fold_in(rng, SITE_STREAM))
    sites = all_sites(base) if sites_BxK is None else chosen_sites(base, sites_BxK)
    b, k = sites.index_BxK.shape
    forced_SxBxT = None
    if forced_thoughts_SxBxPxK is not None:
        chex.assert_shape(forced_thoughts_SxBxPxK, (qs.n_sampled, b, qs.n_passes, k))
        forced_SxBxT = forced_thoughts_SxBxPxK.reshape(qs.n_sampled, b, qs.n_passes * k)
    r = think_and_talk(config, qs, params, lm, base, sites, rng, forced_SxBxT, talk_distribution)
    return r._replace(think_gate_BxN=gate_BxN, site_index_BxK=sites_BxK)


def think_and_talk(config: ModelConfig, qs: QuietStarConfig, params: Params, lm: LM, base: BasePass, sites: Sites,
                   rng, forced_SxBxT, talk_distribution: bool) -> Rollout:
    """Thought steps and talk steps after the base pass, by `qs.rollout_impl`."""
    if qs.rollout_impl == "scan":
        return scan_rollout(config, qs, params, lm, base, sites, rng, forced_SxBxT, talk_distribution)
    if forced_SxBxT is None:
        frozen = jax.lax.stop_gradient(params)
        frozen_lm, frozen_base = lm_functions(config, frozen["lm"]), jax.lax.stop_gradient(base)
        frozen_sites = jax.lax.stop_gradient(sites)
        think = thought_stepper(config, qs, frozen_lm, frozen_base, frozen_sites)
        forced_SxBxT = sampling_scan(config, qs, frozen, frozen_lm, frozen_base, frozen_sites, think, rng, None)[0]
    return teacher_forced_rollout(config, qs, params, lm, base, sites, forced_SxBxT, talk_distribution)
