"""The paper's run: Quiet-STaR on Mistral-7B-v0.1 with OpenWebMath (Zelikman et al. 2024).

Prepare once, on a machine with network access (any path works, gs:// included):
    huggingface-cli download mistralai/Mistral-7B-v0.1 --local-dir hf/mistral-7b-v0.1
    python -m qstar_jax.convert --hf-checkpoint hf/mistral-7b-v0.1 --output checkpoints/mistral-7b-v0.1
    # OpenWebMath as the HF dataset ships it: parquet shards with a "text" column
    huggingface-cli download open-web-math/open-web-math --repo-type dataset --local-dir data/open-web-math
    # the zero-shot benchmarks evaluated every 10 steps, in their public JSONL layouts
    mkdir -p data/gsm8k data/csqa
    curl -L -o data/gsm8k/test.jsonl https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl
    curl -L -o data/csqa/dev.jsonl https://s3.amazonaws.com/commensenseqa/dev_rand_split.jsonl
Run (one host; on a pod see launch/ and docs/scaling.md):
    python -m qstar_jax.train --config experiments/mistral_owm.py --workdir runs/mistral_owm
Check memory first without weights:  ... --preflight (reports per-device GB for this mesh).
Without the benchmark files: --config.eval_tasks= (held-out NLL is still evaluated).
"""

import ml_collections

from experiments import base

# Mistral-7B-v0.1's architecture (what a converted checkpoint holds; --preflight uses it).
MISTRAL_7B = dict(
    model_type="mistral", hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=32768,
    tie_word_embeddings=False,
)


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.init_from = "checkpoints/mistral-7b-v0.1"
    config.model.update(MISTRAL_7B, dtype="bfloat16", param_dtype="float32", remat=True)
    config.model.sliding_window = 4096
    config.preflight_vocab_size = 32002  # Mistral's 32000 + the two thought tokens
    config.quiet_star.update(n_ahead=12, n_ahead_talk=4, n_passes=2)  # official defaults
    # The TPU compiler's plan (docs/scaling.md): two_pass peaks lower than the scan rollout
    # on the same mesh (17.2 vs 27.2 GiB per v4 chip) and needs fewer executed FLOPs.
    config.quiet_star.rollout_impl = "two_pass"
    config.optimizer.update(learning_rate=1e-6, warmup_steps=20, weight_decay=0.001, grad_clip_norm=1.0)
    # All of OpenWebMath, streamed: each process reads only its own rows' documents.
    config.data.update(source="files", path="data/open-web-math", seq_len=256, eval_documents=50)
    # 200 problems of each, with thinking, at every evaluation: the paper's zero-shot metrics
    config.eval_tasks = "gsm8k:data/gsm8k/test.jsonl:200,csqa:data/csqa/dev.jsonl:200"
    config.batch_size = 8
    config.steps = 100
    config.eval_every = 10
    config.checkpoint_every = 10
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    return config
