"""The one path layer: every file qstar_jax reads or writes goes through here.

Paths are `etils.epath.Path`s, so a local directory and a bucket (`gs://BUCKET/run`, served
by gcsfs; Orbax reaches the same bucket through tensorstore) are used alike. Two rules
follow from running one program on every host of a pod:

  * files that describe the run (configs, tokenizer, metrics, chain records) are written by
    process 0 only (`is_writer`); the other processes read them after a barrier if needed;
  * a file is replaced whole, never seen half-written: locally through a temporary file and
    a rename, on a bucket by the object store's own all-or-nothing upload.
"""

from __future__ import annotations

import os
import uuid
from typing import Union

import jax
from etils import epath

from qstar_jax.errors import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike, epath.Path]


def path(p: PathLike) -> epath.Path:
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    return "://" in str(p)


def absolute(p: PathLike) -> str:
    """A string form Orbax accepts: local paths made absolute, bucket paths unchanged."""
    return str(p) if is_remote(p) else os.path.abspath(str(p))


def is_writer() -> bool:
    """Whether this process writes the run's shared files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes `p` whole: a reader sees the old file or the new one, never a part."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)  # an object upload is atomic
        return
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def read_text(p: PathLike, what: str = "file") -> str:
    """The file's UTF-8 text; a missing or undecodable file is a one-line user error."""
    data = read_bytes(p, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_bytes(p: PathLike, what: str = "file") -> bytes:
    source = path(p)
    if not source.is_file():
        raise UserError(f"{what} not found: {p}")
    return source.read_bytes()


def files_under(root: PathLike) -> list[epath.Path]:
    """Every file below a directory, sorted (epath refuses recursive globs on buckets)."""
    found = []
    for child in path(root).iterdir():
        found.extend(files_under(child) if child.is_dir() else [child])
    return sorted(found, key=str)
