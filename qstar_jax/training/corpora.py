"""The embedded default data: generated arithmetic word problems (the README's main command
trains on them, with no download).

Each question belongs to one split, decided by a hash of its text (toy/reasoning.py's
`split_of`): the training corpus holds "train" questions only and held-out problems come
from "dev" or "test", so they are disjoint by construction, whatever the seeds and counts.
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from qstar_jax.training.splits import check_disjoint, check_split, split_of


def arithmetic_problems(num_problems: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    """Short arithmetic stories as GSM8K-format records (question, answer with "#### N"),
    every question of `split`, deterministic given the seed (repeats allowed)."""
    check_split(split)
    rng = random.Random(seed)
    problems: list[dict[str, str]] = []
    while len(problems) < num_problems:
        problem = arithmetic_problem(rng)
        if split_of(problem["question"]) == split:  # the space is large: no split is ever empty
            problems.append(problem)
    return problems


def arithmetic_problem(rng: random.Random) -> dict[str, str]:
    """One story: a sum, a product or a difference of small numbers, with its working."""
    names = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
    things = ["apples", "books", "coins", "shells", "stamps", "marbles", "pens", "cards"]
    name, other = rng.sample(names, 2)
    thing = rng.choice(things)
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
        steps, result = f"{a} plus {b} is {a + b}", a + b
    elif kind == 1:
        question = f"{name} packs {c} boxes with {a} {thing} in each box. How many {thing} are there in all?"
        steps, result = f"{c} times {a} is {c * a}", c * a
    else:
        question = f"{name} had {a + b} {thing} and gave {b} to {other}. How many {thing} does {name} keep?"
        steps, result = f"{a + b} minus {b} is {a}", a
    return {"question": question, "answer": f"{steps}, so the answer is {result}.\n#### {result}"}


def default_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """The embedded training text: each arithmetic problem of split "train" with its worked
    answer (the question, a space, the working and the result: one "?" per document).

    The numbers make some tokens hard (the results) and others easy (the template),
    which is what Quiet-STaR's thinking is meant to help with.
    """
    return [document(record) for record in arithmetic_problems(num_documents, seed, "train")]


def document(record: dict[str, str]) -> str:
    """A problem as corpus text: its question and worked answer, without the "#### N" line
    (held-out problems rendered this way read like the corpus and are never in it)."""
    return f"{record['question']} {record['answer'].splitlines()[0]}"


def check_held_out(records: Sequence[dict[str, str]], documents: Iterable[str], what: str) -> None:
    """Raises HeldOutLeak when a question of `records` is the question of a training document
    (its text up to the first "?", the one that ends every question)."""
    trained = (head + mark for head, mark, _ in (document.partition("?") for document in documents) if mark)
    check_disjoint((record["question"] for record in records), trained, what)
