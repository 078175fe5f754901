"""The whole Fast Quiet-STaR chain on a CPU: base LM -> thought curriculum -> NTP student.

    python -m qstar_jax.train --config experiments/fast_quiet_star_tiny.py --workdir runs/fast_quiet_star_tiny

The tiny_cpu model (random-init 2-layer Llama, generated arithmetic corpus). A plain-LM
stage first makes the base model the paper starts from; then Quiet-STaR stages shorten
the thought as the paper's 16-8 -> 12-4 -> 8-4 do (here 8-4 -> 6-2 -> 4-2, the first
learning rate twice the later ones, as 2e-6 -> 1e-6 there); then the NTP stage trains a
plain student against the last thinking stage. Each stage starts from its predecessor's
checkpoint with the lowest held-out next-token NLL (eval/nll_next: for a thinking model,
its post-thought prediction, what generation uses). chain_summary.json and the console
report each pick's NLL, forward passes per generated token, and measured tokens/s.
Learning rates are tiny_cpu's scale (random init), not the paper's.
"""

import ml_collections

from experiments import tiny_cpu


def get_config() -> ml_collections.ConfigDict:
    config = tiny_cpu.get_config()
    config.eval_batches = 4
    config.keep_checkpoints = 1  # plus each stage's best, which is always kept
    config.curriculum.metric = "eval/nll_next"
    config.curriculum.mode = "min"
    config.curriculum.stages = (
        {"name": "base", "method": "lm", "steps": 400, "learning_rate": 1e-3, "every": 50},
        {"name": "think_8_4", "method": "quiet_star", "steps": 150, "learning_rate": 5e-4, "every": 25,
         "n_ahead": 8, "n_ahead_talk": 4},
        {"name": "think_6_2", "method": "quiet_star", "steps": 150, "learning_rate": 2.5e-4, "every": 25,
         "n_ahead": 6, "n_ahead_talk": 2},
        {"name": "think_4_2", "method": "quiet_star", "steps": 150, "learning_rate": 2.5e-4, "every": 25,
         "n_ahead": 4, "n_ahead_talk": 2},
        {"name": "ntp", "method": "ntp", "steps": 150, "learning_rate": 2.5e-4, "every": 25},
    )
    return config
