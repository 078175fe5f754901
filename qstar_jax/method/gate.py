"""The think gate: where a thought pays (an extension; docs/method.md, "Think gate").

Quiet-STaR thinks at every position, although the gain concentrates on a few tokens. The
gate is a small head on the base hidden state at position j, the state available before
any thought is sampled, trained to predict the talk gain a thought at j brings (the
reward before its baseline: sum over talk steps of log p_mix - log p_base, averaged over
the sibling thoughts). It sees the hidden state and the gain through stop_gradient, so it
never changes what the LM, the mixing head or the thought embeddings learn. Generation
can then think only where the predicted gain exceeds a threshold.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qstar_jax.method.config import QuietStarConfig
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params


class ThinkGate(nn.Module):
    """Predicted gain (nats) of thinking at a position, from its base hidden state: a linear
    read-out, or Linear(D->D) + ReLU + Linear(D->1) for "mlp"."""

    hidden_size: int
    kind: str

    @nn.compact
    def __call__(self, h_xD: jax.Array) -> jax.Array:
        x_xD = h_xD.astype(jnp.float32)
        if self.kind == "mlp":
            x_xD = nn.relu(nn.Dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="hidden")(x_xD))
        return nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(x_xD)[..., 0]


def init_think_gate(config: ModelConfig, qs: QuietStarConfig, rng: jax.Array) -> Params:
    """The gate's parameters (float32; it starts predicting a gain of 0 everywhere)."""
    return ThinkGate(config.hidden_size, qs.think_gate).init(rng, jnp.zeros((1, config.hidden_size)))["params"]


def with_think_gate(config: ModelConfig, qs: QuietStarConfig, params: Params, rng: jax.Array) -> Params:
    """Quiet-STaR params with a gate when `qs` asks for one and they have none (a run that
    adds a gate to a checkpoint trained without it); unchanged otherwise."""
    if not qs.think_gate or "think_gate" in params:
        return params
    return {**params, "think_gate": init_think_gate(config, qs, rng)}


def think_gate_scores(config: ModelConfig, qs: QuietStarConfig, params: Params, h_base_xD: jax.Array) -> jax.Array:
    """Predicted talk gain (float32) of a thought after each base hidden state; gradients
    reach the gate only."""
    gate = ThinkGate(config.hidden_size, qs.think_gate)
    return gate.apply({"params": params["think_gate"]}, jax.lax.stop_gradient(h_base_xD))


SITE_STREAM = 2**31 - 1  # fold_in index of the exploration draw (thought steps use 1, 2, ...)


def choose_sites(qs: QuietStarConfig, gate_BxN: jax.Array | None, eligible_BxN: jax.Array,
                 rng: jax.Array) -> jax.Array:
    """The K = qs.n_sites(N) positions per row that think under gated training, ascending.

    K - round(think_explore * K) of them are the eligible positions the gate ranks highest;
    the rest are drawn uniformly from the others, so that the gate keeps seeing the gain of
    positions it ranks low (all K are drawn when there is no gate). Positions whose talk
    horizon runs off the text come last.
    """
    b, n = eligible_BxN.shape
    k = qs.n_sites(n)
    n_explore = k if gate_BxN is None else round(qs.think_explore * k)
    tie_rng, explore_rng = jax.random.split(rng)
    noise_BxN = jax.random.uniform(explore_rng, (b, n))
    # Rank: eligible first; among them, the gate's top (k - n_explore) first (ties, as at the
    # zero-initialised start, broken at random rather than by position), then noise.
    score_BxN = jnp.zeros((b, n)) if gate_BxN is None else jax.lax.stop_gradient(gate_BxN)
    score_BxN = score_BxN + 1e-6 * jax.random.uniform(tie_rng, (b, n))
    by_gate_BxK = jax.lax.top_k(jnp.where(eligible_BxN, score_BxN, -jnp.inf), k - n_explore)[1]
    taken_BxN = jnp.zeros((b, n), bool).at[jnp.arange(b)[:, None], by_gate_BxK].set(True)
    explore_BxN = jnp.where(taken_BxN, -2.0, noise_BxN + eligible_BxN.astype(jnp.float32))
    by_noise_BxK = jax.lax.top_k(explore_BxN, n_explore)[1]
    return jnp.sort(jnp.concatenate([by_gate_BxK, by_noise_BxK], axis=1), axis=1).astype(jnp.int32)
