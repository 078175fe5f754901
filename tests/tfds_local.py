"""Tiny tensorflow-datasets builders prepared in-test (array_record, no TensorFlow, no download)."""

from __future__ import annotations

import tensorflow_datasets as tfds


class TinyText(tfds.core.GeneratorBasedBuilder):
    """A few documents with a "text" feature, like c4/en."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(12):
            yield i, {"text": f"Document {i}: {i} plus {i} is {2 * i}."}


class TinyPiqa(tfds.core.GeneratorBasedBuilder):
    """PIQA's public field names."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({
            "goal": tfds.features.Text(), "sol1": tfds.features.Text(), "sol2": tfds.features.Text(),
            "label": tfds.features.ClassLabel(num_classes=2),
        })
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"goal": f"Goal {i}", "sol1": "do it", "sol2": "do not", "label": i % 2}


def prepare(builder_cls, data_dir: str) -> None:
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
