"""REINFORCE, checked against a literal policy gradient written out position by position.

The reference reads only the rollout's per-position quantities (base and talk log-probs,
the thought tokens' REINFORCE log-probs and their per-position parameter gradients) and
the row's segment ids, and builds the policy gradient the way docs/method.md states it,
in plain Python loops: the reward at (row, pass, position) is the sum of the talk gains,
minus their mean over the sibling passes at the same (row, position), clipped at 0 if
configured, kept at eligible positions only; the gradient is minus the mean over
eligible thoughts of (constant reward) x grad(mean sampled-token log-prob). jax.grad of
the real loss with policy weight w, minus that with weight 0, must equal it; so the
reward's stop-gradient, the loss's sign, the eligibility rule and the baseline are each
pinned by a check that no single hand computation replaces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_quiet_star import VOCAB, make_params
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.loss import loss_terms, quiet_star_loss
from qstar_jax.method.rollout import rollout

CONFIG = ModelConfig("llama", VOCAB, 32, 64, 1, 4, 2, 8)  # one layer: the gradients compile in seconds
N = 10
# Row 0: two packed documents ending in real text at the row's end (the N-2-C cut and
# the document boundary both matter); row 1: left and right padding around one document.
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
CASES = {  # the policy-positions rule, clipping and rollout algorithm vary together
    "official_clipped_scan": dict(n_ahead=5, n_ahead_talk=2, n_passes=3, policy_positions="official",
                                  clip_negative_rewards=True, rollout_impl="scan"),
    "full_horizon_unclipped_two_pass": dict(n_ahead=5, n_ahead_talk=3, n_passes=2, policy_positions="full_horizon",
                                            clip_negative_rewards=False, rollout_impl="two_pass"),
}
POLICY_WEIGHT = 3.0


def eligible_positions(qs: QuietStarConfig, segments_BxN: np.ndarray) -> np.ndarray:
    """Positions REINFORCE scores: j <= N-2-C ("official") or j <= N-1-C ("full_horizon"),
    and every talk target x_{j+1}..x_{j+C} real text of x_j's document."""
    b, n = segments_BxN.shape
    c_talk = qs.n_ahead_talk
    last = n - 2 - c_talk if qs.policy_positions == "official" else n - 1 - c_talk
    eligible = np.zeros((b, n), bool)
    for bi in range(b):
        for j in range(last + 1):
            doc = segments_BxN[bi, j]
            eligible[bi, j] = doc > 0 and all(segments_BxN[bi, j + 1 + c] == doc for c in range(c_talk))
    return eligible


def reference_rewards(qs: QuietStarConfig, r, eligible_BxN: np.ndarray) -> np.ndarray:
    """Baselined, clipped reward per (row, pass, position); 0 where not eligible."""
    talk, base = np.asarray(r.talk_logp_CxBxPxN, np.float64), np.asarray(r.base_logp_BxN, np.float64)
    b, n = eligible_BxN.shape
    p = qs.n_passes
    rewards = np.zeros((b, p, n))
    for bi in range(b):
        for j in range(n):
            if not eligible_BxN[bi, j]:
                continue
            raw = [sum(talk[c, bi, pi, j] - base[bi, j + c] for c in range(qs.n_ahead_talk)) for pi in range(p)]
            baseline = sum(raw) / p
            for pi in range(p):
                reward = raw[pi] - baseline
                rewards[bi, pi, j] = max(reward, 0.0) if qs.clip_negative_rewards else reward
    return rewards


def reference_policy_gradient(qs: QuietStarConfig, rewards_BxPxN, eligible_BxN, position_grad):
    """-w / (#eligible thoughts) * sum over eligible (b, p, j) of reward * d(mean_s logp)/d(params),
    one position's gradient at a time (`position_grad(b, p, j)`)."""
    b, p, n = rewards_BxPxN.shape
    n_thoughts = p * int(eligible_BxN.sum())
    total = None
    for bi in range(b):
        for pi in range(p):
            for j in range(n):
                if eligible_BxN[bi, j]:
                    term = jax.tree.map(lambda g: rewards_BxPxN[bi, pi, j] * np.asarray(g, np.float64),
                                        position_grad(bi, pi, j))
                    total = term if total is None else jax.tree.map(np.add, total, term)
    return jax.tree.map(lambda acc: -qs.policy_loss_weight * acc / n_thoughts, total)


