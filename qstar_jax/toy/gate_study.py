"""Where a thought pays, the think-gate study: `python -m qstar_jax.toy_gate_study`.

    python -m qstar_jax.toy_gate_study --workdir runs/gate_study [--seeds 0,1,2]
        [--shares 0.1,0.2] [--readme README.md] [--plot docs/gate_study.png] [--smoke]

Sweeps the share of positions that think, on two texts:
  toy     the toy study's task ("written" variant, same base pretraining), continued on
          implicit documents with 5-token thoughts (n_ahead 8); scored by held-out answer
          accuracy and answer NLL (toy/eval.py);
  corpus  the embedded default corpus of `experiments/tiny_cpu.py` (random init); scored
          by held-out NLL per token, teacher-forced, thinking as in generation.
Arms, per seed and text: the control (plain next-token training: share 0), Quiet-STaR at
every position (share 1; also scored with its gate at inference only, every_gated s), and
for each share s:
  gate s    gated training (quiet_star.think_share=s, a linear think gate: its top-ranked
            positions plus a 10% exploration share) and gated inference at the threshold
            that lets s of the positions of development text think;
  random s  training at s random positions per row (think_explore=1, no gate), and
            inference that thinks at a random s of positions, scored by its expectation
            s * thinking + (1 - s) * plain (exact: the draw is independent of the text).
Decoding speed (batch 1, greedy, after a toy test question) of the control, the
every-position arm and each gate arm at its threshold is timed alternately
(inference/speed.py); a gate arm's speed-up over every-position thinking is the median
over rounds of the ratio within a round. Every run is an ordinary `qstar_jax.train`
subprocess, so an interrupted study resumes; WORKDIR/results.json, the README table and
the plot are the outputs. docs/method.md ("Think gate") explains the gate; `--smoke` is a miniature for
the tests (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference import speed
from qstar_jax.inference.decode import continuation_decoded
from qstar_jax.method.gate import think_gate_scores
from qstar_jax.models.transformer import forward
from qstar_jax.toy import gate_report
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.toy.eval import answer_metrics
from qstar_jax.toy.runs import REPO, export_base, make_workdir, run_study, study_parser, train
from qstar_jax.toy.study import ARM_CONFIG, BASE_CONFIG, SMOKE_ARM, SMOKE_BASE, TEST_PROBLEMS, TEST_SEED
from qstar_jax.training import checkpoint, data

CORPUS_CONFIG = os.path.join(REPO, "experiments", "tiny_cpu.py")
DEV_SEED = 2  # the toy study's development problems: thresholds are set on them, never on test
DEV_PROBLEMS = 200
SPEED_TOKENS = 32
SPEED_ROUNDS = 41  # a round is ~30 ms here; the speed-up is the median of its per-round ratios
SMOKE_CORPUS = ["--config.steps=4", "--config.optimizer.total_steps=4", "--config.checkpoint_every=4",
                "--config.batch_size=4", "--config.data.default_documents=200", "--config.data.eval_documents=20",
                "--config.data.seq_len=32"]
SMOKE_THOUGHTS = ["--config.quiet_star.n_ahead=4"]  # smoke: shorter thoughts compile faster
GATE = "--config.quiet_star.think_gate=linear"


def share_name(kind: str, share: float) -> str:
    """An arm's name: control, every, or the kind and share (gate_0.2, random_0.2, every_gated_0.2)."""
    return kind if kind in ("control", "every") else f"{kind}_{share:g}"


def arms(shares: list[float]) -> list[tuple[str, float]]:
    """(kind, share) of every arm: the control, every position, then gate and random per share."""
    return [("control", 0.0), ("every", 1.0), *(("gate", s) for s in shares), *(("random", s) for s in shares)]


def arm_overrides(kind: str, share: float) -> list[str]:
    """What an arm changes in its text's config (docs/method.md, "Think gate")."""
    return {"control": ["--config.method=lm"], "every": [GATE],
            "gate": [GATE, f"--config.quiet_star.think_share={share}"],
            "random": [f"--config.quiet_star.think_share={share}", "--config.quiet_star.think_explore=1.0"]}[kind]


