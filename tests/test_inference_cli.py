"""generate / evaluate / analyze on a real (tiny) training run, and periodic evaluation."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_tasks import RECORDS, write_jsonl
from test_train import REPO, assert_ok, metrics, run_train
from qstar_jax.training import checkpoint, manifest
from qstar_jax.models import model_files
from qstar_jax.tokenizer import END_THOUGHT, START_THOUGHT


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    csqa = write_jsonl(root / "csqa.jsonl", [RECORDS["csqa"]] * 2)
    # trained with a think gate, thinking at half the positions (gated training); without
    # --think-gate the CLIs think everywhere
    assert_ok(run_train(root / "run", f"--config.eval_tasks=csqa:{csqa}:2", "--config.quiet_star.think_gate=linear",
                        "--config.quiet_star.think_share=0.5"))
    return root / "run"


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"qstar_jax.{module}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=600)


def one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("W1", "I1", "WARNING"))]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]


def test_training_runs_the_configured_benchmarks(run_dir):
    evals = [m for m in metrics(run_dir) if "eval/csqa/soft_score" in m]
    assert [m["step"] for m in evals] == [3, 6]
    assert all(0.0 < m["eval/csqa/soft_score"] < 1.0 for m in evals)


def test_generate_hides_thoughts_unless_asked(run_dir):
    plain = cli("generate", "--checkpoint", run_dir, "--prompt", "Ava has 3 apples.", "--max-new-tokens", 12)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "\u00ab" not in plain.stdout and START_THOUGHT not in plain.stdout and END_THOUGHT not in plain.stdout
    shown = cli("generate", "--checkpoint", run_dir, "--prompt", "Ava has 3 apples.", "--max-new-tokens", 4,
                "--show-thoughts")
    assert shown.returncode == 0 and shown.stdout.count("\u00ab") == 4, shown.stdout
    base = cli("generate", "--checkpoint", run_dir, "--prompt", "Ava has 3 apples.", "--no-think", "--max-new-tokens", 4)
    assert base.returncode == 0 and "\u00ab" not in base.stdout


def test_generate_with_a_think_gate_reports_thoughts_per_token(run_dir):
    """--think-gate T thinks only where the gate trained alongside predicts a gain above T."""
    assert all("think_gate_loss" in m for m in metrics(run_dir) if "loss" in m)
    prompt = ["--checkpoint", run_dir, "--prompt", "Ava has 3 apples.", "--max-new-tokens", 5, "--show-thoughts"]
    always, never = cli("generate", *prompt, "--think-gate", -1e9), cli("generate", *prompt, "--think-gate", 1e9)
    assert always.returncode == 0 and never.returncode == 0, always.stderr[-2000:] + never.stderr[-2000:]
    assert "thoughts per generated token: 1.000 (5 of 5)" in always.stderr and always.stdout.count("\u00ab") == 5
    assert "thoughts per generated token: 0.000 (0 of 5)" in never.stderr and "\u00ab" not in never.stdout
    one_line_error(cli("generate", *prompt, "--think-gate", 0, "--no-think"), "--think-gate needs --think")


def test_evaluate_with_a_think_gate_reports_thoughts_per_token(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "csqa.jsonl", [RECORDS["csqa"]] * 2)
    args = ["--checkpoint", run_dir, "--task", "csqa", "--data", data]
    results = {}
    for name, gate in (("every", []), ("never", ["--think-gate", 1e9]), ("always", ["--think-gate", -1e9])):
        result = cli("evaluate", *args, *gate)
        assert result.returncode == 0, result.stderr[-2000:]
        results[name] = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["every"]["thoughts_per_token"] == 1.0 and "think_gate" not in results["every"]
    assert results["never"]["thoughts_per_token"] == 0.0 and results["never"]["think_gate"] == 1e9
    assert results["always"]["soft_score"] == pytest.approx(results["every"]["soft_score"], abs=1e-6)


def test_evaluate_cli_and_bad_input(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", [RECORDS["gsm8k"]] * 2)
    out = tmp_path / "results.json"
    result = cli("evaluate", "--checkpoint", run_dir, "--task", "gsm8k", "--data", data, "--cot-votes", 2,
                 "--cot-tokens", 8, "--output", out)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved == json.loads(result.stdout.strip().splitlines()[-1])
    assert saved["examples"] == 2 and 0.0 <= saved["soft_score"] <= 1.0 and "cot_maj@2" in saved
    one_line_error(cli("evaluate", "--checkpoint", run_dir, "--task", "csqa", "--data", tmp_path / "nope.jsonl"),
                   "data file not found")
    one_line_error(cli("evaluate", "--checkpoint", run_dir, "--task", "csqa", "--data", data), "not in the csqa format")
    one_line_error(cli("evaluate", "--checkpoint", run_dir, "--task", "csqa",
                       "--data", write_jsonl(tmp_path / "e.jsonl", [])), "no examples")


def test_plain_lm_with_think_is_refused(run_dir, tmp_path):
    config, _, params, tokenizer = checkpoint.load_for_inference(str(run_dir))
    model_files.save_model(str(tmp_path / "plain"), config, params["lm"], tokenizer)
    one_line_error(cli("generate", "--checkpoint", tmp_path / "plain", "--prompt", "hi"), "has no thought parameters")
    ok = cli("generate", "--checkpoint", tmp_path / "plain", "--prompt", "Ava has", "--no-think", "--max-new-tokens", 3)
    assert ok.returncode == 0, ok.stderr[-2000:]


class _Spans(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.titles = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "title" in attrs:
            self.titles.append(attrs["title"])


def test_analyze_writes_plot_summary_and_page(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": "Ava has 3 apples and gets 4 more, so 7."}] * 3)
    result = cli("analyze", "--checkpoint", run_dir, "--data", data, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "hard_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["documents"] == 3 and len(summary["deciles"]) == 10
    assert sum(d["tokens"] for d in summary["deciles"]) == summary["tokens"]
    parser = _Spans()
    parser.feed((tmp_path / "out" / "thoughts.html").read_text())
    assert len(parser.titles) == summary["tokens"]
    assert all(t.startswith("gain ") and "| thought: " in t for t in parser.titles)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # where a browser is installed, the page must load without errors
        page = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--enable-logging=stderr", "--v=0", "--dump-dom",
                               f"file://{tmp_path / 'out' / 'thoughts.html'}"], capture_output=True, text=True, timeout=120)
        assert page.returncode == 0 and "Thinking gain per token" in page.stdout
        assert "Uncaught" not in page.stderr and "CONSOLE" not in page.stderr


def test_plain_lm_training_method(tmp_path):
    """method=lm trains the LM alone (no thought tokens): usable with --no-think, refused with --think."""
    result = run_train(tmp_path / "lm", "--config.method=lm")
    assert_ok(result)
    losses = [m["loss"] for m in metrics(tmp_path / "lm") if "loss" in m]
    assert losses[-1] < losses[0]
    config, qs, params, tokenizer = checkpoint.load_for_inference(str(tmp_path / "lm"))
    assert qs is None and "thought" not in params and config.vocab_size == tokenizer.vocab_size
    one_line_error(cli("generate", "--checkpoint", tmp_path / "lm", "--prompt", "Ava"), "has no thought parameters")
    ok = cli("generate", "--checkpoint", tmp_path / "lm", "--prompt", "Ava has", "--no-think", "--max-new-tokens", 3)
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.parametrize("flag,value,message", [("--max-new-tokens", "-3", "--max-new-tokens must be >= 1, got -3"),
                                                ("--temperature", "-1", "--temperature must be >= 0"),
                                                ("--temperature", "nan", "--temperature must be >= 0 and finite"),
                                                ("--temperature", "inf", "--temperature must be >= 0 and finite"),
                                                ("--think-gate", "nan", "--think-gate must be a finite number"),
                                                ("--think-gate", "inf", "--think-gate must be a finite number")])
def test_generate_refuses_nonsense_settings_in_one_line(capsys, flag, value, message):
    """Checked before the checkpoint is read (a NaN temperature used to end in empty output)."""
    from qstar_jax.inference import generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", "never-read", "--prompt", "hi", flag, value])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_analyze_refuses_bad_settings_before_loading(tmp_path, capsys):
    from qstar_jax.inference import analyze

    (tmp_path / "file").write_text("x")
    for args, message in ((["--seq-len", "0"], "--seq-len must be >= 2 (a token and its successor), got 0"),
                          (["--max-documents", "0"], "--max-documents must be >= 1, got 0"),
                          (["--output", str(tmp_path / "file")], f"--output must be a directory; {tmp_path / 'file'} is a file")):
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(["--checkpoint", "never-read", "--data", "never-read", "--output", str(tmp_path / "out"), *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and lines == [f"error: {message}"], lines


def test_prompt_longer_than_the_context_is_refused_by_generate_and_cut_by_evaluate(run_dir, capsys):
    """The rule (decode.prompt_room): prompt + new tokens + one thought's slots must fit
    max_position_embeddings; generate refuses a longer prompt, evaluate keeps its end."""
    from qstar_jax.inference import generate
    from qstar_jax.inference.evaluate import Evaluator, _ids

    config, qs, params, tokenizer = checkpoint.load_for_inference(str(run_dir))
    long_prompt = "Ava has 3 apples. " * config.max_position_embeddings
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(run_dir), "--prompt", long_prompt, "--max-new-tokens", "5"])
    lines = capsys.readouterr().err.strip().splitlines()
    room = config.max_position_embeddings - 5 - qs.n_ahead
    assert len(lines) == 1 and lines[0].startswith("error: the prompt is ") and lines[0].endswith(
        f"with --max-new-tokens 5 the model's context of {config.max_position_embeddings} tokens holds {room}"), lines

    ids = _ids(Evaluator(config, qs, params, tokenizer, True), long_prompt + " How many?", 5)
    full = tokenizer.encode(long_prompt + " How many?")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    assert len(ids) == room and ids == bos + full[len(full) - room + len(bos):]
    assert len(_ids(Evaluator(config, qs, params, tokenizer, False), "Ava has 3 apples.", 5)) < room  # short: whole
    from qstar_jax.inference.decode import prompt_room
    from qstar_jax.errors import UserError

    with pytest.raises(UserError, match=f"and {qs.n_ahead} thought slots leave no room for a prompt"):
        prompt_room(config, qs, config.max_position_embeddings - qs.n_ahead, True)
    assert prompt_room(config, qs, config.max_position_embeddings - qs.n_ahead, False) == qs.n_ahead


@pytest.mark.parametrize("module", ["generate", "evaluate"])
def test_a_think_gate_threshold_on_a_model_without_a_gate_is_one_line(run_dir, tmp_path, monkeypatch, capsys, module):
    """A thinking checkpoint trained without quiet_star.think_gate has nothing to threshold."""
    import importlib

    cli_module = importlib.import_module(f"qstar_jax.inference.{module}")
    config, qs, params, tokenizer = checkpoint.load_for_inference(str(run_dir))
    gateless = (config, qs.replace(think_gate=""), {k: v for k, v in params.items() if k != "think_gate"}, tokenizer)
    monkeypatch.setattr(cli_module, "load_for_inference", lambda *args, **kwargs: gateless)
    args = (["--prompt", "hi"] if module == "generate" else
            ["--task", "csqa", "--data", str(write_jsonl(tmp_path / "csqa.jsonl", [RECORDS["csqa"]] * 2))])
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["--checkpoint", "gateless", *args, "--think-gate", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines == [
        "error: gateless has no think gate (train with --config.quiet_star.think_gate=linear)"], lines


def test_any_int_seed_is_a_jax_seed():
    """--seed takes any int: beyond int64 (what jax.random.key takes) it wraps, as seed + i does."""
    import jax

    from qstar_jax.inference.generate import int64_seed

    assert [int64_seed(s) for s in (0, 5, -1, 2**63 - 1)] == [0, 5, -1, 2**63 - 1]
    assert int64_seed(2**63) == -2**63 and int64_seed(2**70 + 3) == 3 and int64_seed(-2**63 - 1) == 2**63 - 1
    jax.random.key(int64_seed(2**70))


def _one_line_exit(main, argv, capsys) -> str:
    """The single stderr line of a CLI main that refuses `argv` with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--limit", "-1"], "--limit must be >= 0 (0 = all), got -1"),
    (["--cot-votes", "-1"], "--cot-votes must be >= 0 (0 = no chain-of-thought vote), got -1"),
    (["--cot-votes", "1", "--cot-tokens", "0"], "--cot-tokens must be >= 1, got 0"),
    (["--think-gate", "nan"], "--think-gate must be a finite number (of nats), got nan"),
    (["--think-gate", "0", "--no-think"], "--think-gate needs --think"),
    (["--task", "csqa", "--cot-votes", "2"], "--cot-votes applies to --task gsm8k"),
    (["--output", "."], "--output must be a file; . is a directory"),
    (["--task", "piqa", "--data", "PIQA"],
     "piqa.jsonl:2 is not in the piqa format: label must be an int from 0 to 1, got -1 (an unlabelled row, as test "
     "splits have, cannot be scored)"),
])
def test_evaluate_refuses_bad_settings_and_labels_before_loading(tmp_path, capsys, args, message):
    """Each in one line before the checkpoint ("never-read") is opened: a -1 label used to be
    scored as the last choice, --limit -1 evaluated one example, --cot-votes -1 was a traceback."""
    from qstar_jax.inference import evaluate

    gsm8k = write_jsonl(tmp_path / "gsm.jsonl", [RECORDS["gsm8k"]])
    piqa = write_jsonl(tmp_path / "piqa.jsonl", [RECORDS["piqa"], {**RECORDS["piqa"], "label": -1}])
    argv = ["--checkpoint", "never-read", "--task", "gsm8k", "--data", gsm8k,
            *[piqa if a == "PIQA" else a for a in args]]
    line = _one_line_exit(evaluate.main, argv, capsys)
    assert line.endswith(message) and line.startswith("error: ") and "never-read" not in line, line


