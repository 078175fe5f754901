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

from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import apply_lm, init_params
from qstar_jax.method.mixing import init_quiet_star_params
from qstar_jax.tokenizer import add_thought_tokens, load_tokenizer, train_word_tokenizer
from qstar_jax.toy.eval import answer_metrics, explicit_accuracy, sample_thoughts, thought_accuracy
from qstar_jax.toy.study import TABLE_END, TABLE_START, VARIANTS, aggregate, arm_runs, caption, policy_gain, table
from qstar_jax.toy.runs import read_readme, update_readme

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
    with pytest.raises(UserError, match="aside_fraction"):
        toy_reasoning.documents(10, seed=1, explicit_fraction=0.5, aside_fraction=-0.1)


def test_aside_documents_make_the_delimiter_open_the_working_only_some_of_the_time():
    items = toy_reasoning.problems(4000, seed=1)
    plain = toy_reasoning.documents(4000, seed=1, explicit_fraction=0.5)
    mixed = toy_reasoning.documents(4000, seed=1, explicit_fraction=0.5, aside_fraction=0.2, delimiter_fraction=0.1)
    assert toy_reasoning.documents(4000, seed=1, explicit_fraction=0.5, aside_fraction=0.0,
                                   delimiter_fraction=1.0) == plain
    # The same problems are written out (the rendering choice is unchanged) ...
    assert [d != p.implicit() for d, p in zip(mixed, items)] == [d != p.implicit() for d, p in zip(plain, items)]
    kinds = {"working": 0, "marker": 0, "aside": 0}
    first_aside_digits = []
    for doc, p in zip(mixed, items):
        words, q = doc.split(), len(p.question.split())
        if doc == p.implicit():
            continue
        if doc == p.explicit():
            kinds["working"] += 1
        elif doc == p.explicit(toy_reasoning.OTHER_MARKER):
            kinds["marker"] += 1
        else:  # an aside: random digits between the delimiters, then the answer all the same
            assert words[:q + 1] == p.question.split() + ["---"] and words[q + 6:] == ["---", p.answer], doc
            assert all(w.isdigit() for w in words[q + 1:q + 6])
            kinds["aside"] += 1
            first_aside_digits.append(int(words[q + 1]))
    explicit = sum(kinds.values())
    assert 0.17 < kinds["aside"] / explicit < 0.23 and 0.06 < kinds["working"] / explicit < 0.10
    # "---" opens the working for about 29% of the documents that contain it.
    assert 0.24 < kinds["working"] / (kinds["working"] + kinds["aside"]) < 0.34
    assert np.bincount(first_aside_digits, minlength=10).min() > 0.05 * len(first_aside_digits)  # unrelated


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


def _with_thoughts(config, params, tok, n_ahead):
    from qstar_jax.models.vocab import grow_vocab

    start, end = add_thought_tokens(tok)
    init_D = params["embed_tokens"]["embedding"][tok.encode(toy_reasoning.DELIMITER)[0]]
    grown_config, grown = grow_vocab(config, params, end + 1, {start: init_D, end: init_D})
    qs = QuietStarConfig(n_ahead=n_ahead, n_ahead_talk=1, start_token_id=start, end_token_id=end)
    return grown_config, qs, grown, init_quiet_star_params(grown_config, qs, grown, init_D, jax.random.key(1))


def test_thought_accuracy_compares_the_sampled_thought_with_the_start_of_the_working(tiny_toy_model):
    config, params, tok = tiny_toy_model
    config, qs, _, qs_params = _with_thoughts(config, params, tok, n_ahead=5)  # 2 sampled tokens
    items = toy_reasoning.problems(12, seed=4)
    thoughts = [t["thought"].split() for t in sample_thoughts(config, qs, qs_params, tok, items)]
    assert all(len(t) == 2 for t in thoughts)
    # Problems whose working starts with the sampled thought (the same seed samples the same thoughts):
    matching = [p._replace(working=" ".join(t + ["0", "0", "0"])) for p, t in zip(items, thoughts)]
    got = thought_accuracy(config, qs, qs_params, tok, matching)
    assert got == {"thought_exact": 1.0, "thought_tokens": 2}
    # Half of them differ in the second step only: exactly half are wrong.
    other = lambda d: str((int(d) + 1) % 10) if d.isdigit() else "0"  # noqa: E731
    half = [p._replace(working=" ".join([t[0], other(t[1]), "0", "0", "0"])) if i % 2 else p
            for i, (p, t) in enumerate(zip(matching, thoughts))]
    assert thought_accuracy(config, qs, qs_params, tok, half)["thought_exact"] == 0.5


