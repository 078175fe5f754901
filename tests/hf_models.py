"""Tiny random Hugging Face models made in-test with transformers (no downloads)."""

from __future__ import annotations

import os

import numpy as np

TINY_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

# name -> (model_type, extra config). Together they cover tied/untied heads, a Mistral
# sliding window shorter than the test sequences, Qwen2's q/k/v bias and GQA everywhere.
TINY_MODELS = {
    "llama_untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "mistral_window": ("mistral", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False, use_sliding_window=False)),
}


def make_tiny_hf_model(name: str, directory: str, seed: int = 0, saved_dtype: str = "float32",
                       max_shard_size: str | None = None, **config_overrides):
    """Creates, saves and returns a random tiny transformers model (float32, eager attention).

    `saved_dtype` is the dtype written to disk (bfloat16, as 7B checkpoints ship);
    `max_shard_size` splits the safetensors into shards with an index file.
    """
    import torch
    import transformers

    model_type, extra = TINY_MODELS[name]
    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[model_type]
    config = config_cls(**{**TINY_COMMON, **extra, **config_overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random (not ones) norm scales and biases, so a mapping mistake in them shows.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in param_name else 0.0))
    model.eval()
    os.makedirs(directory, exist_ok=True)
    saved = model if saved_dtype == "float32" else model.to(getattr(torch, saved_dtype))
    saved.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return saved


def torch_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
                 position_ids: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask, dtype=torch.long)
        if position_ids is not None:
            kwargs["position_ids"] = torch.tensor(position_ids, dtype=torch.long)
        out = model(torch.tensor(tokens, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()
