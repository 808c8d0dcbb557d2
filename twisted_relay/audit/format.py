"""
The audit log's format on disk, and reading one file of it.

A directory holds files named by the index of their first record
(C{00000000000000000000.audit}, ...). Each file starts with a header, then
records back to back::

    file header   b"TRAUDIT1", first_index u64, seed u32, created_ns u64,
                  n u16, n x (source u8, sequence u64), header_crc u32
    record        frame_size u32, received_ns u64, client_id u32,
                  frame (frame_size bytes), checksum u32

A record's checksum is the CRC-32 of its first 16 bytes and its frame,
started from the previous record's checksum (the first record of a file
starts from the file's seed, which is the last checksum of the file
before), so changing, removing or reordering any record breaks every
checksum after it. The header's C{n} pairs are the last sequence per source
before the file, so a restarted relay knows them from the newest file alone.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ..wire import (
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTES,
    PAYLOAD_SIZE_OFFSET,
    ROUTING,
    SOURCE_SEQUENCE,
    UINT32,
    MiB,
)

FILE_MAGIC = b"TRAUDIT1"
SUFFIX = ".audit"
#: Added to the name of a new file until its header is on disk.
UNFINISHED = ".new"
_FILE_HEAD = struct.Struct("<8sQIQH")
RECORD = struct.Struct("<IQI")
RECORD_OVERHEAD = RECORD.size + UINT32.size
#: Bytes after which a new file is started, unless told otherwise.
ROTATE_SIZE = 64 * MiB
#: Bytes read from an audit file at a time.
_READ_SIZE = 1 << 20


class Record(NamedTuple):
    """One audited frame and where it is."""

    index: int  # type: ignore[assignment]
    received_ns: int
    client_id: int
    frame: bytes

    @property
    def source(self) -> int:
        return self.frame[6]

    @property
    def sequence(self) -> int:
        return ROUTING.unpack_from(self.frame)[4]


class AuditDamage(Exception):
    """
    An audit file is not what the relay wrote: C{torn} when it only ends
    part-way through its last record (a crash mid-write), which the relay
    cuts off at start-up; any other damage is never repaired.
    """

    def __init__(
        self, path: str, index: int, offset: int, problem: str, *, torn: bool = False
    ) -> None:
        super().__init__(path, index, offset, problem)
        self.path, self.index, self.offset, self.problem = path, index, offset, problem
        self.torn = torn

    def __str__(self) -> str:
        return f"{self.path}: record {self.index} at byte {self.offset}: {self.problem}"


@dataclass
class AuditFile:
    """One file of the log, as read from its header."""

    path: str
    first_index: int
    seed: int
    created_ns: int
    sequences: dict[int, int]
    header_size: int

    @classmethod
    def read(cls, path: str) -> AuditFile:
        """
        @raise AuditDamage: the header is missing, torn or altered.
        """
        with open(path, "rb") as f:
            head = f.read(_FILE_HEAD.size)
            if len(head) < _FILE_HEAD.size:
                raise AuditDamage(path, 0, 0, "file header is incomplete")
            magic, first, seed, created, count = _FILE_HEAD.unpack(head)
            if magic != FILE_MAGIC:
                raise AuditDamage(path, 0, 0, f"not an audit file (magic {magic!r})")
            pairs = f.read(count * SOURCE_SEQUENCE.size + UINT32.size)
        if len(pairs) < count * SOURCE_SEQUENCE.size + UINT32.size:
            raise AuditDamage(path, first, 0, "file header is incomplete")
        (crc,) = UINT32.unpack_from(pairs, len(pairs) - UINT32.size)
        if zlib.crc32(pairs[: -UINT32.size], zlib.crc32(head)) != crc:
            raise AuditDamage(path, first, 0, "file header checksum does not match")
        sequences = dict(
            SOURCE_SEQUENCE.iter_unpack(pairs[: count * SOURCE_SEQUENCE.size])
        )
        return cls(path, first, seed, created, sequences, len(head) + len(pairs))

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def start(self) -> Position:
        """Where the file's records begin, and the chain with them."""
        return Position(self.header_size, self.first_index, self.seed)

    @staticmethod
    def header(first_index: int, seed: int, sequences: dict[int, int]) -> bytes:
        body = _FILE_HEAD.pack(
            FILE_MAGIC, first_index, seed, time.time_ns(), len(sequences)
        ) + b"".join(SOURCE_SEQUENCE.pack(s, q) for s, q in sorted(sequences.items()))
        return body + UINT32.pack(zlib.crc32(body))

    def records(self, position: Position | None = None) -> Iterator[Record]:
        """
        The records from C{position} (default: the first) to the current
        end of the file, checked against the chain as they are read; the
        position advances past each record yielded.

        @raise AuditDamage: a record does not match its checksum or its
            frame, or the file ends part-way through one.
        """
        if position is None:
            position = self.start()
        path = self.path
        with open(path, "rb") as f:
            f.seek(position.offset)
            buf = b""
            at = 0
            while True:
                chunk = f.read(_READ_SIZE)
                if not chunk:
                    break
                buf = buf[at:] + chunk
                at = 0
                while len(buf) - at >= RECORD.size:
                    size, received, client = RECORD.unpack_from(buf, at)
                    end = at + RECORD.size + size + UINT32.size
                    if end > len(buf):
                        break
                    frame = buf[at + RECORD.size : end - UINT32.size]
                    problem = _frame_problem(frame)
                    if problem:
                        raise AuditDamage(
                            path,
                            position.index,
                            position.offset,
                            problem,
                            torn=_zeros_to_end(buf, at, f),
                        )
                    crc = zlib.crc32(buf[at : end - UINT32.size], position.crc)
                    if crc != UINT32.unpack_from(buf, end - UINT32.size)[0]:
                        raise AuditDamage(
                            path,
                            position.index,
                            position.offset,
                            "checksum does not match: the record or one before it was altered",
                            torn=_zeros_to_end(buf, at, f),
                        )
                    yield Record(position.index, received, client, frame)
                    position.advance(end - at, crc)
                    at = end
        rest = buf[at:]
        if rest:
            raise AuditDamage(
                path,
                position.index,
                position.offset,
                f"the file ends {len(rest)} bytes into the record",
                torn=not any(rest) or _torn_prefix(rest),
            )


