"""Growing and shrinking a model's vocabulary (thought tokens are added and removed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.models.transformer import Params


def grow_vocab(
    config: ModelConfig, params: Params, vocab_size: int, rows: dict[int, jax.Array]
) -> tuple[ModelConfig, Params]:
    """Grows the embedding and LM-head to `vocab_size` ids and sets the given rows.

    New rows not named in `rows` start at the mean embedding (a neutral token, the usual
    choice when resizing HF models). Each value in `rows` is a D-vector written to that
    id's embedding row and LM-head column, so an added token starts out behaving like the
    token it was initialised from. Shrinking is refused: it would silently drop ids.
    """
    if vocab_size < config.vocab_size:
        raise ValueError(f"cannot shrink vocab from {config.vocab_size} to {vocab_size}")
    params = jax.tree.map(lambda x: x, params)  # shallow copy; leaves are immutable arrays
    extra = vocab_size - config.vocab_size

    def grow(matrix_VxD: jax.Array) -> jax.Array:
        mean_1xD = matrix_VxD.mean(axis=0, keepdims=True)
        grown_VxD = jnp.concatenate([matrix_VxD, jnp.repeat(mean_1xD, extra, axis=0)], axis=0)
        for token_id, row_D in rows.items():
            grown_VxD = grown_VxD.at[token_id].set(row_D.astype(grown_VxD.dtype))
        return grown_VxD

    params["embed_tokens"] = {"embedding": grow(params["embed_tokens"]["embedding"])}
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"].T).T}
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