def test_evaluate_refuses_chains_longer_than_the_context_before_scoring(run_dir, tmp_path, monkeypatch, capsys):
    from qstar_jax.inference import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("scored before the flags were checked"))
    config, qs, _, _ = checkpoint.load_for_inference(str(run_dir))
    tokens = config.max_position_embeddings - qs.n_ahead  # no room left for the question
    line = _one_line_exit(evaluate.main, ["--checkpoint", str(run_dir), "--task", "gsm8k", "--cot-votes", "1",
                                          "--cot-tokens", str(tokens), "--data",
                                          write_jsonl(tmp_path / "gsm.jsonl", [RECORDS["gsm8k"]])], capsys)
    assert line == (f"error: --cot-tokens {tokens}: {tokens} new tokens and {qs.n_ahead} thought slots leave no room "
                    f"for a prompt in the model's context of {config.max_position_embeddings} tokens"), line


def test_analyze_refuses_a_seq_len_beyond_the_model_context(run_dir, tmp_path, capsys):
    """The thought after the last of --seq-len tokens takes its n_ahead - 1 positions (start,
    sampled tokens, end) past it: with them the sequence must fit max_position_embeddings."""
    from qstar_jax.inference import analyze

    config, qs, _, _ = checkpoint.load_for_inference(str(run_dir))
    longest = config.max_position_embeddings - (qs.n_ahead - 1)
    assert analyze.longest_seq_len(config, qs) == longest
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": "Ava has 3 apples."}])
    line = _one_line_exit(analyze.main, ["--checkpoint", str(run_dir), "--data", data, "--output",
                                         str(tmp_path / "out"), "--seq-len", str(longest + 1)], capsys)
    assert line == (f"error: --seq-len {longest + 1} does not fit the model's context of "
                    f"{config.max_position_embeddings} positions with the {qs.n_ahead - 1}-token thought after the "
                    f"last token: at most {longest}"), line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- readers beside a training run's retention


