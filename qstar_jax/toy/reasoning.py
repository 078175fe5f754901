"""The toy-reasoning corpus: chained arithmetic whose working is written out, or left implicit.

A problem is a chain of single-digit operations evaluated left to right, modulo 10:

    question   7 + 5 * 3 + 9 * 7 + 4 =
    working    2 6 5 5 9              (the running value after each operation)
    answer     9

and a document renders it in one of two ways:

    explicit   7 + 5 * 3 + 9 * 7 + 4 = --- 2 6 5 5 9 --- 9
    implicit   7 + 5 * 3 + 9 * 7 + 4 = 9

The "aside" variant makes "---" an unreliable opener: a share of the explicit documents
(`aside_fraction`) open it on an unrelated aside (random digits, as long as the working),
and of the others only `delimiter_fraction` write the working after "---", the rest
after another marker:

    aside      7 + 5 * 3 + 9 * 7 + 4 = --- 8 0 3 3 1 --- 9
    marker     7 + 5 * 3 + 9 * 7 + 4 = :: 2 6 5 5 9 :: 9

A model pretrained on that can write the working (it has seen plenty, after "::") but
follows "---" with it only some of the time, so a thought, which starts from the
embedding of "---", starts out wrong most of the time: the thoughts must be *learned*.

Each working step is one small table lookup (an operation on the previous running value
and the next operand), easy for a small transformer to learn; the answer of an implicit
document needs all of them at once, in one forward pass. Multiplication uses only 3, 7
and 9 (units mod 10), so no operation loses information: the answer is uniform over the
ten digits and no shortcut (a final "* 0", say) predicts it from part of the question.
The working is delimited by "---", the text whose embedding initialises Quiet-STaR's
thought tokens, as separators do in web text. docs/toy_experiment.md explains the design.

Every question belongs to one split, "train", "dev" or "test", decided by a hash of its
text (`split_of`): training documents are drawn from "train" only and held-out problems
from "dev" or "test", so no held-out question is ever trained on, whatever the seeds and
counts (a 3-operation chain has only 10 * 13^3 = 21,970 questions: different seeds alone
shared most of them). Within a split, problems are a pure function of (count, seed), and
`check_held_out` asserts the disjointness against the actual training documents.

    python -m qstar_jax.toy_reasoning --output problems.jsonl --count 500 --seed 3 [--split test]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Iterable, NamedTuple, Sequence

from qstar_jax import paths
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.training.splits import SPLITS, check_disjoint, check_split, split_of

DELIMITER = "---"
OTHER_MARKER = "::"  # opens the working in the "aside" variant's other explicit documents
MULTIPLIERS = (3, 7, 9)  # units modulo 10: multiplying by them is a bijection
MAX_REJECTIONS = 100_000  # draws in a row outside the split before a split is called empty


class Problem(NamedTuple):
    question: str  # "7 + 5 * 3 + 9 * 7 + 4 ="
    working: str  # "2 6 5 5 9"
    answer: str  # "9"

    def explicit(self, marker: str = DELIMITER) -> str:
        return f"{self.question} {marker} {self.working} {marker} {self.answer}"

    def implicit(self) -> str:
        return f"{self.question} {self.answer}"

    def aside(self, rng: random.Random) -> str:
        digits = " ".join(str(rng.randrange(10)) for _ in self.working.split())
        return f"{self.question} {DELIMITER} {digits} {DELIMITER} {self.answer}"


def make_problem(rng: random.Random, num_ops: int) -> Problem:
    value = rng.randrange(10)
    question, working = [str(value)], []
    for _ in range(num_ops):
        if rng.random() < 0.5:
            operand = rng.randrange(10)
            value = (value + operand) % 10
            question += ["+", str(operand)]
        else:
            operand = rng.choice(MULTIPLIERS)
            value = (value * operand) % 10
            question += ["*", str(operand)]
        working.append(str(value))
    return Problem(" ".join(question + ["="]), " ".join(working), str(value))


def problems(count: int, seed: int, num_ops: int = 5, split: str = "train") -> list[Problem]:
    """`count` problems of `num_ops` operations whose questions belong to `split`,
    deterministic in `seed`: draws from outside the split are rejected, so the problems keep
    the generator's distribution restricted to the split (repeats allowed, as before)."""
    if num_ops < 1:
        raise UserError(f"num_ops must be >= 1, got {num_ops}")
    check_split(split)
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < count:
        for _ in range(MAX_REJECTIONS):
            problem = make_problem(rng, num_ops)
            if split_of(problem.question) == split:
                out.append(problem)
                break
        else:
            raise UserError(f"split {split!r} holds no question of {num_ops} operations "
                            f"(none in {MAX_REJECTIONS:,} draws; asked for count={count})")
    return out


def document_question(document: str) -> str | None:
    """The question a training document starts with (its text up to the first "=", what
    every rendering of `documents` begins with), or None for a document with none."""
    head, equals, _ = document.partition("=")
    return head + equals if equals else None


def check_held_out(items: Sequence[Problem], documents: Iterable[str], what: str) -> None:
    """Raises HeldOutLeak when a question of `items` is the question of a training document."""
    trained = (question for question in map(document_question, documents) if question is not None)
    check_disjoint((item.question for item in items), trained, what)


def documents(count: int, seed: int, explicit_fraction: float, num_ops: int = 5,
              aside_fraction: float = 0.0, delimiter_fraction: float = 1.0) -> list[str]:
    """Training text, from split "train" only: each problem rendered explicit with
    probability `explicit_fraction`.
    An explicit one is an aside after "---" with probability `aside_fraction`; otherwise
    its working follows "---" with probability `delimiter_fraction`, else "::"."""
    for name, value in (("explicit_fraction", explicit_fraction), ("aside_fraction", aside_fraction),
                        ("delimiter_fraction", delimiter_fraction)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {value}")
    rng = random.Random(seed + 1_000_003)  # the rendering choice, independent of the problems
    variant_rng = random.Random(seed + 2_000_003)  # its own stream: the defaults leave the corpus as it was
    out = []
    for p in problems(count, seed, num_ops, split="train"):
        if rng.random() >= explicit_fraction:
            out.append(p.implicit())
        elif aside_fraction and variant_rng.random() < aside_fraction:
            out.append(p.aside(variant_rng))
        elif delimiter_fraction < 1.0 and variant_rng.random() >= delimiter_fraction:
            out.append(p.explicit(OTHER_MARKER))
        else:
            out.append(p.explicit())
    return out


def write_problems(path: str, items: list[Problem]) -> None:
    paths.write_text(path, "".join(json.dumps(p._asdict()) + "\n" for p in items))


def read_problems(path: str) -> list[Problem]:
    """Problems from JSONL with question / working / answer fields (what `write_problems` writes)."""
    lines = [line for line in paths.read_text(path, "problems file").splitlines() if line.strip()]
    items = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            items.append(Problem(str(record["question"]), str(record.get("working", "")), str(record["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{number}: not a toy-reasoning problem ({type(e).__name__}: {e})") from None
    if not items:
        raise UserError(f"{path} holds no problems")
    return items


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.toy_reasoning", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--num-ops", type=int, default=5)
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="whose questions to draw: dev and test are never in training documents (train is)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    write_problems(args.output, problems(args.count, args.seed, args.num_ops, args.split))
