"""Llama-family GGUF files (llama.cpp) -> qstar_jax params, config and tokenizer.

GGUF tensors are renamed to HF names by one table and then go through the same checked
mapping as safetensors (`hf.params_from_hf_tensors`). Quantised tensors (Q4_1, Q8_0, ...)
are dequantised with the `gguf` package. llama.cpp's converter permutes the rows of the
q and k projections (for its RoPE layout); we apply the inverse permutation. The BPE
tokenizer stored in the metadata becomes a HF `tokenizer.json`.
"""

from __future__ import annotations

import json
import os

import numpy as np

from qstar_jax.models.config import ModelConfig
from qstar_jax.errors import UserError
from qstar_jax.models.hf import params_from_hf_tensors
from qstar_jax.models.transformer import Params

# GGUF name -> HF name ({i}: layer index).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
TOKEN_TYPE_CONTROL = 3


def unpermute_rope_rows(weight_OxI: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (pairs interleaved -> rotate-half halves)."""
    out = weight_OxI.shape[0]
    return weight_OxI.reshape(heads, out // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight_OxI.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template = GGUF_TO_HF.get(".".join(["blk", "{i}"] + parts[2:]))
        return template.format(i=parts[1]) if template else None
    return None


def load_gguf_model(path: str, param_dtype: str = "float32"):
    """(ModelConfig, params, tokenizer directory writer) from a llama-architecture GGUF file."""
    import gguf

    if not os.path.isfile(path):
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"unsupported GGUF architecture {arch!r}; supported: llama")
    tensors = {t.name: t for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = ModelConfig(
        model_type="llama",
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        param_dtype=param_dtype,
    )
    by_hf = {}
    for name in tensors:
        hf_name = _hf_name(name)
        if hf_name is None:
            raise UserError(f"GGUF tensor {name} has no llama mapping")
        by_hf[hf_name] = name

    def read(hf_name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A slice of a dequantised tensor (quantised blocks do not slice; conversion reads
        each tensor once, on the host mesh)."""
        tensor = tensors[by_hf[hf_name]]
        array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if hf_name.endswith("q_proj.weight"):
            array = unpermute_rope_rows(array, heads)
        elif hf_name.endswith("k_proj.weight"):
            array = unpermute_rope_rows(array, kv_heads)
        return array[index]

    # GGUF lists dims innermost first; HF (and numpy) order is the reverse.
    shapes = {hf_name: tuple(int(d) for d in reversed(tensors[name].shape)) for hf_name, name in by_hf.items()}
    params: Params = params_from_hf_tensors(config, shapes, read, path)
    return config, params, reader


def write_tokenizer(reader, directory: str) -> None:
    """The GGUF's GPT-2-style byte-level BPE as `tokenizer.json` + `tokenizer_config.json`."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"unsupported GGUF tokenizer {model!r}; supported: gpt2 (byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder"):  # digits one by one
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type", [])
    special = [tokens[i] for i, kind in enumerate(types) if kind == TOKEN_TYPE_CONTROL]
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    config = {f"{k if k != 'padding' else 'pad'}_token": tokens[v] for k, v in ids.items() if v is not None}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
