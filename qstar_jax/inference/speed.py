"""Decoding speed of checkpoints: forward passes and measured tokens/s per generated token,
timed alternately so that a change in the machine's load falls on every checkpoint alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.inference.decode import decoding_params, generate_decoded
from qstar_jax.training import checkpoint

BENCH_PROMPT = "Ava has 12 apples. Ben gives Ava 7 more. How many apples does Ava have now?"


BENCH_REPEATS = 5


class Timed(NamedTuple):
    """A checkpoint to time: its path, step (None: newest) and think-gate threshold (None:
    think before every token if it thinks at all)."""

    path: str
    step: int | None = None
    think_gate: float | None = None


def generation_runner(timed: Timed, new_tokens: int,
                      prompt: str = BENCH_PROMPT) -> tuple[Callable[[], jax.Array], float, float]:
    """(run, forward passes and thoughts per generated token) for a checkpoint: `run()` decodes
    `new_tokens` greedily after `prompt` (batch 1), thinking if the model thinks (where the
    gate says, with a threshold), and waits for the result. Building it compiles. The weights
    are put in decoding form once, as a server would at load."""
    config, qs, params, tokenizer = checkpoint.load_for_inference(timed.path, timed.step)
    params = decoding_params(config, params)
    prompt_1xT = jnp.asarray([tokenizer.with_bos(tokenizer.encode(prompt))], jnp.int32)
    valid_1xT = jnp.ones(prompt_1xT.shape, bool)

    def run() -> jax.Array:
        decoded = generate_decoded(config, qs, params, prompt_1xT, valid_1xT, jax.random.key(0), new_tokens, 0.0,
                                   qs is not None, timed.think_gate)
        return jax.block_until_ready(decoded.thought_BxM)

    thoughts_per_token = float(np.mean(run()))
    # inference/decode.py: a thought costs n_ahead - 1 decode steps on top of the token's own
    passes = 1 + (qs.n_ahead - 1) * thoughts_per_token if qs is not None else 1
    return run, passes, thoughts_per_token


def generation_speeds(checkpoints: dict[str, tuple], new_tokens: int, prompt: str = BENCH_PROMPT,
                      rounds: int = BENCH_REPEATS) -> dict[str, dict[str, Any]]:
    """Inference cost of checkpoints {name: Timed fields}: forward passes, thoughts and
    measured tokens/s per generated token. After one compiling run each, `rounds` rounds time
    every checkpoint once, in turn, so that a change in the machine's load falls on all of
    them alike; the median per checkpoint, and every round's figure (for `paired_speedup`).
    All of them are loaded at once (small models)."""
    runners = {name: generation_runner(Timed(*fields), new_tokens, prompt) for name, fields in checkpoints.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, (run, _, _) in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"forward_passes_per_token": passes, "thoughts_per_token": thoughts,
                   "tokens_per_s": round(new_tokens / statistics.median(times[name]), 1),
                   "tokens_per_s_runs": [round(new_tokens / t, 1) for t in times[name]]}
            for name, (_, passes, thoughts) in runners.items()}


def paired_speedup(fast: dict[str, Any], slow: dict[str, Any]) -> float:
    """How many times faster `fast` decodes than `slow` (two `generation_speeds` entries): the
    median over rounds of the ratio within each round. A round times both back to back, so a
    change in the machine's load between rounds cancels in its ratio, unlike in a ratio of
    the two medians."""
    return statistics.median(f / s for f, s in zip(fast["tokens_per_s_runs"], slow["tokens_per_s_runs"], strict=True))


def generation_speed(path: str, step: int, new_tokens: int) -> dict[str, Any]:
    """`generation_speeds` of one checkpoint (one at a time keeps a large model's chain in memory)."""
    return generation_speeds({path: (path, step)}, new_tokens)[path]
