"""Held-out means held out: train, dev and test questions are disjoint by construction (a hash
of the question decides its split), training text draws from "train" only, and
`check_held_out` catches any held-out question in training documents."""

from __future__ import annotations

import itertools

import pytest

from qstar_jax.errors import UserError
from qstar_jax.toy import reasoning
from qstar_jax.training import corpora, splits


def test_every_split_draws_only_its_own_questions_whatever_the_seed():
    for num_ops in (2, 3, 5):
        questions = {}
        for split in reasoning.SPLITS:
            items = [p for seed in (0, 1, 2, 3) for p in reasoning.problems(500, seed, num_ops, split=split)]
            assert {reasoning.split_of(p.question) for p in items} == {split}
            questions[split] = {p.question for p in items}
        for a, b in itertools.combinations(reasoning.SPLITS, 2):
            assert not questions[a] & questions[b], (num_ops, a, b)
    # Training text holds "train" questions only (every rendering starts with the question).
    docs = reasoning.documents(2000, seed=3, explicit_fraction=0.5, num_ops=3, aside_fraction=0.3,
                               delimiter_fraction=0.5)
    assert {reasoning.split_of(reasoning.document_question(d)) for d in docs} == {"train"}


def test_split_shares_leave_training_most_of_the_space_and_the_hash_is_stable():
    ops = [f"+ {d}" for d in range(10)] + [f"* {m}" for m in reasoning.MULTIPLIERS]
    space = [" ".join([str(v), *chain, "="]) for v in range(10) for chain in itertools.product(ops, repeat=3)]
    shares = {s: sum(reasoning.split_of(q) == s for q in space) / len(space) for s in reasoning.SPLITS}
    assert shares["train"] > 0.75 and 0.08 < shares["dev"] < 0.12 and 0.08 < shares["test"] < 0.12
    # Pinned: a different hash (or Python's salted `hash`) would silently reshuffle every split.
    assert [reasoning.split_of(q) for q in ("0 + 0 =", "5 + 9 =", "7 + 3 =", "7 + 5 * 3 + 9 * 7 + 4 =")] == [
        "dev", "test", "dev", "train"]


def test_problems_keep_repeats_and_refuse_an_unknown_or_empty_split(monkeypatch):
    items = reasoning.problems(60, seed=0, num_ops=1, split="test")  # a dozen 1-op test questions
    assert len(items) == 60 and len({p.question for p in items}) < 20
    assert items == reasoning.problems(60, seed=0, num_ops=1, split="test")
    with pytest.raises(UserError, match="split must be one of train, dev, test, got 'eval'"):
        reasoning.problems(5, seed=0, split="eval")
    monkeypatch.setitem(splits.HELD_OUT_PERCENT, "test", 0)
    monkeypatch.setattr(reasoning, "MAX_REJECTIONS", 2000)
    with pytest.raises(UserError, match=r"split 'test' holds no question of 1 operations .*count=7"):
        reasoning.problems(7, seed=0, num_ops=1, split="test")


def test_check_held_out_finds_a_planted_question_in_any_rendering_and_passes_a_clean_set():
    test_items = reasoning.problems(200, seed=3, num_ops=3, split="test")
    docs = reasoning.documents(3000, seed=1, explicit_fraction=0.5, num_ops=3)
    reasoning.check_held_out(test_items, docs, "clean test set")
    planted = test_items[150]
    for text in (planted.implicit(), planted.explicit(), planted.explicit(reasoning.OTHER_MARKER)):
        with pytest.raises(splits.HeldOutLeak) as leak:
            reasoning.check_held_out(test_items, [*docs[:100], text, *docs[100:]], "the planted set")
        assert isinstance(leak.value, RuntimeError)
        assert str(leak.value) == (f"the planted set: held-out question {planted.question!r} "
                                   "occurs in the training documents")
    # Exact: a held-out question inside a longer training question is no leak.
    short = reasoning.Problem("5 + 9 =", "4", "4")
    reasoning.check_held_out([short], ["2 * 3 + 5 + 9 = 0", "no question here"], "suffix")
    with pytest.raises(splits.HeldOutLeak, match="'5 [+] 9 ='"):
        reasoning.check_held_out([short], ["5 + 9 = --- 4 --- 4"], "exact")


def test_toy_reasoning_cli_writes_held_out_questions(tmp_path):
    path = str(tmp_path / "problems.jsonl")
    reasoning.main(["--output", path, "--count", "30", "--seed", "0", "--num-ops", "3"])  # default: test
    assert {reasoning.split_of(p.question) for p in reasoning.read_problems(path)} == {"test"}
    reasoning.main(["--output", path, "--count", "30", "--seed", "0", "--num-ops", "3", "--split", "dev"])
    assert reasoning.read_problems(path) == reasoning.problems(30, 0, 3, split="dev")


def test_arithmetic_corpus_splits_by_question_and_trains_on_train_only():
    questions = {}
    for split in reasoning.SPLITS:
        records = corpora.arithmetic_problems(400, seed=0, split=split)
        assert {reasoning.split_of(r["question"]) for r in records} == {split}
        questions[split] = {r["question"] for r in records}
    for a, b in itertools.combinations(reasoning.SPLITS, 2):
        assert not questions[a] & questions[b]
    corpus = corpora.default_corpus(1000, seed=0)
    assert {reasoning.split_of(text.partition("?")[0] + "?") for text in corpus} == {"train"}
    held_out = corpora.arithmetic_problems(300, seed=0, split="test")
    corpora.check_held_out(held_out, corpus, "clean corpus")
    leaked = corpora.document(held_out[7])
    with pytest.raises(splits.HeldOutLeak, match="^planted: held-out question .* occurs in the training documents$"):
        corpora.check_held_out(held_out, [*corpus, leaked], "planted")
    with pytest.raises(UserError, match="split must be one of"):
        corpora.arithmetic_problems(3, split="validation")
