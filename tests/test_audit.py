"""
Tests for L{twisted_relay.audit}: the record chain, rotation, the start-up
check of the newest file's tail, and L{verify}.
"""

from __future__ import annotations

import os
import stat
import zlib

from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import (
    RECORD_OVERHEAD,
    AuditDamage,
    AuditFile,
    AuditLog,
    LogFollower,
    audit_files,
    verify,
)

from .helpers import frames_for, temp_dir

FRAMES = frames_for(3, 300, source=42)
SIZE = len(FRAMES[0]) + RECORD_OVERHEAD


def write_log(directory: str, frames: list[bytes], rotate: int = 4096, batch: int = 10) -> AuditLog:
    """An audit log in C{directory} holding C{frames}, appended C{batch} at a time."""
    log = AuditLog(directory, rotate_size=rotate)
    log.open()
    for n in range(0, len(frames), batch):
        log.append(5, [b"".join(frames[n : n + batch])], 1_000 + n)
    log.close()
    return log


def read_all(directory: str):
    return [record for audit_file in audit_files(directory) for record in audit_file.records()]


class AuditLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(temp_dir(self), "audit")

    def test_recordsRoundTrip(self) -> None:
        """Every frame comes back whole, in order, with its index, time and client."""
        write_log(self.directory, FRAMES)
        records = read_all(self.directory)
        self.assertEqual([r.frame for r in records], FRAMES)
        self.assertEqual([r.index for r in records], list(range(len(FRAMES))))
        self.assertEqual(records[25].received_ns, 1_020)
        self.assertEqual({r.client_id for r in records}, {5})
        self.assertEqual([r.sequence for r in records[:3]], [1, 2, 3])

    def test_syncTimed(self) -> None:
        """Each fdatasync that runs is timed through sync_timer; a sync with nothing new is not."""
        log = AuditLog(self.directory)
        timings: list[float] = []
        log.sync_timer = timings.append
        log.open()
        self.addCleanup(log.close)
        log.append(5, [FRAMES[0]], 1_000)
        log.sync()
        log.sync()
        log.append(5, [FRAMES[1]], 1_001)
        log.sync()
        self.assertEqual(len(timings), 2)
        self.assertTrue(all(0 <= seconds < 10 for seconds in timings), timings)

    def test_chain(self) -> None:
        """Each record's checksum covers it and starts from the previous record's."""
        write_log(self.directory, FRAMES[:2], rotate=1 << 20)
        audit_file = audit_files(self.directory)[0]
        with open(audit_file.path, "rb") as f:
            data = f.read()[audit_file.header_size :]
        first, second = data[:SIZE], data[SIZE:]
        crc1 = zlib.crc32(first[:-4])
        self.assertEqual(first[-4:], crc1.to_bytes(4, "little"))
        self.assertEqual(second[-4:], zlib.crc32(second[:-4], crc1).to_bytes(4, "little"))

    def test_rotation(self) -> None:
        """
        Files start once the current one passes the rotation size, each named by
        its first record and chained to the one before; mode 0640.
        """
        write_log(self.directory, FRAMES, rotate=4096)
        files = audit_files(self.directory)
        self.assertGreater(len(files), 3)
        for before, after in zip(files, files[1:]):
            records = list(before.records())
            self.assertEqual(after.first_index, records[-1].index + 1)
            self.assertEqual(after.sequences, {42: records[-1].sequence})
            self.assertEqual(os.path.basename(after.path), f"{after.first_index:020d}.audit")
        self.assertEqual(stat.S_IMODE(os.stat(files[-1].path).st_mode), 0o640)
        report = verify(self.directory)
        self.assertIsNone(report.damage)
        self.assertEqual((report.files, report.records), (len(files), len(FRAMES)))

    def test_reopenContinues(self) -> None:
        """A reopened log carries on the index, the chain and the last sequences."""
        first = write_log(self.directory, FRAMES[:100])
        log = AuditLog(self.directory, rotate_size=4096)
        self.assertEqual(log.open(), [])
        self.assertEqual((log.records, log.head, log.sequences), (100, first.head, {42: 100}))
        log.append(5, [b"".join(FRAMES[100:])], 0)
        log.close()
        self.assertEqual([r.frame for r in read_all(self.directory)], FRAMES)
        self.assertIsNone(verify(self.directory).damage)

    def test_tornTailCut(self) -> None:
        """A last record cut short is removed at open, with a warning naming it."""
        write_log(self.directory, FRAMES[:50], rotate=1 << 20)
        path = audit_files(self.directory)[-1].path
        os.truncate(path, os.path.getsize(path) - 9)
        self.assertIn("record 49", str(verify(self.directory).damage))
        log = AuditLog(self.directory)
        [warning] = log.open()
        self.assertIn("cut off a torn last record", warning)
        self.assertIn("record 49", warning)
        self.assertEqual(log.records, 49)
        log.close()
        report = verify(self.directory)
        self.assertIsNone(report.damage)
        self.assertEqual(report.records, 49)

    def test_zeroFilledTail(self) -> None:
        """Zeros after the last record (a power loss) are a torn tail, cut at open."""
        write_log(self.directory, FRAMES[:5], rotate=1 << 20)
        path = audit_files(self.directory)[-1].path
        with open(path, "ab") as f:
            f.write(bytes(4096))
        log = AuditLog(self.directory)
        self.assertEqual(len(log.open()), 1)
        self.assertEqual(log.records, 5)
        log.close()

    def test_unfinishedFileRemoved(self) -> None:
        """A new file whose header was still being written (a crash) is removed at open."""
        write_log(self.directory, FRAMES[:5], rotate=1 << 20)
        unfinished = os.path.join(self.directory, f"{5:020d}.audit.new")
        with open(unfinished, "wb") as f:
            f.write(b"TRAUDIT1\x05")
        log = AuditLog(self.directory)
        [warning] = log.open()
        self.assertIn("had not finished", warning)
        self.assertFalse(os.path.exists(unfinished))
        self.assertEqual(log.records, 5)
        log.close()

    def test_damagedHeaderRefused(self) -> None:
        """A header that does not check out is damage: the file is left alone."""
        write_log(self.directory, FRAMES[:5], rotate=1 << 20)
        path = audit_files(self.directory)[-1].path
        with open(path, "r+b") as f:
            f.seek(28)  # the count of (source, sequence) pairs
            f.write(b"\xff")
        size = os.path.getsize(path)
        error = self.assertRaises(AuditDamage, AuditLog(self.directory).open)
        self.assertFalse(error.torn)
        self.assertEqual(os.path.getsize(path), size)

    def test_editedRecordRefused(self) -> None:
        """A changed byte in the newest file is damage, not a torn tail: never cut."""
        write_log(self.directory, FRAMES[:50], rotate=1 << 20)
        path = audit_files(self.directory)[-1].path
        header = AuditFile.read(path).header_size
        with open(path, "r+b") as f:
            f.seek(header + 20 * SIZE + 40)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        size = os.path.getsize(path)
        error = self.assertRaises(AuditDamage, AuditLog(self.directory).open)
        self.assertEqual((error.index, error.offset, error.torn), (20, header + 20 * SIZE, False))
        self.assertEqual(os.path.getsize(path), size)

    def test_verifyNamesEditedRecord(self) -> None:
        """verify names the first record whose checksum fails, in the right file."""
        write_log(self.directory, FRAMES, rotate=4096)
        files = audit_files(self.directory)
        target = files[2]
        with open(target.path, "r+b") as f:
            f.seek(target.header_size + 3 * SIZE + 35)
            f.write(b"\xff")
        damage = verify(self.directory).damage
        self.assertEqual((damage.path, damage.index), (target.path, target.first_index + 3))

    def test_verifyMissingFile(self) -> None:
        """A removed middle file breaks the chain at the next file."""
        write_log(self.directory, FRAMES, rotate=4096)
        files = audit_files(self.directory)
        os.unlink(files[1].path)
        damage = verify(self.directory).damage
        self.assertEqual(damage.path, files[2].path)
        self.assertIn("does not continue", damage.problem)

    def test_verifySequenceHoles(self) -> None:
        """Holes in a source's sequences are reported (they are not damage)."""
        write_log(self.directory, FRAMES[:10] + FRAMES[12:20])
        report = verify(self.directory)
        self.assertIsNone(report.damage)
        self.assertEqual(report.sequence_holes, [(42, 10, 13)])

    def test_failedAppendLeavesNothing(self) -> None:
        """
        An append whose write fails (here: the log's descriptor made read-only)
        changes neither the record count nor the chain, and can be retried.
        """
        log = AuditLog(self.directory, rotate_size=1 << 20)
        log.open()
        log.append(1, [FRAMES[0]], 0)
        head = log.head
        fd = log._fd
        saved = os.dup(fd)
        readonly = os.open(os.devnull, os.O_RDONLY)
        os.dup2(readonly, fd)
        self.assertRaises(OSError, log.append, 1, [FRAMES[1]], 0)
        self.assertEqual((log.records, log.head), (1, head))
        os.dup2(saved, fd)
        os.close(saved)
        os.close(readonly)
        log.append(1, [FRAMES[1]], 0)
        log.close()
        self.assertEqual([r.frame for r in read_all(self.directory)], FRAMES[:2])
        self.assertIsNone(verify(self.directory).damage)

    def test_failedSyncRewrites(self) -> None:
        """
        After a failed sync the kernel may have dropped the pages it could not
        write and forgotten the error (fsyncgate): the next sync writes what
        was appended since the last good one again before it syncs.
        """
        from twisted_relay.audit import writer

        log = AuditLog(self.directory, rotate_size=1 << 20)
        log.open()
        log.append(1, [b"".join(FRAMES[:3])], 0)
        log.sync()
        synced = os.path.getsize(log.files[-1].path)
        log.append(1, [b"".join(FRAMES[3:6])], 0)
        failing, real = [OSError(5, "Input/output error")], os.fdatasync

        def fdatasync(fd: int) -> None:
            if failing:
                raise failing.pop()
            real(fd)

        self.patch(writer.os, "fdatasync", fdatasync)
        self.assertRaises(OSError, log.sync)
        os.truncate(log.files[-1].path, synced)  # the pages the kernel dropped
        log.sync()
        log.append(1, [FRAMES[6]], 0)
        log.close()
        self.assertEqual([r.frame for r in read_all(self.directory)], FRAMES[:7])
        self.assertIsNone(verify(self.directory).damage)

    def test_failedRewriteHoldsAppends(self) -> None:
        """
        A rewrite that fails half-way leaves nothing appended after it: the
        next append writes the records since the last good sync again first,
        so the file on disk, read as after a crash, has no hole in the middle.
        """
        from twisted_relay.audit import writer

        log = AuditLog(self.directory, rotate_size=1 << 20)
        log.open()
        log.append(1, [b"".join(FRAMES[:3])], 0)
        log.sync()
        log.append(1, [b"".join(FRAMES[3:6])], 0)
        real_sync, real_write = os.fdatasync, writer._write_all
        failures = {"sync": 1, "write": 1}

        def fdatasync(fd: int) -> None:
            if failures["sync"]:
                failures["sync"] -= 1
                raise OSError(5, "Input/output error")
            real_sync(fd)

        def write_all(fd: int, data: bytes) -> None:
            if failures["write"]:
                failures["write"] -= 1
                os.write(fd, data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            real_write(fd, data)

        self.patch(writer.os, "fdatasync", fdatasync)
        self.assertRaises(OSError, log.sync)
        self.patch(writer, "_write_all", write_all)
        self.assertRaises(OSError, log.sync)  # the rewrite fails half-way
        log.append(1, [FRAMES[6]], 0)
        self.assertIsNone(verify(self.directory).damage)  # as a crash would leave it
        log.close()
        self.assertEqual([r.frame for r in read_all(self.directory)], FRAMES[:7])
        self.assertIsNone(verify(self.directory).damage)

    def test_oneWriterPerDirectory(self) -> None:
        """A second log on the same directory is refused while the first is open."""
        log = AuditLog(self.directory)
        log.open()
        self.addCleanup(log.close)
        error = self.assertRaises(OSError, AuditLog(self.directory).open)
        self.assertIn("another relay writes", str(error))


class Enough(Exception):
    """Raised by a test's sleep to end a follower."""


class FollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.join(temp_dir(self), "audit")
        os.makedirs(self.directory)

    def follow(self, steps) -> list:
        """The records a follower yields while each of C{steps} runs at one of its waits."""
        waits = iter(steps)

        def sleep(seconds: float) -> None:
            self.assertEqual(seconds, 0.2)
            try:
                next(waits)()
            except StopIteration:
                raise Enough() from None

        records = []
        with self.assertRaises(Enough):
            for record in LogFollower(self.directory, sleep=sleep):
                records.append(record)
        return records

    def test_growingAcrossRotations(self) -> None:
        """Records come out as they are appended, across new files, each once, in order."""
        log = AuditLog(self.directory, rotate_size=4096)
        self.addCleanup(log.close)

        def append(frames):
            return lambda: [log.append(5, [frame], 0) for frame in frames]

        steps = [log.open] + [append(FRAMES[n : n + 37]) for n in range(0, 300, 37)]
        records = self.follow(steps)
        self.assertGreater(len(audit_files(self.directory)), 3)
        self.assertEqual([r.frame for r in records], FRAMES)
        self.assertEqual([r.index for r in records], list(range(300)))

    def test_recordBeingWrittenWaits(self) -> None:
        """A record only part written is waited for, then read whole."""
        write_log(self.directory, FRAMES[:3], rotate=1 << 20)
        [audit_file] = audit_files(self.directory)
        with open(audit_file.path, "rb") as f:
            whole = f.read()

        def cut() -> None:
            with open(audit_file.path, "r+b") as f:
                f.truncate(len(whole) - 10)

        def finish() -> None:
            with open(audit_file.path, "wb") as f:
                f.write(whole)

        cut()
        records = self.follow([lambda: None, finish])
        self.assertEqual([r.frame for r in records], FRAMES[:3])

    def test_damageStops(self) -> None:
        """An altered record is damage, not something to wait for."""
        write_log(self.directory, FRAMES[:3], rotate=1 << 20)
        [audit_file] = audit_files(self.directory)
        with open(audit_file.path, "r+b") as f:
            f.seek(audit_file.header_size + SIZE + 20)
            f.write(b"\xff")
        with self.assertRaises(AuditDamage):
            list(LogFollower(self.directory, sleep=lambda seconds: None))
