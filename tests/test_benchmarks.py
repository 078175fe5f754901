"""The side-by-side benchmark harness: alternation, ratios, MFU and failure reports.

The official code cannot be installed here (it is a git repository, not a package), so the
official side is played by small executables that print what `official_step.py` prints, or
fail as it fails when memory runs out. Our side is the real train step at a small shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "seq=16", "--set", "batch=1", "--set", "n_ahead=4", "--set", "n_ahead_talk=2"]


def fake_official(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def harness(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "side_by_side.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_side_by_side_alternates_and_reports_ratio_mfu_and_memory(tmp_path):
    official = fake_official(tmp_path, "official", """echo '{"impl": "official", "step_s": 2.0, "peak_rss_gb": 3.5}'""")
    result = harness("--official-python", official, "--shape", "tiny", *SMALL, "--ours", "rollout_impl=two_pass",
                     "--ours", "remat=1", "--pairs", "2", "--steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ours"] == {"rollout_impl": "two_pass", "remat": "1"}
    assert "os.fork() was called" not in result.stderr  # JAX never starts in the process that forks
    assert [pair["order"] for pair in report["pairs"]] == [["official", "ours", "plain"], ["plain", "ours", "official"]]
    assert report["shape"]["seq"] == 16 and report["shape"]["hidden"] == 64  # --set over the tiny shape
    ours = sorted(pair["ours"]["step_s"] for pair in report["pairs"])
    assert report["ours_step_s"] == pytest.approx(sum(ours) / 2)  # the median of two
    assert report["speedup"] == pytest.approx(2.0 / report["ours_step_s"], rel=1e-3)
    assert report["speedup_per_pair"] == [round(2.0 / p["ours"]["step_s"], 3) for p in report["pairs"]]
    peaks = report["matmul_peak_gflops"]
    assert len(peaks) == 2 and all(set(p) == {"512", "1024", "2048"} and min(p.values()) > 0 for p in peaks)
    best = max(v for p in peaks for v in p.values())
    assert report["ours_mfu"] == pytest.approx(report["model_gflops_per_step"] / report["ours_step_s"] / best,
                                               rel=1e-2)
    assert report["official_peak_rss_gb"] == 3.5 and report["ours_peak_rss_gb"] > 0
    assert report["official_errors"] == []
    # The ceiling: a plain LM step over as many token passes (1 + n_passes x n_steps rows
    # per row: seq 16, n_ahead 4, talk 2 -> n_steps 4), at its own FLOP rate.
    plain = report["plain_lm"]
    assert plain["batch"] == 1 * (1 + 2 * 4) and all(p["plain"]["batch"] == 9 for p in report["pairs"])
    assert all(p["plain"]["objective"] == "next_token" and p["plain"]["remat"] for p in report["pairs"])
    plain_rate = plain["model_gflops_per_step"] / plain["step_s"]
    assert report["ceiling_speedup"] == pytest.approx(
        2.0 / (report["model_gflops_per_step"] / plain_rate), rel=1e-2)
    assert report["ours_over_plain_rate"] == pytest.approx(
        report["model_gflops_per_step"] / report["ours_step_s"] / plain_rate, rel=1e-2)


def test_an_official_step_out_of_memory_is_reported_not_raised(tmp_path):
    official = fake_official(tmp_path, "official_oom", "echo 'RuntimeError: [enforce fail at alloc_cpu.cpp:117] "
                             "DefaultCPUAllocator: can'\"'\"'t allocate memory' >&2; exit 1")
    result = harness("--official-python", official, *SMALL, "--pairs", "1", "--steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["official_errors"] == ["out of memory (exit 1)"]
    assert report["speedup"] is None and report["official_step_s"] is None and report["ours_step_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--official-python", "/nonexistent/python"], "--official-python /nonexistent/python: not an executable"),
    (["--official-python", sys.executable, "--set", "depth=3"], "--set takes KEY=INT with KEY one of"),
    (["--official-python", sys.executable, "--set", "seq=long"], "--set seq: not an integer: 'long'"),
    (["--official-python", sys.executable, "--ours", "rollout_impl=fast"], "--ours takes one of rollout_impl=scan|two_pass"),
])
def test_bad_harness_arguments_are_one_line(args, message):
    result = harness(*args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_the_official_sides_tokenizer_has_the_exact_vocabulary():
    """official_step.word_tokenizer: exactly `vocab` ids, "---" a single word (the thought
    embeddings start from it), the thought tokens last (the official code appends them)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from official_step import THOUGHT_TOKENS, word_tokenizer

    tokenizer = word_tokenizer(1000)
    assert len(tokenizer) == 1000
    assert len(tokenizer.encode("---", add_special_tokens=False)) == 1
    assert tokenizer.convert_tokens_to_ids(list(THOUGHT_TOKENS)) == [998, 999]