def setup(case: str):
    qs = QuietStarConfig(start_token_id=VOCAB - 2, end_token_id=VOCAB - 1, policy_loss_weight=POLICY_WEIGHT,
                         **CASES[case])
    params = make_params(CONFIG, qs, seed=1)
    tokens = jax.random.randint(jax.random.key(11), SEGMENTS.shape, 0, VOCAB - 2)
    return CONFIG, qs, params, tokens, jnp.asarray(SEGMENTS), jax.random.key(5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_gradient_is_the_literal_reinforce_gradient(case):
    config, qs, params, tokens, segments, rng = setup(case)
    r = jax.jit(rollout, static_argnums=(0, 1))(config, qs, params, tokens, segments, rng)
    eligible = eligible_positions(qs, SEGMENTS)
    rewards = reference_rewards(qs, r, eligible)
    # The fixture exercises every rule: rewards survive clipping, the rule's last position
    # and a position whose horizon crosses a document's end or padding score differently.
    assert np.count_nonzero(rewards) >= eligible.sum(), "too few non-zero rewards to test with"
    last = N - 2 - qs.n_ahead_talk if qs.policy_positions == "official" else N - 1 - qs.n_ahead_talk
    assert eligible[0, last] and not eligible[0, last + 1] and not eligible[0, 2] and not eligible[1, 0]

    # One thought's mean REINFORCE log-prob at (b, p, j), its tokens held fixed, through the
    # two-pass algorithm (whichever the loss runs); its gradient one position at a time.
    def thought_logp(params_, b, p, j):
        r_ = rollout(config, qs.replace(rollout_impl="two_pass"), params_, tokens, segments, rng, r.sampled_SxBxPxN)
        return r_.sample_logp_SxBxPxN.mean(axis=0)[b, p, j]

    position_grad = functools.partial(jax.jit(jax.grad(thought_logp)), params)
    expected = reference_policy_gradient(qs, rewards, eligible, position_grad)

    def loss_grad(params_, weight):
        return jax.grad(lambda p: quiet_star_loss(config, qs.replace(policy_loss_weight=weight), p, tokens, segments,
                                                  rng)[0])(params_)

    # The policy gradient: the loss's gradient with the policy weight, less that without it.
    actual = jax.jit(lambda p: jax.tree.map(jnp.subtract, loss_grad(p, POLICY_WEIGHT), loss_grad(p, 0.0)))(params)
    actual = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), actual)
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
    assert scale > 1e-3, "the reference policy gradient vanishes: nothing is compared"
    # Leaf by leaf, to 1% of its largest entry (a difference of two float32 gradients); where
    # the reference is 0 (the mixing head: the rewards are constants) to 1e-6 of the largest.
    for path, got in jax.tree_util.tree_leaves_with_path(actual):
        want = leaf_at(expected, path)
        np.testing.assert_allclose(got, want, atol=1e-2 * float(np.abs(want).max()) + 1e-6 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))

    terms = loss_terms(qs, r)
    np.testing.assert_array_equal(terms.eligible_BxN, eligible)
    np.testing.assert_allclose(terms.reward_BxPxN, rewards, atol=1e-5)


def leaf_at(tree, path):
    """The leaf of a params tree at a key path of `tree_leaves_with_path`."""
    for key in path:
        tree = tree[key.key]
    return tree


def test_shuffled_rewards_permute_the_scored_pairs_and_keep_each_pairs_passes_together():
    """The shuffled-reward control: the same rewards, on other (row, position) pairs of the
    batch; unscored pairs keep 0, and a pair's pass vector moves as one."""
    from qstar_jax.method.loss import shuffled_over_positions

    b, p, k = 3, 2, 7
    scored_BxK = jax.random.bernoulli(jax.random.key(0), 0.6, (b, k)).at[0, 0].set(False)
    pair_BxK = jnp.arange(b * k, dtype=jnp.float32).reshape(b, k) + 1.0
    reward_BxPxK = jnp.where(scored_BxK[:, None], jnp.stack([pair_BxK, -pair_BxK], axis=1), 0.0)
    moved = [np.asarray(shuffled_over_positions(reward_BxPxK, scored_BxK, jax.random.key(s))) for s in range(4)]
    scored = np.asarray(scored_BxK)
    for out in moved:
        assert (out.transpose(0, 2, 1)[~scored] == 0).all()
        np.testing.assert_array_equal(out[:, 1], -out[:, 0])  # the passes of a pair stay together
        np.testing.assert_array_equal(np.sort(out[:, 0][scored]), np.sort(np.asarray(pair_BxK)[scored]))
    assert any(not np.array_equal(out, np.asarray(reward_BxPxK)) for out in moved)  # really permuted
    assert not np.array_equal(moved[0], moved[1])  # a new draw per key


def test_shuffle_rewards_keeps_every_term_but_the_policy_loss():
    """Only the policy term sees the permutation: NLLs and the logged rewards are the
    unshuffled ones, and the policy loss changes (the rewards land on other thoughts)."""
    qs = QuietStarConfig(n_ahead=5, n_ahead_talk=2, n_passes=2, policy_loss_weight=POLICY_WEIGHT,
                         clip_negative_rewards=False, start_token_id=VOCAB - 2, end_token_id=VOCAB - 1)
    params = make_params(CONFIG, qs)
    tokens = jax.random.randint(jax.random.key(3), SEGMENTS.shape, 0, VOCAB - 2)
    loss = jax.jit(lambda q: quiet_star_loss(CONFIG, q, params, tokens, jnp.asarray(SEGMENTS), jax.random.key(4))[1],
                   static_argnums=0)
    plain, shuffled = loss(qs), loss(qs.replace(shuffle_rewards=True))
    for name in ("nll_base", "nll_talk", "reward_raw", "reward_baselined", "talk_gain"):
        np.testing.assert_allclose(shuffled[name], plain[name], rtol=1e-6, err_msg=name)
    assert abs(float(shuffled["policy_loss"]) - float(plain["policy_loss"])) > 1e-6 * abs(float(plain["policy_loss"]))
