"""The toy-reasoning replication: corpus, word tokenizer, answer scoring, and the study command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax import toy_reasoning
from qstar_jax.config import ModelConfig, QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.model import apply_lm, init_params
from qstar_jax.quiet_star import init_quiet_star_params
from qstar_jax.tokenizer import add_thought_tokens, load_tokenizer, train_word_tokenizer
from qstar_jax.toy_eval import answer_metrics, explicit_accuracy
from qstar_jax.toy_study import TABLE_END, TABLE_START

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate_chain(question: str) -> list[int]:
    """The running values of "d op d op d ... =" evaluated left to right modulo 10."""
    words = question.split()
    assert words[-1] == "="
    value, running = int(words[0]), []
    for op, operand in zip(words[1:-1:2], words[2:-1:2]):
        value = (value + int(operand)) % 10 if op == "+" else (value * int(operand)) % 10
        assert op == "+" or int(operand) in toy_reasoning.MULTIPLIERS
        running.append(value)
    return running


def test_problems_are_deterministic_correct_and_seeded():
    items = toy_reasoning.problems(200, seed=5, num_ops=4)
    assert items == toy_reasoning.problems(200, seed=5, num_ops=4)
    assert items != toy_reasoning.problems(200, seed=6, num_ops=4)
    for p in items:
        running = evaluate_chain(p.question)
        assert len(running) == 4
        assert p.working == " ".join(map(str, running)) and p.answer == str(running[-1])
    # Uniform answers: no digit dominates (a shortcut-free answer distribution).
    counts = np.bincount([int(p.answer) for p in toy_reasoning.problems(5000, seed=0)], minlength=10)
    assert counts.min() > 400 and counts.max() < 600
    docs = toy_reasoning.documents(100, seed=1, explicit_fraction=0.0)
    assert all(toy_reasoning.DELIMITER not in d for d in docs)
    docs = toy_reasoning.documents(100, seed=1, explicit_fraction=1.0)
    assert all(d.count(toy_reasoning.DELIMITER) == 2 for d in docs)
    mixed = toy_reasoning.documents(1000, seed=1, explicit_fraction=0.5)
    assert 400 < sum(toy_reasoning.DELIMITER in d for d in mixed) < 600
    with pytest.raises(UserError, match="explicit_fraction"):
        toy_reasoning.documents(10, seed=1, explicit_fraction=1.5)


def test_problem_files_round_trip_and_bad_files_fail_in_one_line(tmp_path):
    path = str(tmp_path / "p.jsonl")
    items = toy_reasoning.problems(7, seed=3)
    toy_reasoning.write_problems(path, items)
    assert toy_reasoning.read_problems(path) == items
    with pytest.raises(UserError, match="explicit needs every problem's working"):
        explicit_accuracy(None, None, None, None, [items[0]._replace(working="")])
    with pytest.raises(UserError, match="problems file not found"):
        toy_reasoning.read_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"question": "1 + 2 ="}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: not a toy-reasoning problem"):
        toy_reasoning.read_problems(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no problems"):
        toy_reasoning.read_problems(str(tmp_path / "empty.jsonl"))


def test_word_tokenizer_keeps_each_symbol_one_token(tmp_path):
    docs = toy_reasoning.documents(300, seed=0, explicit_fraction=0.5)
    tok = train_word_tokenizer(docs, str(tmp_path / "words"))
    assert len(tok.encode(toy_reasoning.DELIMITER)) == 1
    assert all(len(tok.encode(str(d))) == 1 for d in range(10))
    for doc in docs[:20]:
        ids = tok.encode(doc)
        assert len(ids) == len(doc.split()) and tok.decode(ids) == doc
    assert tok.encode("7 banana") == [tok.encode("7")[0], tok.token_id("<unk>")]
    assert tok.eos_id is not None and tok.decode([tok.eos_id]) == "<|endoftext|>"
    reloaded = load_tokenizer(str(tmp_path / "words"))
    assert reloaded.encode(docs[0]) == tok.encode(docs[0]) and reloaded.vocab_size == tok.vocab_size


@pytest.fixture(scope="module")
def tiny_toy_model(tmp_path_factory):
    docs = toy_reasoning.documents(200, seed=0, explicit_fraction=0.5)
    tok = train_word_tokenizer(docs, str(tmp_path_factory.mktemp("words")))
    config = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, eos_token_id=tok.eos_id)
    return config, init_params(config, jax.random.key(0)), tok


def test_answer_metrics_equal_a_direct_forward(tiny_toy_model):
    config, params, tok = tiny_toy_model
    items = toy_reasoning.problems(24, seed=9)
    got = answer_metrics(config, None, params, tok, items, thinking=False)
    digits = np.array(sorted(tok.encode(str(d))[0] for d in range(10)))
    correct, nll = [], []
    for p in items:  # one unpadded forward per problem; the answer follows the last token
        logits_V = np.asarray(apply_lm(config, params, jnp.asarray([[tok.eos_id] + tok.encode(p.question)]))[0, -1])
        logp_A = logits_V[digits] - np.logaddexp.reduce(logits_V[digits])
        answer = int(np.searchsorted(digits, tok.encode(p.answer)[0]))
        correct.append(int(np.argmax(logp_A)) == answer)
        nll.append(-logp_A[answer])
    assert got["accuracy"] == pytest.approx(np.mean(correct), abs=1e-9)
    assert got["answer_nll"] == pytest.approx(float(np.mean(nll)), abs=1e-5)


def test_thinking_with_an_untrained_mixing_head_scores_like_the_base(tiny_toy_model):
    """w = 0 at init: the mixed prediction is the base prediction, whatever the thought."""
    config, params, tok = tiny_toy_model
    start, end = add_thought_tokens(tok)
    from qstar_jax.model import grow_vocab

    init_D = params["embed_tokens"]["embedding"][tok.encode(toy_reasoning.DELIMITER)[0]]
    grown_config, grown = grow_vocab(config, params, end + 1, {start: init_D, end: init_D})
    qs = QuietStarConfig(n_ahead=5, n_ahead_talk=1, start_token_id=start, end_token_id=end)
    qs_params = init_quiet_star_params(grown_config, qs, grown, init_D, jax.random.key(1))
    items = toy_reasoning.problems(16, seed=4)
    thinking = answer_metrics(grown_config, qs, qs_params, tok, items, thinking=True)
    plain = answer_metrics(grown_config, None, grown, tok, items, thinking=False)
    assert thinking["accuracy"] == plain["accuracy"]
    assert thinking["answer_nll"] == pytest.approx(plain["answer_nll"], abs=1e-5)


def test_smoke_study_writes_table_plot_results_and_scores_checkpoints(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nafter\n")
    plot = tmp_path / "study.png"
    workdir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "qstar_jax.toy_study", "--smoke", "--workdir", str(workdir), "--seeds", "0,1",
            "--n-ahead", "4", "--readme", str(readme), "--plot", str(plot)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((workdir / "results.json").read_text())
    assert {r["name"] for r in results["runs"]} == {"ntp_seed0", "ntp_seed1", "qs4_seed0", "qs4_seed1"}
    for run in results["runs"]:
        assert sorted(map(int, run["curve"])) == [2, 4]  # every checkpoint scored
    finals = [r["curve"]["4"]["accuracy"] for r in results["runs"] if r["arm"] == "ntp"]
    summary = results["summary"]["ntp"]["accuracy"]
    assert summary["mean"] == pytest.approx(np.mean(finals)) and summary["std"] == pytest.approx(np.std(finals, ddof=1))
    thoughts = results["sample_thoughts"]["qs4_seed1"]
    assert len(thoughts) == 8 and all(len(t["thought"].split()) == 1 for t in thoughts)  # n_ahead 4: 1 token

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore") and text.rstrip().endswith("after")
    table_lines = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table_lines) == 3  # base, control, Quiet-STaR n_ahead 4
    assert f"{results['summary']['quiet_star_4']['accuracy']['mean']:.3f}" in table_lines[2]
    assert "(c) base model" in result.stdout and plot.stat().st_size > 10_000

    # The evaluation entry point on a Quiet-STaR checkpoint and on fresh problems.
    problems = tmp_path / "fresh.jsonl"
    subprocess.run([sys.executable, "-m", "qstar_jax.toy_reasoning", "--output", str(problems), "--count", "12",
                    "--seed", "11"], cwd=REPO, env=env, check=True)
    evaluated = subprocess.run([sys.executable, "-m", "qstar_jax.toy_eval", "--checkpoint", str(workdir / "qs4_seed0"),
                                "--problems", str(problems), "--step", "2", "--explicit"],
                               cwd=REPO, env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert scores["problems"] == 12 and scores["think"] is True and 0 <= scores["accuracy"] <= 1
    assert "explicit_accuracy" in scores
    missing = subprocess.run([sys.executable, "-m", "qstar_jax.toy_eval", "--checkpoint", str(workdir / "qs4_seed0"),
                              "--problems", str(tmp_path / "nope.jsonl")], cwd=REPO, env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"error: problems file not found: {tmp_path / 'nope.jsonl'}"]
