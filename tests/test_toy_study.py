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

from qstar_jax.training.splits import HeldOutLeak
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.models.config import ModelConfig
from qstar_jax.method.config import QuietStarConfig
from qstar_jax.errors import UserError
from qstar_jax.models.transformer import apply_lm, init_params
from qstar_jax.method.mixing import init_quiet_star_params
from qstar_jax.tokenizer import add_thought_tokens, load_tokenizer, train_word_tokenizer
from qstar_jax.toy.eval import answer_metrics, explicit_accuracy, sample_thoughts, thought_accuracy
from qstar_jax.toy.study import (ARM_CONFIG, BASE_CONFIG, NONNEGATIVE, STUDY_TEST_SEED, VARIANTS, aggregate, arm_runs,
                                 caption, check_unseen, contrast, table, training_documents)
from qstar_jax.toy.runs import read_readme, update_readme
from qstar_jax.training import checkpoint

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
    grown_config, grown = grow_vocab(config, params, end + 1, jax.random.key(2))
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


def _fake_results(values: dict[str, list[float]], variant: str = "aside") -> dict:
    """A results.json in miniature: per arm, one run per base seed (arm seed 0) whose final
    checkpoint has these accuracies (thought correctness half of it, NLL one minus it)."""
    nonnegative = {"quiet_star_nonneg_8", "policy_off_8", "shuffled_8"} if variant == "aside" else set()
    runs = [{"arm": arm, "base_seed": base_seed, "seed": 0, "name": f"base{base_seed}/{arm}_seed0",
             "overrides": [NONNEGATIVE] if arm in nonnegative else [],
             "curve": {"10": {"accuracy": acc, "answer_nll": 1.0 - acc,
                              **({"thought_exact": acc / 2} if arm != "ntp" else {})},
                       "5": {"accuracy": 0.0, "answer_nll": 9.0}}}
            for arm, accs in values.items() for base_seed, acc in enumerate(accs)]
    seeds = sorted({run["base_seed"] for run in runs})
    bases = [{"base_seed": b, "metrics": {"accuracy": 0.1 + 0.01 * b, "answer_nll": 2.3},
              "initial_thoughts": {"thought_exact": 0.02}, "explicit": {"explicit_accuracy": 1.0, "working_exact": 0.9}}
             for b in seeds]
    return {"variant": variant, "runs": runs, "bases": bases, "n_ahead": [8], "base_seeds": seeds, "seeds": [0],
            "test_problems": 500, "test_seed": 7, "test_split": "test", "steps": 10, "wall_s": 60.0,
            "command": "python -m qstar_jax.toy_study"}


def test_table_and_caption_report_every_run_and_paired_differences_from_the_results_alone():
    results = _fake_results({"ntp": [0.1, 0.2, 0.3], "quiet_star_8": [0.9, 0.8, 0.1],
                             "quiet_star_nonneg_8": [0.9, 0.8, 0.7], "policy_off_8": [0.4, 0.4, 0.4],
                             "shuffled_8": [0.5, 0.3, 0.4]})
    summary = aggregate(results)
    assert summary["quiet_star_nonneg_8"]["accuracy"]["mean"] == pytest.approx(0.8)
    assert summary["quiet_star_nonneg_8"]["accuracy"]["std"] == pytest.approx(0.1)  # sample std (ddof 1)
    assert summary["policy_off_8"]["thought_exact"]["mean"] == pytest.approx(0.2)
    assert "thought_exact" not in summary["ntp"]
    assert summary["base"]["accuracy"]["values"] == pytest.approx([0.1, 0.11, 0.12])  # one per base model
    # Paired by base seed: the differences 0.5, 0.4, 0.3 (not the spread of either arm).
    gain = contrast(results, "quiet_star_nonneg_8", "policy_off_8")
    assert gain["accuracy"]["difference"] == pytest.approx(0.4) and gain["accuracy"]["std"] == pytest.approx(0.1)
    assert gain["thought_exact"]["difference"] == pytest.approx(0.2) and gain["pairs"] == 3
    assert "thought_exact" not in contrast(results, "quiet_star_8", "ntp")
    lines = table(results).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| (d) base model, untouched", "| (c) next-token continued training (control)",
        "| (b) Quiet-STaR without the policy loss, n_ahead 8 (5 thought tokens)",
        "| (f) Quiet-STaR with rewards shuffled across positions (control), n_ahead 8 (5 thought tokens)",
        "| (a) Quiet-STaR, n_ahead 8 (5 thought tokens)",
        "| (e) Quiet-STaR, non-negative mixing weight, n_ahead 8 (5 thought tokens)",
        "| base model writing the working out itself (reference)"]
    # Every run's value, whatever it shows: the failing official-head run too.
    assert "0.600 ± 0.436 (0.900, 0.800, 0.100)" in lines[6] and "0.020 ± 0.000 (0.020, 0.020, 0.020)" in lines[2]
    text = caption(results)
    assert "(e) minus (b): answer accuracy +0.400 ± 0.100 (4.0 std), sampled thought = working +0.200 ± 0.050" in text
    assert "(e) minus (f): answer accuracy +0.400 ± 0.100 (4.0 std)" in text
    assert "(a) minus (c): answer accuracy +0.400 ± 0.529 (0.8 std);" in text and "n = 3;" in text
    assert f"(b), (f), (e) run with `{NONNEGATIVE}`" in text and "seed 7, split test" in text
    assert table(json.loads(json.dumps(results))) == table(results)  # what the committed file renders
    written = _fake_results({"ntp": [0.1], "quiet_star_8": [0.9], "policy_off_8": [0.4]}, "written")
    assert "(a) minus (b): answer accuracy +0.500 (one pair: std undefined)" in caption(written)
    assert "non-negative" not in caption(written) and "| 0.900 |" in table(written)


