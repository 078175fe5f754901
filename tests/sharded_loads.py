"""Run with 8 forced CPU devices (see test_sharded_loads.py): loads a model every way the
trainer and the tools do, on an fsdp=8 mesh, and prints what each device holds as JSON.

    python tests/sharded_loads.py WORKDIR
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiments import tiny_cpu  # noqa: E402
from hf_models import make_tiny_hf_model  # noqa: E402
from qstar_jax.training import checkpoint
from qstar_jax.models import model_files
from qstar_jax.models import convert
from qstar_jax.models import sharding
from qstar_jax.training import setup, trainer  # noqa: E402
from qstar_jax.tokenizer import load_tokenizer  # noqa: E402
from tokenizers_local import train_bpe_json  # noqa: E402


def shard_report(params) -> dict:
    """Per leaf: the largest share of the leaf any one device holds, and its dtype."""
    report = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        per_device = {}
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.size
        report[jax.tree_util.keystr(path)] = {
            "share": max(per_device.values()) / leaf.size, "devices": len(per_device), "dtype": str(leaf.dtype),
            "fsdp": "fsdp" in tuple(leaf.sharding.spec)}
    return report


def run_config(init_from: str, **changes):
    cfg = tiny_cpu.get_config()
    cfg.init_from = init_from
    cfg.mesh.update(data=1, fsdp=8, tensor=1)
    for key, value in changes.items():
        target = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return cfg


def main(workdir: str) -> None:
    assert jax.device_count() == 8
    hf_dir, model_dir, run_dir = (os.path.join(workdir, n) for n in ("hf", "model", "run"))
    train_bpe_json(hf_dir)
    make_tiny_hf_model("llama_untied", hf_dir, saved_dtype="bfloat16", max_shard_size="60KB",
                       vocab_size=load_tokenizer(hf_dir).vocab_size)
    convert.main(["--hf-checkpoint", hf_dir, "--output", model_dir, "--dtype", "bfloat16"])
    mesh = sharding.make_mesh(1, 8, 1)
    docs = ["Ava has 3 apples."]

    reports = {}
    for kind, source in (("hf", hf_dir), ("model_dir", model_dir)):
        _, params, _ = setup.load_base_model(run_config(source), docs, run_dir, mesh)
        reports[kind] = shard_report(params)

    # One Quiet-STaR step at lr 1e-6 from the bfloat16 model directory.
    cfg = run_config(model_dir, steps=1, eval_every=0, checkpoint_every=1, batch_size=8,
                     **{"optimizer.learning_rate": 1e-6, "optimizer.warmup_steps": 0, "optimizer.total_steps": 1,
                        "data.seq_len": 24, "data.default_documents": 200, "data.eval_documents": 0,
                        "quiet_star.n_ahead": 4, "quiet_star.n_ahead_talk": 2})
    trainer.train_run(cfg, run_dir)
    _, before = model_files.load_model(model_dir, mesh, "float32")
    after, _ = checkpoint.TrainCheckpoints(os.path.join(run_dir, "checkpoints"), keep=10).restore_params(1, mesh)
    moved = {jax.tree_util.keystr(path):  # over the original vocab (the head grew by the thought tokens)
             float(np.mean(np.asarray(a)[tuple(slice(0, n) for n in b.shape)] != np.asarray(b)))
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after["lm"]), jax.tree.leaves(before))
             if path[-1].key == "kernel"}

    _, params, _ = setup.load_base_model(run_config(run_dir), docs, run_dir, mesh)  # a training workdir
    reports["training_dir"] = shard_report(params)
    _, _, params, _ = checkpoint.load_for_inference(run_dir)  # evaluate / generate / analyze / NTP teacher
    reports["inference"] = shard_report(params)
    print(json.dumps({"reports": reports, "kernel_fraction_moved": moved}))


if __name__ == "__main__":
    main(sys.argv[1])
