"""Pretrains the toy-reasoning base model (docs/toy_experiment.md): plain next-token
prediction on chained arithmetic, half the documents with the working written out.

    python -m qstar_jax.train --config experiments/toy_reasoning_base.py --workdir runs/toy_base

The study (`python -m qstar_jax.toy_study`) runs this, then continues from the result
with experiments/toy_reasoning.py.
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.method = "lm"
    config.tokenizer_type = "word"
    config.model.update(
        model_type="llama", hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position_embeddings=256, scan_unroll=2,
    )
    # Short documents: packing keeps the rows full (segment ids keep them apart).
    config.data.update(source="toy_reasoning", seq_len=64, eval_documents=200, packing=True)
    config.data.toy.update(problems=20000, seed=0, explicit_fraction=0.5, num_ops=5)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.01, schedule="cosine")
    config.batch_size = 32
    config.steps = 1500
    config.log_every = 50
    config.eval_every = 250
    config.eval_batches = 2
    config.checkpoint_every = 500
    return config
