"""
Replay from the audit log: a client that missed frames asks for each source
from the first sequence it wants (RecoveryRequest), and gets them from the
log, then the live stream, with no gap and no duplicate at the splice.

From the request on, the client is taken out of the live broadcast: the
replay reads the log, which holds every frame forwarded since, until it
reaches the last forwarded record, and puts the client back into the
broadcast in that same reactor turn, so the next live frame is the next
record. Records logged but not forwarded yet (held while the log could not
be synced) are left to the live stream. Nothing waits in memory for a
replaying client, so a long replay holds no one back.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.task import (
    CooperativeTask,
    Cooperator,
    TaskDone,
    TaskFailed,
    TaskStopped,
)
from twisted.python.failure import Failure

from ..audit import AuditDamage, AuditFile, Record
from ..control import REPLAYING, Subscription, recovery_response_frame
from ..wire import unpack_header
from .accounting import ClientStats
from .delivery import Outbox
from .logger import RelayLogger
from .writeahead import WriteAhead


class Replayed(Protocol):
    """The client a replay is for (a L{protocol.RelayProtocol})."""

    stats: ClientStats
    outbox: Outbox
    #: What it receives; taken off the live stream by the relay once its replay starts.
    subscription: Subscription
    #: The first audit record it could have received live.
    audit_index: int

#: Records read between two turns of the reactor.
_STEP = 512
#: Bytes of replayed frames handed to the transport at once.
_WRITE_SIZE = 64 * 1024


class Replay:
    """One client's replay, from its request to its return to the live stream."""

    log = RelayLogger(namespace="relay")

    def __init__(
        self,
        client: Replayed,
        writeahead: WriteAhead,
        wanted: dict[int, int],
        *,
        cooperator: Cooperator,
        domain: int,
        echo: bool,
        done: Callable[[Replay], None],
    ) -> None:
        """
        @param done: called when the replay reached the end of the log, in
            the reactor turn the client must go back on the live stream.
        """
        self.client = client
        self.writeahead = writeahead
        self.wanted = dict(wanted)
        self.cooperator = cooperator
        self.domain = domain
        self.echo = echo
        self.done = done
        #: What the client receives; it has it again once back on the live stream.
        self.subscription = client.subscription
        #: The first record the live stream did not give the client.
        self.detached_at = writeahead.forwarded
        self.frames = 0
        self._resumed: Deferred[None] | None = None
        self._task: CooperativeTask | None = None

    def begin(self) -> None:
        """Start streaming: everything queued for the client before the request is written."""
        self._task = self.cooperator.cooperate(self._steps())
        self._task.whenDone().addErrback(self._failed)

    def resume(self) -> None:
        """The client's transport can take more."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stop(self) -> None:
        """The client is gone."""
        if self._task is not None:
            try:
                self._task.stop()
            except (TaskDone, TaskFailed, TaskStopped):
                pass

    def _failed(self, failure: Failure) -> None:
        if failure.check(TaskStopped):
            return
        if failure.check(AuditDamage):
            detail = f"the audit log is damaged: {failure.value}"
        else:
            self.log.failure(
                "replay for client {client_id} failed",
                failure,
                client_id=self.client.stats.client_id,
            )
            detail = f"internal error: {failure.getErrorMessage()}"
        self.client.outbox.cut("replay failed", detail)

    def _steps(self) -> Iterator[Deferred[None] | None]:
        after = yield from self._starts()
        answers = [
            recovery_response_frame(self.domain, s, q, REPLAYING)
            for s, q in sorted(self.wanted.items())
        ]
        self.client.outbox.write(answers, 0, sum(map(len, answers)))
        first = min([self.detached_at, *(index + 1 for index in after.values())])
        own = None if self.echo else self.client.stats.client_id
        connected_at = self.client.audit_index
        batch: list[bytes] = []
        size = count = 0
        for record in self._records(first):
            frame = record.frame
            start = after.get(record.source)
            if start is None:
                if record.index < self.detached_at:
                    continue
            elif record.index <= start:
                continue
            if record.client_id == own and record.index >= connected_at:
                continue
            subscription = self.subscription
            if subscription.publish_only or (
                subscription.filtered
                and not subscription.wants(frame, 0, len(frame), unpack_header(frame))
            ):
                continue
            batch.append(frame)
            size += len(frame)
            count += 1
            if size >= _WRITE_SIZE or count >= _STEP:
                yield from self._write(batch, count)
                batch, size, count = [], 0, 0
        # The forwarded records end here, in this reactor turn: back to live.
        if batch:
            self._send(batch, count)
        self.done(self)

    def _files(self) -> list[AuditFile]:
        """The files of the log still there (old ones may be archived away)."""
        return [f for f in self.writeahead.audit.files if f.exists()]

    def _starts(self) -> Generator[None, None, dict[int, int]]:
        """
        For each source wanted, the index of its last record with a sequence
        below the first one wanted (-1 if there is none): the replay of that
        source starts after it. The newest files are searched first.
        """
        wanted = dict(self.wanted)
        after: dict[int, int] = {}
        for audit_file in reversed(self._files()):
            if not wanted:
                break
            if audit_file.first_index >= self.detached_at:
                continue
            below: dict[int, int] = {}
            try:
                for n, record in enumerate(audit_file.records()):
                    if record.index >= self.detached_at:
                        break
                    source = record.source
                    if source in wanted and record.sequence < wanted[source]:
                        below[source] = record.index
                    if n % _STEP == 0:
                        yield None
            except AuditDamage as damage:
                if not self._beingWritten(damage, self.detached_at):
                    raise
            for source, index in below.items():
                after[source] = index
                del wanted[source]
        after.update(dict.fromkeys(wanted, -1))
        return after

    def _records(self, first: int) -> Iterator[Record]:
        """
        The records from index C{first} (or the oldest file still there) to
        the last forwarded one, however far the log grows meanwhile.
        """
        files = self._files()
        if not files:
            return
        current = max((n for n, f in enumerate(files) if f.first_index <= first), default=0)
        audit_file = files[current]
        position = audit_file.start()
        end = self.writeahead.forwarded
        while True:
            before = position.index
            try:
                for record in audit_file.records(position):
                    if record.index >= end:
                        # The end moves on while the replay yields: look again.
                        end = self.writeahead.forwarded
                        if record.index >= end:
                            return
                    if record.index >= first:
                        yield record
            except AuditDamage as damage:
                if self._beingWritten(damage, self.writeahead.forwarded):
                    return
                raise
            if position.index >= self.writeahead.forwarded:
                return
            files = self.writeahead.audit.files
            later = [f for f in files if f.first_index > audit_file.first_index]
            if later and position.index >= later[0].first_index:
                audit_file = later[0]
                position = audit_file.start()
            elif position.index == before:
                raise AuditDamage(
                    audit_file.path,
                    position.index,
                    position.offset,
                    f"the log ends here, before the {self.writeahead.forwarded} records forwarded",
                )

    @staticmethod
    def _beingWritten(damage: AuditDamage, forwarded: int) -> bool:
        """
        Whether C{damage} is only the record the log's writer is appending
        now, past the C{forwarded} ones: the replay's end, not damage.
        """
        return damage.torn and damage.index >= forwarded

    def _write(self, frames: list[bytes], count: int) -> Iterator[Deferred[None] | None]:
        """Send C{frames}, then wait until the transport wants more."""
        self._send(frames, count)
        yield None
        while not self.client.outbox.writable:
            self._resumed = Deferred()
            yield self._resumed

    def _send(self, frames: list[bytes], count: int) -> None:
        self.client.outbox.write(frames, count, sum(map(len, frames)), replayed=True)
        self.frames += count
