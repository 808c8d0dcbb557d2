"""
The relay's side of the audit log: no frame is forwarded before it is in
the log (and, with C{--audit-fsync always}, on disk). When the log cannot be
written the publishers are held back and the frames already read wait, in
order, until it can; nothing is forwarded unlogged and nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..audit import AuditLog
from ..wire import frame_spans
from .accounting import ClientStats
from .delivery import PublisherGate


class Publisher(Protocol):
    """Where accepted frames came from (an L{ingest.Ingest}), as the log records it."""

    stats: ClientStats
    #: Whether the frames came from another relay through NATS.
    bridged: bool


#: What the log calls with frames it logged late: sender, runs, frames.
Forward = Callable[[Publisher, list[bytes], int], None]


@dataclass
class _Held:
    """Frames accepted while the log could not be written."""

    sender: Publisher
    runs: list[bytes]
    frames: int
    received_ns: int
    logged: bool = False


def _before(held: list[_Held]) -> dict[int, int]:
    """For each source in C{held}, the sequence before its first held frame."""
    first: dict[int, int] = {}
    for batch in held:
        for _, _, _, header in frame_spans(batch.runs):
            first.setdefault(header.source, header.sequence)
    return {source: sequence - 1 for source, sequence in first.items()}


class WriteAhead:
    """
    Logs accepted frames before the relay forwards them.

    @ivar fsync_interval: seconds between syncs of the log to disk; C{None}
        syncs before every forward (C{--audit-fsync always}).
    @ivar sequences: the relay's last sequence accepted per source, which the
        log fills in at the start and takes back with withdrawn frames.
    @ivar forward: what fans frames out once they were logged late.
    """

    log = Logger()

    def __init__(
        self,
        audit: AuditLog,
        fsync_interval: float | None,
        clock: IReactorTime,
        *,
        gate: PublisherGate,
        sequences: dict[int, int],
        forward: Forward,
        retry_interval: float = 1.0,
    ) -> None:
        self.audit = audit
        self.gate = gate
        self.sequences = sequences
        self.forward = forward
        self.fsync_interval = fsync_interval
        self.clock = clock
        self.retry_interval = retry_interval
        self.held: list[_Held] = []
        #: Why the log cannot be written now, or None.
        self.failure: str | None = None
        self.failures = 0
        self._failedAt = 0.0
        self._retry: IDelayedCall | None = None
        self._sync = LoopingCall(self._syncNow)
        self._sync.clock = clock

    def start(self) -> None:
        """
        Open the log (cutting off a torn last record, with a warning) and
        take the last sequence per source from it.

        @raise OSError, AuditDamage: the log cannot be used.
        """
        for warning in self.audit.open():
            self.log.warn("audit log: {warning}", warning=warning)
        self.sequences.update(self.audit.sequences)
        self.log.info(
            "audit log {directory}: {records} records, chain head 0x{head:08x}, "
            "fsync {fsync}",
            directory=self.audit.directory,
            records=self.audit.records,
            head=self.audit.head,
            fsync=self.fsync_description,
        )
        if self.fsync_interval is not None:
            self._sync.start(self.fsync_interval, now=False)

    @property
    def fsync_description(self) -> str:
        if self.fsync_interval is None:
            return "always"
        return f"every {self.fsync_interval * 1000:g} ms"

    def stop(self) -> None:
        """Sync and close the log; frames still held are reported as lost."""
        if self._sync.running:
            self._sync.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self.held:
            self.log.error(
                "stopping with {frames} frames never written to the audit log "
                "({reason}); they were not forwarded",
                frames=self.held_frames,
                reason=self.failure,
            )
        try:
            self.audit.close()
        except OSError as e:
            self.log.error("audit log could not be synced at shutdown: {error}", error=e)
        self.log.info(
            "audit log closed: {records} records, chain head 0x{head:08x}",
            records=self.audit.records,
            head=self.audit.head,
        )

    def holds(self, sender: Publisher) -> bool:
        """Whether frames from C{sender} wait for the log."""
        return any(held.sender is sender for held in self.held)

    def withdraw(self) -> int:
        """
        Take back the frames from other relays (through NATS) that are held
        and not yet in the log: the stream, which has no acknowledgement for
        them, delivers them again. Returns the frames taken back.
        """
        taken: list[_Held] = []
        kept: list[_Held] = []
        for held in self.held:
            (taken if held.sender.bridged and not held.logged else kept).append(held)
        if taken:
            self.held = kept
            self.sequences.update(_before(taken))
        return sum(h.frames for h in taken)

    def forwardedSequences(self) -> dict[int, int]:
        """
        The last sequence forwarded per source, for heartbeats: the last
        accepted, except that a source with frames held stops before the
        first of them (publishers' sequences run on by one).
        """
        sequences = self.sequences
        if not self.held:
            return sequences
        return {**sequences, **_before(self.held)}

    @property
    def held_frames(self) -> int:
        """The frames waiting for the log."""
        return sum(held.frames for held in self.held)

    @property
    def forwarded(self) -> int:
        """The records of the log that were forwarded: all but those still held."""
        return self.audit.records - sum(h.frames for h in self.held if h.logged)

    def admit(self, sender: Publisher, runs: list[bytes], frames: int) -> bool:
        """
        Log C{runs}; C{True} if they may be forwarded now. Otherwise they are
        held, and forwarded by the relay once they are logged.
        """
        held = _Held(sender, runs, frames, time.time_ns())
        if self.failure is not None:
            self.held.append(held)
            return False
        try:
            self._log(held)
        except OSError as e:
            self.held.append(held)
            self._failed(e)
            return False
        return True

    def _log(self, held: _Held) -> None:
        if not held.logged:
            self.audit.append(held.sender.stats.client_id, held.runs, held.received_ns)
            held.logged = True
        if self.fsync_interval is None:
            self.audit.sync()

    def _failed(self, error: OSError) -> None:
        first = self.failure is None
        self.failure = f"audit log write failed: {error.strerror or error}"
        self.failures += 1
        if first:
            self._failedAt = self.clock.seconds()
            self.log.error(
                "{reason}; publishers are held back and {frames} accepted frames "
                "wait until the log can be written (retrying every {retry}s)",
                reason=self.failure,
                frames=self.held_frames,
                retry=self.retry_interval,
            )
            self.gate.hold(self, self.failure)
        self._retry = self.clock.callLater(self.retry_interval, self._retryHeld)

    def _retryHeld(self) -> None:
        try:
            self.audit.sync()
            for entry in self.held:
                self._log(entry)
        except OSError as e:
            self._failed(e)
            return
        held, self.held = self.held, []
        self.log.info(
            "audit log writable again after {outage:.3f}s: {frames} held frames "
            "logged and forwarded",
            outage=self.clock.seconds() - self._failedAt,
            frames=sum(h.frames for h in held),
        )
        self.failure = None
        for batch in held:
            self.forward(batch.sender, batch.runs, batch.frames)
        self.gate.unblock(self)

    def _syncNow(self) -> None:
        """The interval's sync; one that fails holds the publishers like a failed write."""
        if self.failure is not None:
            return
        try:
            self.audit.sync()
        except OSError as e:
            self._failed(e)
