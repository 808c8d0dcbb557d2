"""
The relay's side of the audit log: no frame is forwarded before it is in
the log (and, with C{--audit-fsync always}, on disk). When the log cannot be
written the publishers are held back and the frames already read wait, in
order, until it can; nothing is forwarded unlogged and nothing is lost.

The relay runs the writes and syncs on a thread of their own
(L{WriterThread}), as a group commit: while one batch is being written (and,
with C{--audit-fsync always}, synced), the reactor goes on reading and
checking the next, which then goes to disk in one write and one sync; each
batch fans out once it is written (and synced). The interval's syncs run on
the same thread, in order with the writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..audit import AuditLog
from ..wire import MiB, frame_spans
from .accounting import ClientStats
from .delivery import PublisherGate
from .logger import RelayLogger


class Publisher(Protocol):
    """Where accepted frames came from (an L{ingest.Ingest}), as the log records it."""

    stats: ClientStats
    #: Whether the frames came from another relay through NATS.
    bridged: bool


#: What the log calls with frames once they are logged: sender, runs, frames.
Forward = Callable[[Publisher, list[bytes], int], None]

_T = TypeVar("_T")


class Offload(Protocol):
    """Where the log's writes run, one after another (L{WriterThread}, L{InLine})."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Wait for the work in progress to finish, then run no more."""

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        """Run C{work} after the work given before; its result, in the reactor thread."""


class WriterThread:
    """One thread running the audit log's writes and syncs, in order."""

    def __init__(self, reactor: IReactorFromThreads) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="audit log writer")

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        return deferToThreadPool(self.reactor, self.pool, work)


