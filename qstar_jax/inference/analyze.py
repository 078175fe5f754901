"""Where does thinking help? Per-token log-prob gain of the post-thought prediction.

    python -m qstar_jax.analyze --checkpoint RUN_DIR --data FILES --output DIR
        [--seq-len 128] [--max-documents 16] [--seed 0]

For every token x_{j+1} of held-out text: gain = log p_mix(x_{j+1}) − log p_base(x_{j+1}),
where p_mix is the prediction after one sampled thought at position j (n_passes=1,
n_ahead_talk=1). Writes to DIR:
  hard_tokens.png  mean gain per decile of base NLL (the paper's hard-token figure)
  summary.json     overall and per-decile figures
  thoughts.html    the text, each token coloured by its gain, its thought on hover
"""

from __future__ import annotations

import argparse
import html
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qstar_jax import paths
from qstar_jax.training.checkpoint import load_for_inference
from qstar_jax.training.data import file_documents
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.inference.generate import int64_seed
from qstar_jax.method.rollout import rollout


def analysis_config(qs):
    """One thought at every position, judged on the next token alone."""
    return qs.replace(n_passes=1, n_ahead_talk=1, think_share=1.0)


def longest_seq_len(config, qs) -> int:
    """The longest --seq-len whose thoughts stay inside the model's context: the thought
    after the last token (position seq_len - 1) takes the next n_steps positions (`rollout`);
    past max_position_embeddings positions leave what the model was trained on."""
    return config.max_position_embeddings - analysis_config(qs).n_steps


def token_gains(config, qs, params, tokens_1xN: np.ndarray, seed: int):
    """(base_nll_N, gain_N, valid_N, thoughts_NxS) for one sequence; entry j is about x_{j+1}."""
    qs1 = analysis_config(qs)
    tokens = jnp.asarray(tokens_1xN)
    r = jax.jit(rollout, static_argnums=(0, 1))(config, qs1, params, tokens, jnp.ones(tokens.shape, bool),
                                                  jax.random.key(seed))
    base = np.asarray(r.base_logp_BxN[0])
    gain = np.asarray(r.talk_logp_CxBxPxN[0, 0, 0]) - base
    valid = np.asarray(r.target_valid_CxBxN[0, 0])
    thoughts = np.asarray(r.sampled_SxBxPxN[:, 0, 0]).T
    return -base, gain, valid, thoughts


def decile_table(base_nll: np.ndarray, gain: np.ndarray) -> list[dict]:
    edges = np.quantile(base_nll, np.linspace(0, 1, 11))
    rows = []
    for d in range(10):
        upper = base_nll <= edges[d + 1] if d == 9 else base_nll < edges[d + 1]
        mask = (base_nll >= edges[d]) & upper
        rows.append({"decile": d + 1, "base_nll_from": float(edges[d]), "base_nll_to": float(edges[d + 1]),
                     "tokens": int(mask.sum()), "mean_gain": float(gain[mask].mean()) if mask.any() else 0.0})
    return rows


def plot(rows: list[dict]) -> bytes:
    """The per-decile gain bar chart as PNG bytes (written through the path layer)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.bar([r["decile"] for r in rows], [r["mean_gain"] for r in rows], color="#3b7dd8")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("decile of base-model NLL (1 = easiest tokens, 10 = hardest)")
    ax.set_ylabel("mean log-prob gain of thinking (nats)")
    ax.set_title("Where thinking helps")
    ax.set_xticks(range(1, 11))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()


def _colour(gain: float, scale: float) -> str:
    strength = min(abs(gain) / scale, 1.0) if scale > 0 else 0.0
    alpha = 0.15 + 0.6 * strength
    return f"rgba(40,160,70,{alpha:.2f})" if gain >= 0 else f"rgba(210,50,50,{alpha:.2f})"


def html_page(sequences: list[dict], tokenizer, scale: float) -> str:
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>qstar_jax thoughts</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}"
             "span.t{white-space:pre-wrap;border-radius:3px;cursor:help}p.doc{margin-bottom:2em}</style>",
             "</head><body><h1>Thinking gain per token</h1>",
             "<p>Green: the post-thought prediction of this token beats the base prediction; red: it is worse. "
             "Hover a token for its gain and the thought sampled just before it.</p>"]
    for seq in sequences:
        parts.append("<p class='doc'>" + html.escape(tokenizer.decode(seq["tokens"][:1])))
        for j, token in enumerate(seq["tokens"][1:]):
            if not seq["valid"][j]:
                continue
            gain = seq["gain"][j]
            thought = tokenizer.decode(seq["thoughts"][j])
            title = html.escape(f"gain {gain:+.3f} nats | thought: {thought}", quote=True)
            text = html.escape(tokenizer.decode([token]))
            parts.append(f"<span class='t' style='background:{_colour(gain, scale)}' title=\"{title}\">{text}</span>")
        parts.append("</p>")
    parts.append("</body></html>")
    return "".join(parts)


def analyze(checkpoint: str, data: str, output: str, seq_len: int, max_documents: int, seed: int) -> dict:
    config, qs, params, tokenizer = load_for_inference(checkpoint)
    if qs is None:
        raise UserError(f"{checkpoint} has no thought parameters; analysis needs a Quiet-STaR run")
    if seq_len > (longest := longest_seq_len(config, qs)):
        raise UserError(f"--seq-len {seq_len} does not fit the model's context of {config.max_position_embeddings} "
                        f"positions with the {analysis_config(qs).n_steps}-token thought after the last token: "
                        f"at most {longest}")
    source = file_documents(data)
    if not len(source):
        raise UserError(f"no documents in {data}")
    documents = (source[i] for i in range(min(len(source), max_documents)))
    sequences, all_nll, all_gain = [], [], []
    for i, text in enumerate(documents):
        ids = tokenizer.with_bos(tokenizer.encode(text))[:seq_len]
        if len(ids) < 2:
            continue
        nll, gain, valid, thoughts = token_gains(config, qs, params, np.asarray([ids], np.int32), int64_seed(seed + i))
        sequences.append({"tokens": ids, "gain": gain.tolist(), "valid": valid.tolist(), "thoughts": thoughts.tolist()})
        all_nll.append(nll[valid])
        all_gain.append(gain[valid])
    if not sequences:
        raise UserError(f"no document in {data} has two or more tokens")
    nll, gain = np.concatenate(all_nll), np.concatenate(all_gain)
    rows = decile_table(nll, gain)
    out = paths.path(output)
    paths.write_bytes(out / "hard_tokens.png", plot(rows))
    paths.write_text(out / "thoughts.html", html_page(sequences, tokenizer, float(np.quantile(np.abs(gain), 0.95)) or 1.0))
    summary = {"checkpoint": checkpoint, "documents": len(sequences), "tokens": int(len(gain)),
               "mean_gain": float(gain.mean()), "mean_base_nll": float(nll.mean()),
               "fraction_improved": float((gain > 0).mean()), "deciles": rows}
    paths.write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir")
    parser.add_argument("--data", required=True, help="held-out .txt/.jsonl/.parquet file or directory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-documents", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be >= 2 (a token and its successor), got {args.seq_len}")
    if args.max_documents < 1:
        raise UserError(f"--max-documents must be >= 1, got {args.max_documents}")
    if paths.path(args.output).is_file():
        raise UserError(f"--output must be a directory; {args.output} is a file")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = analyze(args.checkpoint, args.data, args.output, args.seq_len, args.max_documents, args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k != "deciles"}))
