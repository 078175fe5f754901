"""Held-out splits by construction: every generated question belongs to one of "train",
"dev" and "test", decided by a stable hash of its text.

The generators (training/corpora.py, toy/reasoning.py) draw training text from "train"
only and held-out problems from "dev" or "test", so no held-out question is ever trained
on, whatever the seeds and counts; each study also checks the actual training documents
against its held-out set (`HeldOutLeak`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from qstar_jax.errors import UserError

SPLITS = ("train", "dev", "test")
HELD_OUT_PERCENT = {"test": 10, "dev": 10}  # of the question space; "train" keeps the other 80%


class HeldOutLeak(RuntimeError):
    """A held-out question occurs in training text: a broken invariant, not a user error."""


def split_of(question: str) -> str:
    """The split a question belongs to, from a stable hash of its text (the same in every
    process and Python version, unlike `hash`): the splits are disjoint by construction."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < HELD_OUT_PERCENT["test"]:
        return "test"
    if bucket < HELD_OUT_PERCENT["test"] + HELD_OUT_PERCENT["dev"]:
        return "dev"
    return "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def check_disjoint(held_out_questions: Iterable[str], trained_questions: Iterable[str], what: str) -> None:
    """Raises HeldOutLeak, naming `what` and the first such question, when a held-out question
    is one a training document asks (exact match, one set lookup each). The generators say
    what a document's question is (`reasoning.check_held_out`, `corpora.check_held_out`)."""
    trained = set(trained_questions)
    for question in held_out_questions:
        if question in trained:
            raise HeldOutLeak(f"{what}: held-out question {question!r} occurs in the training documents")
