"""The literal, slow definition of Quiet-STaR, for tests only.

Each (row b, pass p, position j) is its own sequence: the real tokens x_0..x_j, then that
position's thought (start, sampled tokens, end), then the teacher-forced talk tokens, run
through the plain causal LM step by step. No thought attention tricks, no cache: what the
parallel implementation must reproduce.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.transformer import AttentionInputs, Transformer, forward, positions_from_valid
from qstar_jax.method.heads import Rollout
from qstar_jax.method.sampling import mask_thought_tokens, sample_thought_tokens, thought_uniforms
from qstar_jax.method.mixing import mixing_head_module
from qstar_jax.method.base_pass import talk_targets


@functools.partial(jax.jit, static_argnames=("config",))
def _hidden(config, lm_params, x_RxLxD, positions_RxL, valid_RxL):
    h, _ = Transformer(config).apply(
        {"params": lm_params}, x_RxLxD, AttentionInputs(positions_RxL, valid_RxL), method=Transformer.transform
    )
    return h


def _apply(config, lm_params, method, *args):
    return Transformer(config).apply({"params": lm_params}, *args, method=method)


def reference_rollout(config: ModelConfig, qs: QuietStarConfig, params, tokens_BxN, valid_BxN, rng) -> Rollout:
    lm = params["lm"]
    b, n = tokens_BxN.shape
    p, c_talk = qs.n_passes, qs.n_ahead_talk
    tokens_BxN, valid_BxN = np.asarray(tokens_BxN), np.asarray(valid_BxN)
    base_logits, h_base = forward(config, lm, jnp.asarray(tokens_BxN), None, jnp.asarray(valid_BxN))
    targets_CxBxN, target_valid_CxBxN = (np.asarray(x) for x in talk_targets(jnp.asarray(tokens_BxN), jnp.asarray(valid_BxN), c_talk))
    base_logp = np.asarray(jax.nn.log_softmax(base_logits))
    base_logp_BxN = np.take_along_axis(base_logp, targets_CxBxN[0][..., None], -1)[..., 0]
    positions_BxN = np.asarray(positions_from_valid(jnp.asarray(valid_BxN)))
    embedding = np.asarray(lm["embed_tokens"]["embedding"])
    start = np.asarray(params["thought"]["start"]) * qs.embedding_scale
    end = np.asarray(params["thought"]["end"]) * qs.embedding_scale

    # One row per (b, p, j), row index r = (b * p + pass) * n + j, matching the parallel layout.
    rows = [(bi, pi, j) for bi in range(b) for pi in range(p) for j in range(n)]
    length = n + qs.n_steps
    x = np.zeros((len(rows), length, config.hidden_size), np.float32)
    pos = np.zeros((len(rows), length), np.int32)
    valid = np.zeros((len(rows), length), bool)
    for r, (bi, _, j) in enumerate(rows):
        x[r, : j + 1] = embedding[tokens_BxN[bi, : j + 1]]
        pos[r, : j + 1] = positions_BxN[bi, : j + 1]
        valid[r, : j + 1] = valid_BxN[bi, : j + 1]
        pos[r, j + 1 : j + 1 + qs.n_steps] = positions_BxN[bi, j] + np.arange(1, qs.n_steps + 1)

    def feed(step, x_RxD):
        """Writes the step-th thought input after each row's prefix; returns its hidden state."""
        for r, (_, _, j) in enumerate(rows):
            x[r, j + step] = x_RxD[r]
            valid[r, j + step] = True
        h = np.asarray(_hidden(config, lm, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(valid)))
        return np.stack([h[r, j + step] for r, (_, _, j) in enumerate(rows)])

    sampled, sample_logp = [], []
    x_RxD = np.broadcast_to(start, (len(rows), config.hidden_size))
    for step in range(1, qs.n_ahead - 1):
        h_RxD = feed(step, x_RxD)
        if step <= qs.n_sampled:
            logits = mask_thought_tokens(_apply(config, lm, Transformer.logits, jnp.asarray(h_RxD)), qs)
            # The same uniforms as the parallel path: it draws a BxT array, T = P*N.
            uniform_R = thought_uniforms(rng, jnp.int32(step), (b, p * n)).reshape(-1)
            tok = np.asarray(sample_thought_tokens(logits, uniform_R, qs.thought_temperature))
            sampled.append(tok)
            sample_logp.append(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / qs.reinforce_temperature)), tok[:, None], -1)[:, 0])
            x_RxD = embedding[tok]

    talk_logp, weights = [], []
    h_base = np.asarray(h_base)
    for c in range(c_talk):
        step = qs.n_ahead - 1 + c
        if c == 0:
            x_RxD = np.broadcast_to(end, (len(rows), config.hidden_size))
        else:
            x_RxD = embedding[[targets_CxBxN[c - 1][bi, j] for (bi, _, j) in rows]]
        h_RxD = feed(step, x_RxD)
        hb_RxD = np.stack([h_base[bi, j + c] if j + c < n else np.zeros(config.hidden_size) for (bi, _, j) in rows])
        w_R = np.asarray(mixing_head_module(config, qs).apply({"params": params["mixing_head"]}, jnp.asarray(hb_RxD), jnp.asarray(h_RxD)))
        h_mix = (1 - w_R[:, None]) * hb_RxD + w_R[:, None] * h_RxD
        logp = np.asarray(jax.nn.log_softmax(_apply(config, lm, Transformer.logits, jnp.asarray(h_mix))))
        target = np.array([targets_CxBxN[c][bi, j] for (bi, _, j) in rows])
        talk_logp.append(np.take_along_axis(logp, target[:, None], -1)[:, 0])
        weights.append(w_R)

    per_pass = lambda xs: np.stack(xs).reshape(len(xs), b, p, n) if xs else np.zeros((0, b, p, n))
    return Rollout(
        base_logp_BxN=base_logp_BxN,
        target_valid_CxBxN=target_valid_CxBxN,
        sampled_SxBxPxN=per_pass(sampled).astype(np.int32),
        sample_logp_SxBxPxN=per_pass(sample_logp),
        talk_logp_CxBxPxN=per_pass(talk_logp),
        mixing_weight_CxBxPxN=per_pass(weights),
    )
