"""Quiet-STaR on Mistral-7B-v0.1 with C4 (the paper's second corpus).

Prepare on a machine with network access (any path works, gs:// included): C4 as the HF
hub ships it (json.gz shards), rewritten as parquet so every process can read any
document without decompressing whole shards (this takes the first 8 of 1,024 shards,
about 2.8M documents; widen the pattern for more):
    huggingface-cli download allenai/c4 --repo-type dataset --include "en/c4-train.0000[0-7]-of-01024.json.gz" --local-dir data/c4-json
    python -m qstar_jax.data --to-parquet data/c4-json/en --output data/c4
A C4 already prepared by tensorflow-datasets in array_record format also works:
--config.data.source=tfds --config.data.tfds_name=c4/en --config.data.path=DATA_DIR.
The rest (model, benchmarks) as in experiments/mistral_owm.py.
"""

import ml_collections

from experiments import mistral_owm


def get_config() -> ml_collections.ConfigDict:
    config = mistral_owm.get_config()
    config.data.update(source="files", path="data/c4")
    return config
