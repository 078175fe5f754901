"""Tokenizers behind one small interface, plus Quiet-STaR's thought tokens.

Two kinds of files ship with the models we support: a SentencePiece `tokenizer.model`
(Mistral, Llama-2) and a HF `tokenizer.json` (Qwen2, Llama-3, SmolLM). Both are wrapped
as `Tokenizer`: encode/decode plain text, look up special ids, and add new special tokens
(Quiet-STaR's `<|startofthought|>` / `<|endofthought|>`), which always round-trip exactly.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

import sentencepiece as spm
import tokenizers

from qstar_jax import paths
from qstar_jax.errors import UserError

START_THOUGHT = "<|startofthought|>"
END_THOUGHT = "<|endofthought|>"
SP_ADDED_TOKENS_FILE = "added_tokens.json"
EOS_TEXT = "<|endoftext|>"  # document separator of the tokenizers trained here
UNKNOWN_TEXT = "<unk>"


class Tokenizer:
    """Common interface; `vocab_size` counts every id the tokenizer can emit, added ones too."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Adds tokens that encode as one id each and never merge with text; returns their ids."""
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        raise NotImplementedError

    def save(self, directory: str) -> None:
        raise NotImplementedError

    def without_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """A copy without these added tokens (a distilled student drops the thought tokens)."""
        raise NotImplementedError

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        """`ids` after the BOS token, if the tokenizer has one: how every sequence the models
        see starts (training documents, prompts, analysed texts)."""
        return ([] if self.bos_id is None else [self.bos_id]) + list(ids)

    def until_eos(self, ids: Sequence[int]) -> list[int]:
        """`ids` up to (without) the first EOS token: where a generated continuation ends."""
        ids = list(ids)
        return ids[: ids.index(self.eos_id)] if self.eos_id is not None and self.eos_id in ids else ids


class SentencePieceTokenizer(Tokenizer):
    """A `tokenizer.model` plus added special tokens numbered after the SentencePiece vocab.

    SentencePiece models cannot grow, so added tokens live here: text is split on them,
    the pieces in between go through SentencePiece, and each added token maps to its id.
    """

    def __init__(self, model_proto: bytes, added_tokens: dict[str, int] | None = None):
        self._model_proto = model_proto  # the serialized model: read from any path, saved as is
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._added: dict[str, int] = dict(added_tokens or {})
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + len(self._added)

    def _split_pattern(self) -> re.Pattern | None:
        if not self._added:
            return None
        alternatives = sorted(self._added, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def encode(self, text: str) -> list[int]:
        pattern = self._split_pattern()
        chunks = pattern.split(text) if pattern else [text]
        ids: list[int] = []
        for chunk in chunks:
            if chunk in self._added:
                ids.append(self._added[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        by_id = {i: t for t, i in self._added.items()}
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in by_id:
                pieces.append(self._sp.decode(run))
                pieces.append(by_id[i])
                run = []
            else:
                run.append(i)
        pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        for token in tokens:
            if token not in self._added:
                self._added[token] = self.vocab_size
        return [self._added[t] for t in tokens]

    def token_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        piece = self._sp.piece_to_id(token)
        return None if piece == self._sp.unk_id() else piece

    def without_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        return SentencePieceTokenizer(self._model_proto, {t: i for t, i in self._added.items() if t not in tokens})

    def save(self, directory: str) -> None:
        directory = paths.path(directory)
        paths.write_bytes(directory / "tokenizer.model", self._model_proto)
        paths.write_text(directory / SP_ADDED_TOKENS_FILE, json.dumps(self._added, indent=2))


class HFTokenizer(Tokenizer):
    """A HF `tokenizer.json` (byte-level BPE and friends) via the `tokenizers` library."""

    def __init__(self, tok: tokenizers.Tokenizer, special: dict[str, str] | None = None):
        self._tok = tok
        self._special = dict(special or {})
        self.bos_id = self._id_of(self._special.get("bos_token"))
        self.eos_id = self._id_of(self._special.get("eos_token"))
        pad = self._id_of(self._special.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _id_of(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):  # tokenizer_config.json may store AddedToken dicts
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        self._tok.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens]
        )
        return [self._tok.token_to_id(t) for t in tokens]

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def without_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in tokens]
        return HFTokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), self._special)

    def save(self, directory: str) -> None:
        directory = paths.path(directory)
        paths.write_text(directory / "tokenizer.json", self._tok.to_str())
        paths.write_text(directory / "tokenizer_config.json", json.dumps(self._special, indent=2))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def has_tokenizer(directory: str) -> bool:
    return any((paths.path(directory) / f).is_file() for f in TOKENIZER_FILES)