def study_runs(seeds: list[int], shares: list[float]) -> list[dict]:
    """Every training run of the study: per text, seed and arm."""
    return [{"text": text, "kind": kind, "share": share, "arm": share_name(kind, share), "seed": seed,
             "name": f"{text}_{share_name(kind, share)}_seed{seed}",
             "overrides": [f"--config.seed={seed}", *arm_overrides(kind, share)]}
            for text in ("toy", "corpus") for seed in seeds for kind, share in arms(shares)]


# ------------------------------------------------------------------------------ scoring


def right_pad(rows: list[np.ndarray], pad_id: int) -> tuple[jax.Array, jax.Array]:
    """(tokens_BxT, valid_BxT) of rows of different lengths, padded on the right."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    return jnp.asarray(tokens), jnp.asarray(np.arange(width)[None, :] < np.array([len(r) for r in rows])[:, None])


def gate_scores(config, qs, params, rows: list[np.ndarray], pad_id: int) -> np.ndarray:
    """The gate's predicted gain at every position of `rows` that predicts a next token of
    its row, all rows' concatenated: the positions generation would consider thinking at."""
    tokens_BxT, valid_BxT = right_pad(rows, pad_id)
    _, h_BxTxD = forward(config, params["lm"], tokens_BxT, None, valid_BxT)
    scores_BxT = np.asarray(think_gate_scores(config, qs, params, h_BxTxD))
    predicts_BxT = np.asarray(valid_BxT)[:, 1:]  # position t predicts token t + 1
    return scores_BxT[:, :-1][predicts_BxT]


def threshold_for(share: float, dev_scores: np.ndarray) -> float:
    """The think-gate threshold above which `share` of the development positions lie."""
    return float(np.quantile(dev_scores, 1.0 - share))


def expected_mix(share: float, thinking: dict, plain: dict, keys: tuple[str, ...]) -> dict:
    """Metrics of thinking at a random `share` of positions: s * thinking + (1 - s) * plain."""
    return {k: share * thinking[k] + (1 - share) * plain[k] for k in keys}


def toy_rows(tokenizer, items) -> list[np.ndarray]:
    """Implicit test or development documents as the training stream has them (after an EOS)."""
    return [np.asarray([tokenizer.eos_id, *tokenizer.encode(p.implicit())], np.int32) for p in items]


def score_toy(run: dict, run_dir: str, scoring: dict) -> dict[str, dict]:
    """{arm: held-out answer accuracy, NLL and share of test positions that think} of a toy
    run, thinking as its arm does; the every-position run is also scored with its gate at
    inference only (arm every_gated_s), at each of the study's shares."""
    config, qs, params, tokenizer = checkpoint.load_for_inference(run_dir)
    items = scoring["items"]
    score = lambda thinking, **kw: answer_metrics(config, qs, params, tokenizer, items, thinking, run["seed"], **kw)  # noqa: E731
    kind, share = run["kind"], run["share"]
    if kind == "control":
        return {run["arm"]: {**score(False), "thinking_share": 0.0}}
    if kind == "random":
        mixed = expected_mix(share, score(True), score(False), ("accuracy", "answer_nll", "answer_thought"))
        return {run["arm"]: {**mixed, "thinking_share": share}}
    dev_scores = gate_scores(config, qs, params, toy_rows(tokenizer, scoring["dev_items"]), tokenizer.pad_id)
    test_scores = gate_scores(config, qs, params, toy_rows(tokenizer, items), tokenizer.pad_id)

    def gated(at: float) -> dict:
        threshold = threshold_for(at, dev_scores)
        return {**score(True, think_gate=threshold), "think_gate": threshold,
                "thinking_share": float(np.mean(test_scores > threshold))}

    if kind == "gate":
        return {run["arm"]: gated(share)}
    return {"every": {**score(True), "thinking_share": 1.0},
            **{share_name("every_gated", at): gated(at) for at in scoring["shares"]}}


