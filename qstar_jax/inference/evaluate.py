"""Zero-shot evaluation (GSM8K, CommonsenseQA, PIQA, SIQA), with or without thinking.

    python -m qstar_jax.evaluate --checkpoint DIR --task csqa --data dev.jsonl
        [--think/--no-think] [--limit N] [--cot-votes K] [--output results.json]

Metrics (tasks.py has the formats):
  soft_score  the paper's: probability of the true answer tokens, renormalised over the
              allowed answer tokens (the choice letters; for GSM8K, number tokens at each
              answer position), averaged over examples;
  accuracy    exact match: argmax over the choice letters; for GSM8K the first number
              of a greedy continuation;
  cot_maj@K   GSM8K only: K chains sampled at temperature 0.9 after "Let's think step by
              step.", each finished with "Therefore, the answer (arabic numerals) is",
              first number extracted, majority vote.
With --think every predicted token is the mixed post-thought prediction (one thought
before each token, as in generation). A question longer than the model's context keeps
its last tokens (`decode.prompt_room`).
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import json
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax import paths
from qstar_jax.training.checkpoint import load_for_inference
from qstar_jax.inference.decode import continuation_decoded, decoding_params, generate_decoded, prompt_room
from qstar_jax.inference.generate import check_think_gate, int64_seed
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference.tasks import TASKS, Example, extract_number, load_examples

PAD_TO = 64  # prompts are left-padded to a multiple of this, so few shapes get compiled
COT_TRIGGER = " Let's think step by step."
COT_ANSWER = "\nTherefore, the answer (arabic numerals) is"
ANSWER_TOKENS = 8  # greedy tokens read for a number


@dataclasses.dataclass
class ThoughtTally:
    """How many scored or generated tokens a thought preceded, of how many."""

    thoughts: int = 0
    tokens: int = 0

    def add(self, thought_BxM) -> None:
        self.thoughts += int(np.asarray(thought_BxM).sum())
        self.tokens += int(np.asarray(thought_BxM).size)


class Evaluator(NamedTuple):
    """A model ready to score benchmarks: its configs, params and tokenizer, and whether it
    thinks before each answer token (Quiet-STaR) or predicts plainly; with `think_gate`,
    only where its think gate predicts a gain above that threshold (counted in `tally`)."""

    config: object
    qs: object
    params: object
    tokenizer: object
    thinking: bool
    think_gate: float | None = None
    tally: ThoughtTally | None = None


def _ids(ev: Evaluator, text: str, new_tokens: int) -> list[int]:
    """The prompt's ids; one longer than the context keeps its last tokens (where the
    question is asked) after the BOS token."""
    room = prompt_room(ev.config, ev.qs, new_tokens, ev.thinking)
    ids = ev.tokenizer.encode(text)
    bos = len(ev.tokenizer.with_bos([]))
    return ev.tokenizer.with_bos(ids[max(len(ids) - (room - bos), 0):])


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[jax.Array, jax.Array]:
    width = -(-max(len(r) for r in rows) // PAD_TO) * PAD_TO
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        valid[i, width - len(row):] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


def answer_logits(ev: Evaluator, prompt: str, continuation: list[int], seed: int = 0) -> np.ndarray:
    """Next-token log-probs (MxV) before each continuation token, after `prompt`."""
    tokens, valid = left_pad([_ids(ev, prompt, len(continuation))], ev.tokenizer.pad_id)
    decoded = continuation_decoded(ev.config, ev.qs, ev.params, tokens, valid, jnp.asarray([continuation], jnp.int32),
                                   jax.random.key(seed), ev.thinking, ev.think_gate)
    if ev.tally is not None:
        ev.tally.add(decoded.thought_BxM)
    return np.asarray(jax.nn.log_softmax(decoded.logits_BxMxV[0], axis=-1))


def generated_text(ev: Evaluator, prompts: list[str], new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Continuations of `prompts` (greedy at temperature 0, else sampled), cut at EOS."""
    tokens, valid = left_pad([_ids(ev, p, new_tokens) for p in prompts], ev.tokenizer.pad_id)
    decoded = generate_decoded(ev.config, ev.qs, ev.params, tokens, valid, jax.random.key(seed), new_tokens,
                               temperature, ev.thinking, ev.think_gate)
    rows = [ev.tokenizer.until_eos(row) for row in np.asarray(decoded.tokens_BxM).tolist()]
    if ev.tally is not None:  # the tokens kept (up to EOS), as generate counts them
        for row, thought_M in zip(rows, np.asarray(decoded.thought_BxM)):
            ev.tally.add(thought_M[:len(row)])
    return [ev.tokenizer.decode(row) for row in rows]


def numeric_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """Ids whose text is digits (spaces aside): the tokens a GSM8K answer may use."""
    mask = np.zeros((vocab_size,), bool)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        text = tokenizer.decode([i]).strip()
        mask[i] = bool(text) and text.isdigit()
    return mask


def sequence_logp(ev: Evaluator, prompt: str, continuation: list[int]) -> float:
    logp_MxV = answer_logits(ev, prompt, continuation)
    return float(sum(logp_MxV[t, token] for t, token in enumerate(continuation)))


def score_multiple_choice(ev: Evaluator, ex: Example) -> tuple[float, bool]:
    """Each choice's answer text " X" scored as a token sequence (a letter may take several
    tokens in some vocabularies); probabilities renormalised over the choices."""
    logp_C = np.array([sequence_logp(ev, ex.prompt, ev.tokenizer.encode(" " + c)) for c in ex.choices])
    answer = ex.choices.index(ex.answer)
    soft = float(np.exp(logp_C[answer] - np.logaddexp.reduce(logp_C)))
    return soft, int(np.argmax(logp_C)) == answer


