"""Generated tables: every table in the docs that reports a study is what its committed
results file renders (a hand edit fails here), and the mechanism that writes them."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from qstar_jax.errors import UserError
from qstar_jax.toy import gate_report, ntp_study
from qstar_jax.toy.results_tables import FAST_CHAIN, TABLES, TINY_CPU, Table, fast_chain_table, main, rendered, \
    shown, tiny_cpu_table
from qstar_jax.toy import runs
from qstar_jax.toy.runs import REPO, STUDY_HOMES, Home, destinations, marker_pair, publish, study_home
from qstar_jax.toy.study import VARIANTS

MAX_RESULTS_BYTES = 200_000  # a committed results file stays small enough to read and diff


@pytest.mark.parametrize("table", TABLES, ids=lambda t: f"{t.doc}:{t.marker}")
def test_every_doc_table_is_what_its_committed_results_render(table):
    now = shown(table)  # the markers are there, whether or not the file is committed yet
    if os.path.exists(os.path.join(REPO, table.results)):
        assert os.path.getsize(os.path.join(REPO, table.results)) < MAX_RESULTS_BYTES
        assert now == rendered(table).strip("\n"), "rewrite with `python -m qstar_jax.toy.results_tables`"


def test_every_study_default_command_has_a_home_the_registry_renders():
    for markers in [v.markers for v in VARIANTS.values()] + [gate_report.MARKERS, ntp_study.MARKERS]:
        home = study_home(markers)
        assert {t.doc for t in TABLES if t.markers == markers and t.results == home.results} == set(home.docs)
    assert {t.results for t in TABLES} == {h.results for h in STUDY_HOMES.values()} | {TINY_CPU, FAST_CHAIN}
    with pytest.raises(UserError, match="no committed results file is registered for the <!-- new-table:start"):
        study_home(marker_pair("new-table"))


def test_a_smoke_run_or_an_explicit_readme_commits_nothing():
    markers = gate_report.MARKERS
    ask = lambda readme, smoke: destinations(argparse.Namespace(readme=readme, smoke=smoke), markers)  # noqa: E731
    assert ask(None, False) == ("", STUDY_HOMES["gate-study-table"])
    assert ask(None, True) == ("", None)
    assert ask("x/README.md", False) == ("x/README.md", None) and ask("", False) == ("", None)


def _doc(path, *names: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# doc\n" + "".join(f"\n{marker_pair(n)[0]}\nold\n{marker_pair(n)[1]}\n" for n in names) + "after\n")


def _render(results: dict) -> str:
    return f"| curve steps | {sorted(results['curve'])} |\n|---|---|"


def test_publish_commits_the_results_and_writes_every_doc_from_that_file(tmp_path, capsys):
    _doc(tmp_path / "README.md", "other", "s")
    _doc(tmp_path / "docs" / "results.md", "s")
    home, markers = Home("docs/results/s.json", ("README.md", "docs/results.md")), marker_pair("s")
    results = {"curve": {2: 0.5, 10: 0.25}}  # int keys: the file has strings, and the docs show the file
    publish(results, str(tmp_path), _render, "", markers, None, "", home, root=str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads((tmp_path / home.results).read_text())
    assert json.loads((tmp_path / home.results).read_text()) == {"curve": {"2": 0.5, "10": 0.25}}
    readme, doc = (tmp_path / "README.md").read_text(), (tmp_path / "docs" / "results.md").read_text()
    assert "| curve steps | ['10', '2'] |" in readme and "Data: [`docs/results/s.json`](docs/results/s.json)" in readme
    assert "| curve steps | ['10', '2'] |" in doc and "Data: [`docs/results/s.json`](results/s.json)" in doc
    assert f"{marker_pair('other')[0]}\nold\n" in readme and doc.endswith("after\n")
    tables = tuple(Table(d, "s", home.results, _render) for d in home.docs)
    main(["--check"], tables, str(tmp_path))
    assert capsys.readouterr().out.count("up to date") == 2


def test_a_study_default_command_checks_its_docs_first_then_commits_and_writes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "REPO", str(tmp_path))
    args = argparse.Namespace(readme=None, smoke=False, workdir=str(tmp_path), plot="")
    studied = []
    study = lambda: studied.append(1) or {"curve": {1: 0.5}}  # noqa: E731
    _doc(tmp_path / "README.md", "toy-ntp-table")
    with pytest.raises(UserError, match="docs/results.md"):  # docs/results.md has no markers yet
        runs.run_study("prog", ["--x"], args, ntp_study.MARKERS, study, _render, None)
    assert not studied
    _doc(tmp_path / "docs" / "results.md", "toy-ntp-table")
    runs.run_study("prog", ["--x"], args, ntp_study.MARKERS, study, _render, None)
    committed = json.loads((tmp_path / STUDY_HOMES["toy-ntp-table"].results).read_text())
    assert committed == {"curve": {"1": 0.5}, "command": "python -m prog --x"}
    tables = tuple(t._replace(render=_render) for t in TABLES if t.marker == "toy-ntp-table")
    assert [shown(t, str(tmp_path)) == rendered(t, str(tmp_path)) for t in tables] == [True, True]


def test_check_exits_2_naming_the_first_table_that_differs_and_a_rewrite_mends_it(tmp_path, capsys):
    _doc(tmp_path / "doc.md", "a", "b")
    for name in "ab":
        (tmp_path / f"{name}.json").write_text(json.dumps({"curve": {"1": 0.5}}))
    tables = tuple(Table("doc.md", name, f"{name}.json", _render) for name in "ab")
    main([], tables, str(tmp_path))
    text = (tmp_path / "doc.md").read_text()
    (tmp_path / "doc.md").write_text(text.replace("['1'] |\n|---|---|\n\nData: [`b.json`]", "['2'] |\n|---|---|\n\n"
                                                  "Data: [`b.json`]"))  # a hand edit of the second table
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--check"], tables, str(tmp_path))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: doc.md (b) differs from what b.json renders; rewrite it "
                                                    "with `python -m qstar_jax.toy.results_tables`"]
    main([], tables, str(tmp_path))
    assert (tmp_path / "doc.md").read_text() == text and "rewrote: doc.md (b)" in capsys.readouterr().out


def test_a_missing_results_file_or_marker_is_one_line(tmp_path, capsys):
    _doc(tmp_path / "doc.md", "a")
    tables = (Table("doc.md", "a", "a.json", _render),)
    main([], tables, str(tmp_path))  # not committed yet: the table waits
    assert capsys.readouterr().out == "waiting for a.json: doc.md (a)\n" and "old" in (tmp_path / "doc.md").read_text()
    cases = [(["a.json"], tables, f"error: results file not found: {tmp_path / 'a.json'}"),
             (["b.json"], tables, "error: no table is written from b.json; the registry's files: a.json"),
             ([], (Table("doc.md", "z", "a.json", _render),),
              f"error: {tmp_path / 'doc.md'} has no <!-- z:start --> ... <!-- z:end --> markers to put the table "
              "between"),
             ([], (Table("gone.md", "a", "a.json", _render),), f"error: doc to update not found: {tmp_path / 'gone.md'}")]
    for argv, registry, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv, registry, str(tmp_path))
        assert exit_.value.code == 2 and capsys.readouterr().err.splitlines() == [message]


def _tiny_cpu_run(run) -> None:
    run.mkdir()
    lines = [{"step": 290, "loss": 1.0, "tokens_per_s": 1700.4},
             {"step": 300, "eval/nll_base": 1.2991, "eval/nll_talk": 0.8968, "eval/mixing_weight": -2.341},
             {"step": 300, "loss": 0.9, "tokens_per_s": 1812.6, "mixing_weight": -2.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 31')


def test_tiny_cpu_results_come_from_its_run_and_analysis(tmp_path, capsys):
    run, analysis = tmp_path / "run", tmp_path / "analysis"
    _tiny_cpu_run(run)
    analysis.mkdir()
    deciles = [{"decile": d + 1, "mean_gain": 0.1 * d} for d in range(10)]
    (analysis / "summary.json").write_text(json.dumps({"documents": 16, "tokens": 900, "mean_gain": 0.4172,
                                                       "fraction_improved": 0.958, "deciles": deciles}))
    _doc(tmp_path / "docs" / "results.md", "tiny-cpu-table")
    tables = (Table("docs/results.md", "tiny-cpu-table", TINY_CPU, tiny_cpu_table),)
    main(["--tiny-cpu", str(run), str(analysis)], tables, str(tmp_path))
    committed = json.loads((tmp_path / TINY_CPU).read_text())
    assert committed["final_train"]["tokens_per_s"] == 1812.6 and committed["final_eval"]["step"] == 300
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "| 300 | 1,813 | 1.299 → 0.897 (step 300) | -2.34 | 0.417 | 96% |" in doc
    assert "(easiest → hardest): 0.00, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90." in doc
    lm_run = tmp_path / "lm"
    lm_run.mkdir()
    (lm_run / "metrics.jsonl").write_text('{"step": 10, "loss": 2.0, "tokens_per_s": 5.0}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--tiny-cpu", str(lm_run), str(analysis)], tables, str(tmp_path))
    assert capsys.readouterr().err.splitlines() == [
        f"error: {lm_run / 'metrics.jsonl'}: no evaluation logs eval/nll_base, eval/nll_talk, eval/mixing_weight; "
        "is it a Quiet-STaR run with eval_every set?"]


def _stage(name: str, method: str, n_ahead, talk, values: dict, runs: list[float] | None) -> dict:
    """A stage as training/curriculum.py writes it to chain_summary.json."""
    best = min(values, key=values.get)
    speed = {"forward_passes_per_token": float(n_ahead or 1), "thoughts_per_token": 1.0 if n_ahead else 0.0,
             "tokens_per_s": sorted(runs)[len(runs) // 2], "tokens_per_s_runs": runs} if runs else {}
    return {"name": name, "method": method, "n_ahead": n_ahead, "n_ahead_talk": talk, "dir": f"/w/stages/{name}",
            "best_step": int(best), "metric": "eval/nll_next", "value": values[best], "values": values, **speed}


def test_the_fast_chain_table_comes_from_its_chain_summary(tmp_path):
    summary = {"metric": "eval/nll_next", "mode": "min", "final_model": "/w/model", "stages": [
        _stage("base", "lm", None, None, {"200": 1.01, "400": 0.96823}, [13920.4, 13299.0, 14516.2]),
        _stage("think_8_4", "quiet_star", 8, 4, {"75": 0.9, "150": 0.89711}, [3512.0, 3461.0, 3534.0])]}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "chain_summary.json").write_text(json.dumps(summary))
    _doc(tmp_path / "docs" / "results.md", "fast-chain-table")
    tables = (Table("docs/results.md", "fast-chain-table", FAST_CHAIN, fast_chain_table),)
    main(["--fast-chain", str(tmp_path / "run")], tables, str(tmp_path))
    assert json.loads((tmp_path / FAST_CHAIN).read_text()) == summary
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "| base | lm | – | 400 | 400 | 0.9682 | 1.0100, 0.9682 | 1 | 13,920 (13,299–14,516) |" in doc
    assert "| think_8_4 | quiet_star | 8–4 | 150 | 150 | 0.8971 | 0.9000, 0.8971 | 8 | 3,512 (3,461–3,534) |" in doc
    assert "the median of 3 runs and their range" in doc and "checkpoint with the lowest `eval/nll_next`" in doc
    untimed = {**summary, "stages": [_stage("base", "lm", None, None, {"5": 2.0}, None)]}
    assert "| base | lm | – | 5 | 5 | 2.0000 | 2.0000 | – | – |" in fast_chain_table(untimed)
    assert "not timed" in fast_chain_table(untimed)
