"""Text generation, with or without thinking, from a training run or a model directory.

    python -m qstar_jax.generate --checkpoint DIR --prompt TEXT [--think/--no-think]
        [--show-thoughts] [--max-new-tokens N] [--temperature T] [--seed S]

With --think the model thinks one thought before every token (KV-cached, so a token
costs n_ahead decode steps whatever the prompt length). Thoughts never appear in the
output unless --show-thoughts asks; then each shows as «…» before the token it preceded.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from qstar_jax.training.checkpoint import load_for_inference
from qstar_jax.inference.decode import generate, prompt_room
from qstar_jax.errors import UserError, exit_on_user_error

THOUGHT_OPEN, THOUGHT_CLOSE = "\u00ab", "\u00bb"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--show-thoughts", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    return args


def render(tokenizer, tokens: list[int], thoughts: list[list[int]] | None) -> str:
    if thoughts is None:
        return tokenizer.decode(tokens)
    pieces = []
    for token, thought in zip(tokens, thoughts):
        pieces.append(f"{THOUGHT_OPEN}{tokenizer.decode(thought)}{THOUGHT_CLOSE}")
        pieces.append(tokenizer.decode([token]))
    return "".join(pieces)


def run(args: argparse.Namespace) -> str:
    config, qs, params, tokenizer = load_for_inference(args.checkpoint)
    if args.think and qs is None:
        raise UserError(f"{args.checkpoint} has no thought parameters (a plain LM); use --no-think")
    prompt = tokenizer.with_bos(tokenizer.encode(args.prompt))
    if not prompt:
        raise UserError("the prompt is empty")
    room = prompt_room(config, qs, args.max_new_tokens, args.think)
    if len(prompt) > room:
        raise UserError(f"the prompt is {len(prompt)} tokens; with --max-new-tokens {args.max_new_tokens} the model's "
                        f"context of {config.max_position_embeddings} tokens holds {room}")
    prompt_1xT = jnp.asarray([prompt], jnp.int32)
    tokens_1xM, thoughts_1xMxS = generate(
        config, qs, params, prompt_1xT, jnp.ones(prompt_1xT.shape, bool), jax.random.key(args.seed),
        args.max_new_tokens, args.temperature, args.think,
    )
    tokens = tokenizer.until_eos(int(t) for t in tokens_1xM[0])
    thoughts = [[int(t) for t in th] for th in thoughts_1xMxS[0]] if args.think and args.show_thoughts else None
    return render(tokenizer, tokens, thoughts)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    print(run(parse_args(sys.argv[1:] if argv is None else argv)))