def test_arms_per_base_and_seed_and_the_variant_settings():
    aside = VARIANTS["aside"]
    runs = arm_runs([0, 1], [0], [8], aside)
    assert [r["name"] for r in runs] == [f"base{b}/{arm}_seed0" for b in (0, 1) for arm in (
        "ntp", "quiet_star_8", "quiet_star_nonneg_8", "policy_off_8", "shuffled_8")]
    by_name = {r["name"]: r["overrides"] for r in runs}
    weights = {name: [o for o in overrides if "policy_loss_weight" in o] for name, overrides in by_name.items()}
    assert weights["base1/quiet_star_8_seed0"] == weights["base1/shuffled_8_seed0"] == [
        "--config.quiet_star.policy_loss_weight=1000.0"]
    assert weights["base0/policy_off_8_seed0"] == ["--config.quiet_star.policy_loss_weight=0"]  # one setting, never two
    # (a) keeps the official head; its ablation (b) and control (f) share (e)'s non-negative head.
    heads = {name: NONNEGATIVE in overrides for name, overrides in by_name.items() if name.startswith("base0/")}
    assert heads == {"base0/ntp_seed0": False, "base0/quiet_star_8_seed0": False,
                     "base0/quiet_star_nonneg_8_seed0": True, "base0/policy_off_8_seed0": True,
                     "base0/shuffled_8_seed0": True}
    assert [name for name, overrides in by_name.items() if "--config.quiet_star.shuffle_rewards=True" in overrides] == [
        "base0/shuffled_8_seed0", "base1/shuffled_8_seed0"]
    assert "--config.method=lm" in by_name["base0/ntp_seed0"] and (aside.base_seeds, aside.seeds) == ("0,1,2", "0")
    assert all("--config.steps=150" in overrides for overrides in by_name.values())  # the budget: every arm alike
    written = [r["name"] for r in arm_runs([0], [0, 1], [4, 8], VARIANTS["written"])
               if not any(o.startswith("--config.steps=") for o in r["overrides"])]
    assert written == [f"base0/{arm}_seed{seed}" for seed in (0, 1)
                       for arm in ("ntp", "quiet_star_4", "quiet_star_8", "policy_off_8")]


def test_the_test_problems_are_checked_against_every_trainings_own_documents():
    base = ["--config.data.toy.problems=60", "--config.data.toy.aside_fraction=0.3", "--config.seed=2"]
    arm = ["--config.data.toy.problems=40", "--config.method=lm"]
    # The documents are what `train` reads with these overrides: parsed as its command line.
    assert training_documents(BASE_CONFIG, base) == toy_reasoning.documents(60, 0, 0.5, aside_fraction=0.3)
    assert training_documents(ARM_CONFIG, arm) == toy_reasoning.documents(40, 1, 0.0)
    trainings = [(BASE_CONFIG, base, "base model 2"), (ARM_CONFIG, arm, "base2/ntp_seed0")]
    check_unseen(toy_reasoning.problems(50, STUDY_TEST_SEED, split="test"), trainings)
    trained = toy_reasoning.problems(40, 1)[7]  # a question of the arm's documents
    with pytest.raises(HeldOutLeak, match="base2/ntp_seed0"):
        check_unseen([trained], trainings)


