"""The think-gate study: its arms, its scoring (the gate's positions are the decoder's), its
verdict, and a smoke run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_decode import gated_params
from test_quiet_star import CONFIGS, VOCAB
from qstar_jax.inference.speed import paired_speedup
from qstar_jax.models.transformer import forward
from qstar_jax.toy import gate_report
from qstar_jax.toy.runs import read_readme
from qstar_jax.toy.gate_study import expected_mix, gate_scores, per_token_nll, share_list, study_runs, threshold_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_arm_trains_what_it_claims():
    runs = study_runs([0, 1], [0.1, 0.2])
    assert len(runs) == 2 * 2 * 6 and len({r["name"] for r in runs}) == len(runs)
    by_name = {r["name"]: r["overrides"] for r in runs}
    assert "--config.method=lm" in by_name["toy_control_seed1"]
    assert "--config.quiet_star.think_gate=linear" in by_name["corpus_every_seed0"]
    assert not any("think_share" in o for o in by_name["corpus_every_seed0"])
    gate, rand = by_name["toy_gate_0.2_seed0"], by_name["toy_random_0.2_seed0"]
    assert "--config.quiet_star.think_share=0.2" in gate and "--config.quiet_star.think_gate=linear" in gate
    assert "--config.quiet_star.think_share=0.2" in rand and "--config.quiet_star.think_explore=1.0" in rand
    assert not any("think_gate" in o for o in rand)  # random selection has no gate to follow
    assert all(f"--config.seed={r['seed']}" in r["overrides"] for r in runs)


def _rows():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB - 2, n).astype(np.int32) for n in (7, 4, 9)]


def test_the_threshold_lets_the_share_think_and_the_decoder_gates_on_the_same_scores():
    """gate_scores (one full forward) are what the KV-cache decoder thresholds: at the
    median, the decoder thinks before exactly the positions whose score lies above it."""
    config = CONFIGS["llama"]
    qs, params = gated_params(config)
    rows = _rows()
    scores = gate_scores(config, qs, params, rows, pad_id=0)
    assert scores.shape == (sum(len(r) - 1 for r in rows),)
    threshold = threshold_for(0.5, scores)
    assert 0.4 <= np.mean(scores > threshold) <= 0.6
    gated = per_token_nll(config, qs, params, rows, 0, True, threshold, seed=1)
    assert gated["thinking_share"] == pytest.approx(np.mean(scores > threshold))


def test_per_token_nll_is_the_teacher_forced_nll_and_extreme_thresholds_are_always_or_never():
    config = CONFIGS["llama"]
    qs, params = gated_params(config, seed=2)
    rows = _rows()
    plain = per_token_nll(config, qs, params, rows, 0, False, None, seed=1)
    expected = []
    for row in rows:  # an independent computation: one full forward per row; thought tokens are
        logits_1xTxV, _ = forward(config, params["lm"], jnp.asarray(row[None]))  # never text
        logits_TxV = logits_1xTxV[0].at[:, [qs.start_token_id, qs.end_token_id]].set(-jnp.inf)
        logp_TxV = np.asarray(jax.nn.log_softmax(logits_TxV, axis=-1))
        expected += [-logp_TxV[t, row[t + 1]] for t in range(len(row) - 1)]
    assert plain["nll"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
    assert plain["thinking_share"] == 0.0
    thinking = per_token_nll(config, qs, params, rows, 0, True, None, seed=1)
    always = per_token_nll(config, qs, params, rows, 0, True, float("-inf"), seed=1)
    never = per_token_nll(config, qs, params, rows, 0, True, float("inf"), seed=1)
    assert always == pytest.approx(thinking) and thinking["thinking_share"] == 1.0
    assert never == pytest.approx(plain) and thinking["nll"] != pytest.approx(plain["nll"])


def test_random_selection_is_scored_by_its_expectation():
    assert expected_mix(0.2, {"nll": 1.0, "x": 9.0}, {"nll": 2.0, "x": 0.0}, ("nll",)) == {"nll": pytest.approx(1.8)}


def _fake_results(gate_acc: list[float], random_acc: list[float], gate_speed: float) -> dict:
    """Three seeds of every toy and corpus arm at share 0.2 with the given accuracies."""
    toy = {"control": [0.1, 0.12, 0.11], "every": [0.95, 0.93, 0.94], "gate_0.2": gate_acc, "random_0.2": random_acc}
    share = {"control": 0.0, "every": 1.0, "gate_0.2": 0.15, "random_0.2": 0.2}
    runs = []
    for arm, accs in toy.items():
        for seed, acc in enumerate(accs):
            runs.append({"text": "toy", "arm": arm, "seed": seed, "scores": {arm: {
                "accuracy": acc, "answer_nll": 2.3 - 2 * acc, "thinking_share": share[arm], "answer_thought": acc}}})
            runs.append({"text": "corpus", "arm": arm, "seed": seed,
                         "scores": {arm: {"nll": 3.0 - acc / 10, "thinking_share": share[arm]}}})
    speed = {"control": 900.0, "every": 100.0, "gate_0.2": gate_speed}
    load = [1.0, 0.5, 2.0]  # the machine's speed in each round, which falls on every arm alike
    results = {"runs": runs, "seeds": [0, 1, 2], "shares": [0.2], "test_problems": 500, "wall_s": 600.0,
               "command": "python -m qstar_jax.toy_gate_study",
               "speed": {a: {"tokens_per_s": s, "tokens_per_s_runs": [s * f for f in load], "thoughts_per_token": 0.1}
                         for a, s in speed.items()}}
    results["summary"] = gate_report.aggregate(results)
    results["verdict"] = gate_report.verdict(results)
    return results


def test_the_verdict_holds_only_when_every_bar_does():
    good = _fake_results([0.93, 0.92, 0.94], [0.30, 0.28, 0.29], gate_speed=400.0)["verdict"]["0.2"]
    assert good["holds"] and good["gate_kept"] == pytest.approx((0.93 - 0.11) / (0.94 - 0.11))
    assert good["speedup_over_every"] == pytest.approx(4.0)
    assert not _fake_results([0.93, 0.92, 0.94], [0.30, 0.28, 0.29], gate_speed=250.0)["verdict"]["0.2"]["holds"]
    assert not _fake_results([0.80, 0.82, 0.81], [0.30, 0.28, 0.29], gate_speed=400.0)["verdict"]["0.2"]["holds"]
    close = _fake_results([0.93, 0.70, 0.94], [0.60, 0.90, 0.85], gate_speed=400.0)["verdict"]["0.2"]
    assert close["gate_minus_random_in_std"] < 2 and not close["holds"]


def test_speedup_is_the_median_of_the_per_round_ratios():
    """Rounds are timed back to back, so the ratio within each round is what compares the
    two; here the ratio of the medians (3.0) would differ from it (4.5)."""
    fast, slow = {"tokens_per_s_runs": [300.0, 250.0, 900.0]}, {"tokens_per_s_runs": [100.0, 50.0, 200.0]}
    assert paired_speedup(fast, slow) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        paired_speedup(fast, {"tokens_per_s_runs": [100.0]})


def test_report_has_a_row_per_arm_and_the_verdict_in_its_caption():
    results = _fake_results([0.93, 0.92, 0.94], [0.30, 0.28, 0.29], gate_speed=400.0)
    text = gate_report.report(results)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 * (1 + 4)  # per text: header and the four arms (no every_gated scores here)
    assert "keeps 99% of the every-position accuracy gain" in text and "4.0× as fast" in text


def test_shares_must_lie_between_0_and_1():
    assert share_list("0.1,0.25") == [0.1, 0.25]
    for bad in ("0.1,1", "0", "a"):
        with pytest.raises(Exception, match="share|numbers"):
            share_list(bad)


def test_smoke_study_writes_results_table_and_plot(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{gate_report.MARKERS[0]}\nold table\n{gate_report.MARKERS[1]}\nafter\n")
    workdir, plot = tmp_path / "study", tmp_path / "gate.png"
    result = subprocess.run([sys.executable, "-m", "qstar_jax.toy_gate_study", "--smoke", "--seeds", "0",
                             "--shares", "0.25", "--workdir", str(workdir), "--readme", str(readme), "--plot", str(plot)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert {r["name"] for r in results["runs"]} == {f"{text}_{arm}_seed0" for text in ("toy", "corpus")
                                                    for arm in ("control", "every", "gate_0.25", "random_0.25")}
    for run in results["runs"]:
        logged = [json.loads(line) for line in (workdir / run["name"] / "metrics.jsonl").open()]
        assert logged, run["name"]
        gated = [s for arm, s in run["scores"].items() if arm.startswith(("gate_", "every_gated_"))]
        for scores in gated:  # thresholded on development text: some positions think, not all
            assert 0 < scores["thinking_share"] < 1 and "think_gate" in scores
        assert len(gated) == (run["kind"] in ("gate", "every"))
    assert set(results["summary"]["corpus"]) == {"control", "every", "gate_0.25", "random_0.25", "every_gated_0.25"}
    speed = results["speed"]
    assert set(speed) == {"control", "every", "gate_0.25", "every_gated_0.25"}
    assert speed["control"]["thoughts_per_token"] == 0 and speed["every"]["thoughts_per_token"] == 1
    assert speed["every"]["forward_passes_per_token"] == 4  # the smoke's n_ahead: 3 thought steps and the token
    assert set(results["verdict"]) == {"0.25"}
    text = readme.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert plot.stat().st_size > 10_000


def test_the_default_command_can_rewrite_the_repo_readme():
    read_readme(os.path.join(REPO, "README.md"), gate_report.MARKERS)
