"""The arms of the SmolLM2-135M math study (`python -m qstar_jax.smollm2_study`, which
converts the GGUF, writes the data and runs every arm; qstar_jax/toy/smollm2_study.py).

    python -m qstar_jax.train --config experiments/smollm2_math.py --workdir runs/qs
    python -m qstar_jax.train --config experiments/smollm2_math.py --workdir runs/nopolicy \
        --config.quiet_star.policy_loss_weight=0
    python -m qstar_jax.train --config experiments/smollm2_math.py --workdir runs/lm --config.method=lm

Quiet-STaR, its policy-off ablation and the LM control (plain next-token training), on
the same documents (GSM-style word problems of the "train" split, training/corpora.py)
with the same optimizer and steps. Everything not set here is the official run's.
"""

import ml_collections

from experiments import base, smollm2_135m


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model = smollm2_135m.get_config().model  # the architecture the converted GGUF has
    config.preflight_vocab_size = 49154
    config.init_from = "runs/smollm2_study/base_model"  # the study converts the GGUF there
    # Shapes sized for a 2-core CPU (timed in qstar_jax/toy/smollm2_study.py's docstring): rows
    # of 48 tokens, about a document each (37-49 tokens with BOS and EOS), 3 sampled thought
    # tokens, 2 talk tokens, 2 thoughts per position. The policy weight stays the official
    # 1e6: Adam normalises each parameter's update, so the weight sets how REINFORCE weighs
    # against the NLL terms whatever the learning rate (smollm2_135m.py scales it with the lr).
    config.quiet_star.update(n_ahead=6, n_ahead_talk=2, n_passes=2)
    # lr 3e-5, not the official 1e-6: 40 steps at 1e-6 would leave a pretrained model where
    # it started (not tuned: no budget for a development sweep on this machine).
    config.optimizer.update(learning_rate=3e-5, warmup_steps=5)
    # The study scores held-out problems itself; the training text is the "train" split only.
    config.data.update(source="default", default_documents=2000, default_seed=0, seq_len=48, eval_documents=0,
                       packing=True)
    config.batch_size = 2
    config.steps = 40
    config.log_every = 5
    config.eval_every = 0
    config.checkpoint_every = 40
    config.keep_checkpoints = 1
    return config
