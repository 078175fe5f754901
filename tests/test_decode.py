"""KV-cache generation, with and without thinking, equals recomputing everything from scratch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode_reference import reference_generate
from test_quiet_star import CONFIGS, QS, VOCAB, make_params
from qstar_jax.inference.decode import generate, generate_decoded
from qstar_jax.method.gate import think_gate_scores


def with_layers(config, layers: str):
    """The config with its layer stack scanned (a loop; decoding runs nn.scan and a stacked
    cache) or unrolled (decoding runs straight-line layers and per-layer caches)."""
    return config.replace(scan_unroll=1 if layers == "scanned" else config.num_layers)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("layers", ["scanned", "unrolled"])
def test_cached_generation_matches_no_cache_reference(thinking, temperature, layers):
    config = with_layers(CONFIGS["mistral_window"], layers)
    params = make_params(config)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, VOCAB - 2)
    rng = jax.random.key(11)
    tokens, thoughts = generate(config, QS, params, prompt, jnp.ones(prompt.shape, bool), rng, 4, temperature, thinking)
    ref_tokens, ref_thoughts = reference_generate(config, QS, params, prompt, rng, 4, temperature, thinking)
    np.testing.assert_array_equal(tokens, ref_tokens)
    if thinking:
        np.testing.assert_array_equal(thoughts, ref_thoughts)
        assert thoughts.shape == (2, 4, QS.n_sampled)


def test_thinking_changes_predictions_and_left_padding_is_harmless():
    config = CONFIGS["llama"]
    params = make_params(config)
    prompt = jax.random.randint(jax.random.key(2), (1, 6), 0, VOCAB - 2)
    rng = jax.random.key(3)
    padded = jnp.concatenate([jnp.zeros((1, 3), prompt.dtype), prompt], axis=1)
    valid = jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 6), bool)], axis=1)
    a, _ = generate(config, QS, params, prompt, jnp.ones(prompt.shape, bool), rng, 6, 0.0, True)
    b, _ = generate(config, QS, params, padded, valid, rng, 6, 0.0, True)
    np.testing.assert_array_equal(a, b)


def test_thought_tokens_are_never_generated():
    config = CONFIGS["llama"]
    params = make_params(config)
    lm_head_DxV = params["lm"]["lm_head"]["kernel"]
    boost = jnp.zeros(lm_head_DxV.shape).at[:, [QS.start_token_id, QS.end_token_id]].set(50.0)
    params["lm"]["lm_head"]["kernel"] = lm_head_DxV + boost  # the model now loves thought tokens
    prompt = jnp.arange(5)[None]
    for thinking in (True, False):
        tokens, thoughts = generate(config, QS, params, prompt, jnp.ones((1, 5), bool), jax.random.key(0), 8, 1.0, thinking)
        assert not np.isin(np.asarray(tokens), [QS.start_token_id, QS.end_token_id]).any()
        if thinking:
            assert not np.isin(np.asarray(thoughts), [QS.start_token_id, QS.end_token_id]).any()


def gated_params(config, seed=0):
    """A gated model whose gate is random (as after training, it scores positions apart)."""
    qs = QS.replace(think_gate="linear")
    params = make_params(config, qs, seed)
    kernel = params["think_gate"]["out"]["kernel"]
    params["think_gate"]["out"]["kernel"] = jax.random.normal(jax.random.key(seed + 7), kernel.shape)
    return qs, params


@pytest.mark.parametrize("layers", ["scanned", "unrolled"])
def test_gated_generation_thinks_where_the_gate_says_and_matches_the_reference(layers):
    """KV-cache exact with a think gate: a row thinks before a token only where the gate's
    score exceeds the threshold, and tokens and thoughts equal the no-cache reference's."""
    config = with_layers(CONFIGS["mistral_window"], layers)
    qs, params = gated_params(config)
    prompt = jax.random.randint(jax.random.key(1), (3, 5), 0, VOCAB - 2)
    valid, rng = jnp.ones(prompt.shape, bool), jax.random.key(11)
    threshold = float(np.median(think_gate_scores(config, qs, params, jax.random.normal(jax.random.key(5), (64, 32)))))
    decoded = generate_decoded(config, qs, params, prompt, valid, rng, 6, 1.0, True, threshold)
    ref_tokens, ref_thoughts = reference_generate(config, qs, params, prompt, rng, 6, 1.0, True, threshold)
    np.testing.assert_array_equal(decoded.tokens_BxM, ref_tokens)
    np.testing.assert_array_equal(decoded.thoughts_BxMxS, ref_thoughts)
    thought = np.asarray(decoded.thought_BxM)
    assert 0 < thought.mean() < 1, thought  # the test sees both kinds of token
    np.testing.assert_array_equal(thought, np.asarray(ref_thoughts)[:, :, 0] >= 0)


def test_extreme_thresholds_are_always_and_never_thinking():
    config = CONFIGS["llama"]
    qs, params = gated_params(config, seed=3)
    prompt = jax.random.randint(jax.random.key(4), (2, 5), 0, VOCAB - 2)
    valid, rng = jnp.ones(prompt.shape, bool), jax.random.key(2)
    always = generate_decoded(config, qs, params, prompt, valid, rng, 5, 1.0, True, float("-inf"))
    never = generate_decoded(config, qs, params, prompt, valid, rng, 5, 1.0, True, float("inf"))
    thinking, plain = generate(config, qs, params, prompt, valid, rng, 5, 1.0, True), \
        generate(config, qs, params, prompt, valid, rng, 5, 1.0, False)
    np.testing.assert_array_equal(always.tokens_BxM, thinking[0])
    np.testing.assert_array_equal(always.thoughts_BxMxS, thinking[1])
    np.testing.assert_array_equal(never.tokens_BxM, plain[0])
    assert np.asarray(always.thought_BxM).all() and not np.asarray(never.thought_BxM).any()
    assert (np.asarray(never.thoughts_BxMxS) == -1).all()


def _token_loop_inputs(jaxpr, new_tokens: int) -> list:
    """The loop-invariant inputs (shapes) of the token loop in `jaxpr`: the scan over
    `new_tokens` steps (a scanned layer stack's scans are over its layers)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == new_tokens:
            return [v.aval.shape for v in eqn.invars[:eqn.params["num_consts"]]]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found = _token_loop_inputs(sub, new_tokens)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize("layers", ["scanned", "unrolled"])
def test_an_unrolled_layer_stack_enters_the_token_loop_already_sliced(layers):
    """Decoding an unrolled stack slices each layer weight once per call, outside the token
    loop (XLA on CPU would otherwise copy every weight at every token, kv_cache.py); a
    scanned stack keeps its stacked weights (and its loop slices them per layer anyway)."""
    config = with_layers(CONFIGS["llama"], layers)
    params = make_params(config)
    prompt = jnp.zeros((1, 4), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: generate_decoded(config, QS, p, prompt, jnp.ones((1, 4), bool),
                                                      jax.random.key(0), 5, 0.0, True))(params)
    shapes = _token_loop_inputs(jaxpr.jaxpr, 5)
    stacked = params["lm"]["layers"]["gate_proj"]["kernel"].shape  # L x D x F
    assert (stacked in shapes) == (layers == "scanned")
    assert (stacked[1:] in shapes) == (layers == "unrolled")
