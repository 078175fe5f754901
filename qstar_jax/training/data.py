"""Training data: random-access documents -> per-document (or packed) rows, per process.

Sources (`config.data.source`), each a random-access list of documents that is never
read whole:
  * "default": a corpus the repo generates deterministically (`default_corpus`), so the
    main command needs no download; only questions of the "train" split (corpora.py), so
    held-out problems (`python -m qstar_jax.data --write-problems`) are never trained on;
  * "files": a directory (or one file) of `.parquet` files with a text column (how the
    HF hub ships OpenWebMath; `python -m qstar_jax.data --to-parquet`, in
    training/prepare_data.py, writes C4's json.gz the same way), read row group by row
    group; `.txt` files, one document each, read on demand; `.jsonl` files (a text field),
    read whole, for small corpora;
  * "toy_reasoning": chained arithmetic with the working written out or left implicit
    (toy/reasoning.py; the miniature replication of docs/toy_experiment.md), questions of
    the "train" split only: the studies' dev and test questions never occur in it;
  * "tfds": a tensorflow-datasets dataset by name, already prepared in `data_dir`, read
    through its TF-free array_record data source.

Rows follow the official code by default: one document per row (BOS + text + EOS),
randomly cropped to `seq_len` or right-padded (padding is segment 0: never attended to,
never a target). With `data.packing` a row starts at a random point of one document and
is filled with the next documents of the shuffled order, each its own segment (1, 2, ...)
so packed documents never see each other (models/transformer.py's segment ids).

The order is grain's: documents shuffled by a seeded index permutation, reshuffled every
epoch, addressed lazily. Row r of step s is global example `s * batch_size + r`, a pure
function of (seed, index): each process reads and tokenises only the rows of its own
devices, nothing is kept between steps, and the data "iterator" state is just the next
step, saved in every checkpoint, so resume is exact (and independent of process count).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from typing import Iterator, Protocol, Sequence

import grain
import numpy as np

from qstar_jax import paths
from qstar_jax.errors import UserError
from qstar_jax.tokenizer import Tokenizer
from qstar_jax.toy import reasoning as toy_reasoning
from qstar_jax.training.corpora import default_corpus

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# ------------------------------------------------------------------------ default corpus


# ------------------------------------------------------------------------------ sources


class Documents(Protocol):
    """A random-access list of texts (what grain's `MapDataset.source` takes)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> str: ...


class ParquetDocuments:
    """The text column of one parquet file, read one row group at a time.

    Only the footer is read up front (row counts); a document's row group is read when
    the document is asked for, and the last few stay cached (as Python strings). HF's parquet shards hold
    row groups of ~1,000 documents, so this is a few MB per read, local or on a bucket.
    """

    def __init__(self, path: paths.Path, text_field: str):
        import pyarrow.parquet as pq

        self.path, self.text_field = path, text_field
        try:
            with path.open("rb") as f:
                parquet_file = pq.ParquetFile(f)
                self._metadata, names = parquet_file.metadata, parquet_file.schema_arrow.names
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]})") from None
        if text_field not in names:
            raise UserError(f"{path} has no {text_field!r} column (columns: {', '.join(names)})")
        counts = [self._metadata.row_group(i).num_rows for i in range(self._metadata.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._read_group = functools.lru_cache(maxsize=4)(self._read_group_uncached)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _read_group_uncached(self, group: int) -> list:
        # The file is open only while a row group is read: a process with hundreds of
        # shards on a bucket keeps no file handles (or their read-ahead buffers) alive.
        import pyarrow.parquet as pq

        with self.path.open("rb") as f:
            table = pq.ParquetFile(f, metadata=self._metadata).read_row_group(group, columns=[self.text_field])
        return table.column(0).to_pylist()

    def __getitem__(self, index: int) -> str:
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._read_group(group)[index - int(self._starts[group])] or ""


class TextFileDocuments:
    """`.txt` files, one document each, read when asked for."""

    def __init__(self, files: Sequence[paths.Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        return paths.read_text(self.files[index])


def jsonl_documents(path: paths.Path, text_field: str) -> list[str]:
    """Every text of a JSON-lines file (read whole: for corpora that fit in memory)."""
    return [record_text(record, text_field, path, line_number) for line_number, record in json_lines(path)]


def record_text(record, text_field: str, path: paths.Path, line_number: int) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(f"{path}:{line_number} has no {text_field!r} text field")
    return record[text_field]


class ConcatDocuments:
    """Several document lists as one, in order."""

    def __init__(self, parts: Sequence[Documents]):
        self.parts = [part for part in parts if len(part)]
        self._starts = np.concatenate([[0], np.cumsum([len(part) for part in self.parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part][index - int(self._starts[part])]


def file_documents(path: str, text_field: str = "text") -> Documents:
    """The documents of a file or of every .parquet/.txt/.jsonl file under a directory."""
    root = paths.path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [f for f in paths.files_under(root) if f.name.endswith(TEXT_SUFFIXES)]
        if not files:
            raise UserError(f"no {'/'.join(TEXT_SUFFIXES)} files in data directory {path}")
    else:
        raise UserError(f"data path does not exist: {path}")
    parts: list[Documents] = []
    texts = [f for f in files if f.name.endswith(".txt") and f.stat().length > 0]  # an empty file is no document
    if texts:
        parts.append(TextFileDocuments(texts))
    for file in files:
        if file.name.endswith(".parquet"):
            parts.append(ParquetDocuments(file, text_field))
        elif file.name.endswith(".jsonl"):
            parts.append(jsonl_documents(file, text_field))
        elif not file.name.endswith(".txt"):
            raise UserError(f"{file} is not a {'/'.join(TEXT_SUFFIXES)} file")
    return ConcatDocuments(parts)


def open_tfds_split(name: str, split: str, data_dir: str | None):
    """A prepared tfds split through `tfds.data_source` (random access, no TensorFlow, no
    download); one line naming it when it is not there."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    # An unknown name is a DatasetNotFoundError (a ValueError), an unprepared one a
    # NotImplementedError (a RuntimeError), missing files an OSError, a bad split a ValueError.
    except (ValueError, RuntimeError, OSError, AssertionError) as e:
        raise UserError(f"tfds dataset {name!r} split {split!r} is not prepared (not available in {data_dir}): "
                        f"{str(e).splitlines()[0]}") from None


class TfdsDocuments:
    """The texts of a prepared tfds split."""

    def __init__(self, name: str, split: str, data_dir: str | None, text_field: str = "text"):
        self._source = open_tfds_split(name, split, data_dir)
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        text = self._source[index][self.text_field]
        return text.decode("utf-8") if isinstance(text, bytes) else text


def load_documents(data_config) -> grain.MapDataset:
    """The configured source as a random-access dataset of texts (`max_documents` > 0 keeps
    the first that many)."""
    source = data_config.source
    if source == "default":
        documents: Documents = default_corpus(data_config.default_documents, data_config.default_seed)
    elif source == "files":
        documents = file_documents(data_config.path, data_config.text_field)
    elif source == "toy_reasoning":
        toy = data_config.toy
        documents = toy_reasoning.documents(toy.problems, toy.seed, toy.explicit_fraction, toy.num_ops,
                                            toy.aside_fraction, toy.delimiter_fraction)
    elif source == "tfds":
        documents = TfdsDocuments(data_config.tfds_name, data_config.split, data_config.path or None,
                                  data_config.text_field)
    else:
        raise UserError(f"data.source must be 'default', 'files', 'toy_reasoning' or 'tfds', got {source!r}")
    if not len(documents):
        raise UserError(f"the {source} dataset is empty")
    dataset = grain.MapDataset.source(documents)
    if data_config.max_documents > 0:
        dataset = dataset[: data_config.max_documents]
    return dataset


def split_documents(documents: grain.MapDataset, eval_documents: int) -> tuple[grain.MapDataset, grain.MapDataset]:
    """Holds out the last `eval_documents` documents for evaluation (never trained on)."""
    if eval_documents <= 0:
        return documents, documents[:0]
    if eval_documents >= len(documents):
        raise UserError(f"data.eval_documents={eval_documents} leaves no training documents "
                        f"(dataset has {len(documents)})")
    return documents[:-eval_documents], documents[-eval_documents:]


def leading_documents(documents: grain.MapDataset, limit: int) -> list[str]:
    """The first `limit` documents (what a tokenizer is trained on for a random init)."""
    return [documents[i] for i in range(min(len(documents), limit))]


# --------------------------------------------------------------------------------- rows


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A document's token ids, wrapped in BOS ... EOS when the tokenizer has them."""
    ids = tokenizer.with_bos(tokenizer.encode(text))
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class Row:
    tokens_N: np.ndarray  # int32
    segments_N: np.ndarray  # int32: 0 padding, 1, 2, ... documents


class Rows:
    """Training rows addressed by a global example index: `rows[i]` is a pure function of
    (documents, seed, i), so any process can build any row without coordination."""

    def __init__(self, documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, seed: int,
                 packing: bool):
        if seq_len < 2:
            raise UserError(f"data.seq_len must be at least 2, got {seq_len}")
        if not len(documents):
            raise UserError("no documents to build training rows from")
        self.seq_len, self.seed, self.packing = seq_len, seed, packing
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        # Every epoch is a fresh permutation (grain's repeat of a shuffled dataset).
        self.encoded = (documents.shuffle(seed=seed).repeat(None)
                        .map(functools.partial(encode_document, tokenizer)))

    def __getitem__(self, index: int) -> Row:
        rng = np.random.default_rng((self.seed, index))
        ids = self.encoded[index]
        tokens_N = np.full(self.seq_len, self.pad_id, np.int32)
        segments_N = np.zeros(self.seq_len, np.int32)
        if self.packing:  # anywhere in the first document; the next ones fill the row
            start = int(rng.integers(0, len(ids)))
        else:  # a random crop of a long document (a short one starts at 0 and is padded)
            start = int(rng.integers(0, max(len(ids) - self.seq_len, 0) + 1))
        filled, segment, following = 0, 1, index
        while filled < self.seq_len:
            piece = ids[start : start + self.seq_len - filled]
            tokens_N[filled : filled + len(piece)] = piece
            segments_N[filled : filled + len(piece)] = segment
            filled += len(piece)
            if not self.packing:
                break
            following, segment, start = following + 1, segment + 1, 0
            ids = self.encoded[following]
        return Row(tokens_N, segments_N)


# ------------------------------------------------------------------------- JSON lines


def json_lines(path: paths.Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of a `.jsonl` or `.json.gz` file (C4's layout on the HF hub),
    streamed; blank lines skipped."""
    with path.open("rb") as raw:
        lines = gzip.open(raw) if path.name.endswith(".gz") else raw
        for line_number, line in enumerate(lines, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{line_number} is not UTF-8 text") from None
            if text.strip():
                try:
                    yield line_number, json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_number} is not valid JSON ({e.msg})") from None