def _delete_like_orbax(step_dir, directories_too: bool = True) -> None:
    """What Orbax's retention does to a step: every file removed, then the directories."""
    for root, _, files in os.walk(step_dir):
        for name in files:
            os.remove(os.path.join(root, name))
    if directories_too:
        shutil.rmtree(step_dir)


def _steps_deleted_after_listing(monkeypatch, run, steps):
    """The first time a reader lists the steps, `steps` are deleted right after (the race
    with a running training run, made deterministic)."""
    listed, pending = checkpoint.CheckpointReader.current_steps, list(steps)

    def list_then_delete(self):
        found = listed(self)
        if self.directory == str(run / "checkpoints"):
            while pending:
                _delete_like_orbax(run / "checkpoints" / str(pending.pop()))
        return found

    monkeypatch.setattr(checkpoint.CheckpointReader, "current_steps", list_then_delete)


class _FailsWhenCollected:
    """Like Orbax's array reads when their step is deleted under them: coroutines whose
    errors Python reports through sys.unraisablehook as they are collected."""

    def __del__(self):
        raise RuntimeError("reading an array of the deleted step failed")


def _params_equal(a, b) -> bool:
    import jax
    import numpy as np

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("when", ["after_listing", "while_restoring"])
def test_a_reader_passes_over_the_newest_step_deleted_under_it(run_dir, tmp_path, monkeypatch, capsys, when):
    """Step 6 is deleted right after the reader listed it, or its files while Orbax reads
    them (raw FileNotFoundError / KeyError / TypeError before, and the other reads' errors
    as "Exception ignored" pages): the reader reloads the step list and reads step 3, saying
    so in one line on stderr."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if when == "after_listing":
        _steps_deleted_after_listing(monkeypatch, run, [6])
    else:
        restore = checkpoint.CheckpointReader.restore_params

        def delete_then_restore(self, step, *args, **kwargs):
            if step == 6:  # its files go; its directories are still listed while Orbax reads
                _delete_like_orbax(run / "checkpoints" / "6", directories_too=False)
                _FailsWhenCollected()
            return restore(self, step, *args, **kwargs)

        monkeypatch.setattr(checkpoint.CheckpointReader, "restore_params", delete_then_restore)
    _, _, params, _ = checkpoint.load_for_inference(str(run))
    assert _params_equal(params, checkpoint.load_for_inference(str(run_dir), 3)[2])
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"warning: {run / 'checkpoints'}: checkpoint step 6 was deleted while it was read; "
                     "read step 3 instead"], lines


def test_a_requested_step_deleted_under_the_reader_is_one_line(run_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _steps_deleted_after_listing(monkeypatch, run, [6])
    with pytest.raises(checkpoint.UserError) as error:
        checkpoint.load_for_inference(str(run), 6)
    assert str(error.value) == (f"checkpoint at step 6 in {run / 'checkpoints'} was deleted while it was read "
                                "(steps now: 3)")


def test_generate_started_while_every_step_is_deleted_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    from qstar_jax.inference import generate

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _steps_deleted_after_listing(monkeypatch, run, [6, 3])
    line = _one_line_exit(generate.main, ["--checkpoint", str(run), "--prompt", "hi"], capsys)
    assert line == (f"error: no checkpoint in {run / 'checkpoints'} can be read: checkpoint step 6 was deleted "
                    "while it was read"), line


def test_a_newest_step_without_its_manifest_yet_is_passed_over(run_dir, tmp_path, capsys):
    """A step without a manifest (saved by an older version, or its manifest lost) cannot be
    verified: readers take the newest step that verifies; asked for it, they refuse it in one line."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    os.remove(run / "checkpoints" / "6" / manifest.MANIFEST_FILE)
    _, _, params, _ = checkpoint.load_for_inference(str(run))
    assert _params_equal(params, checkpoint.load_for_inference(str(run_dir), 3)[2])
    why = f"has no {manifest.MANIFEST_FILE}, so it cannot be verified"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {run / 'checkpoints'}: checkpoint step 6 {why}; read step 3 instead"]
    with pytest.raises(checkpoint.UserError) as error:
        checkpoint.load_for_inference(str(run), 6)
    assert str(error.value) == f"checkpoint at step 6 in {run / 'checkpoints'} {why} (steps now: 3, 6)"


