"""Data preparation, `python -m qstar_jax.data`: JSON-lines corpora (C4's json.gz) rewritten
as parquet for the "files" source (training/data.py), and held-out arithmetic problems as
GSM8K-format JSONL for qstar_jax.evaluate.

What the outputs promise:
  * every input keeps its own output: a `.json.gz`/`.jsonl` file under SOURCE becomes a
    `.parquet` file at the same relative path under DIR (C4 keeps files of one name in
    en/, realnewslike/, ...: written flat, the last would silently replace the others),
    and two inputs that would still share an output (a.jsonl beside a.json.gz) are
    refused, naming both, before anything is written;
  * all files or none: each is written under a temporary name beside its target (never
    `.parquet`, so no reader takes it for data) and moved into place only once every file
    is complete; a bad input line removes the temporary files and the directories the run
    made, so a failure leaves nothing that looks whole;
  * nothing is replaced unasked: a non-empty DIR or an existing problems FILE is refused
    unless --overwrite, and then only the files of the names written are replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from typing import Sequence

from qstar_jax import paths
from qstar_jax.errors import UserError, exit_on_user_error
from qstar_jax.training.corpora import arithmetic_problems, document
from qstar_jax.training.data import json_lines, record_text


def parquet_name(file: paths.Path, root: paths.Path) -> str:
    """Where one JSON-lines file's parquet goes, relative to the output directory: its path
    under `root` (sub-folders mirrored), suffix made `.parquet`."""
    relative = file.name if file == root else str(file.relative_to(root))
    return relative.removesuffix(".gz").removesuffix(".json").removesuffix(".jsonl") + ".parquet"


def parquet_targets(files: Sequence[paths.Path], root: paths.Path) -> dict[str, paths.Path]:
    """Output name -> the input written there; two inputs of one name (a.jsonl beside
    a.json.gz) are refused, naming both, before anything is written."""
    targets: dict[str, paths.Path] = {}
    for file in files:
        name = parquet_name(file, root)
        if name in targets:
            raise UserError(f"{targets[name]} and {file} would both be written to {name}; rename one of them")
        targets[name] = file
    return targets


def check_output_dir(output: paths.Path, names: Sequence[str], overwrite: bool) -> None:
    """An existing non-empty output directory is refused unless `overwrite`: then only the
    files of the names written are replaced, and every other file there is kept."""
    if output.is_file():
        raise UserError(f"--output must be a directory; {output} is a file")
    if not overwrite and output.is_dir() and any(output.iterdir()):
        raise UserError(f"--output {output} is not empty; pass --overwrite to replace the files written there")
    for name in names:
        if (output / name).is_dir():
            raise UserError(f"{output / name} is a directory; the parquet file of that name cannot replace it")


def missing_dirs(output: paths.Path, names: Sequence[str]) -> list[paths.Path]:
    """The directories that writing `names` under `output` creates (`output` included),
    deepest first: what a failed conversion removes again."""
    dirs = {output}
    for name in names:
        parent = (output / name).parent
        while parent != output:
            dirs.add(parent)
            parent = parent.parent
    return sorted((d for d in dirs if not d.exists()), key=lambda d: len(d.parts), reverse=True)


def write_parquet(file: paths.Path, sink_path: paths.Path, text_field: str, rows_per_group: int) -> int:
    """One JSON-lines file as parquet (the text column, row groups of `rows_per_group`),
    streamed; returns its number of documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(text_field, pa.string())])
    count = 0
    with sink_path.open("wb") as sink, pq.ParquetWriter(sink, schema) as writer:
        batch: list[str] = []
        for line_number, record in json_lines(file):
            batch.append(record_text(record, text_field, file, line_number))
            if len(batch) == rows_per_group:
                writer.write_table(pa.table({text_field: batch}, schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_table(pa.table({text_field: batch}, schema=schema))
            count += len(batch)
    return count


def to_parquet(source: str, output: str, text_field: str = "text", rows_per_group: int = 1000,
               overwrite: bool = False) -> int:
    """Rewrites every `.json.gz`/`.jsonl` file under `source` as a parquet file at the same
    relative path under `output`, one file at a time in bounded memory, all or nothing (the
    module docstring says how). Returns the number of documents written."""
    root = paths.path(source)
    if not root.exists():
        raise UserError(f"--to-parquet source does not exist: {source}")
    files = [root] if root.is_file() else [f for f in paths.files_under(root)
                                            if f.name.endswith((".json.gz", ".jsonl"))]
    if not files:
        raise UserError(f"no .json.gz/.jsonl files under {source}")
    out = paths.path(output)
    targets = parquet_targets(files, root)
    check_output_dir(out, list(targets), overwrite)
    created = missing_dirs(out, list(targets))
    staged: list[tuple[paths.Path, paths.Path]] = []
    total = 0
    try:
        for name, file in targets.items():
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.append((target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}", target))
            total += write_parquet(file, staged[-1][0], text_field, rows_per_group)
    except BaseException:
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if not paths.is_remote(out):  # a bucket has no directories of its own to remove
            for directory in created:
                with contextlib.suppress(OSError):  # not empty: someone else's files are there now
                    directory.rmdir()
        raise
    for temporary, target in staged:
        temporary.replace(target)
    return total


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Data preparation: held-out arithmetic problems as GSM8K-format JSONL (for
    qstar_jax.evaluate), or JSON-lines corpora (C4's json.gz) rewritten as parquet."""
    parser = argparse.ArgumentParser(prog="python -m qstar_jax.data", description=main.__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-problems", metavar="FILE", help="refused if FILE exists, unless --overwrite")
    action.add_argument("--to-parquet", metavar="SOURCE",
                        help="a .json.gz/.jsonl file or a directory of them (sub-folders are mirrored under DIR)")
    parser.add_argument("--output", metavar="DIR", help="--to-parquet: the directory the parquet files go to; "
                        "refused if it is not empty, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --write-problems FILE, or write into a non-empty --output DIR "
                        "(the files of the names written are replaced, all others are kept)")
    parser.add_argument("--as-documents", action="store_true",
                        help="--write-problems: {\"text\": ...} documents as the training corpus renders problems "
                        "(for qstar_jax.analyze) instead of GSM8K question/answer records")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1,
                        help="--write-problems draws test-split questions, never in the training corpus")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.to_parquet:
        if not args.output:
            raise UserError("--to-parquet needs --output DIR")
        count = to_parquet(args.to_parquet, args.output, args.text_field, overwrite=args.overwrite)
        print(f"wrote {count} documents to {args.output}")
        return
    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    problems = paths.path(args.write_problems)
    if problems.is_dir():
        raise UserError(f"--write-problems needs a file name; {args.write_problems} is a directory")
    if problems.exists() and not args.overwrite:
        raise UserError(f"{args.write_problems} exists; pass --overwrite to replace it")
    held_out = arithmetic_problems(args.count, args.seed, "test")  # never in the training corpus
    if args.as_documents:  # rendered as the training corpus renders its problems, for analyze
        held_out = [{"text": document(problem)} for problem in held_out]
    paths.write_text(problems, "".join(json.dumps(problem) + "\n" for problem in held_out))
