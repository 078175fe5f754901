"""Talking: the mixing head, the start/end thought embeddings and the one mixing formula,
shared by training (the rollout) and decoding."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qstar_jax.method.config import QuietStarConfig
from qstar_jax.method.gate import with_think_gate
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params, init_params


class MixingHead(nn.Module):
    """w = MLP([h_base ; h_thought]): Linear(2D->D)+ReLU, Linear(D->D)+ReLU, Linear(D->1).

    The last layer is zero-initialised, so w = 0 and training starts exactly at the base
    model. w is used unsquashed, as in the official code, unless `nonnegative`: then its
    magnitude, so that a head that learns a negative weight cannot invert the reward (a
    negative w makes the thoughts that help least score best; docs/method.md). |w| is 0 at
    the start like w, and unlike max(w, 0) its gradient never vanishes (1 at w = 0, written
    out rather than left to abs's convention), so the head cannot get stuck at 0.
    """

    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    nonnegative: bool = False

    @nn.compact
    def __call__(self, h_base_xD: jax.Array, h_thought_xD: jax.Array) -> jax.Array:
        dense = lambda features, **kw: nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
        x = jnp.concatenate([h_base_xD, h_thought_xD], axis=-1)
        x = nn.relu(dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="in")(x))
        x = nn.relu(dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="hidden")(x))
        w_x = dense(1, use_bias=False, kernel_init=nn.initializers.zeros, name="out")(x)[..., 0]
        return jnp.where(w_x >= 0, w_x, -w_x) if self.nonnegative else w_x


def mixing_head_module(config: ModelConfig, qs: QuietStarConfig) -> MixingHead:
    return MixingHead(config.hidden_size, jnp.dtype(config.dtype), jnp.dtype(config.param_dtype),
                      qs.nonnegative_mixing_weight)


def init_quiet_star_params(
    config: ModelConfig, qs: QuietStarConfig, lm_params: Params, init_embedding_D: jax.Array, rng: jax.Array
) -> Params:
    """Adds the mixing head, the start/end thought embeddings and (if configured) the think
    gate to an LM's params.

    Both thought embeddings start at `init_embedding_D` (the official code uses the
    embedding of "---") and are *stored* divided by `embedding_scale` and used multiplied
    by it, which scales their gradient (and, under Adam, their effective step) by it.
    """
    d = config.hidden_size
    mixing = mixing_head_module(config, qs).init(rng, jnp.zeros((1, d)), jnp.zeros((1, d)))["params"]
    stored_D = (init_embedding_D / qs.embedding_scale).astype(jnp.dtype(config.param_dtype))
    # Two buffers, not one shared array: a donated train state must not alias itself.
    params = {"lm": lm_params, "mixing_head": mixing, "thought": {"start": stored_D, "end": jnp.copy(stored_D)}}
    return with_think_gate(config, qs, params, jax.random.fold_in(rng, 1))


def thought_embeddings(qs: QuietStarConfig, params: Params) -> tuple[jax.Array, jax.Array]:
    """Start and end embeddings as fed (training and decoding): stored / embedding_scale,
    used x embedding_scale."""
    return params["thought"]["start"] * qs.embedding_scale, params["thought"]["end"] * qs.embedding_scale


def fed_thought_embeddings(config: ModelConfig, qs: QuietStarConfig, params: Params) -> tuple[jax.Array, jax.Array]:
    dtype = jnp.dtype(config.dtype)
    return tuple(x.astype(dtype) for x in thought_embeddings(qs, params))


def mix_hidden(config: ModelConfig, qs: QuietStarConfig, params: Params, h_base_xD, h_thought_xD):
    """(h_mix, w): h_mix = (1 - w) h_base + w h_thought, w from the mixing head; the one
    mixing formula of training and decoding."""
    w_x = mixing_head_module(config, qs).apply({"params": params["mixing_head"]}, h_base_xD, h_thought_xD)
    w_xx1 = w_x[..., None].astype(h_base_xD.dtype)
    return (1 - w_xx1) * h_base_xD + w_xx1 * h_thought_xD, w_x.astype(jnp.float32)


def params_shape_fn(model_config: ModelConfig, qs: QuietStarConfig | None):
    """A function whose `jax.eval_shape` is the run's params: the LM, plus thought parts."""
    def params():
        lm = init_params(model_config, jax.random.key(0))
        if qs is None:
            return lm
        return init_quiet_star_params(model_config, qs, lm, jnp.zeros((model_config.hidden_size,)), jax.random.key(1))
    return params