def corpus_rows(texts: list[str], seq_len: int, tokenizer) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(development, test) halves of the corpus's held-out documents, as token rows of at
    most seq_len tokens (each run has its own tokenizer)."""
    rows = [data.encode_document(tokenizer, text)[:seq_len] for text in texts]
    rows = [r for r in rows if len(r) > 1]
    if len(rows) < 2:
        raise UserError(f"the corpus holds out {len(rows)} scorable documents; the study needs at least 2")
    return rows[:len(rows) // 2], rows[len(rows) // 2:]


def per_token_nll(config, qs, params, rows: list[np.ndarray], pad_id: int, thinking: bool,
                  think_gate: float | None, seed: int) -> dict:
    """Mean NLL of every token after the first of each row, teacher-forced through the
    decoder (one thought before a token where the model thinks), and the share that thought."""
    prompt_Bx1 = jnp.asarray([r[:1] for r in rows], jnp.int32)
    continuation_BxM, valid_BxM = right_pad([r[1:] for r in rows], pad_id)
    decoded = continuation_decoded(config, qs, params, prompt_Bx1, jnp.ones(prompt_Bx1.shape, bool),
                                   continuation_BxM, jax.random.key(seed), thinking, think_gate)
    logp_BxMxV = jax.nn.log_softmax(decoded.logits_BxMxV.astype(jnp.float32), axis=-1)
    nll_BxM = -np.asarray(jnp.take_along_axis(logp_BxMxV, continuation_BxM[..., None], axis=-1)[..., 0])
    valid = np.asarray(valid_BxM)
    return {"nll": float(nll_BxM[valid].mean()), "thinking_share": float(np.asarray(decoded.thought_BxM)[valid].mean())}


def score_corpus(run: dict, run_dir: str, scoring: dict) -> dict[str, dict]:
    """{arm: held-out NLL per token and share of positions that think} of a corpus run, as
    `score_toy` scores a toy run."""
    config, qs, params, tokenizer = checkpoint.load_for_inference(run_dir)
    dev, test = corpus_rows(scoring["corpus_texts"], scoring["corpus_seq_len"], tokenizer)
    score = lambda thinking, gate=None: per_token_nll(config, qs, params, test, tokenizer.pad_id, thinking, gate,  # noqa: E731
                                                      run["seed"])
    kind, share = run["kind"], run["share"]
    if kind == "control":
        return {run["arm"]: score(False)}
    if kind == "random":
        return {run["arm"]: {**expected_mix(share, score(True), score(False), ("nll",)), "thinking_share": share}}
    dev_scores = gate_scores(config, qs, params, dev, tokenizer.pad_id)

    def gated(at: float) -> dict:
        threshold = threshold_for(at, dev_scores)
        return {**score(True, threshold), "think_gate": threshold}

    if kind == "gate":
        return {run["arm"]: gated(share)}
    return {"every": score(True), **{share_name("every_gated", at): gated(at) for at in scoring["shares"]}}


def corpus_held_out(smoke: bool) -> tuple[list[str], int]:
    """(held-out texts, seq_len) of the corpus runs: their config with the study's overrides,
    read once for every run."""
    from experiments.tiny_cpu import get_config

    cfg = get_config()
    if smoke:
        cfg.data.update(default_documents=200, eval_documents=20, seq_len=32)
    _, held_out = data.split_documents(data.load_documents(cfg.data), cfg.data.eval_documents)
    return [held_out[i] for i in range(len(held_out))], cfg.data.seq_len


# --------------------------------------------------------------------------------- study


def pretrain_base(workdir: str, cache_dir: str, smoke: bool) -> str:
    """The toy study's base model (written variant), pretrained and exported once."""
    base_run, base_model = os.path.join(workdir, "base"), os.path.join(workdir, "base_model")
    print(f"[gate_study] pretraining the toy base model in {base_run}", flush=True)
    train(BASE_CONFIG, base_run, SMOKE_BASE if smoke else [], cache_dir)
    export_base(base_run, base_model)
    return base_model