def test_each_variant_writes_between_its_own_markers(tmp_path):
    readme = tmp_path / "README.md"
    aside = VARIANTS["aside"]
    (start, end), (aside_start, aside_end) = VARIANTS["written"].markers, aside.markers
    readme.write_text(f"a\n{start}\nold 1\n{end}\nb\n{aside_start}\nold 2\n{aside_end}\nc\n")
    update_readme(str(readme), "new 2", aside.markers)
    assert readme.read_text() == f"a\n{start}\nold 1\n{end}\nb\n{aside_start}\nnew 2\n{aside_end}\nc\n"
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
    """The aside variant end to end at toy size (its numbers mean nothing), one base model:
    every arm, every checkpoint scored on fresh test problems, thought correctness, the
    README table and the plot."""
    aside = VARIANTS["aside"]
    readme = tmp_path / "README.md"
    start, end = aside.markers
    readme.write_text(f"# title\n\nbefore\n\n{start}\nold table\n{end}\n\nafter\n")
    plot = tmp_path / "study.png"
    workdir = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-m", "qstar_jax.toy_study", "--smoke", "--variant", "aside", "--workdir", str(workdir),
            "--base-seeds", "0", "--seeds", "0", "--n-ahead", "4", "--readme", str(readme), "--plot", str(plot)]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((workdir / "results.json").read_text())
    assert results["variant"] == "aside" and results["bases"][0]["overrides"][:4] == [*aside.base_overrides,
                                                                                       "--config.seed=0"]
    names = ["ntp", "quiet_star_4", "quiet_star_nonneg_4", "policy_off_4", "shuffled_4"]
    assert [r["name"] for r in results["runs"]] == [f"base0/{name}_seed0" for name in names]
    for run in results["runs"]:
        assert sorted(map(int, run["curve"])) == [2, 4]  # every checkpoint scored
        assert ("thought_exact" in run["curve"]["4"]) == (run["arm"] != "ntp")
    # Fresh test problems: seed 7 of the test split, as written beside the runs.
    items = toy_reasoning.read_problems(str(workdir / "test.jsonl"))
    assert items == toy_reasoning.problems(40, STUDY_TEST_SEED, split="test") and results["test_seed"] == 7
    logged = {name: [json.loads(line) for line in (workdir / f"base0/{name}_seed0" / "metrics.jsonl").read_text()
                     .splitlines()] for name in names[1:]}
    assert all(any(m["policy_loss"] != 0 for m in logged[name]) for name in ("quiet_star_4", "quiet_star_nonneg_4",
                                                                              "shuffled_4"))
    assert logged["policy_off_4"] and all(m["policy_loss"] == 0 for m in logged["policy_off_4"])
    # The non-negative mixing weight reaches (e), (b) and (f), the shuffled rewards (f) alone.
    assert all(m["mixing_weight"] >= 0 for name in names[2:] for m in logged[name])
    heads = {name: checkpoint.load_for_inference(str(workdir / f"base0/{name}_seed0"))[1] for name in names[1:]}
    assert [(qs.nonnegative_mixing_weight, qs.shuffle_rewards) for qs in heads.values()] == [
        (False, False), (True, False), (True, False), (True, True)]
    assert 0 <= results["bases"][0]["initial_thoughts"]["thought_exact"] <= 1 and "working for" in result.stdout
    assert os.listdir(workdir / "jax_cache")  # the runs share compiled programs
    thoughts = results["sample_thoughts"]
    assert sorted(thoughts) == sorted(f"base0/{name}_seed0" for name in names[1:])
    assert all(len(t) == 8 and all(len(x["thought"].split()) == 1 for x in t) for t in thoughts.values())  # 1 token

    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore") and text.rstrip().endswith("after")
    table_lines = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table_lines) == 6  # base, control, policy off, shuffled, Quiet-STaR official and non-negative
    assert f"{results['summary']['quiet_star_nonneg_4']['accuracy']['mean']:.3f}" in table_lines[5]
    assert "(d) base model" in result.stdout and plot.stat().st_size > 10_000
    assert "(e) minus (f): answer accuracy" in text and "one pair: std undefined" in text  # one base, one seed

    # The evaluation entry point on a Quiet-STaR checkpoint and on fresh problems.
    problems = tmp_path / "fresh.jsonl"
    subprocess.run([sys.executable, "-m", "qstar_jax.toy_reasoning", "--output", str(problems), "--count", "12",
                    "--seed", "11"], cwd=REPO, env=env, check=True)
    official = str(workdir / "base0/quiet_star_4_seed0")
    evaluated = subprocess.run([sys.executable, "-m", "qstar_jax.toy_eval", "--checkpoint", official,
                                "--problems", str(problems), "--step", "2", "--explicit"],
                               cwd=REPO, env=env, capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    scores = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert scores["problems"] == 12 and scores["think"] is True and 0 <= scores["accuracy"] <= 1
    assert "explicit_accuracy" in scores
    missing = subprocess.run([sys.executable, "-m", "qstar_jax.toy_eval", "--checkpoint", official,
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
