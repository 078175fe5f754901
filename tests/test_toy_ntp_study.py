"""The NTP study: its arms, the share of the teacher's gain kept, the table, and the command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qstar_jax.training.splits import HeldOutLeak
from qstar_jax.toy import ntp_study as toy_ntp_study
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.toy.ntp_study import (FORMS, MARKERS, aggregate, arm_runs, check_test_set, gain_kept, table,
                                     training_documents)
from qstar_jax.toy.study import ARM_CONFIG, BASE_CONFIG, TEST_PROBLEMS, TEST_SEED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _value(overrides: list[str], key: str) -> str | None:
    found = [o.split("=", 1)[1] for o in overrides if o.startswith(f"--config.{key}=")]
    assert len(found) <= 1, (key, found)  # one setting, never two
    return found[0] if found else None


def test_students_start_from_their_seeds_teacher_and_the_control_trains_as_long_as_both():
    runs = arm_runs([0, 1], "/b/base_model", "/w")
    names = [r["name"] for r in runs]
    assert names[:6] == ["teacher_seed0", "control_seed0", "lm_from_teacher_seed0", "student_paper_seed0",
                         "student_code_seed0", "student_kl_seed0"]
    assert len(runs) == 12
    by_name = {r["name"]: r["overrides"] for r in runs}
    assert _value(by_name["teacher_seed1"], "init_from") == "/b/base_model"
    assert _value(by_name["teacher_seed1"], "method") is None  # the config's: quiet_star
    assert _value(by_name["control_seed1"], "method") == "lm"
    assert _value(by_name["control_seed1"], "init_from") == "/b/base_model"
    assert int(_value(by_name["control_seed1"], "steps")) == toy_ntp_study.TEACHER_STEPS + toy_ntp_study.STUDENT_STEPS
    for form in FORMS:
        student = by_name[f"student_{form}_seed1"]
        assert _value(student, "method") == "ntp" and _value(student, "ntp.form") == form
        assert _value(student, "init_from") == _value(student, "ntp.teacher") == "/w/teacher_seed1"
        assert int(_value(student, "steps")) == toy_ntp_study.STUDENT_STEPS
        assert _value(student, "seed") == "1"
        assert _value(student, "ntp.clip_negative_rewards") == ("True" if form == "code" else None)
    assert _value(by_name["lm_from_teacher_seed0"], "init_from") == "/w/teacher_seed0"
    assert _value(by_name["lm_from_teacher_seed0"], "ntp.teacher") is None


def test_the_test_set_is_checked_against_every_runs_training_documents():
    num_ops = f"--config.data.toy.num_ops={toy_ntp_study.NUM_OPS}"
    # The documents are the ones training reads: the config parsed with the run's overrides.
    assert training_documents(ARM_CONFIG, [num_ops, "--config.data.toy.problems=300", "--config.method=lm"]) == \
        toy_reasoning.documents(300, 1, 0.0, toy_ntp_study.NUM_OPS)
    runs = [("base", BASE_CONFIG, [num_ops]),
            *((run["name"], ARM_CONFIG, run["overrides"]) for run in arm_runs([0, 1, 2], "/b/base_model", "/w"))]
    items = toy_reasoning.problems(TEST_PROBLEMS, TEST_SEED, toy_ntp_study.NUM_OPS, split="test")
    assert check_test_set(items, runs) == [name for name, _, _ in runs]  # the study's real test set is clean
    base_questions = set(map(toy_reasoning.document_question, training_documents(BASE_CONFIG, runs[0][2])))
    arm_questions = set(map(toy_reasoning.document_question, training_documents(ARM_CONFIG, runs[1][2])))
    planted = toy_reasoning.Problem(sorted(arm_questions - base_questions)[0], "", "")
    with pytest.raises(HeldOutLeak, match=r"^test problems against run teacher_seed0's training"):
        check_test_set([*items, planted], runs)
    # A run reading other data is checked on its own, not as its config file's first run.
    seed9 = toy_reasoning.documents(300, 9, 0.0, toy_ntp_study.NUM_OPS)
    extra = ("seed9", ARM_CONFIG, [num_ops, "--config.data.toy.problems=300", "--config.data.toy.seed=9"])
    leaked = next(q for q in map(toy_reasoning.document_question, seed9) if q not in base_questions | arm_questions)
    with pytest.raises(HeldOutLeak, match="run seed9's"):
        check_test_set([*items, toy_reasoning.Problem(leaked, "", "")], [*runs, extra])


def _fake_results(accuracy: dict[str, list[float]]) -> dict:
    runs = [{"arm": arm, "seed": i, "curve": {"50": {"accuracy": 0.0, "answer_nll": 9.0},
                                              "200": {"accuracy": a, "answer_nll": 1.0 - a}}}
            for arm, values in accuracy.items() for i, a in enumerate(values)]
    return {"runs": runs, "seeds": [0, 1], "base": {"accuracy": 0.25, "answer_nll": 1.6},
            "base_explicit": {"explicit_accuracy": 1.0}}


def test_share_of_the_gain_kept_comes_from_the_final_checkpoints():
    results = _fake_results({"teacher": [0.9, 0.9], "control": [0.3, 0.3], "lm_from_teacher": [0.3, 0.2],
                             "student_paper": [0.6, 0.6], "student_code": [0.1, 0.1], "student_kl": [0.9, 0.7]})
    results["summary"] = aggregate(results)
    kept = gain_kept(results["summary"])
    assert kept["student_paper"] == pytest.approx(0.5) and kept["student_kl"] == pytest.approx(5 / 6)
    assert kept["student_code"] == pytest.approx(-1 / 3) and kept["lm_from_teacher"] == pytest.approx(-1 / 12)
    assert set(kept) == {"lm_from_teacher", *(f"student_{f}" for f in FORMS)}
    results.update(gain_kept=kept, speed={"base": {"tokens_per_s": 9000.0}, "student_paper": {"tokens_per_s": 8800.0}})
    lines = table(results).splitlines()
    rows = {line.split(" | ")[0]: line for line in lines[2:]}
    assert "| 0.600 ± 0.000 | 0.400 ± 0.000 | +0.50 | 8,800 |" in rows["| NTP student, `ntp.form=paper`"]
    assert "| 0.250 | 1.600 | – | 9,000 |" in rows["| base model, untouched"]
    assert "0.800 ± 0.141" in rows["| NTP student, `ntp.form=kl`"]  # sample std over the two seeds
    # No gain to keep (the teacher no better than the control): no share, not a division by zero.
    assert all(v is None for v in gain_kept(aggregate(_fake_results({"teacher": [0.3], "control": [0.3],
                                                                     "student_kl": [0.4]}))).values())


def test_smoke_study_trains_every_arm_and_writes_table_plot_and_timings(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{MARKERS[0]}\nold table\n{MARKERS[1]}\nafter\n")
    workdir, plot = tmp_path / "study", tmp_path / "ntp.png"
    result = subprocess.run([sys.executable, "-m", "qstar_jax.toy_ntp_study", "--smoke", "--seeds", "0", "--workdir",
                             str(workdir), "--readme", str(readme), "--plot", str(plot)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert results["test_split"] == {"split": "test", "seed": TEST_SEED, "checked_against": [
        "base", "teacher_seed0", "control_seed0", "lm_from_teacher_seed0", *(f"student_{f}_seed0" for f in FORMS)]}
    assert {r["name"] for r in results["runs"]} == {"teacher_seed0", "control_seed0", "lm_from_teacher_seed0",
                                                    *(f"student_{f}_seed0" for f in FORMS)}
    for run in results["runs"]:
        assert sorted(map(int, run["curve"])) == [2, 4]  # every checkpoint scored
        assert run["curve"]["4"]["think"] == (run["arm"] == "teacher")
    for form in FORMS:  # each student really trained against its teacher
        logged = [json.loads(line) for line in (workdir / f"student_{form}_seed0" / "metrics.jsonl").open()]
        assert any("nll_teacher" in m for m in logged)
    speed = results["speed"]
    assert speed["teacher"]["forward_passes_per_token"] == toy_ntp_study.NUM_OPS + 3
    assert speed["student_paper"]["forward_passes_per_token"] == speed["base"]["forward_passes_per_token"] == 1
    assert all(s["tokens_per_s"] > 0 for s in speed.values())
    text = readme.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert len([line for line in text.splitlines() if line.startswith("|")]) == 2 + 8  # header, 7 arms, reference
    assert plot.stat().st_size > 10_000
