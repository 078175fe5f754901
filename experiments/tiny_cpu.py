"""The embedded default run: a small random-init Llama on the repo's generated corpus.

    python -m qstar_jax.train --config experiments/tiny_cpu.py --workdir runs/tiny_cpu

Finishes in a few minutes on 2 CPU cores and leaves checkpoints, TensorBoard events and
metrics.jsonl. A BPE tokenizer is trained on the corpus at start (deterministic).
Because the model starts from random weights it must also learn the language, so the
learning rate is 1e-3 (not the paper's 1e-6 for a pretrained 7B) and the policy weight
is 1 (the paper's 1e6 at lr 1e-6; at lr 1e-3 it would drown the NLL gradient).
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.update(
        model_type="llama", hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=512, scan_unroll=2,
    )
    config.tokenizer_vocab_size = 384
    config.quiet_star.update(n_ahead=8, n_ahead_talk=4, n_passes=2, policy_loss_weight=1.0)
    config.optimizer.update(learning_rate=1e-3, warmup_steps=20, weight_decay=0.001, schedule="cosine")
    # Short documents: packing keeps the rows full (segment ids keep them apart).
    config.data.update(source="default", seq_len=64, eval_documents=100, packing=True)
    config.batch_size = 8
    config.steps = 300
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    return config
