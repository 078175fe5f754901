"""Tiny tokenizers trained in-test: a SentencePiece model and a byte-level BPE tokenizer.json."""

from __future__ import annotations

import io
import os

CORPUS = [
    f"Question {i}: what is {i} plus {i + 3}? Think --- then answer {2 * i + 3}. "
    f"The cat sat on mat number {i % 7}, and it was   happy."
    for i in range(300)
]


def train_sentencepiece(directory: str, vocab_size: int = 400) -> str:
    """Trains a Llama-style SentencePiece model (identity normaliser, byte fallback)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def train_bpe_json(directory: str, vocab_size: int = 300) -> str:
    """Trains a byte-level BPE `tokenizer.json` (the SmolLM/Qwen2 kind) with BOS/EOS specials."""
    import json

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"}, f)
    return path
