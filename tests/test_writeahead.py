# -*- test-case-name: tests.test_writeahead -*-
"""
Tests for L{twisted_relay.engine.writeahead}'s pipelined log (C{--audit-fsync
always} with a writer): batches written and synced off the reactor thread,
forwarded only once synced, in order, growing while a write is in progress.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import AuditLog, audit_files
from twisted_relay.engine.writeahead import WriterThread
from twisted_relay.wire import Domain

from .helpers import DiskFull, connect, frames_for, make_relay, published, temp_dir


class StepWriter:
    """An offload that runs each piece of work when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.jobs.append((work, done))
        return done

    def step(self) -> None:
        """Run the oldest piece of work, and hand its result back."""
        work, done = self.jobs.pop(0)
        done.callback(work())


def logged(relay) -> list[bytes]:
    directory = relay.writeahead.audit.directory
    return [r.frame for f in audit_files(directory) for r in f.records()]


def retries(relay) -> int:
    """The log's retries waiting on the relay's clock."""
    return sum(
        call.func == relay.writeahead._retryHeld for call in relay.clock.getDelayedCalls()
    )


class WriterTestCase(SynchronousTestCase):
    """An execution relay whose audit log's writer runs when the test says."""

    #: The log's fsync interval (None: always).
    interval: float | None = None

    def setUp(self) -> None:
        self.writer = StepWriter()
        self.relay = make_relay(
            Domain.EXECUTION, audit=AuditLog(temp_dir(self)), audit_writer=self.writer
        )
        self.relay.writeahead.fsync_interval = self.interval
        self.relay.writeahead.start()
        self.addCleanup(self.relay.writeahead.stop)
        self.publisher, self.subscriber = connect(self.relay), connect(self.relay)
        self.frames = frames_for(Domain.EXECUTION, 30, source=42)

    def received(self) -> list[bytes]:
        return published(self.subscriber.transport.value())