def test_thinking_with_an_untrained_mixing_head_scores_like_the_base(tiny_toy_model):
    """w = 0 at init: the mixed prediction is the base prediction, whatever the thought."""
    config, params, tok = tiny_toy_model
    grown_config, qs, grown, qs_params = _with_thoughts(config, params, tok, n_ahead=5)
    items = toy_reasoning.problems(16, seed=4)
    thinking = answer_metrics(grown_config, qs, qs_params, tok, items, thinking=True)
    plain = answer_metrics(grown_config, None, grown, tok, items, thinking=False)
    assert thinking["accuracy"] == plain["accuracy"]
    assert thinking["answer_nll"] == pytest.approx(plain["answer_nll"], abs=1e-5)


def _fake_results(values: dict[str, list[float]]) -> dict:
    """A results.json in miniature: one final checkpoint per (arm, seed) with these accuracies."""
    runs = [{"arm": arm, "seed": seed, "curve": {"10": {"accuracy": acc, "answer_nll": 1.0 - acc,
                                                         **({"thought_exact": acc / 2} if arm != "ntp" else {})},
                                                  "5": {"accuracy": 0.0, "answer_nll": 9.0}}}
            for arm, accs in values.items() for seed, acc in enumerate(accs)]
    return {"runs": runs, "n_ahead": [8], "seeds": [0, 1, 2], "base": {"accuracy": 0.1, "answer_nll": 2.3},
            "initial_thoughts": {"thought_exact": 0.3}, "base_explicit": {"explicit_accuracy": 1.0,
                                                                         "working_exact": 0.9},
            "test_problems": 500, "steps": 10, "wall_s": 60.0, "command": "python -m qstar_jax.toy_study"}


def test_summary_policy_gain_and_table_come_from_the_final_checkpoints():
    results = _fake_results({"ntp": [0.1, 0.2, 0.3], "quiet_star_8": [0.9, 0.8, 0.7], "policy_off_8": [0.4, 0.4, 0.4]})
    results["summary"] = aggregate(results)
    results["policy_gain"] = policy_gain(results)
    assert results["summary"]["quiet_star_8"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert results["summary"]["quiet_star_8"]["accuracy"]["std"] == pytest.approx(0.1)  # sample std (ddof 1)
    assert results["summary"]["policy_off_8"]["thought_exact"]["mean"] == pytest.approx(0.2)
    assert "thought_exact" not in results["summary"]["ntp"]
    gain = results["policy_gain"]
    assert gain["accuracy"]["difference"] == pytest.approx(0.4) and gain["accuracy"]["in_std"] == pytest.approx(4.0)
    assert gain["thought_exact"]["difference"] == pytest.approx(0.2)
    lines = table(results).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:6]] == [
        "| (d) base model, untouched", "| (c) next-token continued training (control)",
        "| (b) Quiet-STaR without the policy loss, n_ahead 8 (5 thought tokens)",
        "| (a) Quiet-STaR, n_ahead 8 (5 thought tokens)"]
    assert "0.800 ± 0.100" in lines[5] and "0.300 (thoughts a run starts from)" in lines[2]
    assert "+0.400 (4.0 std)" in caption(results) and "Both thinking arms" not in caption(results)
    results["thinking_overrides"] = ["--config.quiet_star.nonnegative_mixing_weight=True"]
    assert "Both thinking arms run with `--config.quiet_star.nonnegative_mixing_weight=True`." in caption(results)


def test_arms_per_seed_and_the_variant_settings():
    aside = VARIANTS["aside"]
    runs = arm_runs([0, 1], [4, 8], aside.policy_loss_weight, aside.thinking_overrides)
    assert [r["name"] for r in runs] == ["ntp_seed0", "qs4_seed0", "qs8_seed0", "nopolicy8_seed0",
                                         "ntp_seed1", "qs4_seed1", "qs8_seed1", "nopolicy8_seed1"]
    weights = {r["name"]: [o for o in r["overrides"] if "policy_loss_weight" in o] for r in runs}
    assert weights["qs8_seed1"] == ["--config.quiet_star.policy_loss_weight=1000.0"]
    assert weights["nopolicy8_seed0"] == ["--config.quiet_star.policy_loss_weight=0"]  # one setting, never two
    assert "--config.quiet_star.n_ahead=8" in runs[3]["overrides"] and "--config.method=lm" in runs[0]["overrides"]
    mixing = {r["name"]: [o for o in r["overrides"] if "mixing_weight" in o] for r in runs}
    # Both thinking arms use the same mixing head, so (a) - (b) is the policy loss alone.
    assert mixing["qs8_seed0"] == mixing["nopolicy8_seed0"] == ["--config.quiet_star.nonnegative_mixing_weight=True"]
    assert mixing["ntp_seed1"] == [] and VARIANTS["written"].thinking_overrides == ()


