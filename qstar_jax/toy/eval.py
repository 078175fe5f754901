"""Answer accuracy and answer NLL on toy-reasoning problems, with or without thinking.

    python -m qstar_jax.toy_eval --checkpoint DIR --problems problems.jsonl [--no-think]
        [--step N] [--explicit] [--seed S]

The answer is the hard token: one digit after "... =". With thinking, the model thinks
one thought after "=" (start, n_ahead-3 sampled tokens, end) and the answer distribution
is the mixed post-thought prediction, exactly as in training and in `generate`.

  accuracy     the most likely digit is the true answer (exact match)
  answer_nll   -log p(true digit), in nats, with p renormalised over the ten digits
               (the answers the format allows; a base model that saw explicit documents
               also puts mass on "---", the start of written-out working, which says
               nothing about the answer; answer_nll_full_vocab keeps that mass)
  explicit     (--explicit) the model writes the working itself: greedy continuation of
               "QUESTION ---", read as "w1 .. wK --- ANSWER"; the accuracy of that ANSWER
               shows what the base model can do when the reasoning is written out.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.training.checkpoint import load_for_inference
from qstar_jax.inference.decode import continuation_decoded, generate
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference.evaluate import left_pad
from qstar_jax.toy.reasoning import DELIMITER, Problem, read_problems


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """A document starts after the previous one's EOS, as in the training stream."""
    ids = tokenizer.encode(text)
    return ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + ids


def _answer_ids(tokenizer, items: list[Problem]) -> np.ndarray:
    ids = [tokenizer.encode(p.answer) for p in items]
    if any(len(i) != 1 for i in ids):
        raise UserError("every answer must be one token of this tokenizer (a toy-reasoning word tokenizer)")
    return np.asarray([i[0] for i in ids], np.int32)


def answer_metrics(config, qs, params, tokenizer, items: list[Problem], thinking: bool, seed: int = 0,
                   think_gate: float | None = None) -> dict:
    """Accuracy and mean NLL of the answer token after each question (one batch); with a
    `think_gate` threshold the model thinks only where its gate predicts a gain above it,
    and `answer_thought` says how often it did."""
    if thinking and qs is None:
        raise UserError("this checkpoint has no thought parameters (a plain LM); evaluate with --no-think")
    tokens, valid = left_pad([_prompt_ids(tokenizer, p.question) for p in items], tokenizer.pad_id)
    answer_B = _answer_ids(tokenizer, items)
    decoded = continuation_decoded(config, qs, params, tokens, valid, jnp.asarray(answer_B[:, None]),
                                   jax.random.key(seed), thinking, think_gate)
    logp_BxV = np.asarray(jax.nn.log_softmax(decoded.logits_BxMxV[:, 0].astype(jnp.float32), axis=-1))
    digits_A = _answer_vocabulary(tokenizer)
    logp_BxA = logp_BxV[:, digits_A] - np.logaddexp.reduce(logp_BxV[:, digits_A], axis=-1, keepdims=True)
    answer_index_B = np.searchsorted(digits_A, answer_B)
    rows = np.arange(len(items))
    return {
        "problems": len(items),
        "think": thinking,
        "answer_thought": float(np.mean(decoded.thought_BxM)),
        "accuracy": float(np.mean(digits_A[np.argmax(logp_BxA, axis=-1)] == answer_B)),
        "answer_nll": float(np.mean(-logp_BxA[rows, answer_index_B])),
        "answer_nll_full_vocab": float(np.mean(-logp_BxV[rows, answer_B])),
    }


def _answer_vocabulary(tokenizer) -> np.ndarray:
    """Sorted ids of the ten digits: the answers the format allows."""
    ids = [tokenizer.encode(str(d)) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise UserError("the tokenizer does not map each digit to one token (not a toy-reasoning word tokenizer)")
    return np.asarray(sorted(i[0] for i in ids), np.int32)


def sample_thoughts(config, qs, params, tokenizer, items: list[Problem], seed: int = 0) -> list[dict]:
    """The thought after "=" and the answer it leads to (greedy on the mixed prediction)."""
    tokens, valid = left_pad([_prompt_ids(tokenizer, p.question) for p in items], tokenizer.pad_id)
    out_Bx1, thoughts_Bx1xS = generate(config, qs, params, tokens, valid, jax.random.key(seed), 1, 0.0, True)
    return [
        {"question": p.question, "working": p.working, "answer": p.answer,
         "thought": tokenizer.decode(np.asarray(thought[0]).tolist()), "predicted": tokenizer.decode([int(out[0])])}
        for p, out, thought in zip(items, out_Bx1, thoughts_Bx1xS)
    ]


def thought_accuracy(config, qs, params, tokenizer, items: list[Problem], seed: int = 0) -> dict:
    """How often the thought sampled after "=" (at the thought temperature, as in training)
    is the problem's working: the whole working when the thought has room for it, else
    its first steps. This is what the policy gradient should improve."""
    tokens, valid = left_pad([_prompt_ids(tokenizer, p.question) for p in items], tokenizer.pad_id)
    _, thoughts_Bx1xS = generate(config, qs, params, tokens, valid, jax.random.key(seed), 1, 0.0, True)
    room = thoughts_Bx1xS.shape[-1]
    exact = [tokenizer.decode(np.asarray(thought[0]).tolist()).split() == p.working.split()[:room]
             for p, thought in zip(items, thoughts_Bx1xS)]
    return {"thought_exact": float(np.mean(exact)), "thought_tokens": int(room)}


def explicit_accuracy(config, qs, params, tokenizer, items: list[Problem], marker: str = DELIMITER) -> dict:
    """Accuracy when the model writes the working out itself after `marker` (greedy, no thinking)."""
    steps = len(items[0].working.split())
    if not steps or any(len(p.working.split()) != steps for p in items):
        raise UserError("--explicit needs every problem's working, all of the same length (as toy_reasoning writes)")
    tokens, valid = left_pad([_prompt_ids(tokenizer, f"{p.question} {marker}") for p in items], tokenizer.pad_id)
    out_BxM, _ = generate(config, qs, params, tokens, valid, jax.random.key(0), steps + 2, 0.0, False)
    texts = [tokenizer.decode(np.asarray(row).tolist()).split() for row in out_BxM]
    answers = [words[steps + 1] if len(words) > steps + 1 and words[steps] == marker else None for words in texts]
    workings = [" ".join(words[:steps]) for words in texts]
    return {
        "problems": len(items),
        "explicit_accuracy": float(np.mean([a == p.answer for a, p in zip(answers, items)])),
        "working_exact": float(np.mean([w == p.working for w, p in zip(workings, items)])),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.toy_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or model directory")
    parser.add_argument("--problems", required=True, help="JSONL from python -m qstar_jax.toy_reasoning")
    parser.add_argument("--step", type=int, help="checkpoint step of a training workdir (default: newest)")
    parser.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                        help="default: think if the checkpoint has thought parameters")
    parser.add_argument("--explicit", action="store_true", help="also score answers after self-written working")
    parser.add_argument("--seed", type=int, default=0, help="thought sampling seed")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    items = read_problems(args.problems)
    config, qs, params, tokenizer = load_for_inference(args.checkpoint, args.step)
    thinking = qs is not None if args.think is None else args.think
    result = answer_metrics(config, qs, params, tokenizer, items, thinking, args.seed)
    if args.explicit:
        result.update(explicit_accuracy(config, qs, params, tokenizer, items))
    print(json.dumps(result))
