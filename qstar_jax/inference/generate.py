"""Text generation, with or without thinking, from a training run or a model directory.

    python -m qstar_jax.generate --checkpoint DIR --prompt TEXT [--think/--no-think]
        [--think-gate THRESHOLD] [--show-thoughts] [--max-new-tokens N] [--temperature T] [--seed S]

With --think the model thinks one thought before every token (KV-cached, so a token
costs n_ahead decode steps whatever the prompt length). With --think-gate (a model
trained with quiet_star.think_gate) it thinks only before the tokens whose predicted
gain exceeds THRESHOLD nats, and reports thoughts per generated token on stderr.
Thoughts never appear in the output unless --show-thoughts asks; then each shows as «…»
before the token it preceded.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from qstar_jax.training.checkpoint import load_for_inference
from qstar_jax.inference.decode import generate_decoded, prompt_room
from qstar_jax.errors import UserError, exit_on_user_error

THOUGHT_OPEN, THOUGHT_CLOSE = "\u00ab", "\u00bb"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--think-gate", type=float, metavar="THRESHOLD",
                        help="think only where the think gate predicts a gain above THRESHOLD (nats of "
                             "log-likelihood over the n_ahead_talk tokens it was trained on)")
    parser.add_argument("--show-thoughts", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be >= 0 and finite (0 = greedy), got {args.temperature}")
    check_think_gate(args.think_gate, args.think)
    return args


def check_think_gate(threshold: float | None, think: bool) -> None:
    """A --think-gate threshold is a gain in nats that the gate's prediction is compared
    with: any finite number (NaN would silently never think, infinities always or never)."""
    if threshold is None:
        return
    if not math.isfinite(threshold):
        raise UserError(f"--think-gate must be a finite number (of nats), got {threshold}")
    if not think:
        raise UserError("--think-gate needs --think")


def int64_seed(seed: int) -> int:
    """`seed` as the signed 64-bit integer `jax.random.key` takes: any int is a valid --seed
    (seeds 2**64 apart give the same numbers), and a seed + offset never overflows."""
    return (seed + 2**63) % 2**64 - 2**63


def render(tokenizer, tokens: list[int], thoughts: list[list[int]] | None) -> str:
    if thoughts is None:
        return tokenizer.decode(tokens)
    pieces = []
    for token, thought in zip(tokens, thoughts):
        if thought is not None:  # None: no thought before this token (a think gate said so)
            pieces.append(f"{THOUGHT_OPEN}{tokenizer.decode(thought)}{THOUGHT_CLOSE}")
        pieces.append(tokenizer.decode([token]))
    return "".join(pieces)


def run(args: argparse.Namespace) -> str:
    config, qs, params, tokenizer = load_for_inference(args.checkpoint)
    if args.think and qs is None:
        raise UserError(f"{args.checkpoint} has no thought parameters (a plain LM); use --no-think")
    if args.think_gate is not None and not qs.think_gate:
        raise UserError(f"{args.checkpoint} has no think gate (train with --config.quiet_star.think_gate=linear)")
    prompt = tokenizer.with_bos(tokenizer.encode(args.prompt))
    if not prompt:
        raise UserError("the prompt is empty")
    room = prompt_room(config, qs, args.max_new_tokens, args.think)
    if len(prompt) > room:
        raise UserError(f"the prompt is {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} the model's "
                        f"context of {config.max_position_embeddings} tokens holds {room}")
    prompt_1xT = jnp.asarray([prompt], jnp.int32)
    decoded = generate_decoded(config, qs, params, prompt_1xT, jnp.ones(prompt_1xT.shape, bool),
                               jax.random.key(int64_seed(args.seed)), args.max_new_tokens, args.temperature, args.think,
                               args.think_gate)
    tokens = tokenizer.until_eos(int(t) for t in decoded.tokens_BxM[0])
    thought_M = [bool(t) for t in decoded.thought_BxM[0][:len(tokens)]]
    if args.think_gate is not None:
        share = sum(thought_M) / max(len(thought_M), 1)
        print(f"thoughts per generated token: {share:.3f} ({sum(thought_M)} of {len(thought_M)})", file=sys.stderr)
    thoughts = None
    if args.think and args.show_thoughts:
        thoughts = [[int(t) for t in th] if made else None for th, made in zip(decoded.thoughts_BxMxS[0], thought_M)]
    return render(tokenizer, tokens, thoughts)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    print(run(parse_args(sys.argv[1:] if argv is None else argv)))
