"""The one path layer: every file qstar_jax reads or writes goes through here.

Paths are `etils.epath.Path`s, so a local directory and a bucket (`gs://BUCKET/run`, served
by gcsfs; Orbax reaches the same bucket through tensorstore) are used alike. Two rules
follow from running one program on every host of a pod:

  * files that describe the run (configs, tokenizer, metrics, chain records) are written by
    process 0 only (`is_writer`); the other processes read them after a barrier if needed;
  * a file is replaced whole, never seen half-written: locally through a temporary file and
    a rename, on a bucket by the object store's own all-or-nothing upload.

Any name a file system or bucket accepts works, glob syntax included (see "names are names"
below); `orbax_path` refuses up front the few that Orbax's storage cannot hold.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import uuid
from typing import Iterator, Union

import jax
from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

from qstar_jax.errors import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike, epath.Path]


# ------------------------------------------------------- names are names, never patterns
#
# Any name a file system or bucket accepts must work as a workdir, model directory or data
# path, including names with `[`, `]`, `*`, `?`. etils and fsspec take such names for glob
# patterns in three places, all reached by Orbax: `Path.glob` joins the path to the pattern
# unescaped, and on a bucket gcsfs globs the path of every `rm` and `mv` too. A checkpoint
# written below such a name lost its merged index (Orbax found none of the per-process
# directories it had just written), so no step of the run could be read again, and on a
# bucket the old steps could not be deleted nor a bad one moved aside. The replacements
# below handle such a name by listing directories; any other name takes etils' own path.


def _glob_below(self: epath.Path, pattern: str) -> Iterator[epath.Path]:
    """`epath.Path.glob` with only `pattern` matched as a pattern. Below a name with glob
    syntax, each part of `pattern` is matched against a listing of the directories found so
    far (like `glob`, a part not starting with `.` matches no hidden name): Orbax globs
    `ocdbt.process_*` and `array_metadatas/process_*` below a step, one listing each."""
    if "**" in pattern:  # as etils: never a recursive listing of a bucket
        raise NotImplementedError(f"recursive glob {pattern!r} below {self}")
    if not glob.has_magic(self._path_str):
        yield from (self._new(found) for found in self._backend.glob(self._PATH.join(self._path_str, pattern)))
        return
    parts = [part for part in pattern.split("/") if part]
    found = [self]
    for part in parts:
        if not glob.has_magic(part):
            found = [directory / part for directory in found]
            continue
        found = [child for directory in found for child in _children(directory)
                 if fnmatch.fnmatchcase(child.name, part) and (part.startswith(".") or not child.name.startswith("."))]
    if parts and not glob.has_magic(parts[-1]):
        found = [p for p in found if p.exists()]
    yield from sorted(found, key=str)


def _children(directory: epath.Path) -> list[epath.Path]:
    try:
        return list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


class _LiteralBucketBackend(backend_lib._FileSystemSpecBackend):  # noqa: SLF001 -- replaces etils' gs:// one
    """etils' fsspec backend, whose `rm` and `mv` let gcsfs glob the path. Below a name with
    glob syntax, a removal here lists the objects under the path (a prefix listing, no
    pattern) and deletes each by its name; a move always does so (etils' also refused a
    destination folder that does not exist yet, which in a bucket is every new one)."""

    def rmtree(self, path: PathLike) -> None:
        if not glob.has_magic(os.fspath(path)):
            return super().rmtree(path)
        fs = self.fs(path)
        objects = fs.find(fs_path(path), withdirs=False)
        if not objects:
            raise FileNotFoundError(path)
        for name in objects:
            fs.rm_file(name)

    def remove(self, path: PathLike) -> None:
        if not glob.has_magic(os.fspath(path)):
            return super().remove(path)
        self.fs(path).rm_file(fs_path(path))

    def rename(self, path: PathLike, dst: PathLike) -> None:
        if self.exists(dst):
            raise FileExistsError(f"{dst} already exists. Cannot rename {path}.")
        self.replace(path, dst)

    def replace(self, path: PathLike, dst: PathLike) -> None:
        """Copies every object under `path` to the same name under `dst`, then removes the
        originals (a bucket has no rename; all copies exist before any original goes)."""
        fs, source, target = self.fs(path), fs_path(path), fs_path(dst)
        objects = fs.find(source, withdirs=False)
        if not objects:
            raise FileNotFoundError(path)
        for name in objects:
            fs.cp_file(name, target + name[len(source):])
        for name in objects:
            fs.rm_file(name)


def fs_path(p: PathLike) -> str:
    """A bucket path as fsspec lists it: `bucket/key`, without scheme or trailing slash."""
    return os.fspath(p).split("://", 1)[-1].rstrip("/")


gpath._GPath.glob = _glob_below  # every epath.Path (local and gs://), Orbax's included
gpath._PREFIX_TO_BACKEND["gs"] = _LiteralBucketBackend()


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path. A local path's repeated slashes are one (as for the OS), so a
    directory named `x:` followed by `//` is not taken for a URL scheme that epath lacks."""
    if isinstance(p, epath.Path) or is_remote(p):
        return epath.Path(p)
    return epath.Path(re.sub("/{2,}", "/", os.fspath(p)))


REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # what epath serves from a bucket


def is_remote(p: PathLike) -> bool:
    """Whether `p` names a bucket: by its scheme, as epath decides (a local directory may
    have `://` inside its path)."""
    return str(p).startswith(REMOTE_PREFIXES)


def absolute(p: PathLike) -> str:
    """A string form Orbax accepts: local paths made absolute, bucket paths unchanged."""
    return str(p) if is_remote(p) else os.path.abspath(str(p))


def orbax_path(p: PathLike) -> str:
    """`absolute(p)` for Orbax, refused in one line if its storage cannot hold the name.

    Every other character a file system or bucket accepts works (the name fixes above).
    Two cannot: tensorstore's file driver reads `\\` as a directory separator (it would
    write and read somewhere else), and on a bucket it refuses control characters, after
    Orbax's URL parsing has silently dropped tabs and newlines. Callers pass a run's or a
    model's directory before anything is written to it.
    """
    text = absolute(p)
    if is_remote(text):
        refused = [c for c in text if ord(c) < 0x20 or ord(c) == 0x7F]
    else:
        refused = [c for c in text if c == "\\"]
    if refused:
        where = "a bucket path" if is_remote(text) else "a local path"
        raise UserError(f"the character {refused[0]!r} in {text!r} cannot be used: Orbax checkpoints cannot be "
                        f"stored under {where} holding it; choose a directory name without it")
    return text


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
