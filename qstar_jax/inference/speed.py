"""Decoding speed of checkpoints: forward passes and measured tokens/s per generated token,
timed alternately so that a change in the machine's load falls on every checkpoint alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qstar_jax.inference.decode import generate
from qstar_jax.training import checkpoint

BENCH_PROMPT = "Ava has 12 apples. Ben gives Ava 7 more. How many apples does Ava have now?"


BENCH_REPEATS = 5


def generation_runner(path: str, step: int | None, new_tokens: int) -> tuple[Callable[[], None], int]:
    """(run, forward passes per generated token) for a checkpoint: `run()` decodes
    `new_tokens` greedily after a fixed prompt (batch 1), thinking if the model thinks, and
    waits for the result. Its first call compiles."""
    config, qs, params, tokenizer = checkpoint.load_for_inference(path, step)
    ids = tokenizer.with_bos(tokenizer.encode(BENCH_PROMPT))
    prompt_1xT = jnp.asarray([ids], jnp.int32)
    valid_1xT = jnp.ones(prompt_1xT.shape, bool)

    def run():
        jax.block_until_ready(generate(config, qs, params, prompt_1xT, valid_1xT, jax.random.key(0), new_tokens,
                                       0.0, qs is not None))

    # inference/decode.py: a thinking token costs n_ahead decode steps (n_ahead - 1 thought inputs + itself)
    return run, qs.n_ahead if qs is not None else 1


def generation_speeds(checkpoints: dict[str, tuple[str, int | None]], new_tokens: int) -> dict[str, dict[str, Any]]:
    """Inference cost of checkpoints {name: (path, step)}: forward passes and measured
    tokens/s per generated token. After one compiling run each, BENCH_REPEATS rounds time
    every checkpoint once, in turn, so that a change in the machine's load falls on all of
    them alike; the median per checkpoint. All of them are loaded at once (small models)."""
    runners = {name: generation_runner(path, step, new_tokens) for name, (path, step) in checkpoints.items()}
    for run, _ in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(BENCH_REPEATS):
        for name, (run, _) in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"forward_passes_per_token": passes,
                   "tokens_per_s": round(new_tokens / statistics.median(times[name]), 1),
                   "tokens_per_s_runs": [round(new_tokens / t, 1) for t in times[name]]}
            for name, (_, passes) in runners.items()}


def generation_speed(path: str, step: int, new_tokens: int) -> dict[str, Any]:
    """`generation_speeds` of one checkpoint (one at a time keeps a large model's chain in memory)."""
    return generation_speeds({path: (path, step)}, new_tokens)[path]
