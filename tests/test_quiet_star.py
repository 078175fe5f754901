"""Quiet-STaR core: parallel == literal definition, isolation, init, gradient scale."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quiet_star_reference import reference_rollout
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.transformer import init_params
from qstar_jax.method.mixing import init_quiet_star_params
from qstar_jax.method.loss import loss_terms, quiet_star_loss
from qstar_jax.method.rollout import rollout

VOCAB = 50
QS = QuietStarConfig(n_ahead=6, n_ahead_talk=3, n_passes=2, start_token_id=VOCAB - 2, end_token_id=VOCAB - 1)
CONFIGS = {
    "llama": ModelConfig("llama", VOCAB, 32, 64, 2, 4, 2, 8),
    # A window shorter than prefix + thought, so thought tokens lose early base keys.
    "mistral_window": ModelConfig("mistral", VOCAB, 32, 64, 2, 4, 2, 8, sliding_window=6),
    "qwen2_tied": ModelConfig("qwen2", VOCAB, 32, 64, 2, 4, 1, 8, qkv_bias=True, tie_word_embeddings=True),
}
jit_rollout = jax.jit(rollout, static_argnums=(0, 1))


def make_params(config, qs=QS, seed=0, trained_head=True):
    lm = init_params(config, jax.random.key(seed))
    params = init_quiet_star_params(config, qs, lm, lm["embed_tokens"]["embedding"][3], jax.random.key(seed + 1))
    if trained_head:  # a non-zero last layer, as after training, so thoughts matter
        out = params["mixing_head"]["out"]["kernel"]
        params["mixing_head"]["out"]["kernel"] = 0.5 * jax.random.normal(jax.random.key(seed + 2), out.shape)
    return params


def make_batch(b=2, n=9, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, n), 0, VOCAB - 2)
    valid = jnp.ones((b, n), bool).at[1, :3].set(False)  # left padding in row 1
    valid = valid.at[0, -2:].set(False)  # right padding in row 0
    return tokens, valid


IMPLEMENTATIONS = {  # (rollout_impl, attention_impl)
    "scan_parallel": ("scan", "parallel"), "scan_dense_mask": ("scan", "dense_mask"), "two_pass": ("two_pass", "parallel"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_parallel_equals_literal_definition(name, impl):
    # Unit policy weight: the official 1e6 would amplify float32 summation-order noise
    # (~1e-6 in log-probs) a millionfold; every ingredient is compared at 1e-5 either way.
    rollout_impl, attention_impl = IMPLEMENTATIONS[impl]
    config = CONFIGS[name]
    qs = QS.replace(rollout_impl=rollout_impl, attention_impl=attention_impl, policy_loss_weight=1.0)
    params = make_params(config, qs)
    tokens, valid = make_batch()
    rng = jax.random.key(7)
    fast = jit_rollout(config, qs, params, tokens, valid, rng)
    slow = reference_rollout(config, qs, params, tokens, valid, rng)
    real_BxPxN = np.asarray(valid)[:, None, :]  # thoughts at padding are never used
    np.testing.assert_array_equal(np.where(real_BxPxN, fast.sampled_SxBxPxN, 0), np.where(real_BxPxN, slow.sampled_SxBxPxN, 0))
    for field in ("sample_logp_SxBxPxN", "talk_logp_CxBxPxN", "mixing_weight_CxBxPxN"):
        a, b = np.asarray(getattr(fast, field)), np.asarray(getattr(slow, field))
        np.testing.assert_allclose(np.where(real_BxPxN, a, 0), np.where(real_BxPxN, b, 0), atol=1e-5, err_msg=field)
    np.testing.assert_allclose(fast.base_logp_BxN, slow.base_logp_BxN, atol=1e-5)
    fast_terms, slow_terms = loss_terms(qs, fast), loss_terms(qs, jax.tree.map(jnp.asarray, slow))
    np.testing.assert_allclose(fast_terms.reward_BxPxN, slow_terms.reward_BxPxN, atol=1e-5)
    np.testing.assert_allclose(fast_terms.loss, slow_terms.loss, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(fast_terms.reward_BxPxN).max()) > 0  # rewards are really compared
    assert len(np.unique(np.asarray(fast.sampled_SxBxPxN))) > 5  # thoughts are really sampled


def test_thoughts_of_one_position_affect_only_that_position():
    config = CONFIGS["mistral_window"]
    params = make_params(config)
    tokens, valid = make_batch(n=10)
    valid = jnp.ones_like(valid)
    rng = jax.random.key(3)
    thoughts = jit_rollout(config, QS, params, tokens, valid, rng).sampled_SxBxPxN
    j = 4
    changed = thoughts.at[:, 0, 1, j].set((thoughts[:, 0, 1, j] + 7) % (VOCAB - 2))
    a = jit_rollout(config, QS, params, tokens, valid, rng, thoughts)
    b = jit_rollout(config, QS, params, tokens, valid, rng, changed)
    for field in ("talk_logp_CxBxPxN", "mixing_weight_CxBxPxN", "sample_logp_SxBxPxN"):
        diff = np.abs(np.asarray(getattr(a, field)) - np.asarray(getattr(b, field)))
        assert diff[..., 0, 1, j].max() > 1e-4, field  # the changed thought matters...
        diff[..., 0, 1, j] = 0
        assert diff.max() == 0.0, field  # ...and nothing else moves, not even by rounding


def test_future_tokens_do_not_affect_earlier_positions():
    config = CONFIGS["llama"]
    params = make_params(config)
    tokens, valid = make_batch(n=12)
    valid = jnp.ones_like(valid)
    j = 3
    m = j + QS.n_ahead_talk + 1  # first token position j's terms must not see
    changed = tokens.at[:, m:].set((tokens[:, m:] + 5) % (VOCAB - 2))
    rng = jax.random.key(4)
    a, b = (jit_rollout(config, QS, params, t, valid, rng) for t in (tokens, changed))
    ta, tb = loss_terms(QS, a), loss_terms(QS, b)
    for x, y in [(a.sampled_SxBxPxN, b.sampled_SxBxPxN), (a.sample_logp_SxBxPxN, b.sample_logp_SxBxPxN),
                 (a.talk_logp_CxBxPxN, b.talk_logp_CxBxPxN), (ta.reward_BxPxN, tb.reward_BxPxN)]:
        np.testing.assert_allclose(np.asarray(x)[..., : j + 1], np.asarray(y)[..., : j + 1], atol=1e-6)
    assert np.abs(np.asarray(a.talk_logp_CxBxPxN) - np.asarray(b.talk_logp_CxBxPxN))[..., m - 1 :].max() > 1e-4


def test_at_init_mixed_prediction_is_base_and_policy_loss_is_zero():
    config = CONFIGS["llama"]
    params = make_params(config, trained_head=False)
    tokens, valid = make_batch()
    r = jit_rollout(config, QS, params, tokens, valid, jax.random.key(0))
    assert float(jnp.abs(r.mixing_weight_CxBxPxN).max()) == 0.0
    for c in range(QS.n_ahead_talk):
        base_shifted = np.asarray(r.base_logp_BxN)[:, c:]
        talk = np.asarray(r.talk_logp_CxBxPxN)[c][:, :, : base_shifted.shape[1]]
        np.testing.assert_array_equal(talk, np.broadcast_to(base_shifted[:, None], talk.shape))
    terms = loss_terms(QS, r)
    assert float(terms.policy_loss) == 0.0 and float(terms.talk_gain) == 0.0


def test_loss_terms_match_hand_computation():
    """Two passes, one position with a complete talk horizon: check every formula by hand.
    Under the official policy positions (j <= N-2-C = -1 here) no position is scored."""
    qs = QuietStarConfig(n_ahead=4, n_ahead_talk=2, n_passes=2, start_token_id=0, end_token_id=1,
                         policy_loss_weight=10.0, base_loss_weight=0.25, policy_positions="full_horizon")
    from qstar_jax.method.heads import Rollout

    base = jnp.array([[-1.0, -2.0, -3.0]])  # B=1, N=3
    valid_c = jnp.array([[[True, True, False]], [[True, False, False]]])  # C=2: only j=0 complete
    talk = jnp.array([[[[-0.5, -1.0, 0.0], [-1.5, -3.0, 0.0]]], [[[-1.0, 0.0, 0.0], [-2.5, 0.0, 0.0]]]])
    sample_logp = jnp.array([[[[-0.2, -0.4, -0.6], [-0.3, -0.5, -0.7]]]])
    r = Rollout(base, valid_c, jnp.zeros((1, 1, 2, 3), jnp.int32), sample_logp, talk, jnp.zeros_like(talk))
    t = loss_terms(qs, r)
    # j=0 gains: pass0 (-0.5+1)+(-1+2)=1.5, pass1 (-1.5+1)+(-2.5+2)=-1.0; mean 0.25
    np.testing.assert_allclose(t.reward_BxPxN[0, :, 0], [1.25, 0.0])
    np.testing.assert_allclose(t.policy_loss, 10.0 * (-(1.25 * -0.2) - 0.0) / 2)
    nll_base = (1.0 + 2.0) / 2
    nll_talk = ((0.5 + 1.0 + 1.5 + 3.0) / 4 + (1.0 + 2.5) / 2) / 2
    np.testing.assert_allclose(t.nll_base, nll_base)
    np.testing.assert_allclose(t.nll_talk, nll_talk)
    np.testing.assert_allclose(t.loss, 0.25 * nll_base + 0.75 * nll_talk + t.policy_loss, rtol=1e-6)
    np.testing.assert_allclose(t.raw_reward_BxPxN[0, :, 0], [1.5, -1.0])  # the official logged reward
    official = loss_terms(qs.replace(policy_positions="official"), r)
    assert not bool(official.eligible_BxN.any()) and float(official.policy_loss) == 0.0
    np.testing.assert_allclose(official.nll_talk, nll_talk)  # the NLL terms do not depend on the cut


def test_thought_embedding_gradient_is_scaled():
    config = CONFIGS["llama"]
    tokens, valid = make_batch()
    grads = {}
    for scale in (1.0, 100.0):
        # (e / 100) * 100 differs from e by rounding; a unit policy weight keeps that from
        # being amplified a millionfold, which would hide what this test checks.
        qs = QS.replace(embedding_scale=scale, policy_loss_weight=1.0)
        params = make_params(config, qs)
        loss = lambda p: quiet_star_loss(config, qs, p, tokens, valid, jax.random.key(5))[0]
        grads[scale] = jax.jit(jax.grad(loss))(params)["thought"]  # one compile, not one per op
    assert float(jnp.abs(grads[1.0]["start"]).max()) > 0
    for name in ("start", "end"):
        np.testing.assert_allclose(grads[100.0][name], 100.0 * grads[1.0][name], rtol=1e-4, atol=1e-6)


def test_bad_thought_ids_are_a_clear_error():
    from qstar_jax.errors import UserError

    config = CONFIGS["llama"]
    params = make_params(config)
    tokens, valid = make_batch()
    with pytest.raises(UserError, match="thought token ids"):
        rollout(config, QS.replace(start_token_id=-1), params, tokens, valid, jax.random.key(0))


def test_the_train_step_names_the_first_state_a_checkpoint_must_not_hold():
    """A NaN update: the step's loss (from the good state 0) is finite but the state it makes
    is not, so state 1 is the first bad one; the next step's loss, computed from that state,
    is not finite either, and it names state 1 again by that cause. The trainer keeps the
    earliest of these and never saves a state at or after it."""
    import optax

    from qstar_jax.training.step import FIRST_BAD_STATE, NO_BAD_STATE, init_train_state, make_train_step

    config = CONFIGS["llama"]
    poisoned = optax.chain(optax.sgd(1e-3), optax.scale(jnp.nan))
    state = init_train_state(init_params(config, jax.random.key(0)), poisoned, jax.random.key(0))
    step = make_train_step(config, None, poisoned)
    tokens, valid = make_batch()
    state, metrics = step(state, tokens[None], valid[None])
    assert np.isfinite(float(metrics["loss"]))
    assert metrics[FIRST_BAD_STATE].tolist() == [NO_BAD_STATE, 1]
    state, metrics = step(state, tokens[None], valid[None])
    assert metrics[FIRST_BAD_STATE].tolist() == [1, 2]


def test_training_on_a_fixed_batch_lowers_the_loss():
    from qstar_jax.training.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

    config = CONFIGS["llama"]
    # The official policy weight (1e6) is paired with lr 1e-6; at this test's lr 1e-3 a
    # unit weight keeps the policy gradient from swamping the NLL gradient after clipping.
    qs = QS.replace(n_ahead=5, n_ahead_talk=2, policy_loss_weight=1.0)
    params = make_params(config, qs, trained_head=False)
    start_before = np.asarray(params["thought"]["start"])  # params are donated below
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=2, total_steps=30))
    state = init_train_state(params, optimizer, jax.random.key(0))
    step = make_train_step(config, qs, optimizer)
    tokens, valid = make_batch(b=4, n=12)
    tokens_AxBxN, valid_AxBxN = tokens.reshape(2, 2, 12), valid.reshape(2, 2, 12)  # 2 micro-batches
    losses = []
    for _ in range(30):
        state, metrics = step(state, tokens_AxBxN, valid_AxBxN)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(losses[-1])
    assert int(state.step) == 30
    assert losses[-1] < 0.8 * losses[0]
    assert float(jnp.abs(state.params["mixing_head"]["out"]["kernel"]).max()) > 0  # the head learned
    assert float(np.abs(np.asarray(state.params["thought"]["start"]) - start_before).max()) > 0


def test_decay_mask_selects_weight_matrices_only():
    from qstar_jax.training.step import decay_mask

    params = make_params(CONFIGS["qwen2_tied"])
    mask = decay_mask(params)
    assert mask["lm"]["layers"]["q_proj"]["kernel"] and mask["lm"]["embed_tokens"]["embedding"]
    assert not mask["lm"]["layers"]["q_proj"]["bias"] and not mask["lm"]["layers"]["attn_norm"]["scale"]
    assert not mask["thought"]["start"] and mask["mixing_head"]["out"]["kernel"]


def test_sampler_follows_the_softmax_distribution():
    from qstar_jax.method.sampling import sample_thought_tokens

    probs = np.array([0.05, 0.2, 0.0, 0.3, 0.15, 0.1, 0.2])  # 7 ids: blocks of 3, one id a padded block
    logits = jnp.log(jnp.asarray(np.tile(probs, (40000, 1)))) * 2.0  # temperature 2 undoes the x2
    tokens = np.asarray(sample_thought_tokens(logits, jax.random.uniform(jax.random.key(0), (40000,)), 2.0))
    freq = np.bincount(tokens, minlength=7) / len(tokens)
    np.testing.assert_allclose(freq, probs, atol=0.01)
    assert freq[2] == 0.0


def test_logit_chunking_does_not_change_results():
    config = CONFIGS["llama"]
    params = make_params(config)
    tokens, valid = make_batch(n=11)  # 2 * 2 * 11 = 44 rows: chunks of 8 leave a remainder
    rng = jax.random.key(9)
    whole = jit_rollout(config, QS.replace(logits_chunk_rows=0), params, tokens, valid, rng)
    chunked = jit_rollout(config, QS.replace(logits_chunk_rows=8), params, tokens, valid, rng)
    np.testing.assert_array_equal(whole.sampled_SxBxPxN, chunked.sampled_SxBxPxN)
    assert whole.talk_logdist_BxPxNxV is None  # only asked for by the NTP teacher
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), whole, chunked)


def test_layer_remat_and_unroll_do_not_change_gradients():
    config = CONFIGS["llama"]
    params = make_params(config)
    tokens, valid = make_batch()
    # Unit policy weight: the official 1e6 amplifies float32 reassociation noise (which
    # differs between CPUs) past any fixed tolerance; remat/unroll change nothing else.
    qs = QS.replace(policy_loss_weight=1.0)
    grad = lambda c: jax.jit(jax.grad(lambda p: quiet_star_loss(c, qs, p, tokens, valid, jax.random.key(5))[0]))(
        params)
    plain = grad(config)
    for variant in (config.replace(remat=True), config.replace(scan_unroll=2)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad(variant), plain)


def test_targets_are_the_next_true_tokens():
    """Target alignment checked without `talk_targets`: at init (mixing weight 0) talk step c
    at position j scores x_{j+1+c} with the base model's own log-prob given x_<=j+c, taken
    here from plain LM logits; the base term scores x_{j+1} given x_<=j."""
    from qstar_jax.models.transformer import apply_lm

    config = CONFIGS["llama"]
    params = make_params(config, trained_head=False)
    tokens, _ = make_batch()
    segments = jnp.ones(tokens.shape, jnp.int32)
    r = jit_rollout(config, QS, params, tokens, segments, jax.random.key(2))
    logp_BxNxV = np.asarray(jax.nn.log_softmax(apply_lm(config, params["lm"], tokens)))
    t_BxN = np.asarray(tokens)
    b, n = t_BxN.shape
    rows = np.arange(b)
    for j in range(n - 1):
        np.testing.assert_allclose(r.base_logp_BxN[:, j], logp_BxNxV[rows, j, t_BxN[:, j + 1]], atol=1e-5)
    for c in range(QS.n_ahead_talk):
        for j in range(n - 1 - c):
            expected_B = logp_BxNxV[rows, j + c, t_BxN[:, j + 1 + c]]
            np.testing.assert_allclose(r.talk_logp_CxBxPxN[c][:, :, j], np.repeat(expected_B[:, None], QS.n_passes, 1),
                                       atol=1e-5, err_msg=f"talk step {c}, position {j}")
        assert np.asarray(r.target_valid_CxBxN[c])[:, : n - 1 - c].all()
        assert not np.asarray(r.target_valid_CxBxN[c])[:, n - 1 - c :].any()


def test_packed_documents_do_not_see_each_other():
    """Two documents packed in one row (segments 1, 2) give exactly what each gives alone in
    its own padded row: no attention, thought or talk target crosses the boundary, and
    positions restart at the second document."""
    config = CONFIGS["mistral_window"]
    params = make_params(config)
    la, lb = 5, 7
    n = la + lb
    packed_tokens = jax.random.randint(jax.random.key(11), (1, n), 0, VOCAB - 2)
    packed_segments = jnp.asarray([[1] * la + [2] * lb], jnp.int32)
    alone_tokens = jnp.zeros((2, n), jnp.int32).at[0, :la].set(packed_tokens[0, :la]).at[1, :lb].set(packed_tokens[0, la:])
    alone_segments = jnp.zeros((2, n), jnp.int32).at[0, :la].set(1).at[1, :lb].set(1)
    rng = jax.random.key(12)
    packed = jit_rollout(config, QS, params, packed_tokens, packed_segments, rng)
    thoughts = packed.sampled_SxBxPxN
    alone_thoughts = jnp.zeros(thoughts.shape[:1] + (2,) + thoughts.shape[2:], jnp.int32)
    alone_thoughts = alone_thoughts.at[:, 0, :, :la].set(thoughts[:, 0, :, :la]).at[:, 1, :, :lb].set(thoughts[:, 0, :, la:])
    alone = jit_rollout(config, QS, params, alone_tokens, alone_segments, rng, alone_thoughts)
    def documents(r, packed_row: bool):
        """Each field's two documents (row axis dropped): split at la in the packed row, or
        rows 0 and 1 of the alone batch."""
        out = {}
        for field in r._fields:
            if getattr(r, field) is None:  # optional outputs this rollout was not asked for
                continue
            x = np.asarray(getattr(r, field))
            x = np.moveaxis(x, 0 if field == "base_logp_BxN" else 1, 0)  # rows first
            out[field] = [x[0][..., :la], x[0][..., la:]] if packed_row else [x[0][..., :la], x[1][..., :lb]]
        return out

    got, want = documents(packed, True), documents(alone, False)
    for d in range(2):
        target_CxN = got["target_valid_CxBxN"][d]
        np.testing.assert_array_equal(target_CxN, want["target_valid_CxBxN"][d])
        masks = {"base_logp_BxN": target_CxN[0],  # scored where x_{j+1} is in the same document
                 "sample_logp_SxBxPxN": np.ones(target_CxN.shape[-1], bool),  # every real position thinks
                 "talk_logp_CxBxPxN": target_CxN[:, None], "mixing_weight_CxBxPxN": target_CxN[:, None]}
        for field, mask in masks.items():
            np.testing.assert_allclose(np.where(mask, got[field][d], 0), np.where(mask, want[field][d], 0),
                                       atol=1e-5, err_msg=f"{field}, document {d}")
    # The first document's last position has no target (the next token is another document's).
    assert not bool(packed.target_valid_CxBxN[0, 0, la - 1]) and bool(packed.target_valid_CxBxN[0, 0, la - 2])


def test_positions_restart_at_each_segment():
    from qstar_jax.models.transformer import positions_from_segments

    segments = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
    np.testing.assert_array_equal(positions_from_segments(segments)[:, :6], [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]])
    left_padded = jnp.asarray([[False, False, True, True, True]])
    np.testing.assert_array_equal(positions_from_segments(left_padded), [[0, 0, 0, 1, 2]])


def test_a_lone_thought_is_rewarded_by_its_raw_gain():
    """n_passes = 1: no sibling mean to subtract (it would make every reward 0); the reward
    is the thought's own gain over the base, clipped at 0, as in the official code."""
    from qstar_jax.method.heads import Rollout

    qs = QuietStarConfig(n_ahead=4, n_ahead_talk=1, n_passes=1, start_token_id=0, end_token_id=1,
                         policy_positions="full_horizon")
    base = jnp.array([[-1.0, -2.0, -3.0]])
    valid_c = jnp.array([[[True, True, False]]])
    talk = jnp.array([[[[-0.25, -2.5, 0.0]]]])  # gains +0.75 and -0.5
    r = Rollout(base, valid_c, jnp.zeros((1, 1, 1, 3), jnp.int32), jnp.full((1, 1, 1, 3), -0.5), talk,
                jnp.zeros_like(talk))
    np.testing.assert_allclose(loss_terms(qs, r).reward_BxPxN[0, 0], [0.75, 0.0, 0.0])
    np.testing.assert_allclose(loss_terms(qs.replace(clip_negative_rewards=False), r).reward_BxPxN[0, 0],
                               [0.75, -0.5, 0.0])
    assert float(loss_terms(qs, r).policy_loss) != 0.0
    official = qs.replace(policy_positions="official", clip_negative_rewards=False)  # j <= N-2-C = 0
    np.testing.assert_allclose(loss_terms(official, r).reward_BxPxN[0, 0], [0.75, 0.0, 0.0])


