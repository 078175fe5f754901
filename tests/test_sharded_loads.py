"""Every weight load lands sharded: on an fsdp=8 mesh each device holds 1/8 of every sharded
parameter right after loading a HF directory, a model directory, a training workdir (the
curriculum and NTP-teacher path) and for the inference tools; a bfloat16-stored model
trains with float32 master weights and Adam moments, so one step at lr 1e-6 moves every
kernel entry (with bf16 weights, most such updates round away)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from process_env import forced_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_load_is_sharded_and_bf16_models_train_in_float32(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": forced_devices(8)}
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharded_loads.py"), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for kind in ("hf", "model_dir", "training_dir", "inference"):
        report = out["reports"][kind]
        sharded = {name: leaf for name, leaf in report.items() if leaf["fsdp"]}
        matrices = [name for name in report if name.endswith(("['kernel']", "['embedding']"))]
        assert matrices and all(name in sharded for name in matrices), (kind, sorted(set(matrices) - set(sharded)))
        for name, leaf in sharded.items():
            assert leaf["devices"] == 8 and leaf["share"] == 1 / 8, (kind, name, leaf)
        assert {leaf["dtype"] for leaf in report.values()} == {"float32"}, kind  # bf16 storage, f32 master
    moved = out["kernel_fraction_moved"]
    assert len(moved) == 8  # q, k, v, o, gate, up, down, lm_head
    assert all(fraction == 1.0 for fraction in moved.values()), moved