@dataclass
class Position:
    """Where reading a file has got to: byte offset, record index, chain checksum."""

    offset: int
    index: int
    crc: int

    def advance(self, size: int, crc: int) -> None:
        self.offset += size
        self.index += 1
        self.crc = crc


def _frame_problem(frame: bytes) -> str:
    """Why C{frame} cannot be a frame the relay accepted, or ''."""
    if len(frame) < HEADER_SIZE:
        return f"holds {len(frame)} bytes, less than a frame header"
    magic, _, _, _, _, payload = ROUTING.unpack_from(frame)
    if magic != MAGIC:
        return f"holds no frame (magic 0x{magic:08x})"
    if HEADER_SIZE + payload != len(frame):
        return f"its size {len(frame)} is not its frame's {HEADER_SIZE + payload}"
    return ""


def _zeros_to_end(buf: bytes, at: int, f) -> bool:
    """Whether C{buf[at:]} and the rest of the file C{f} are all zeros (a power loss)."""
    if any(buf[at:]):
        return False
    while chunk := f.read(_READ_SIZE):
        if any(chunk):
            return False
    return True


def _torn_prefix(rest: bytes) -> bool:
    """
    Whether C{rest}, the bytes after the last whole record, can be the start
    of a record whose write was cut short: its frame, as far as it goes,
    agrees with the record's size.
    """
    if len(rest) < RECORD.size + PAYLOAD_SIZE_OFFSET + 4:
        return True
    (size,) = UINT32.unpack_from(rest)
    frame = rest[RECORD.size :]
    return (
        frame[:4] == MAGIC_BYTES
        and HEADER_SIZE + UINT32.unpack_from(frame, PAYLOAD_SIZE_OFFSET)[0] == size
    )


def audit_paths(directory: str) -> list[str]:
    """The paths of the log's files in C{directory}, oldest first."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    return [os.path.join(directory, name) for name in names]


def audit_files(directory: str) -> list[AuditFile]:
    """The files of the log in C{directory}, oldest first."""
    return [AuditFile.read(path) for path in audit_paths(directory)]
