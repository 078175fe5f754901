"""Quiet-STaR on Qwen2.5-7B with OpenWebMath (the Fast Quiet-STaR paper's second base model)."""

import ml_collections

from experiments import mistral_owm

QWEN2_5_7B = dict(
    model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
    num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
    tie_word_embeddings=False, qkv_bias=True,
)


def get_config() -> ml_collections.ConfigDict:
    config = mistral_owm.get_config()
    config.init_from = "checkpoints/qwen2.5-7b"
    config.model.update(QWEN2_5_7B)
    config.model.sliding_window = None
    config.preflight_vocab_size = 152064  # Qwen2.5's padded vocab already has room for two tokens
    return config
