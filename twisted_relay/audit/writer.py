"""
Appending to an audit log: L{AuditLog} writes records to the newest file of
a directory it locks, rotates files, and cuts off a torn last record when it
opens the log again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import zlib
from collections.abc import Callable

from ..paths import make_directories
from ..scan import NATIVE_LOOPS
from ..wire import HEADER_SIZE, PAYLOAD_SIZE_OFFSET, ROUTING, UINT32
from .format import (
    RECORD,
    ROTATE_SIZE,
    SUFFIX,
    UNFINISHED,
    AuditDamage,
    AuditFile,
    audit_files,
    audit_paths,
)


class AuditLog:
    """
    Appends records to the newest file of an audit directory, and starts a
    new file once it passes C{rotate_size} bytes. One relay at a time: the
    directory is locked.
    """

    def __init__(self, directory: str, rotate_size: int = ROTATE_SIZE) -> None:
        self.directory = os.path.abspath(directory)
        self.rotate_size = rotate_size
        #: Index the next record will get.
        self.records = 0
        #: Checksum of the last record: the head of the chain.
        self.head = 0
        #: The last sequence per source, as of the last record.
        self.sequences: dict[int, int] = {}
        self.files: list[AuditFile] = []
        self._fd = -1
        self._size = 0
        self._lock = -1
        self.dirty = False
        self._unfinished = False
        #: The newest file's size at its last good sync, and what was
        #: appended to it since: after a failed sync the kernel may have
        #: dropped those pages and forgotten the error, so they are written
        #: again before the next sync is believed (fsyncgate).
        self._synced = 0
        self._unsynced: list[bytes] = []
        self._rewrite = False
        #: Called with the seconds each fdatasync took, failed or not, on the
        #: thread that syncs: how the status site times the log without the
        #: log knowing about metrics.
        self.sync_timer: Callable[[float], None] | None = None

    def open(self) -> list[str]:
        """
        Lock the directory, check the newest file's tail and open it for
        appending; returns warnings about what was cut off.

        @raise AuditDamage: the newest file is damaged other than by a torn
            last record.
        @raise OSError: the directory cannot be used.
        """
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(errno.ENOTDIR, "it is not a directory")
        make_directories(self.directory, 0o750)
        self._lock = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = -1
            raise OSError(
                errno.EBUSY, f"another relay writes to the audit directory {self.directory}"
            ) from None
        warnings: list[str] = []
        for name in os.listdir(self.directory):
            if name.endswith(UNFINISHED):
                # A file whose header was being written when the relay died:
                # it never held a record.
                os.unlink(os.path.join(self.directory, name))
                warnings.append(f"removed {name}, a new file the relay had not finished")
        paths = audit_paths(self.directory)
        if paths:
            self._resume(AuditFile.read(paths[-1]), warnings)
        else:
            self._start(0, 0, {})
        return warnings

    def _resume(self, newest: AuditFile, warnings: list[str]) -> None:
        """Find the end of C{newest}, cutting a torn last record, and append there."""
        position = newest.start()
        sequences = dict(newest.sequences)
        try:
            for record in newest.records(position):
                sequences[record.source] = record.sequence
        except AuditDamage as damage:
            if not damage.torn:
                raise
            size = os.path.getsize(newest.path)
            warnings.append(
                f"cut off a torn last record: {damage}; {size - position.offset} "
                f"bytes removed from the end of {newest.path}"
            )
            os.truncate(newest.path, position.offset)
        self.files = audit_files(self.directory)
        self.records, self.head, self.sequences = position.index, position.crc, sequences
        self._fd = os.open(newest.path, os.O_WRONLY | os.O_APPEND)
        self._size = self._synced = position.offset

    def _start(self, first_index: int, seed: int, sequences: dict[int, int]) -> None:
        """
        Begin a new file: its records will follow C{first_index} and C{seed}.
        Its header is written and synced under another name first, so a file
        of the log never has a partial header.
        """
        path = os.path.join(self.directory, f"{first_index:020d}{SUFFIX}")
        unfinished = path + UNFINISHED
        fd = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.fchmod(fd, 0o640)
            header = AuditFile.header(first_index, seed, sequences)
            _write_all(fd, header)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(unfinished, path)
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            if os.path.exists(unfinished):
                os.unlink(unfinished)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd, self._size = fd, len(header)
        self._synced, self._unsynced = self._size, []
        self.files.append(AuditFile.read(path))

    def append(self, client_id: int, runs: list[bytes], received_ns: int) -> int:
        """
        Append one record per frame of C{runs} (runs of whole frames);
        returns the number of records. Nothing is appended if it fails.

        @raise OSError: the write failed (disk full, I/O error); the file is
            as it was before.
        """
        if self._rewrite:
            self._restore()
        if self._unfinished:
            # A failed append left bytes that could not be removed then.
            os.ftruncate(self._fd, self._size)
            self._unfinished = False
        if self._size >= self.rotate_size:
            self.sync()
            self._start(self.records, self.head, self.sequences)
        data, crc, count, sequences = audit_records(runs, received_ns, client_id, self.head)
        try:
            _write_all(self._fd, data)
        except OSError:
            self._undo()
            raise
        self._size += len(data)
        self._unsynced.append(data)
        self.records += count
        self.head = crc
        self.sequences.update(sequences)
        self.dirty = True
        return count

    def _undo(self) -> None:
        """
        Remove what a failed append wrote, so the file ends on a whole record;
        if that fails too, the next append removes it first, or fails.
        """
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._unfinished = True

    def sync(self) -> None:
        """
        Make everything appended so far durable. After a failed sync, what
        was appended since the last good one is written again first: a
        second fdatasync alone could succeed on pages the kernel dropped.

        @raise OSError: the sync (or the rewrite before it) failed.
        """
        if not self.dirty:
            return
        if self._rewrite:
            self._restore()
        started = time.perf_counter()
        try:
            os.fdatasync(self._fd)
        except OSError:
            self._rewrite = True
            raise
        finally:
            if self.sync_timer is not None:
                self.sync_timer(time.perf_counter() - started)
        self.dirty = False
        self._synced = self._size
        self._unsynced.clear()

    def _restore(self) -> None:
        """
        Cut the file back to its last good sync and write again what was
        appended since; until that succeeds, nothing else is appended.
        """
        os.ftruncate(self._fd, self._synced)
        _write_all(self._fd, b"".join(self._unsynced))
        self._rewrite = False
        self._unfinished = False

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = -1
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def audit_records_python(
    runs: list[bytes], received_ns: int, client_id: int, crc: int
) -> tuple[bytes, int, int, dict[int, int]]:
    """
    The records of the frames of C{runs} (runs of whole frames), chained
    from C{crc}: C{(records, last checksum, count, {source: last sequence})}.
    """
    pack, crc32, size_at = RECORD.pack, zlib.crc32, UINT32.unpack_from
    routing, pack_crc = ROUTING.unpack_from, UINT32.pack
    sequences: dict[int, int] = {}
    parts: list[bytes | memoryview] = []
    count = 0
    # Its own walk rather than wire.frame_spans, whose Header per frame makes
    # this fallback half as slow again (850 ns a frame against 550).
    for run in runs:
        view = memoryview(run)
        offset, length = 0, len(run)
        while offset < length:
            end = offset + HEADER_SIZE + size_at(run, offset + PAYLOAD_SIZE_OFFSET)[0]
            head = pack(end - offset, received_ns, client_id)
            frame = view[offset:end]
            crc = crc32(frame, crc32(head, crc))
            parts += (head, frame, pack_crc(crc))
            _, _, _, source, sequence, _ = routing(run, offset)
            sequences[source] = sequence
            offset = end
            count += 1
    return b"".join(parts), crc, count, sequences


audit_records = audit_records_python if NATIVE_LOOPS is None else NATIVE_LOOPS.audit_records


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