def _json_file(path: paths.Path) -> Any:
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads `tokenizer.json` (preferred, it is what current HF models ship) or `tokenizer.model`."""
    directory = paths.path(directory)
    if (directory / "tokenizer.json").is_file():
        config_file = directory / "tokenizer_config.json"
        special = {}
        if config_file.is_file():
            config = _json_file(config_file)
            special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k)}
        try:  # the Rust library raises a bare Exception for a malformed file
            tokenizer = tokenizers.Tokenizer.from_str(paths.read_text(directory / "tokenizer.json"))
        except Exception as e:
            raise UserError(f"{directory / 'tokenizer.json'} is not a readable tokenizer ({e})") from None
        return HFTokenizer(tokenizer, special)
    if (directory / "tokenizer.model").is_file():
        added_file = directory / SP_ADDED_TOKENS_FILE
        added = _json_file(added_file) if added_file.is_file() else None
        try:
            return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes(), added)
        except RuntimeError:
            raise UserError(f"{directory / 'tokenizer.model'} is not a readable SentencePiece model") from None
    raise UserError(f"no tokenizer in {directory}: expected one of {', '.join(TOKENIZER_FILES)}")


def add_thought_tokens(tokenizer: Tokenizer) -> tuple[int, int]:
    """Adds `<|startofthought|>` and `<|endofthought|>`; returns (start_id, end_id)."""
    start_id, end_id = tokenizer.add_special_tokens([START_THOUGHT, END_THOUGHT])
    return start_id, end_id


def remove_thought_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without `<|startofthought|>` / `<|endofthought|>` (for a plain-LM student)."""
    return tokenizer.without_tokens([START_THOUGHT, END_THOUGHT])


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int, directory: str) -> Tokenizer:
    """Trains a byte-level BPE `tokenizer.json` on `documents` (deterministic) and loads it.

    Used when a run starts from random weights and no tokenizer is given: the embedded
    default corpus gets a tokenizer fitted to it, through the same HF tokenizer code path
    real checkpoints use.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return _saved(tok, directory)


def train_word_tokenizer(documents: Sequence[str], directory: str) -> Tokenizer:
    """A word-level `tokenizer.json`: one id per whitespace-separated word of `documents`.

    For synthetic corpora whose symbols are words (the toy-reasoning corpus: digits,
    operators and the "---" delimiter). BPE would merge across symbols ("3+", "=---"),
    so one symbol would not be one token and a thought could not hold one step per token.
    Ids are assigned in sorted order, so the tokenizer is a pure function of the corpus;
    decoding joins words with single spaces, which round-trips whitespace-normalised text.
    """
    from tokenizers import models, pre_tokenizers

    words = sorted({word for text in documents for word in text.split()} - {EOS_TEXT, UNKNOWN_TEXT})
    vocab = {token: i for i, token in enumerate([EOS_TEXT, UNKNOWN_TEXT, *words])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_TEXT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _saved(tok, directory)


def _saved(tok: tokenizers.Tokenizer, directory: str) -> Tokenizer:
    """The trained tokenizer, saved (by process 0) for later runs and tools; used as built,
    not read back (every process trains the same one, deterministically)."""
    tokenizer = HFTokenizer(tok, {"eos_token": EOS_TEXT})
    if paths.is_writer():
        tokenizer.save(directory)
    return tokenizer
