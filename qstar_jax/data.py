"""Training data: documents -> one token stream -> random fixed-length windows.

Sources (`config.data.source`):
  * "default": a corpus the repo generates deterministically (`default_corpus`), so the
    main command needs no download;
  * "files": a directory (or one file) of `.txt`, `.jsonl` (a text field) or `.parquet`
    (a text column) files: how OpenWebMath or C4 are used offline;
  * "toy_reasoning": chained arithmetic with the working written out or left implicit
    (toy_reasoning.py; the miniature replication of docs/toy_experiment.md);
  * "tfds": a tensorflow-datasets dataset by name, already prepared in `data_dir`, read
    through its TF-free array_record data source.

Windows follow the paper: each example is a random `seq_len`-token crop of the token
stream (documents joined with EOS). The window of global example i at step s is a pure
function of (seed, s, i), so the data "iterator" state is just the next step: saved in
every checkpoint, resumable exactly, and each host / data-parallel rank draws its own
rows without coordination.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Iterable, Sequence

import numpy as np

from qstar_jax import paths, toy_reasoning
from qstar_jax.errors import UserError
from qstar_jax.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


# ------------------------------------------------------------------------ default corpus


def arithmetic_problems(num_problems: int, seed: int = 0) -> list[dict[str, str]]:
    """Short arithmetic stories as GSM8K-format records (question, answer with "#### N").

    Deterministic given the seed, so held-out problems are just another seed.
    """
    rng = random.Random(seed)
    names = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
    things = ["apples", "books", "coins", "shells", "stamps", "marbles", "pens", "cards"]
    problems = []
    for _ in range(num_problems):
        name, other = rng.sample(names, 2)
        thing = rng.choice(things)
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            question = f"{name} has {a} {thing}. {other} gives {name} {b} more. How many {thing} does {name} have now?"
            steps, result = f"{a} plus {b} is {a + b}", a + b
        elif kind == 1:
            question = f"{name} packs {c} boxes with {a} {thing} in each box. How many {thing} are there in all?"
            steps, result = f"{c} times {a} is {c * a}", c * a
        else:
            question = f"{name} had {a + b} {thing} and gave {b} to {other}. How many {thing} does {name} keep?"
            steps, result = f"{a + b} minus {b} is {a}", a
        problems.append({"question": question, "answer": f"{steps}, so the answer is {result}.\n#### {result}"})
    return problems


def default_corpus(num_documents: int = 2000, seed: int = 0) -> list[str]:
    """The embedded training text: each arithmetic problem with its worked answer.

    The numbers make some tokens hard (the results) and others easy (the template),
    which is what Quiet-STaR's thinking is meant to help with.
    """
    return [
        f"{p['question']} {p['answer'].split(chr(10))[0]}" for p in arithmetic_problems(num_documents, seed)
    ]


# ------------------------------------------------------------------------------ sources


def _read_file(path: paths.Path, text_field: str) -> Iterable[str]:
    if path.name.endswith(".txt"):
        yield path.read_text(encoding="utf-8")
    elif path.name.endswith(".jsonl"):
        with path.open("r", encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number} is not valid JSON ({e.msg})") from None
                if text_field not in record:
                    raise UserError(f"{path}:{line_number} has no {text_field!r} field")
                yield record[text_field]
    else:
        import pyarrow.parquet as pq

        with path.open("rb") as f:
            table = pq.read_table(f)
        if text_field not in table.column_names:
            raise UserError(f"{path} has no {text_field!r} column (columns: {', '.join(table.column_names)})")
        yield from table.column(text_field).to_pylist()


def file_documents(path: str, text_field: str = "text", max_documents: int = 0) -> list[str]:
    root = paths.path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [f for f in paths.files_under(root) if f.name.endswith(TEXT_SUFFIXES)]
        if not files:
            raise UserError(f"no {'/'.join(TEXT_SUFFIXES)} files in data directory {path}")
    else:
        raise UserError(f"data path does not exist: {path}")
    documents = []
    for file in files:
        for text in _read_file(file, text_field):
            if text:
                documents.append(text)
            if max_documents and len(documents) >= max_documents:
                return documents
    return documents


def tfds_documents(name: str, split: str, data_dir: str | None, text_field: str = "text",
                   max_documents: int = 0) -> list[str]:
    """Reads a prepared tfds dataset through `tfds.data_source` (no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many types for "not prepared here"
        raise UserError(f"tfds dataset {name!r} split {split!r} is not available in {data_dir}: "
                        f"{str(e).splitlines()[0]}") from None
    count = len(source) if not max_documents else min(len(source), max_documents)
    documents = []
    for i in range(count):
        text = source[i][text_field]
        documents.append(text.decode("utf-8") if isinstance(text, bytes) else text)
    return documents


def load_documents(data_config) -> list[str]:
    source = data_config.source
    if source == "default":
        documents = default_corpus(data_config.default_documents, data_config.default_seed)
    elif source == "files":
        documents = file_documents(data_config.path, data_config.text_field, data_config.max_documents)
    elif source == "toy_reasoning":
        toy = data_config.toy
        documents = toy_reasoning.documents(toy.problems, toy.seed, toy.explicit_fraction, toy.num_ops)
    elif source == "tfds":
        documents = tfds_documents(data_config.tfds_name, data_config.split, data_config.path or None,
                                   data_config.text_field, data_config.max_documents)
    else:
        raise UserError(f"data.source must be 'default', 'files', 'toy_reasoning' or 'tfds', got {source!r}")
    if not documents:
        raise UserError(f"the {source} dataset is empty")
    return documents


# ------------------------------------------------------------------------------- tokens


def token_stream(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one int32 stream, each wrapped in BOS ... EOS when the tokenizer has them."""
    pieces = []
    for text in documents:
        ids = tokenizer.encode(text)
        if tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        pieces.append(np.asarray(ids, np.int32))
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True)
class WindowSampler:
    """Random `seq_len` windows of a token stream, addressed by (step, example index)."""

    tokens: np.ndarray
    seq_len: int
    seed: int

    def __post_init__(self):
        if len(self.tokens) < self.seq_len:
            raise UserError(
                f"dataset has {len(self.tokens)} tokens, fewer than one window of seq_len={self.seq_len}"
            )

    def window(self, step: int, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, step, index))
        start = int(rng.integers(0, len(self.tokens) - self.seq_len + 1))
        return self.tokens[start : start + self.seq_len]

    def batch(self, step: int, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and validity (all real: windows never run past the stream) for these rows."""
        tokens = np.stack([self.window(step, i) for i in rows])
        return tokens, np.ones(tokens.shape, bool)


def split_documents(documents: list[str], eval_documents: int) -> tuple[list[str], list[str]]:
    """Holds out the last `eval_documents` documents for evaluation (never trained on)."""
    if eval_documents <= 0:
        return documents, []
    if eval_documents >= len(documents):
        raise UserError(f"data.eval_documents={eval_documents} leaves no training documents "
                        f"(dataset has {len(documents)})")
    return documents[:-eval_documents], documents[-eval_documents:]


def main(argv: list[str] | None = None) -> None:
    """Writes held-out arithmetic problems as GSM8K-format JSONL (for qstar_jax.evaluate)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m qstar_jax.data", description=main.__doc__)
    parser.add_argument("--write-problems", required=True, metavar="FILE")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1, help="the training corpus uses data.default_seed (0)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    paths.write_text(args.write_problems,
                     "".join(json.dumps(problem) + "\n" for problem in arithmetic_problems(args.count, args.seed)))


if __name__ == "__main__":
    main()
