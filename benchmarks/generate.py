"""Generation speed, base vs thinking, at several prompt lengths; one JSON line each.

    python benchmarks/generate.py [--new-tokens 32] [--n-ahead 12]

Tiny random Mistral (hidden 64, 2 layers, vocab 1000), batch 1, greedy. With a KV cache
a thinking token costs n_ahead decode steps however long the prompt is, so thinking
tokens/s should stay >= 1/(n_ahead+2) of base tokens/s at every prompt length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.inference.decode import generate
from qstar_jax.models.transformer import init_params
from qstar_jax.method.mixing import init_quiet_star_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--n-ahead", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vocab = 1000
    config = ModelConfig("mistral", vocab, 64, 256, 2, 4, 2, 16, sliding_window=4096, max_position_embeddings=4096)
    qs = QuietStarConfig(n_ahead=args.n_ahead, start_token_id=vocab - 2, end_token_id=vocab - 1)
    lm = init_params(config, jax.random.key(0))
    params = init_quiet_star_params(config, qs, lm, lm["embed_tokens"]["embedding"][3], jax.random.key(1))
    for prompt_len in (64, 256, 1024):
        prompt = jax.random.randint(jax.random.key(prompt_len), (1, prompt_len), 0, vocab - 2)
        valid = jnp.ones(prompt.shape, bool)
        for mode in ("base", "think"):
            run = lambda: jax.block_until_ready(
                generate(config, qs, params, prompt, valid, jax.random.key(2), args.new_tokens, 0.0, mode == "think")
            )
            run()  # compile
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            print(json.dumps(dict(mode=mode, prompt_len=prompt_len, new_tokens=args.new_tokens,
                                  n_ahead=args.n_ahead, seconds=round(seconds, 4),
                                  tokens_per_s=round(args.new_tokens / seconds, 2),
                                  backend=jax.default_backend())), flush=True)


if __name__ == "__main__":
    main()