class InLine:
    """The log's writes and syncs run in the reactor thread, there and then."""

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing is ever in progress."""

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        return succeed(work())


@dataclass
class _Held:
    """Accepted frames not forwarded yet."""

    sender: Publisher
    runs: list[bytes]
    frames: int
    received_ns: int
    logged: bool = False
    #: What to call once these frames are forwarded (L{WriteAhead.then}).
    then: list[Callable[[], None]] = field(default_factory=list)


def _timedOut(failure: Failure) -> None:
    failure.trap(TimeoutError)


def _fire(waiting: list[Deferred[None]]) -> None:
    for deferred in waiting:
        if not deferred.called:
            deferred.callback(None)


def _call(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _size(held: _Held) -> int:
    return sum(map(len, held.runs))


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

    Every accepted batch is L{held} until the writer has written it (and,
    C{fsync_interval} being C{None}, synced it); the writer takes everything
    held at once, so one write and one sync cover whatever arrived while the
    previous ones ran. A write that fails keeps its frames and the rest held,
    in order, and holds the publishers back until a retry succeeds.

    @ivar fsync_interval: seconds between syncs of the log to disk; C{None}
        syncs before every forward (C{--audit-fsync always}).
    @ivar sequences: the relay's last sequence accepted per source, which the
        log fills in at the start and takes back with withdrawn frames.
    @ivar forward: what fans frames out once they are logged.
    @ivar offload: where the writes and syncs run (L{InLine}: before
        L{admit} returns).
    @ivar batch_limit: bytes of accepted frames that may wait for the write
        in progress; past it the publishers are held back until it returns.
    @ivar held: the accepted frames not forwarded yet, in order: the first
        C{flying} of them are with the writer now.
    @ivar forwarded: the records of the log that were forwarded.
    """

    log = RelayLogger(namespace="relay.audit")

    def __init__(
        self,
        audit: AuditLog,
        fsync_interval: float | None,
        clock: IReactorTime,
        *,
        gate: PublisherGate,
        sequences: dict[int, int],
        forward: Forward,
        offload: Offload | None = None,
        batch_limit: int = 4 * MiB,
        retry_interval: float = 1.0,
    ) -> None:
        self.audit = audit
        self.gate = gate
        self.sequences = sequences
        self.forward = forward
        self.fsync_interval = fsync_interval
        self.clock = clock
        self.retry_interval = retry_interval
        self.offload: Offload = InLine() if offload is None else offload
        self.batch_limit = batch_limit
        self.held: list[_Held] = []
        self.flying = 0
        self.forwarded = 0
        #: Why the log cannot be written now, or None.
        self.failure: str | None = None
        self.failures = 0
        self._failedAt = 0.0
        self._retry: IDelayedCall | None = None
        self._sync = LoopingCall(self._syncNow)
        self._sync.clock = clock
        self._syncing = False
        self._retrying = False
        self._stopped = False
        #: Whether the log was opened (by L{start}), so L{stop} has one to close.
        self.opened = False
        #: Bytes held and not with the writer.
        self._waiting = 0
        #: The gate's key while the publishers wait for the writer.
        self._behind = object()
        self._settled: list[Deferred[None]] = []
        self._landings: list[Deferred[None]] = []

    def start(self) -> None:
        """
        Open the log (cutting off a torn last record, with a warning) and
        take the last sequence per source from it.

        @raise OSError, AuditDamage: the log cannot be used.
        """
        for warning in self.audit.open():
            self.log.warn("audit log: {warning}", warning=warning)
        self.opened = True
        self.sequences.update(self.audit.sequences)
        self.forwarded = self.audit.records
        self.offload.start()
        self.log.info(
            "audit log {directory}: {records} records, chain head 0x{head:08x}, "
            "fsync {fsync}{writer}",
            directory=self.audit.directory,
            records=self.audit.records,
            head=self.audit.head,
            fsync=self.fsync_description,
            writer=", pipelined on a writer thread" if self.pipelined else "",
        )
        if self.fsync_interval is not None:
            self._sync.start(self.fsync_interval, now=False)

    @property
    def fsync_description(self) -> str:
        if self.fsync_interval is None:
            return "always"
        return f"every {self.fsync_interval * 1000:g} ms"

    @property
    def pipelined(self) -> bool:
        """Whether the writes and syncs run on a writer of their own."""
        return not isinstance(self.offload, InLine)

    def settled(self, timeout: float) -> Deferred[None]:
        """
        Fires once no frame is with the writer or waiting for it (or the log
        is failing, so none will be forwarded), at most C{timeout} seconds
        from now.
        """
        waiting: Deferred[None] = Deferred()
        if not self.held or self.failure is not None:
            waiting.callback(None)
            return waiting
        self._settled = [d for d in self._settled if not d.called]
        self._settled.append(waiting)
        waiting.addTimeout(timeout, self.clock)
        return waiting.addErrback(_timedOut)

    def landed(self, timeout: float) -> Deferred[None]:
        """Fires when the write in progress returns (at once if none), at most C{timeout} from now."""
        waiting: Deferred[None] = Deferred()
        if not self.flying:
            waiting.callback(None)
            return waiting
        self._landings = [d for d in self._landings if not d.called]
        self._landings.append(waiting)
        waiting.addTimeout(timeout, self.clock)
        return waiting.addErrback(_timedOut)

    def stop(self) -> None:
        """
        Wait for the write in progress, sync and close the log; frames still
        held are reported as not forwarded.
        """
        if not self.opened:
            return
        self.opened = False
        if self._sync.running:
            self._sync.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._stopped = True
        self.offload.stop()
        if self.held:
            self.log.error(
                "stopping with {frames} accepted frames not forwarded ({reason}); "
                "those the log holds are replayed on request",
                frames=self.held_frames,
                reason=self.failure or "the audit log's write had not returned",
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
        kept = self.held[: self.flying]
        for held in self.held[self.flying :]:
            if held.sender.bridged and not held.logged:
                taken.append(held)
                if held.then:  # due once what came before it is forwarded
                    if kept:
                        kept[-1].then += held.then
                    else:
                        _call(held.then)
            else:
                kept.append(held)
        if taken:
            self.held = kept
            self._waiting = sum(_size(h) for h in kept[self.flying :])
            if self._waiting <= self.batch_limit:
                self.gate.unblock(self._behind)
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

    def then(self, call: Callable[[], None]) -> None:
        """Call C{call} once every frame admitted so far is forwarded: now, if none is held."""
        if self.held:
            self.held[-1].then.append(call)
        else:
            call()

    def admit(self, sender: Publisher, runs: list[bytes], frames: int) -> None:
        """Log C{runs}; they are forwarded once logged, after those admitted before."""
        held = _Held(sender, runs, frames, time.time_ns())
        self.held.append(held)
        if self.failure is not None:
            return
        if not self.flying:
            self._flush()
            return
        self._waiting += _size(held)
        if self._waiting > self.batch_limit and self._behind not in self.gate.blockers:
            self.gate.hold(self._behind, "the audit log's writes are behind")

    def _flush(self, sync: bool | None = None) -> None:
        """
        Give the writer everything held: one write for it all, then one sync
        if C{sync} (by default: with C{--audit-fsync always}).
        """
        if sync is None:
            sync = self.fsync_interval is None
        batch = self.held[:]
        self.flying, self._waiting = len(batch), 0
        self.gate.unblock(self._behind)
        self.offload(lambda: self._write(batch, sync)).addCallbacks(self._landed, self._crashed)

    def _write(self, batch: list[_Held], sync: bool) -> tuple[int, int, OSError | None]:
        """
        On the writer: append C{batch}, then sync if C{sync}. Returns how
        many of its entries were appended, how many of those may be
        forwarded, and the error that stopped it, if any. After a failed
        append, what was appended before it is synced, so that much can go
        out.
        """
        written = 0
        try:
            for held in batch:
                if not held.logged:
                    self.audit.append(held.sender.stats.client_id, held.runs, held.received_ns)
                written += 1
        except Exception as e:
            # Not only OSError: what was appended must be known, or a retry
            # would append it again.
            failed = e if isinstance(e, OSError) else OSError(f"{type(e).__name__}: {e}")
            return written, written if self._syncIf(sync) is None else 0, failed
        error = self._syncIf(sync)
        return written, 0 if error else written, error

    def _syncIf(self, sync: bool) -> OSError | None:
        """On the writer: sync if asked to; the error, if that failed."""
        if sync:
            try:
                self.audit.sync()
            except OSError as e:
                return e
        return None

    def _landed(self, result: tuple[int, int, OSError | None]) -> None:
        """The writer is done with the batch in flight: forward what may go out."""
        if self._stopped:
            return
        written, durable, error = result
        batch = self.held[: self.flying]
        self.flying = 0
        for held in batch[:written]:
            held.logged = True
        del self.held[:durable]
        self._forward(batch[:durable])
        retried, self._retrying = self._retrying, False
        if error is not None:
            self._failed(error)
        elif retried:
            self._recovered(sum(h.frames for h in batch))
        landings, self._landings = self._landings, []
        _fire(landings)
        if self.held and self.failure is None:
            self._flush()
        else:
            self.gate.unblock(self._behind)
            self._settle()

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("the audit log writer failed", failure)
        self._landed((0, 0, OSError(str(failure.value))))

    def _forward(self, batch: list[_Held]) -> None:
        for held in batch:
            self.forwarded += held.frames
            self.forward(held.sender, held.runs, held.frames)
            _call(held.then)

    def _settle(self) -> None:
        waiting, self._settled = self._settled, []
        _fire(waiting)

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
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(self.retry_interval, self._retryHeld)

    def _retryHeld(self) -> None:
        """Try the log again: write what is held and not written, and sync."""
        if self.flying:
            # A write that began before an interval's sync failed: after it.
            self._retry = self.clock.callLater(self.retry_interval, self._retryHeld)
            return
        self._retrying = True
        self._flush(sync=True)

    def _recovered(self, frames: int) -> None:
        self.log.info(
            "audit log writable again after {outage:.3f}s: {frames} held frames "
            "logged and forwarded",
            outage=self.clock.seconds() - self._failedAt,
            frames=frames,
        )
        self.failure = None
        self.gate.unblock(self)

    def _syncNow(self) -> None:
        """The interval's sync; one that fails holds the publishers like a failed write."""
        if self.failure is not None or self._syncing:
            return
        self._syncing = True
        self.offload(lambda: self._syncIf(True)).addCallbacks(
            self._intervalSynced, self._intervalCrashed
        )

    def _intervalCrashed(self, failure: Failure) -> None:
        self.log.failure("the audit log's interval sync failed", failure)
        self._intervalSynced(OSError(str(failure.value)))

    def _intervalSynced(self, error: OSError | None) -> None:
        self._syncing = False
        if error is not None and not self._stopped and self.failure is None:
            self._failed(error)
