"""Growing and shrinking a model's vocabulary (thought tokens are added and removed)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import INIT_STD, Params


def grow_vocab(
    config: ModelConfig, params: Params, vocab_size: int, rng: jax.Array, redraw_ids: Sequence[int] = ()
) -> tuple[ModelConfig, Params]:
    """Grows the embedding and LM head to `vocab_size` ids, as `resize_token_embeddings`
    does in the transformers version the official code pins (4.37).

    Every new row, and the rows of `redraw_ids` (tokens placed in a vocab's unused padding
    rows), is drawn from normal(0, INIT_STD), the model's initialiser, independently for
    the embedding and an untied LM head; the old rows are kept, so old logits are unchanged.
    The thought tokens' input embeddings are separate parameters (`params["thought"]`), so
    of these rows only the LM head's matter: they set the small logit each thought token
    gets in the NLL's softmax. Shrinking is refused: it would silently drop ids.
    """
    if vocab_size < config.vocab_size:
        raise ValueError(f"cannot shrink vocab from {config.vocab_size} to {vocab_size}")
    params = jax.tree.map(lambda x: x, params)  # shallow copy; leaves are immutable arrays
    drawn_ids = jnp.asarray(sorted(set(redraw_ids) | set(range(config.vocab_size, vocab_size))), jnp.int32)

    def grow(matrix_VxD: jax.Array, key: jax.Array) -> jax.Array:
        extra_VxD = jnp.zeros((vocab_size - config.vocab_size, matrix_VxD.shape[1]), matrix_VxD.dtype)
        grown_VxD = jnp.concatenate([matrix_VxD, extra_VxD], axis=0)
        drawn_RxD = INIT_STD * jax.random.normal(key, (drawn_ids.shape[0], matrix_VxD.shape[1]), jnp.float32)
        return grown_VxD.at[drawn_ids].set(drawn_RxD.astype(matrix_VxD.dtype))

    embed_key, head_key = jax.random.split(rng)
    params["embed_tokens"] = {"embedding": grow(params["embed_tokens"]["embedding"], embed_key)}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"].T, head_key).T}
    return config.replace(vocab_size=vocab_size), params


def truncate_vocab(config: ModelConfig, params: Params, vocab_size: int) -> tuple[ModelConfig, Params]:
    """Keeps the first `vocab_size` ids of the embedding and LM head (drops tokens added last)."""
    if not 0 < vocab_size <= config.vocab_size:
        raise ValueError(f"cannot truncate vocab of {config.vocab_size} to {vocab_size}")
    params = jax.tree.map(lambda x: x, params)
    params["embed_tokens"] = {"embedding": params["embed_tokens"]["embedding"][:vocab_size]}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :vocab_size]}
    return config.replace(vocab_size=vocab_size), params