class PipelineTests(WriterTestCase):
    def test_forwardedOnceSynced(self) -> None:
        """Nothing reaches a subscriber before the writer wrote and synced it."""
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        self.assertEqual(self.received(), [])
        self.assertEqual(logged(self.relay), [])
        self.assertEqual(self.relay.writeahead.forwarded, 0)
        self.writer.step()
        self.assertEqual(logged(self.relay), self.frames[:10])
        self.assertFalse(self.relay.writeahead.audit.dirty)
        self.assertEqual(self.received(), self.frames[:10])
        self.assertEqual(self.relay.writeahead.forwarded, 10)
        self.assertEqual(self.writer.jobs, [])

    def test_batchGrowsWhileWriting(self) -> None:
        """What arrives during a write goes out in the next one, all together, in order."""
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        other = connect(self.relay)
        self.publisher.dataReceived(b"".join(self.frames[10:20]))
        other.dataReceived(b"".join(frames_for(Domain.EXECUTION, 5, source=7)))
        self.publisher.dataReceived(b"".join(self.frames[20:]))
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.step()
        self.assertEqual(self.received(), self.frames[:10])
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.step()
        expected = self.frames[:20] + frames_for(Domain.EXECUTION, 5, source=7) + self.frames[20:]
        self.assertEqual(self.received(), expected)
        self.assertEqual(logged(self.relay), expected)
        self.assertEqual(self.writer.jobs, [])

    def test_boundedBatch(self) -> None:
        """Past the batch limit, the publishers wait for the write in progress."""
        self.relay.writeahead.batch_limit = 1000
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        self.publisher.dataReceived(b"".join(self.frames[10:]))
        self.assertTrue(self.relay.gate.paused)
        self.assertTrue(self.publisher.transport.producerState == "paused")
        self.writer.step()
        self.assertFalse(self.relay.gate.paused)
        self.writer.step()
        self.assertEqual(self.received(), self.frames)

    def test_failedWriteHolds(self) -> None:
        """
        A write that fails in the writer holds the publishers and keeps the
        frames, in order, until the log can be written again.
        """
        full = DiskFull(self.relay.writeahead.audit)
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        self.writer.step()
        self.assertTrue(self.relay.gate.paused)
        self.assertIn("No space left", self.relay.writeahead.failure)
        self.publisher.dataReceived(b"".join(self.frames[10:]))
        self.assertEqual(self.writer.jobs, [])
        self.assertEqual(self.received(), [])
        full.free()
        self.relay.clock.advance(1.0)
        self.assertEqual(self.received(), [])
        self.writer.step()  # the retry, on the writer too
        self.assertIsNone(self.relay.writeahead.failure)
        self.assertFalse(self.relay.gate.paused)
        self.assertEqual(self.received(), self.frames)
        self.assertEqual(logged(self.relay), self.frames)
        self.assertEqual(self.relay.writeahead.forwarded, 30)

    def test_otherErrorsNotAppendedTwice(self) -> None:
        """An unexpected error part-way through a batch holds; the retry appends the rest once."""
        audit = self.relay.writeahead.audit
        append, calls = audit.append, []

        def failing_once(*args):
            calls.append(args)
            if len(calls) == 2:
                raise ValueError("a run does not hold whole frames")
            return append(*args)

        audit.append = failing_once
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        other = connect(self.relay)
        other.dataReceived(b"".join(frames_for(Domain.EXECUTION, 5, source=7)))
        self.publisher.dataReceived(b"".join(self.frames[10:]))
        self.writer.step()  # the first batch
        self.writer.step()  # the second: its first entry, then the error
        self.assertIn("ValueError", self.relay.writeahead.failure)
        self.relay.clock.advance(1.0)
        self.writer.step()
        expected = self.frames[:10] + frames_for(Domain.EXECUTION, 5, source=7) + self.frames[10:]
        self.assertEqual(logged(self.relay), expected)
        self.assertEqual(self.received(), expected)

    def test_withdrawReleasesThePublishers(self) -> None:
        """Taking back the bridged frames that held the publishers lets them go."""
        writeahead = self.relay.writeahead
        writeahead.batch_limit = 1000
        bridged = SimpleNamespace(stats=self.publisher.stats, bridged=True)
        self.publisher.dataReceived(self.frames[0])
        writeahead.admit(bridged, [b"".join(self.frames[1:20])], 19)
        self.assertTrue(self.relay.gate.paused)
        self.assertEqual(writeahead.withdraw(), 19)
        self.assertFalse(self.relay.gate.paused)
        self.writer.step()
        self.assertEqual(self.received(), self.frames[:1])

    def test_thenAfterTheFramesBefore(self) -> None:
        """What waits on the log runs once the frames admitted before it are forwarded."""
        writeahead, calls = self.relay.writeahead, []
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        writeahead.then(lambda: calls.append(len(self.received())))
        self.publisher.dataReceived(b"".join(self.frames[10:]))
        self.writer.step()
        self.assertEqual(calls, [10])
        self.writer.step()
        writeahead.then(lambda: calls.append(len(self.received())))
        self.assertEqual(calls, [10, 30])

    def test_thenSurvivesWithdraw(self) -> None:
        """What waits on withdrawn frames runs after the frames kept before them, or now."""
        writeahead, calls = self.relay.writeahead, []
        bridged = SimpleNamespace(stats=self.publisher.stats, bridged=True)
        self.publisher.dataReceived(self.frames[0])
        writeahead.admit(bridged, [self.frames[1]], 1)
        writeahead.then(lambda: calls.append("after the kept frame"))
        writeahead.withdraw()
        self.assertEqual(calls, [])
        self.writer.step()
        self.assertEqual(calls, ["after the kept frame"])

    def test_thenOnWithdrawnFramesAlone(self) -> None:
        """What waits on withdrawn frames, with nothing held before them, runs at once."""
        writeahead, calls = self.relay.writeahead, []
        bridged = SimpleNamespace(stats=self.publisher.stats, bridged=True)
        holdup = DiskFull(writeahead.audit)
        self.addCleanup(holdup.free)
        writeahead.admit(bridged, [self.frames[0]], 1)
        self.writer.step()
        self.assertIsNotNone(writeahead.failure)
        writeahead.then(lambda: calls.append("now"))
        self.assertEqual(writeahead.withdraw(), 1)
        self.assertEqual(calls, ["now"])

    def test_drainWaitsForTheWriter(self) -> None:
        """A stop first lets the batch with the writer land and fan out."""
        self.publisher.dataReceived(b"".join(self.frames))
        self.relay.drain(5.0)
        self.assertFalse(self.subscriber.transport.disconnecting)
        self.writer.step()
        self.assertEqual(self.received(), self.frames)
        self.assertTrue(self.subscriber.transport.disconnecting)

    def test_drainBounded(self) -> None:
        """A writer that never returns holds a stop no longer than its timeout."""
        self.publisher.dataReceived(b"".join(self.frames))
        self.relay.drain(2.0)
        self.relay.clock.advance(1.9)
        self.assertFalse(self.subscriber.transport.disconnecting)
        self.relay.clock.advance(0.1)
        self.assertTrue(self.subscriber.transport.disconnecting)
        self.assertEqual(self.received(), [])


