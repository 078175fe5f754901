"""Benchmark of the jitted Quiet-STaR train step; prints one JSON object per configuration.

Anchor: the tiny random Mistral the official PyTorch code was measured with (hidden 64,
2 layers, 4 heads / 2 KV heads, MLP 256, float32; batch 4, seq 256, n_ahead 12,
n_ahead_talk 4, n_passes 2) at vocab 1000 and 32002, plus a sweep over seq and n_ahead.
"variant" "dense_mask" runs the official algorithm (every thought query against an
N x N*(S+2) key set) for comparison; "objective" "next_token" times a plain LM step instead. Each configuration runs in its own subprocess so
`peak_rss_gb` is that configuration's own peak.

    python benchmarks/train_step.py [--quick] [--steps 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ANCHOR = dict(vocab=1000, batch=4, seq=256, n_ahead=12, n_ahead_talk=4, n_passes=2)
TINY_MODEL = dict(hidden=64, inter=256, layers=2, heads=4, kv=2)  # the anchor's random Mistral


def configurations(quick: bool) -> list[dict]:
    anchors = [dict(ANCHOR, variant="parallel"), dict(ANCHOR, vocab=32002, variant="parallel")]
    if quick:
        return anchors
    dense = [dict(ANCHOR, variant="dense_mask"), dict(ANCHOR, vocab=32002, variant="dense_mask")]
    # The dense-mask variant stops at seq 256: at 512 it needs minutes per step here.
    sweep = [
        dict(ANCHOR, seq=seq, n_ahead=n_ahead, variant=variant)
        for variant in ("parallel", "dense_mask")
        for seq in ((128, 256, 512) if variant == "parallel" else (128, 256))
        for n_ahead in (8, 12, 16)
        if not (seq == 256 and n_ahead == 12)
    ]
    return anchors + dense + sweep


def build(spec: dict):
    """(step, state, tokens, valid) of one configuration: the jitted train step of a random
    model, its first state and a random batch; `spec` may add remat, objective=next_token
    (a plain LM step), rollout_impl, think_gate and think_share."""
    import jax
    import jax.numpy as jnp

    from qstar_jax.models.config import ModelConfig
    from qstar_jax.method.config import QuietStarConfig
    from qstar_jax.models.transformer import init_params
    from qstar_jax.method.mixing import init_quiet_star_params
    from qstar_jax.training.step import OptimizerConfig, init_train_state, make_optimizer, make_train_step

    vocab, model = spec["vocab"], {**TINY_MODEL, **spec}
    config = ModelConfig("mistral", vocab, model["hidden"], model["inter"], model["layers"], model["heads"],
                         model["kv"], model["hidden"] // model["heads"], sliding_window=4096,
                         remat=bool(spec.get("remat", False)))
    lm = init_params(config, jax.random.key(0))
    if spec.get("objective") == "next_token":  # the plain LM step (side_by_side.py's ceiling)
        qs, params = None, lm
    else:
        qs = QuietStarConfig(
            n_ahead=spec["n_ahead"], n_ahead_talk=spec["n_ahead_talk"], n_passes=spec["n_passes"],
            start_token_id=vocab - 2, end_token_id=vocab - 1, attention_impl=spec["variant"],
            rollout_impl=spec.get("rollout_impl", "scan"), think_gate=spec.get("think_gate", ""),
            think_share=spec.get("think_share", 1.0),
        )
        params = init_quiet_star_params(config, qs, lm, lm["embed_tokens"]["embedding"][3], jax.random.key(1))
    optimizer = make_optimizer(OptimizerConfig())
    state = init_train_state(params, optimizer, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (1, spec["batch"], spec["seq"]), 0, vocab - 2)
    return make_train_step(config, qs, optimizer), state, tokens, jnp.ones(tokens.shape, bool)


def timed_step(step, state, tokens, valid):
    """(seconds, new state, metrics) of one step, waited for."""
    import jax

    t0 = time.perf_counter()
    state, metrics = step(state, tokens, valid)
    jax.block_until_ready(metrics)
    return time.perf_counter() - t0, state, metrics


def measure(spec: dict, steps: int) -> dict:
    """Runs in the child process: builds the model and times `steps` train steps after compile."""
    import jax

    step, state, tokens, valid = build(spec)
    compile_s, state, metrics = timed_step(step, state, tokens, valid)
    times = []
    for _ in range(steps):
        seconds, state, metrics = timed_step(step, state, tokens, valid)
        times.append(seconds)
    step_s = statistics.median(times)
    return dict(
        spec,
        step_s=round(step_s, 4),
        step_s_min=round(min(times), 4),
        tokens_per_s=round(spec["batch"] * spec["seq"] / step_s, 1),
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        compile_s=round(compile_s, 2),
        steps_timed=steps,
        loss=round(float(metrics["loss"]), 4),
        backend=jax.default_backend(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the two anchor configurations")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child), args.steps)), flush=True)
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for spec in configurations(args.quick):
        result = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec), "--steps", str(args.steps)],
            capture_output=True, text=True, env=env,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or not lines:
            print(json.dumps(dict(spec, error=(result.stderr.strip().splitlines() or ["no output"])[-1])), flush=True)
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
