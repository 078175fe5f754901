"""Checkpoint manifests: every file of a finished step with its size and checksum, so a
corrupted or truncated step is found before it is restored rather than loaded silently."""

from __future__ import annotations

import json
import zlib
from typing import Any

from qstar_jax import paths

MANIFEST_FILE = "manifest.json"  # in a step directory: every other file's size and checksum


def file_checksum(p: paths.Path) -> str:
    """A checksum tagged with its algorithm. A bucket object's is the CRC32C the store
    computed at upload (read from its metadata: verifying a 7B checkpoint must not mean
    downloading it); a local file's is the CRC-32 of its bytes."""
    if paths.is_remote(p):
        import gcsfs  # the backend epath uses for gs:// paths

        info = gcsfs.GCSFileSystem().info(str(p))
        if info.get("crc32c"):
            return f"crc32c:{info['crc32c']}"
        return f"md5:{info['md5Hash']}"
    crc = 0
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"crc32:{crc:08x}"


# Orbax rewrites this file of a step when it commits the step (its commit time), after the
# manifest is written: it is recorded once the commit is done (`record_committed_files`).
REWRITTEN_AT_COMMIT = ("_CHECKPOINT_METADATA",)


def step_files(step_dir: paths.Path, names: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """{path relative to the step directory: {"bytes", "checksum"}} for every file but the
    manifest (or only those named)."""
    prefix = len(str(step_dir).rstrip("/")) + 1
    return {
        str(f)[prefix:]: {"bytes": f.stat().length, "checksum": file_checksum(f)}
        for f in paths.files_under(step_dir)
        if f.name != MANIFEST_FILE and (names is None or str(f)[prefix:] in names)
    }


def write_manifest(step_dir: paths.Path) -> None:
    """Records the step's files, atomically: from Orbax's save thread once they are complete
    and before the step is committed, all but REWRITTEN_AT_COMMIT."""
    files = {name: entry for name, entry in step_files(step_dir).items() if name not in REWRITTEN_AT_COMMIT}
    paths.write_text(step_dir / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def record_committed_files(step_dir: paths.Path) -> None:
    """Adds REWRITTEN_AT_COMMIT to a committed step's manifest (a step whose run stopped
    before this still verifies: unrecorded files are not checked)."""
    recorded = json.loads((step_dir / MANIFEST_FILE).read_text())["files"]
    paths.write_text(step_dir / MANIFEST_FILE, json.dumps(
        {"files": {**recorded, **step_files(step_dir, REWRITTEN_AT_COMMIT)}}, indent=1))


def verify_step(step_dir: paths.Path) -> str | None:
    """Why the step's files differ from its manifest (None: they match). A step without a
    manifest is not verified either: nothing shows whether its bytes changed since it was
    saved (an asynchronous save writes the manifest before Orbax commits the step, so only
    a synchronous save killed just after its commit, or an older version, leaves one); a
    resume sets it aside like a corrupt step, and readers take an earlier step."""
    manifest_file = step_dir / MANIFEST_FILE
    if not manifest_file.exists():
        return f"it has no {MANIFEST_FILE} (its run stopped before the manifest was written), so it cannot be verified"
    try:
        recorded = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return f"its {MANIFEST_FILE} is unreadable"
    found = step_files(step_dir)
    for name, entry in sorted(recorded.items()):
        if name not in found:
            return f"{name} is missing"
        if found[name]["bytes"] != entry["bytes"]:
            return f"{name} has {found[name]['bytes']} bytes, {entry['bytes']} when saved"
        if found[name]["checksum"] != entry["checksum"]:
            return f"{name} does not match its checksum ({found[name]['checksum']}, {entry['checksum']} when saved)"
    return None
