"""FLOPs of one Quiet-STaR optimizer step, counted from the shapes the code runs; prints JSON.

    python benchmarks/step_flops.py [--config experiments/mistral_owm.py] [--check]

The counting lives in qstar_jax/training/flops.py (the training log's MFU uses it).

`--check` compiles the forward loss of a small model whose loops all run once and compares
XLA's own count (`compiled.cost_analysis()`, which counts a loop body once) with this one.
With the layers unrolled XLA also drops what nothing reads: at step n_ahead - 2 (no LM
head) the last layer's attention output, o_proj and MLP. The check subtracts that part;
in the real step the layer loop keeps it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.training.flops import forward_flops, step_flops


def load_experiment(path: str):
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def configs_from(cfg) -> tuple[ModelConfig, QuietStarConfig]:
    vocab = cfg.preflight_vocab_size
    model = ModelConfig(**{**cfg.model.to_dict(), "vocab_size": vocab})
    qs = QuietStarConfig(**cfg.quiet_star.to_dict(), start_token_id=vocab - 2, end_token_id=vocab - 1)
    return model, qs


def check_against_xla() -> dict[str, float]:
    """A model where every loop runs once (so XLA's per-body count is the whole count)."""
    import jax
    import jax.numpy as jnp

    from qstar_jax.models.transformer import init_params
    from qstar_jax.method.mixing import init_quiet_star_params
    from qstar_jax.method.loss import quiet_star_loss

    m = ModelConfig(model_type="mistral", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=2,
                    num_heads=8, num_kv_heads=2, head_dim=64, scan_unroll=2)
    qs = QuietStarConfig(n_ahead=3, n_ahead_talk=1, n_passes=2, logits_chunk_rows=0, remat_steps=False,
                         start_token_id=4094, end_token_id=4095)
    batch, seq = 2, 128
    params = jax.eval_shape(lambda: init_quiet_star_params(m, qs, init_params(m, jax.random.key(0)),
                                                           jnp.zeros((m.hidden_size,)), jax.random.key(1)))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, seq), bool)
    loss = jax.jit(lambda p, t, v: quiet_star_loss(m, qs, p, t, v, jax.random.key(0))[0])
    xla = loss.lower(params, tokens, valid).compile().cost_analysis()["flops"]
    rows = batch * qs.n_passes * seq
    d, hk = m.hidden_size, m.num_heads * m.head_dim
    dead = 2 * rows * (hk * d + 3 * d * m.intermediate_size) + 4 * rows * m.num_heads * (seq + qs.n_steps + 1) * m.head_dim
    ours = sum(forward_flops(m, qs, batch, seq).values()) - dead
    return {"xla_forward_flops": xla, "counted_forward_flops": ours, "ratio": xla / ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "experiments", "mistral_owm.py"))
    parser.add_argument("--check", action="store_true", help="compare with XLA's cost analysis on a small model")
    args = parser.parse_args()
    cfg = load_experiment(args.config)
    m, qs = configs_from(cfg)
    flops = step_flops(m, qs, cfg.batch_size, cfg.data.seq_len)
    print(json.dumps({"config": os.path.relpath(args.config, REPO), "batch": cfg.batch_size,
                      "seq_len": cfg.data.seq_len, "n_ahead": qs.n_ahead, "n_ahead_talk": qs.n_ahead_talk,
                      "n_passes": qs.n_passes, "remat": m.remat, "remat_steps": qs.remat_steps, **flops}))
    if args.check:
        print(json.dumps({"check": check_against_xla()}))


if __name__ == "__main__":
    main()
