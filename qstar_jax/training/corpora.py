"""The embedded default data: generated arithmetic word problems (the README's main command
trains on them, with no download)."""

from __future__ import annotations

import random


def arithmetic_problems(num_problems: int, seed: int = 0) -> list[dict[str, str]]:
    """Short arithmetic stories as GSM8K-format records (question, answer with "#### N").

    Deterministic given the seed, so held-out problems are just another seed.
    """
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
    things = ["apples", "books", "coins", "shells", "stamps", "marbles", "pens", "cards"]
    problems = []
    for _ in range(num_problems):
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
        problems.append({"question": question, "answer": f"{steps}, so the answer is {result}.\n#### {result}"})
    return problems


def default_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """The embedded training text: each arithmetic problem with its worked answer.

    The numbers make some tokens hard (the results) and others easy (the template),
    which is what Quiet-STaR's thinking is meant to help with.
    """
    return [
        f"{p['question']} {p['answer'].split(chr(10))[0]}" for p in arithmetic_problems(num_documents, seed)
    ]
