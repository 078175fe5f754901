"""Fast Quiet-STaR on Mistral-7B-v0.1 (Huang et al. 2025): thought curriculum, then NTP.

    python -m qstar_jax.train --config experiments/fast_quiet_star_mistral.py --workdir runs/fast_quiet_star_mistral

Prepare the model and OpenWebMath as for experiments/mistral_owm.py, and the four
benchmarks in their public JSONL layouts (qstar_jax/inference/tasks.py) under data/. Stages as in
the public code: n_ahead-n_ahead_talk 16-8 at lr 2e-6, then 12-4 and 8-4 at lr 1e-6,
150 steps of 8 sequences each, a checkpoint every 10 steps; each stage starts from the
previous stage's checkpoint with the best mean accuracy over GSM8K, CommonsenseQA, PIQA
and SIQA (with thinking). Then the NTP stage distils the 8-4 pick into a plain LM
(300 steps, as the public code's; docs/method.md has both NTP objectives) and writes it
to WORKDIR/model for `python -m qstar_jax.convert --to-hf`. Full benchmark sets at every
checkpoint, as the paper; append ":N" to an eval_tasks entry to evaluate N examples.
"""

import ml_collections

from experiments import mistral_owm


def get_config() -> ml_collections.ConfigDict:
    config = mistral_owm.get_config()  # init_from checkpoints/mistral-7b-v0.1, OpenWebMath, batch 8
    config.eval_tasks = ("gsm8k:data/gsm8k/test.jsonl,csqa:data/csqa/dev.jsonl,"
                         "piqa:data/piqa/dev.jsonl,siqa:data/siqa/dev.jsonl")
    config.keep_checkpoints = 1  # plus each stage's best, which is always kept
    config.curriculum.metric = "eval/average/accuracy"
    config.curriculum.mode = "max"
    config.curriculum.stages = (
        {"name": "think_16_8", "method": "quiet_star", "steps": 150, "learning_rate": 2e-6, "every": 10,
         "n_ahead": 16, "n_ahead_talk": 8},
        {"name": "think_12_4", "method": "quiet_star", "steps": 150, "learning_rate": 1e-6, "every": 10,
         "n_ahead": 12, "n_ahead_talk": 4},
        {"name": "think_8_4", "method": "quiet_star", "steps": 150, "learning_rate": 1e-6, "every": 10,
         "n_ahead": 8, "n_ahead_talk": 4},
        {"name": "ntp", "method": "ntp", "steps": 300, "learning_rate": 1e-6, "every": 10},
    )
    return config
