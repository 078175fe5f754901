"""TensorBoard scalars: event files written through the path layer.

TensorBoard reads `events.out.tfevents.*` files: TFRecord-framed `Event` protocol buffers.
Scalars need only three messages (Event, Summary, Summary.Value), encoded here by hand
instead of importing a writer library: tensorboardX imports torch whenever it is installed
(about 3 s at every start of every process) and writes gs:// past the path layer, and the
official writers need TensorFlow. Field numbers are those of tensorboard's
`event.proto` and `summary.proto`.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from qstar_jax import paths
from qstar_jax.training.storage import append

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def event(wall_time: float, step: int = 0, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    """An encoded `Event`: wall_time (1, double), step (2, int64), file_version (3) or a
    summary (5) of `Summary.Value`s, each a tag (1) and a simple_value (2, float)."""
    if step < 0:
        raise ValueError(f"TensorBoard steps are non-negative, got {step}")
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(step)
    if file_version:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", value))
                          for tag, value in scalars.items())
        out += _length_delimited(5, values)
    return out


class EventFile:
    """One run's event file. Locally appended to; a bucket object cannot be appended to, so
    there the whole file is re-uploaded at each write (scalars only: kilobytes)."""

    def __init__(self, directory: paths.PathLike):
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.path = paths.path(directory) / name
        self.remote = paths.is_remote(directory)
        self.data = b""
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab", buffering=0)  # a failed write leaves nothing to retry at exit
        self._append(tfrecord(event(time.time(), file_version=FILE_VERSION)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._append(tfrecord(event(time.time(), step, scalars={k: float(v) for k, v in values.items()})))

    def _append(self, record: bytes) -> None:
        if self.remote:
            self.data += record
            paths.write_bytes(self.path, self.data)
        else:
            append(self.file, record)

    def close(self) -> None:
        if not self.remote:
            self.file.close()