def train_and_score(run: dict, workdir: str, cache_dir: str, base_model: str, smoke: bool, scoring: dict) -> dict:
    """One arm's run, trained (or resumed) and scored on its text's held-out data."""
    run_dir = os.path.join(workdir, run["name"])
    if run["text"] == "toy":
        config, extra = ARM_CONFIG, [f"--config.init_from={base_model}", *(SMOKE_ARM + SMOKE_THOUGHTS if smoke else [])]
    else:
        config, extra = CORPUS_CONFIG, ["--config.eval_every=0", *(SMOKE_CORPUS + SMOKE_THOUGHTS if smoke else [])]
    train_s = train(config, run_dir, [*run["overrides"], *extra], cache_dir)
    scores = (score_toy if run["text"] == "toy" else score_corpus)(run, run_dir, scoring)
    print(f"[gate_study] {run['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores[run["arm"]].items()
                                                      if k in ("accuracy", "nll", "thinking_share"))
          + f" ({train_s:.0f} s)", flush=True)
    return {**run, "train_s": train_s, "scores": scores}


def time_generation(workdir: str, results: dict, items) -> dict:
    """Tokens/s of the first seed's toy control and every-position arms, and of every arm
    that thinks where a gate says, at its threshold."""
    timed = {}
    for run in results["runs"]:
        if run["text"] == "toy" and run["seed"] == results["seeds"][0] and run["kind"] != "random":
            for arm, scores in run["scores"].items():
                timed[arm] = (os.path.join(workdir, run["name"]), None, scores.get("think_gate"))
    return speed.generation_speeds(timed, SPEED_TOKENS, items[0].question, SPEED_ROUNDS)


def study(workdir: str, seeds: list[int], shares: list[float], smoke: bool) -> dict:
    """The whole study in `workdir`; returns what `publish` writes."""
    start = time.perf_counter()
    make_workdir(workdir)
    workdir = os.path.abspath(workdir)
    cache_dir = os.path.join(workdir, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    base_model = pretrain_base(workdir, cache_dir, smoke)
    count = 40 if smoke else TEST_PROBLEMS
    corpus_texts, corpus_seq_len = corpus_held_out(smoke)
    scoring = {"items": toy_reasoning.problems(count, TEST_SEED, split="test"), "corpus_texts": corpus_texts,
               "corpus_seq_len": corpus_seq_len, "shares": shares,
               "dev_items": toy_reasoning.problems(40 if smoke else DEV_PROBLEMS, DEV_SEED, split="dev")}
    results = {"seeds": seeds, "shares": shares, "test_problems": count, "runs": []}
    for run in study_runs(seeds, shares):
        results["runs"].append(train_and_score(run, workdir, cache_dir, base_model, smoke, scoring))
    results["speed"] = time_generation(workdir, results, scoring["items"])
    results["summary"] = gate_report.aggregate(results)
    results["verdict"] = gate_report.verdict(results)
    results["wall_s"] = time.perf_counter() - start
    return results


def share_list(text: str) -> list[float]:
    """argparse type of comma-separated shares in (0, 1)."""
    try:
        shares = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0.0 < s < 1.0 for s in shares):
        raise argparse.ArgumentTypeError(f"every share must be in (0, 1), got {text!r}")
    return shares


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = study_parser("qstar_jax.toy_gate_study", __doc__.splitlines()[0], "runs/gate_study", "every arm",
                          "gate-study table", gate_report.DEFAULT_PLOT)
    parser.add_argument("--shares", type=share_list, default=[0.1, 0.2],
                        help="comma-separated shares of positions that think, for the gate and random arms")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_study("qstar_jax.toy_gate_study", argv, args, gate_report.MARKERS,
              lambda: study(args.workdir, args.seeds, args.shares, args.smoke), gate_report.report, gate_report.plot)