def test_a_step_that_stays_and_does_not_read_is_one_line_not_passed_over(run_dir, tmp_path, monkeypatch):
    """Only a step that goes is passed over: one that stays whole and fails to read is damage."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    monkeypatch.setattr(checkpoint.CheckpointReader, "DELETION_WAITS_S", (0.0,))
    monkeypatch.setattr(checkpoint.CheckpointReader, "restore_params",
                        lambda self, step, *a, **k: (_ for _ in ()).throw(ValueError("tensorstore said no\nmore")))
    with pytest.raises(checkpoint.UserError) as error:
        checkpoint.load_for_inference(str(run))
    assert str(error.value) == (f"checkpoint at step 6 in {run / 'checkpoints'} is unreadable "
                                "(ValueError: tensorstore said no)")


def test_errors_reported_while_a_step_reads_are_still_shown_when_it_reads(run_dir, monkeypatch, capsys):
    """Only a failed read's unraisable errors are dropped (its failure has its own line)."""
    restore = checkpoint.CheckpointReader.restore_params

    def restore_beside_an_unraisable_error(self, step, *args, **kwargs):
        _FailsWhenCollected()
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.CheckpointReader, "restore_params", restore_beside_an_unraisable_error)
    checkpoint.load_for_inference(str(run_dir))
    err = capsys.readouterr().err
    assert "Exception ignored" in err and "RuntimeError: reading an array of the deleted step failed" in err, err