def test_a_nonnegative_mixing_weight_is_the_magnitude_and_learns_from_init():
    """`nonnegative_mixing_weight`: w = |MLP output|, so a head that turns negative mixes
    the thought in with the positive weight instead of inverting the reward; where the
    output is positive nothing changes; the zero-initialised head still gets a gradient."""
    config, tokens_valid = CONFIGS["llama"], make_batch()
    qs = QS.replace(policy_loss_weight=1.0)
    nonneg = qs.replace(nonnegative_mixing_weight=True)
    params = make_params(config, qs)
    flipped = jax.tree.map(lambda x: x, params)
    flipped["mixing_head"]["out"]["kernel"] = -params["mixing_head"]["out"]["kernel"]
    free = jit_rollout(config, qs, params, *tokens_valid, jax.random.key(0))
    free_flipped = jit_rollout(config, qs, flipped, *tokens_valid, jax.random.key(0))
    magnitude = jit_rollout(config, nonneg, params, *tokens_valid, jax.random.key(0))
    w_free = np.asarray(free.mixing_weight_CxBxPxN)
    assert (w_free < 0).any() and (w_free > 0).any()  # the test head takes both signs
    np.testing.assert_allclose(magnitude.mixing_weight_CxBxPxN, np.abs(w_free), atol=1e-6)
    # Thoughts do not depend on the head, so each position's talk prediction is the
    # unsquashed one where w > 0 and the one with the head's sign flipped where w < 0.
    expected = np.where(w_free > 0, free.talk_logp_CxBxPxN, free_flipped.talk_logp_CxBxPxN)
    np.testing.assert_allclose(magnitude.talk_logp_CxBxPxN, expected, atol=1e-5)

    at_init = make_params(config, nonneg, trained_head=False)
    grad = jax.grad(lambda p: quiet_star_loss(config, nonneg, p, *tokens_valid, jax.random.key(0))[0])(at_init)
    assert float(jnp.abs(grad["mixing_head"]["out"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_pass_gradients_equal_the_scan_gradients(name):
    """The two-pass rollout differentiates one teacher-forced pass over the thoughts the
    forward-only scan sampled; its gradient (every parameter) is the scan path's."""
    config = CONFIGS[name]
    qs = QS.replace(policy_loss_weight=1.0)
    params = make_params(config, qs)
    tokens, valid = make_batch()
    grads = {impl: jax.jit(jax.grad(lambda p, q=qs.replace(rollout_impl=impl): quiet_star_loss(
        config, q, p, tokens, valid, jax.random.key(5))[0]))(params) for impl in ("scan", "two_pass")}
    for path, scan_leaf in jax.tree_util.tree_leaves_with_path(grads["scan"]):
        two_pass_leaf = functools.reduce(lambda node, key: node[key.key], path, grads["two_pass"])
        np.testing.assert_allclose(two_pass_leaf, scan_leaf, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    assert float(jnp.abs(grads["scan"]["thought"]["start"]).max()) > 0  # the thoughts' gradient is compared
    # The NTP teacher's whole talk distribution, too.
    dists = [rollout(config, qs.replace(rollout_impl=impl), params, tokens, valid, jax.random.key(5),
                     talk_distribution=True).talk_logdist_BxPxNxV for impl in ("scan", "two_pass")]
    np.testing.assert_allclose(dists[1], dists[0], atol=1e-5)


def test_two_pass_rejects_the_dense_mask_attention():
    from qstar_jax.errors import UserError

    with pytest.raises(UserError, match="attention_impl='dense_mask' runs only with rollout_impl='scan'"):
        QS.replace(rollout_impl="two_pass", attention_impl="dense_mask")
    with pytest.raises(UserError, match="rollout_impl must be 'scan' or 'two_pass', got 'fast'"):
        QS.replace(rollout_impl="fast")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_think_gate_learns_the_gain_and_leaves_every_other_gradient_alone(kind):
    """The gate regresses the realised gain before the baseline (mean over passes) at each
    eligible position; its input and target are stop-gradient, so the LM, mixing head and
    thought embeddings get exactly the gradients they get without a gate."""
    config = CONFIGS["llama"]
    qs = QS.replace(think_gate=kind)
    params = make_params(config, qs)
    kernel = params["think_gate"]["out"]["kernel"]
    params["think_gate"]["out"]["kernel"] = jax.random.normal(jax.random.key(9), kernel.shape)
    tokens, valid = make_batch()
    rng = jax.random.key(4)
    grad = jax.jit(jax.grad(lambda p, q: quiet_star_loss(config, q, p, tokens, valid, rng)[0]), static_argnums=1)
    gated = grad(params, qs)
    plain = grad({k: v for k, v in params.items() if k != "think_gate"}, QS)
    for part in ("lm", "mixing_head", "thought"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), gated[part], plain[part])
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(gated["think_gate"]["out"]))

    r = jit_rollout(config, qs, params, tokens, valid, rng)
    c = r.target_valid_CxBxN.shape[0]
    base_CxBxN = jnp.stack([jnp.concatenate([r.base_logp_BxN[:, i:], jnp.zeros((2, i))], 1) for i in range(c)])
    gain_BxN = jnp.where(r.target_valid_CxBxN[:, :, None], r.talk_logp_CxBxPxN - base_CxBxN[:, :, None], 0.0
                         ).sum(0).mean(1)
    n = r.target_valid_CxBxN.shape[2]  # the official policy positions: j <= N-2-C, whole horizon real
    eligible_BxN = r.target_valid_CxBxN.all(0) & (jnp.arange(n) <= n - 2 - c)[None, :]
    expected = jnp.sum(jnp.where(eligible_BxN, (r.think_gate_BxN - gain_BxN) ** 2, 0.0)) / eligible_BxN.sum()
    _, metrics = quiet_star_loss(config, qs, params, tokens, valid, rng)
    np.testing.assert_allclose(metrics["think_gate_loss"], expected, rtol=1e-5)
    assert float(metrics["think_gate_loss"]) > 0


def test_a_gate_is_added_to_params_without_one_and_dropped_when_off():
    from qstar_jax.method.gate import with_think_gate
    from qstar_jax.training.setup import prepare_method
    from experiments import tiny_cpu
    from qstar_jax.tokenizer import START_THOUGHT, END_THOUGHT

    config = CONFIGS["llama"]
    params = make_params(config)  # trained without a gate
    assert "think_gate" not in params and with_think_gate(config, QS, params, jax.random.key(0)) is params
    gated = with_think_gate(config, QS.replace(think_gate="mlp"), params, jax.random.key(0))
    assert set(gated["think_gate"]) == {"hidden", "out"} and not jnp.any(gated["think_gate"]["out"]["kernel"])

    class Ids:  # the two thought ids where a grown tokenizer puts them
        def token_id(self, token):
            return {START_THOUGHT: QS.start_token_id, END_THOUGHT: QS.end_token_id}[token]

    cfg = tiny_cpu.get_config()
    cfg.quiet_star.think_gate = "linear"
    _, qs, with_gate, _ = prepare_method(cfg, config, params, Ids())
    assert qs.think_gate == "linear" and "think_gate" in with_gate
    cfg.quiet_star.think_gate = ""
    assert "think_gate" not in prepare_method(cfg, config, with_gate, Ids())[2]


@pytest.mark.parametrize("change,message", [
    (dict(think_gate="big"), "think_gate must be one of '', 'linear', 'mlp', got 'big'"),
    (dict(think_share=0.0), "think_share must be in (0, 1] and think_explore in [0, 1], got 0.0 and 0.1"),
    (dict(think_explore=2.0), "think_share must be in (0, 1] and think_explore in [0, 1], got 1.0 and 2.0"),
    (dict(think_gate_loss_weight=-1.0), "think_gate_loss_weight must be >= 0, got -1.0"),
])
def test_bad_think_gate_settings_are_one_line(change, message):
    from qstar_jax.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        QS.replace(**change)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_gated_training_is_the_literal_definition_at_the_chosen_sites(impl):
    """Thinking at K chosen positions only (think_share < 1) gives, at each of them, what
    thinking everywhere gives there (which equals the literal definition, above), with the
    selection and the thoughts forced to the same tokens; the objective's reward at a site
    is the same too."""
    rollout_impl, attention_impl = IMPLEMENTATIONS[impl]
    config = CONFIGS["mistral_window"]  # the window makes the masks depend on each site's position
    qs = QS.replace(rollout_impl=rollout_impl, attention_impl=attention_impl, policy_loss_weight=1.0)
    params = make_params(config, qs)
    tokens, valid = make_batch()
    rng = jax.random.key(7)
    full = jit_rollout(config, qs, params, tokens, valid, rng)
    sites_BxK = jnp.asarray([[0, 2, 5, 6], [3, 4, 7, 8]], jnp.int32)
    at_sites = lambda x_xBxPxN: jnp.take_along_axis(x_xBxPxN, sites_BxK[None, :, None, :], axis=-1)
    gated_qs = qs.replace(think_share=4 / 9)
    gated = jax.jit(rollout, static_argnums=(0, 1, 7))(config, gated_qs, params, tokens, valid, rng,
                                                       at_sites(full.sampled_SxBxPxN), False, sites_BxK)
    np.testing.assert_array_equal(gated.site_index_BxK, sites_BxK)
    for field in ("sample_logp_SxBxPxN", "talk_logp_CxBxPxN", "mixing_weight_CxBxPxN"):
        np.testing.assert_allclose(getattr(gated, field), at_sites(getattr(full, field)), atol=1e-5, err_msg=field)
    np.testing.assert_allclose(gated.base_logp_BxN, full.base_logp_BxN, atol=1e-6)
    full_terms, gated_terms = loss_terms(qs, full), loss_terms(gated_qs, gated)
    np.testing.assert_allclose(gated_terms.reward_BxPxN, at_sites(full_terms.reward_BxPxN[None])[0], atol=1e-5)
    np.testing.assert_allclose(gated_terms.nll_base, full_terms.nll_base, rtol=1e-6)
    # nll_next covers every position: the post-thought prediction at a site, the base one elsewhere
    from qstar_jax.method.loss import next_token_nll_BxN

    nll_BxN = np.asarray(next_token_nll_BxN(gated))
    at_site_BxK = np.take_along_axis(nll_BxN, np.asarray(sites_BxK), axis=1)
    np.testing.assert_allclose(at_site_BxK, -at_sites(full.talk_logp_CxBxPxN)[0].mean(axis=1), atol=1e-5)
    elsewhere_BxN = np.ones(nll_BxN.shape, bool)
    np.put_along_axis(elsewhere_BxN, np.asarray(sites_BxK), False, axis=1)
    np.testing.assert_allclose(nll_BxN[elsewhere_BxN], -np.asarray(full.base_logp_BxN)[elsewhere_BxN], atol=1e-6)


def test_sites_are_the_gates_top_choices_plus_exploration():
    from qstar_jax.method.gate import choose_sites

    qs = QS.replace(think_share=0.5, think_explore=0.25)
    gate_BxN = jnp.asarray([[5.0, 1.0, 9.0, 2.0, 8.0, 0.0, 7.0, 3.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    eligible_BxN = jnp.ones((2, 8), bool).at[1, 6:].set(False)  # row 1's last two cannot be rewarded
    seen = set()
    for seed in range(20):
        sites = np.asarray(choose_sites(qs, gate_BxN, eligible_BxN, jax.random.key(seed)))
        assert sites.shape == (2, 4) and (np.diff(sites, axis=1) > 0).all()  # K = 4 distinct, ascending
        assert {2, 4, 6} <= set(sites[0]) and {3, 4, 5} <= set(sites[1])  # the top 3 eligible by the gate
        assert not {6, 7} & set(sites[1])  # eligible positions come first
        seen.add(tuple(sites[0]))
    assert len(seen) > 1  # the fourth is explored at random
    random_sites = np.asarray(choose_sites(qs, None, eligible_BxN, jax.random.key(0)))  # no gate: all random
    assert random_sites.shape == (2, 4) and not {6, 7} & set(random_sites[1])


def test_the_think_gate_is_clipped_on_its_own():
    """make_optimizer clips the gate's gradient by its own global norm: a huge gate gradient
    leaves the other parameters' update exactly as without a gate."""
    from qstar_jax.training.step import OptimizerConfig, make_optimizer

    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, grad_clip_norm=1.0))
    params = {"lm": {"w": jnp.ones((3,))}, "think_gate": {"out": {"kernel": jnp.ones((3, 1))}}}
    grads = {"lm": {"w": jnp.asarray([0.3, -0.2, 0.1])}, "think_gate": {"out": {"kernel": jnp.full((3, 1), 1e4)}}}
    plain = {"lm": params["lm"]}
    with_gate, _ = optimizer.update(grads, optimizer.init(params), params)
    without, _ = optimizer.update({"lm": grads["lm"]}, optimizer.init(plain), plain)
    np.testing.assert_array_equal(with_gate["lm"]["w"], without["lm"]["w"])
    assert bool(jnp.all(jnp.isfinite(with_gate["think_gate"]["out"]["kernel"])))