def score_gsm8k(ev: Evaluator, ex: Example, numeric_V: np.ndarray) -> tuple[float, bool]:
    answer_ids = ev.tokenizer.encode(" " + ex.answer)
    logp_MxV = answer_logits(ev, ex.prompt, answer_ids)
    allowed = np.where(numeric_V, logp_MxV, -np.inf)
    allowed[np.arange(len(answer_ids)), answer_ids] = logp_MxV[np.arange(len(answer_ids)), answer_ids]
    log_soft = sum(logp_MxV[t, a] - np.logaddexp.reduce(allowed[t]) for t, a in enumerate(answer_ids))
    predicted = extract_number(generated_text(ev, [ex.prompt], ANSWER_TOKENS)[0])
    return float(np.exp(log_soft)), predicted == ex.answer


def cot_majority(ev: Evaluator, ex: Example, votes: int, chain_tokens: int, seed: int) -> tuple[str | None, bool]:
    cot_prompt = f"Q: {ex.question}\nA:{COT_TRIGGER}"
    chains = generated_text(ev, [cot_prompt] * votes, chain_tokens, temperature=0.9, seed=seed)
    finals = generated_text(ev, [cot_prompt + chain.split("\nQ:")[0] + COT_ANSWER for chain in chains], ANSWER_TOKENS)
    vote = majority_vote(finals)
    return vote, vote == ex.answer


def majority_vote(answers: list[str]) -> str | None:
    """The most common first number among the answers (ties: the one seen first)."""
    numbers = [n for n in (extract_number(text) for text in answers) if n is not None]
    return collections.Counter(numbers).most_common(1)[0][0] if numbers else None


def evaluate(ev: Evaluator, task: str, examples: list[Example], cot_votes: int = 0, chain_tokens: int = 96,
             seed: int = 0) -> dict:
    """Zero-shot scores on `examples`: the mean probability of the answer (soft score) and
    accuracy; with `cot_votes`, GSM8K chain-of-thought majority-vote accuracy too."""
    numeric_V = numeric_token_mask(ev.tokenizer, ev.config.vocab_size) if task == "gsm8k" else None
    soft, correct, cot = [], [], []
    for i, ex in enumerate(examples):
        s, c = score_gsm8k(ev, ex, numeric_V) if task == "gsm8k" else score_multiple_choice(ev, ex)
        soft.append(s)
        correct.append(c)
        if cot_votes:
            cot.append(cot_majority(ev, ex, cot_votes, chain_tokens, int64_seed(seed + i))[1])
    result = {"task": task, "examples": len(examples), "think": ev.thinking,
              "soft_score": float(np.mean(soft)), "accuracy": float(np.mean(correct))}
    if cot_votes:
        result[f"cot_maj@{cot_votes}"] = float(np.mean(cot))
    if ev.think_gate is not None:
        result["think_gate"] = ev.think_gate
    if ev.tally is not None and ev.tally.tokens:
        result["thoughts_per_token"] = ev.tally.thoughts / ev.tally.tokens
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", required=True, help="JSONL file in the task's public layout, or tfds:NAME/SPLIT")
    parser.add_argument("--tfds-data-dir", help="where tfds datasets are prepared (with --data tfds:...)")
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--think-gate", type=float, metavar="THRESHOLD",
                        help="think only where the think gate predicts a gain above THRESHOLD (nats of "
                             "log-likelihood over the n_ahead_talk tokens it was trained on)")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--cot-votes", type=int, default=0, help="GSM8K chain-of-thought majority vote over K samples")
    parser.add_argument("--cot-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results JSON here too")
    args = parser.parse_args(argv)
    if args.limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    if args.cot_votes < 0:
        raise UserError(f"--cot-votes must be >= 0 (0 = no chain-of-thought vote), got {args.cot_votes}")
    if args.cot_tokens < 1:
        raise UserError(f"--cot-tokens must be >= 1, got {args.cot_tokens}")
    if args.cot_votes and args.task != "gsm8k":
        raise UserError("--cot-votes applies to --task gsm8k")
    check_think_gate(args.think_gate, args.think)
    if args.output and paths.path(args.output).is_dir():
        raise UserError(f"--output must be a file; {args.output} is a directory")
    return args


def check_chain_room(config, qs, think: bool, cot_tokens: int) -> None:
    """Refuses chains too long to leave room for a question in the model's context before
    any example is scored (`_ids` would find it at the first chain)."""
    try:
        prompt_room(config, qs, cot_tokens, think)
    except UserError as e:
        raise UserError(f"--cot-tokens {cot_tokens}: {e}") from None


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    examples = load_examples(args.task, args.data, args.limit, args.tfds_data_dir)
    config, qs, params, tokenizer = load_for_inference(args.checkpoint)
    if args.think and qs is None:
        raise UserError(f"{args.checkpoint} has no thought parameters (a plain LM); use --no-think")
    if args.think_gate is not None and not qs.think_gate:
        raise UserError(f"{args.checkpoint} has no think gate (train with --config.quiet_star.think_gate=linear)")
    if args.cot_votes:
        check_chain_room(config, qs, args.think, args.cot_tokens)
    evaluator = Evaluator(config, qs, decoding_params(config, params), tokenizer, args.think, args.think_gate,
                          ThoughtTally())
    result = evaluate(evaluator, args.task, examples, args.cot_votes, args.cot_tokens, args.seed)
    print(json.dumps(result))
    if args.output:
        paths.write_text(args.output, json.dumps(result, indent=2))
