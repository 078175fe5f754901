"""Our hand-encoded TensorBoard event files, read back by TensorBoard's own reader."""

from __future__ import annotations

import numpy as np
import pytest

from qstar_jax.training.tensorboard import EventFile, crc32c, event


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"") == 0


def test_tensorboard_reads_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = {1: {"loss": 5.5, "eval/nll_next": 1e-7}, 10: {"loss": 2.25}, 300: {"loss": -0.5, "mfu": 0.125}}
    log = EventFile(tmp_path / "tensorboard")
    for step, values in written.items():
        log.scalars(step, values)
    log.close()

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert sorted(accumulator.Tags()["scalars"]) == ["eval/nll_next", "loss", "mfu"]
    for tag in ("loss", "eval/nll_next", "mfu"):
        expected = [(step, values[tag]) for step, values in written.items() if tag in values]
        read = [(e.step, e.value) for e in accumulator.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in read], [v for _, v in expected], rtol=1e-7)  # float32 storage


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        event(0.0, -1)