@pytest_twisted.ensureDeferred
async def test_throughTheWriterThread(tmp_path) -> None:
    """Frames published while writes run on the real thread all arrive, in order, logged."""
    writer = WriterThread(reactor)
    relay = make_relay(Domain.EXECUTION, audit=AuditLog(str(tmp_path)), audit_writer=writer)
    relay.writeahead.start()
    try:
        publisher, subscriber = connect(relay), connect(relay)
        frames = frames_for(Domain.EXECUTION, 2000, source=42)
        for first in range(0, 2000, 100):
            publisher.dataReceived(b"".join(frames[first : first + 100]))
        for _ in range(500):
            if relay.writeahead.forwarded == 2000:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert published(subscriber.transport.value()) == frames
        assert logged(relay) == frames
    finally:
        relay.writeahead.stop()


class IntervalTests(WriterTestCase):
    """C{--audit-fsync MS} on the writer: forwarded once written, synced every interval."""

    interval = 0.01

    def test_writeThenSync(self) -> None:
        """Frames go out once written; the interval's sync runs on the writer, in order."""
        self.publisher.dataReceived(b"".join(self.frames))
        self.writer.step()
        self.assertEqual(self.received(), self.frames)
        self.assertTrue(self.relay.writeahead.audit.dirty)
        self.relay.clock.advance(0.01)
        self.assertEqual(len(self.writer.jobs), 1)
        self.writer.step()
        self.assertFalse(self.relay.writeahead.audit.dirty)

    def test_oneRetryAtATime(self) -> None:
        """An interval's sync and then a write failing one after the other retry as one."""
        audit = self.relay.writeahead.audit
        self.publisher.dataReceived(b"".join(self.frames[:5]))
        self.writer.step()
        self.relay.clock.advance(0.01)  # the interval's sync, with the writer
        self.publisher.dataReceived(b"".join(self.frames[5:10]))  # a write behind it
        full = DiskFull(audit)
        self.writer.step()  # the sync fails
        self.writer.step()  # the write fails
        self.assertEqual(retries(self.relay), 1)
        full.free()
        self.relay.clock.advance(1.0)
        self.writer.step()
        self.assertEqual(retries(self.relay), 0)
        self.assertEqual(self.received(), self.frames[:10])

    def test_failedSyncHolds(self) -> None:
        """An interval's sync that fails holds the publishers until a retry succeeds."""
        audit = self.relay.writeahead.audit
        self.publisher.dataReceived(b"".join(self.frames[:15]))
        self.writer.step()
        audit.sync = failing_sync
        self.relay.clock.advance(0.01)
        self.writer.step()
        self.assertTrue(self.relay.gate.paused)
        self.publisher.dataReceived(b"".join(self.frames[15:]))
        self.assertEqual(self.writer.jobs, [])
        del audit.sync
        self.relay.clock.advance(1.0)
        self.writer.step()
        self.assertFalse(self.relay.gate.paused)
        self.assertEqual(self.received(), self.frames)


def failing_sync() -> None:
    raise OSError(5, "Input/output error")