def test_two_pass_counts_the_sampling_scan_instead_of_the_step_remat():
    """flops.step_flops: both rollouts have the same model FLOPs; "executed" adds the step
    recomputation for the scan and the forward-only sampling scan for two_pass."""
    from qstar_jax.models.config import ModelConfig
    from qstar_jax.method.config import QuietStarConfig
    from qstar_jax.training.flops import step_flops

    model = ModelConfig("mistral", 1000, 64, 256, 2, 4, 2, 16)
    qs = QuietStarConfig(n_ahead=12, n_ahead_talk=4, n_passes=2, start_token_id=998, end_token_id=999,
                         logits_chunk_rows=0)
    scan, two_pass = (step_flops(model, qs.replace(rollout_impl=impl), 4, 256) for impl in ("scan", "two_pass"))
    fwd = scan["forward_by_part"]
    assert scan["model_flops_per_step"] == two_pass["model_flops_per_step"]
    assert scan["executed_flops_per_step"] - scan["model_flops_per_step"] == pytest.approx(
        fwd["thought_layers"] + fwd["thought_attention"] + fwd["thought_lm_head"] + fwd["mixing_head"])
    sampled = qs.n_sampled / qs.n_steps * (fwd["thought_layers"] + fwd["thought_attention"]) \
        + fwd["thought_lm_head"] * qs.n_sampled / (qs.n_sampled + qs.n_ahead_talk)
    assert two_pass["executed_flops_per_step"] - two_pass["model_flops_per_step"] == pytest.approx(sampled)


def test_gated_training_counts_only_the_thinking_sites():
    """flops.step_flops under think_share 0.25: the thought parts a quarter, the base the same."""
    from qstar_jax.models.config import ModelConfig
    from qstar_jax.method.config import QuietStarConfig
    from qstar_jax.training.flops import step_flops

    model = ModelConfig("mistral", 1000, 64, 256, 2, 4, 2, 16)
    qs = QuietStarConfig(n_ahead=12, n_ahead_talk=4, n_passes=2, start_token_id=998, end_token_id=999)
    full, gated = (step_flops(model, qs.replace(think_share=share), 4, 256) for share in (1.0, 0.25))
    for part, value in full["forward_by_part"].items():
        expected = value if part.startswith("base") else value / 4
        assert gated["forward_by_part"][part] == pytest.approx(expected), part
    assert gated["token_passes_per_step"] == 4 * (256 + 2 * 64 * qs.n_steps)


def test_gated_step_benchmark_times_both_steps_alternately():
    """benchmarks/gated_step.py: a gated and an every-position step, both timed each round,
    and the ratio of their medians; bad settings are refused."""
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    script = os.path.join(REPO, "benchmarks", "gated_step.py")
    result = subprocess.run([sys.executable, script, "--seq", "24", "--rounds", "2", "--share", "0.25"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"]["seq"] == 24 and report["shape"]["think_gate"] == "linear" and report["share"] == 0.25
    assert {name: len(t) for name, t in report["times"].items()} == {"every": 2, "gated": 2}
    assert report["gated_over_every"] == pytest.approx(report["step_s"]["gated"] / report["step_s"]["every"], rel=1e-2)
    bad = subprocess.run([sys.executable, script, "--share", "1.5"], capture_output=True, text=True, env=env, cwd=REPO)
    assert bad.returncode == 2 and "--share must be in (0, 1)" in bad.stderr.strip().splitlines()[-1]
