"""Both tokenizer kinds: text/id round trips with thought tokens, save/reload, vocab growth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.models.config import ModelConfig
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import INIT_STD, apply_lm, init_params
from qstar_jax.models.vocab import grow_vocab
from qstar_jax.tokenizer import (
    END_THOUGHT,
    START_THOUGHT,
    HFTokenizer,
    SentencePieceTokenizer,
    add_thought_tokens,
    load_tokenizer,
)
from tokenizers_local import train_bpe_json, train_sentencepiece

TEXTS = [
    "what is 3 plus 4? " + START_THOUGHT + "3 and 4 make 7" + END_THOUGHT + " 7.",
    START_THOUGHT + END_THOUGHT + "  two  spaces, a tab\t and ünïcödé",
    "no thought tokens at all",
    END_THOUGHT + " leading end then " + START_THOUGHT,
]


@pytest.fixture(params=["sentencepiece", "tokenizer.json"])
def tokenizer_dir(request, tmp_path):
    if request.param == "sentencepiece":
        train_sentencepiece(str(tmp_path))
    else:
        train_bpe_json(str(tmp_path))
    return str(tmp_path)


def test_thought_tokens_round_trip_text_and_ids(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(tokenizer_dir)
    base_vocab = tokenizer.vocab_size
    start_id, end_id = add_thought_tokens(tokenizer)
    assert (start_id, end_id) == (base_vocab, base_vocab + 1)
    assert tokenizer.vocab_size == base_vocab + 2
    assert tokenizer.token_id(START_THOUGHT) == start_id
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert ids.count(start_id) == text.count(START_THOUGHT)
        assert ids.count(end_id) == text.count(END_THOUGHT)
        assert tokenizer.encode(tokenizer.decode(ids)) == ids
    # Adding again is a no-op; saving and reloading keeps the ids.
    assert add_thought_tokens(tokenizer) == (start_id, end_id)
    tokenizer.save(str(tmp_path / "saved"))
    reloaded = load_tokenizer(str(tmp_path / "saved"))
    assert type(reloaded) is type(tokenizer)
    for text in TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.eos_id == tokenizer.eos_id is not None


def test_kinds_are_detected(tmp_path):
    train_sentencepiece(str(tmp_path / "sp"))
    train_bpe_json(str(tmp_path / "bpe"))
    assert isinstance(load_tokenizer(str(tmp_path / "sp")), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path / "bpe")), HFTokenizer)
    assert load_tokenizer(str(tmp_path / "bpe")).eos_id == 0
    with pytest.raises(UserError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))


def test_unreadable_tokenizer_files_are_one_clear_error(tmp_path):
    for name, content, message in (("tokenizer.json", b"{not json", "tokenizer.json is not a readable tokenizer"),
                                   ("tokenizer.model", b"garbage", "tokenizer.model is not a readable SentencePiece"),
                                   ("tokenizer.json", b"\xff\xfe", "tokenizer.json is not UTF-8 text")):
        directory = tmp_path / f"{name}-{len(content)}"
        directory.mkdir()
        (directory / name).write_bytes(content)
        with pytest.raises(UserError, match=message):
            load_tokenizer(str(directory))
    (directory / "tokenizer_config.json").write_text("{")
    with pytest.raises(UserError, match="tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(directory))


def test_grow_vocab_draws_new_rows_as_the_official_resize_and_keeps_old_logits(tokenizer_dir):
    """transformers 4.37's resize (the official code's) draws new embedding and LM-head rows
    from the model's normal(0.02) initialiser; old rows, and so old logits, are unchanged."""
    tokenizer = load_tokenizer(tokenizer_dir)
    config = ModelConfig("llama", tokenizer.vocab_size, 32, 64, 2, 4, 2, 8)
    params = init_params(config, jax.random.key(0))
    start_id, end_id = add_thought_tokens(tokenizer)
    grown_config, grown = grow_vocab(config, params, tokenizer.vocab_size, jax.random.key(1), redraw_ids=[3])
    assert grown_config.vocab_size == config.vocab_size + 2
    head_VxD, embed_VxD = np.asarray(grown["lm_head"]["kernel"]).T, np.asarray(grown["embed_tokens"]["embedding"])
    drawn = np.concatenate([head_VxD[[3, start_id, end_id]], embed_VxD[[3, start_id, end_id]]]).ravel()
    assert abs(drawn.std() - INIT_STD) < 0.1 * INIT_STD and abs(drawn.mean()) < 0.2 * INIT_STD  # 192 draws
    assert not np.array_equal(head_VxD[start_id], embed_VxD[start_id])  # independent draws
    assert not np.array_equal(head_VxD[3], np.asarray(params["lm_head"]["kernel"]).T[3])  # redrawn in place
    kept = [i for i in range(config.vocab_size) if i != 3]
    np.testing.assert_array_equal(embed_VxD[kept], np.asarray(params["embed_tokens"]["embedding"])[kept])
    tokens = jnp.asarray([tokenizer.encode(TEXTS[2])])
    old, new = apply_lm(config, params, tokens), apply_lm(grown_config, grown, tokens)
    np.testing.assert_allclose(new[..., kept], old[..., kept], atol=1e-6)
    assert apply_lm(grown_config, grown, jnp.asarray([tokenizer.encode(TEXTS[0])])).shape[-1] == grown_config.vocab_size
    with pytest.raises(ValueError, match="cannot shrink"):
        grow_vocab(config, params, config.vocab_size - 1, jax.random.key(1))
