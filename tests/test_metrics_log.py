"""metrics.jsonl across restarts: a resumed run's log holds each step once."""

from __future__ import annotations

import json

from qstar_jax.training.metrics import MetricsLog


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_the_steps_after_its_checkpoint_and_a_cut_line(tmp_path):
    first = MetricsLog(str(tmp_path), total_steps=10, start_step=0)
    for step in range(1, 7):
        first.write(step, {"loss": 1.0 / step})
    first.write(4, {"eval/loss": 0.5})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # killed mid-line

    resumed = MetricsLog(str(tmp_path), total_steps=10, start_step=4)  # the newest checkpoint was step 4
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 4]
    for step in range(5, 11):
        resumed.write(step, {"loss": 0.1})
    resumed.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]

    MetricsLog(str(tmp_path), total_steps=10, start_step=0).close()  # a fresh start keeps nothing
    assert (tmp_path / "metrics.jsonl").read_text() == ""
