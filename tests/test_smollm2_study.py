"""The SmolLM2 math study (qstar_jax/toy/smollm2_study.py): its smoke miniature end to end
(a tiny random Llama), the held-out check, the answer NLL it scores, and its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qstar_jax.models.transformer import apply_lm
from qstar_jax.toy import smollm2_report
from qstar_jax.training.splits import HeldOutLeak
from qstar_jax.toy.smollm2_study import (TEST_SEED, answer_line, answer_scores, held_out_rows, token_nlls,
                                         write_data)
from qstar_jax.training import checkpoint, corpora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One seed of the smoke study: (workdir, its stdout)."""
    root = tmp_path_factory.mktemp("smollm2_study")
    args = [sys.executable, "-m", "qstar_jax.smollm2_study", "--smoke", "--seeds", "0", "--workdir",
            str(root / "study"), "--plot", str(root / "study.png")]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "study", result.stdout


def _logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_study_trains_every_arm_on_the_same_data_and_scores_held_out_answers(smoke):
    workdir, stdout = smoke
    results = json.loads((workdir / "results.json").read_text())
    assert [(r["arm"], r["name"]) for r in results["runs"]] == [
        ("quiet_star", "qs_seed0"), ("policy_off", "nopolicy_seed0"), ("lm_control", "lm_seed0")]
    # the held-out problems beside the runs are the test split's
    records = [json.loads(line) for line in (workdir / "test.jsonl").read_text().splitlines()]
    assert len(records) == 8 and records == corpora.arithmetic_problems(8, TEST_SEED, split="test")
    logged = {r["arm"]: _logged(workdir / r["name"]) for r in results["runs"]}
    # same documents, order and init: the two thinking arms' first step is the same step
    assert logged["quiet_star"][0]["loss"] == logged["policy_off"][0]["loss"]
    assert any(m["policy_loss"] != 0 for m in logged["quiet_star"])
    assert all(m["policy_loss"] == 0 for m in logged["policy_off"]) and "policy_loss" not in logged["lm_control"][0]
    for run in results["runs"]:
        thinks = run["arm"] != "lm_control"
        assert run["steps"] == 3 and ("answer_nll_no_think" in run["scores"]) == thinks
        assert len(run["scores"]["gain_over_base"]) == 10 and ("thought_gain" in run["scores"]) == thinks
        assert run["settings"]["quiet_star"]["policy_loss_weight"] == (0 if run["arm"] == "policy_off" else 1e6)
    assert results["summary"]["quiet_star"]["answer_nll"]["values"] == [results["runs"][0]["scores"]["answer_nll"]]
    assert smollm2_report.table(results) in stdout and (workdir.parent / "study.png").stat().st_size > 0


def test_answer_nll_is_the_nll_of_the_answer_tokens_given_the_question(smoke):
    """Scored in padded rows, SCORE_ROWS at a time, as one unpadded forward per problem gives it."""
    workdir, _ = smoke
    config, _, params, tok = checkpoint.load_for_inference(str(workdir / "base_model"))
    records = [json.loads(line) for line in (workdir / "test.jsonl").read_text().splitlines()][:3]
    held = held_out_rows(tok, records)
    got = answer_scores(token_nlls(config, None, params, held, 0)[0], held)
    nll, digit_nll = [], []
    for record in records:
        question, answer = tok.with_bos(tok.encode(record["question"])), tok.encode(" " + answer_line(record))
        logits = apply_lm(config, params, jnp.asarray([question + answer]))[0, len(question) - 1:-1]
        token_nll = -np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(answer)), answer]
        nll += token_nll.tolist()
        digit_nll += [n for n, t in zip(token_nll, answer) if tok.decode([t]).strip().isdigit()]
    assert digit_nll and len(digit_nll) < len(nll)
    assert got["answer_nll"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert got["answer_digit_nll"] == pytest.approx(np.mean(digit_nll), abs=1e-5)


def test_a_held_out_question_in_the_training_text_stops_the_study(tmp_path):
    clean = corpora.default_corpus(50, 0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in clean))
    documents, records = write_data(str(tmp_path), 50, 0, 8)  # the file the runs read is kept and checked
    assert documents == clean and (tmp_path / "test.jsonl").exists()
    planted = records[5]
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": f"{planted['question']} {answer_line(planted)}"}) + "\n")
    with pytest.raises(HeldOutLeak, match="train.jsonl: held-out question"):
        write_data(str(tmp_path), 50, 0, 8)


def _fake_results() -> dict:
    """results.json in miniature: two seeds of each arm with chosen answer NLLs."""
    deciles = lambda gain: [{"decile": d + 1, "mean_gain": gain * (d + 1)} for d in range(10)]  # noqa: E731
    answer = {"lm_control": (1.1, 1.4), "policy_off": (1.0, 1.3), "quiet_star": (1.0, 1.2)}
    runs = []
    for arm, values in answer.items():
        for seed, value in enumerate(values):
            scores = {"answer_nll": value, "answer_digit_nll": 2 * value, "gain_over_base": deciles(0.01 * (seed + 1))}
            if arm != "lm_control":
                scores.update(answer_nll_no_think=value + 0.5, answer_digit_nll_no_think=2 * value + 0.5,
                              thought_gain=deciles(-0.001))
            settings = {"batch_size": 2, "data": {"seq_len": 48}, "optimizer": {"learning_rate": 3e-5},
                        "quiet_star": {"n_ahead": 6, "n_ahead_talk": 2, "n_passes": 2, "policy_loss_weight": 1e6}}
            runs.append({"arm": arm, "seed": seed, "steps": 40, "settings": settings, "scores": scores})
    results = {"model": "SmolLM2", "seeds": [0, 1], "runs": runs, "base": {"answer_nll": 1.5, "answer_digit_nll": 3.0},
               "test_problems": 96, "test_seed": 1, "held_out_tokens": 4000, "train_documents": 2000,
               "wall_s": 2400.0, "command": "python -m qstar_jax.smollm2_study"}
    results["summary"] = smollm2_report.aggregate(results)
    results["differences"] = smollm2_report.differences(results)
    return json.loads(json.dumps(results))  # what a committed results.json gives back


def test_table_renders_means_stds_and_paired_differences_from_the_results_alone():
    results = _fake_results()
    lines = smollm2_report.table(results).splitlines()
    assert "2 seeds" in lines[0]
    assert lines[2] == "| base model, untouched | 1.5000 | 3.0000 | – | – | – |"
    assert lines[3] == ("| LM control (next-token training) | 1.2500 ± 0.2121 | 2.5000 ± 0.4243 | – | – "
                        "| +0.1500 ± 0.0707 |")
    assert lines[5] == ("| Quiet-STaR | 1.1000 ± 0.1414 | 2.2000 ± 0.2828 | 1.6000 ± 0.1414 / 2.7000 ± 0.2828 "
                        "| -0.0100 ± 0.0000 | +0.1500 ± 0.0707 |")
    # seed by seed: Quiet-STaR 1.0, 1.2 against the control's 1.1, 1.4 is -0.1, -0.2
    assert "| Quiet-STaR − LM control (next-token training) | -0.1500 ± 0.0707 | -0.3000 ± 0.1414 |" in lines
    assert "| Quiet-STaR − Quiet-STaR, policy loss off | -0.0500 ± 0.0707 | -0.1000 ± 0.1414 |" in lines
    text = smollm2_report.text(results)
    assert "40 steps of 2 x 48 tokens, lr 3e-05" in text and "40.0 min (`python -m qstar_jax.smollm2_study`)" in text
