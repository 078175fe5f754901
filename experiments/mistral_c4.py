"""Quiet-STaR on Mistral-7B-v0.1 with C4 (the paper's second corpus), read through tfds.

Prepare C4 with tensorflow-datasets in array_record format into data/tfds (on a machine
with network access), e.g. `tfds build c4/en --file_format=array_record --data_dir=data/tfds`.
"""

import ml_collections

from experiments import mistral_owm


def get_config() -> ml_collections.ConfigDict:
    config = mistral_owm.get_config()
    config.data.update(source="tfds", tfds_name="c4/en", split="train", path="data/tfds", max_documents=1000)
    return config
