"""Continues the toy-reasoning base model on implicit documents only (docs/toy_experiment.md).

    python -m qstar_jax.train --config experiments/toy_reasoning.py --workdir runs/toy_qs
    python -m qstar_jax.train --config experiments/toy_reasoning.py --workdir runs/toy_ntp --config.method=lm

The first is the Quiet-STaR arm, the second the paper's control (plain next-token
training on the same documents, same steps, same optimizer). Both start from the base
model the study exports (`python -m qstar_jax.toy_study` writes runs/toy_study/base0/model;
or pretrain one with experiments/toy_reasoning_base.py and export it). The training
problems (seed 1) are new to the base model (pretrained on seed 0); both are drawn from the
"train" split, and the study's test problems (seed 7) from the "test" split, never trained
on (qstar_jax/toy/reasoning.py; development problems come from the "dev" split).
"""

import ml_collections

from experiments import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.method = "quiet_star"
    config.init_from = "runs/toy_study/base0/model"
    config.model.scan_unroll = 2
    # Short documents: packing keeps the rows full (segment ids keep them apart).
    config.data.update(source="toy_reasoning", seq_len=64, eval_documents=200, packing=True)
    config.data.toy.update(problems=10000, seed=1, explicit_fraction=0.0, num_ops=5)
    # n_ahead 8 holds 5 sampled thought tokens: room for the 5 working steps. The answer is
    # one token and what follows it is the next (random) problem, so 2 talk tokens suffice.
    # embedding_scale 1, not the paper's 100: that multiplies a 1e-6 learning rate; at 1e-4
    # it would move the thought embeddings by about a third of their norm per step.
    config.quiet_star.update(n_ahead=8, n_ahead_talk=2, n_passes=2, policy_loss_weight=1.0, embedding_scale=1.0)
    # lr 1e-4 (chosen on development problems, seed 2): at 1e-3 or 3e-4 continued training on
    # implicit documents makes the model forget how to write the working within ~50 steps.
    config.optimizer.update(learning_rate=1e-4, warmup_steps=10, weight_decay=0.01, schedule="cosine")
    config.batch_size = 8
    config.steps = 200
    config.log_every = 25
    config.eval_every = 0
    config.checkpoint_every = 25
    config.keep_checkpoints = 100
    return config
