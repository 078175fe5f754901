"""FLOPs of one Quiet-STaR optimizer step, counted from the shapes the code runs; prints JSON.

    python benchmarks/step_flops.py [--config experiments/mistral_owm.py] [--check]

What one step computes (quiet_star.rollout): a base pass over B x N tokens, then
n_steps = (n_ahead - 1) + (n_ahead_talk - 1) thought steps, each feeding T = n_passes * N
tokens per row through every layer. A thought query attends to all N base keys (masked,
not skipped) plus the S = n_steps slots of its own thought cache plus itself. The LM head
runs on the base pass, the n_ahead - 3 sampling steps and the n_ahead_talk talk steps (not
on step n_ahead - 2); the mixing head on the talk steps.

"model" FLOPs are forward + backward (3x forward), the convention MFU is quoted in.
"executed" adds what rematerialisation recomputes in the backward pass: the thought steps
(quiet_star.remat_steps), every layer again (model.remat, nested inside the former), and
the LM-head chunks (rows_in_chunks checkpoints each chunk once rows exceed the chunk).

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

from qstar_jax.config import ModelConfig, QuietStarConfig


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


def layer_matmul_params(m: ModelConfig) -> int:
    """Weights one token multiplies through in one layer: q, k, v, o and the SwiGLU MLP."""
    d, h, g, k, f = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size
    return d * h * k + 2 * d * g * k + h * k * d + 3 * d * f


def forward_flops(m: ModelConfig, qs: QuietStarConfig, batch: int, seq: int) -> dict[str, int]:
    """Forward FLOPs of one Quiet-STaR loss evaluation, by part (2 FLOPs per multiply-add)."""
    b, n, p, s = batch, seq, qs.n_passes, qs.n_steps
    t = p * n  # thought queries per row
    layers, heads, k = m.num_layers, m.num_heads, m.head_dim
    lm_head = 2 * m.hidden_size * m.vocab_size
    d = m.hidden_size
    mixing = 2 * (2 * d * d + d * d + d)
    head_steps = qs.n_sampled + qs.n_ahead_talk  # thought steps that apply the LM head
    return {
        "base_layers": 2 * layer_matmul_params(m) * layers * b * n,
        "base_attention": 4 * b * heads * n * n * k * layers,  # q.k and p.v over the full N x N
        "base_lm_head": lm_head * b * n,
        "thought_layers": 2 * layer_matmul_params(m) * layers * b * t * s,
        "thought_attention": 4 * b * heads * t * (n + s + 1) * k * layers * s,
        "thought_lm_head": lm_head * b * t * head_steps,
        "mixing_head": mixing * b * t * qs.n_ahead_talk,
    }


def step_flops(m: ModelConfig, qs: QuietStarConfig, batch: int, seq: int) -> dict[str, float]:
    fwd = forward_flops(m, qs, batch, seq)
    forward = sum(fwd.values())
    thought = fwd["thought_layers"] + fwd["thought_attention"] + fwd["thought_lm_head"] + fwd["mixing_head"]
    recompute = 0
    if qs.remat_steps:
        recompute += thought
    if m.remat:  # inside a rematerialised thought step the layers run once more still
        recompute += fwd["base_layers"] + fwd["base_attention"] + fwd["thought_layers"] + fwd["thought_attention"]
    chunked = qs.logits_chunk_rows > 0
    if chunked and batch * seq > qs.logits_chunk_rows:
        recompute += fwd["base_lm_head"]
    if chunked and batch * qs.n_passes * seq > qs.logits_chunk_rows:
        recompute += fwd["thought_lm_head"]
    tokens_through_layers = batch * seq * (1 + qs.n_passes * qs.n_steps)
    return {
        "forward_by_part": fwd,
        "forward": forward,
        "model_flops_per_step": 3 * forward,
        "executed_flops_per_step": 3 * forward + recompute,
        "token_passes_per_step": tokens_through_layers,
        "flops_per_token_pass": 3 * forward / tokens_through_layers,
        "six_n_per_token_pass": 6 * (layer_matmul_params(m) * m.num_layers + m.hidden_size * m.vocab_size),
    }


def check_against_xla() -> dict[str, float]:
    """A model where every loop runs once (so XLA's per-body count is the whole count)."""
    import jax
    import jax.numpy as jnp

    from qstar_jax.model import init_params
    from qstar_jax.quiet_star import init_quiet_star_params, quiet_star_loss

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