def test_each_variant_writes_between_its_own_markers(tmp_path):
    readme = tmp_path / "README.md"
    aside = VARIANTS["aside"]
    readme.write_text(f"a\n{TABLE_START}\nold 1\n{TABLE_END}\nb\n{aside.table_start}\nold 2\n{aside.table_end}\nc\n")
    update_readme(str(readme), "new 2", aside.markers)
    assert readme.read_text() == (f"a\n{TABLE_START}\nold 1\n{TABLE_END}\nb\n{aside.table_start}\nnew 2\n"
                                  f"{aside.table_end}\nc\n")
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="has no <!-- toy-study-aside-table:start -->"):
        update_readme(str(readme), "x", aside.markers)
    # The study checks the README before it trains anything.
    result = subprocess.run([sys.executable, "-m", "qstar_jax.toy_study", "--variant", "aside", "--workdir",
                             str(tmp_path / "w"), "--readme", str(readme)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {readme} has no <!-- toy-study-aside")
    assert not (tmp_path / "w").exists()
    for variant in VARIANTS.values():  # each study's default command can rewrite the repo's README
        read_readme(os.path.join(REPO, "README.md"), variant.markers)


def test_smoke_study_writes_table_plot_results_and_scores_checkpoints(tmp_path):
    """The aside variant end to end at toy size (its numbers mean nothing): every arm,
    every checkpoint scored, thought correctness, the README table and the plot."""
    aside = VARIANTS["aside"]
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{aside.table_start}\nold table\n{aside.table_end}\n\nafter\n")
    plot = tmp_path / "study.png"
    workdir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "qstar_jax.toy_study", "--smoke", "--variant", "aside", "--workdir", str(workdir),
            "--seeds", "0", "--n-ahead", "4", "--readme", str(readme), "--plot", str(plot)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((workdir / "results.json").read_text())
    assert results["variant"] == "aside" and results["base_overrides"] == list(aside.base_overrides)
    assert {r["name"] for r in results["runs"]} == {"ntp_seed0", "qs4_seed0", "nopolicy4_seed0"}
    for run in results["runs"]:
        assert sorted(map(int, run["curve"])) == [2, 4]  # every checkpoint scored
        assert ("thought_exact" in run["curve"]["4"]) == (run["arm"] != "ntp")
    logged = {name: [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("qs4_seed0", "nopolicy4_seed0")}
    assert any(m["policy_loss"] != 0 for m in logged["qs4_seed0"])
    assert logged["nopolicy4_seed0"] and all(m["policy_loss"] == 0 for m in logged["nopolicy4_seed0"])
    # The variant's non-negative mixing weight reaches both thinking arms.
    assert all(m["mixing_weight"] >= 0 for ms in logged.values() for m in ms)
    assert 0 <= results["initial_thoughts"]["thought_exact"] <= 1 and "working for" in result.stdout
    assert os.listdir(workdir / "jax_cache")  # the runs share compiled programs
    thoughts = results["sample_thoughts"]["qs4_seed0"]
    assert len(thoughts) == 8 and all(len(t["thought"].split()) == 1 for t in thoughts)  # n_ahead 4: 1 token

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore") and text.rstrip().endswith("after")
    table_lines = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table_lines) == 4  # base, control, policy off, Quiet-STaR n_ahead 4
    assert f"{results['summary']['quiet_star_4']['accuracy']['mean']:.3f}" in table_lines[3]
    assert "(d) base model" in result.stdout and plot.stat().st_size > 10_000
    assert results["policy_gain"]["accuracy"]["in_std"] is None and "std undefined" in text  # one seed

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


@pytest.mark.parametrize("module", ["qstar_jax.toy_study", "qstar_jax.toy_ntp_study"])
def test_a_workdir_that_is_a_file_is_one_line(tmp_path, module):
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", module, "--smoke", "--workdir", str(in_the_way / "study"),
                             "--readme", "", "--plot", ""], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == f"error: --workdir {in_the_way / 'study'}: not a directory (a file is in the way)"
