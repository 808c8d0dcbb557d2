"""
Delivery to slow consumers: each client's bounded outbound queue, and what
happens when a client falls behind (the domain's policy).

A client's transport keeps at most about 64 KiB of its own; past that it
pauses the client's L{Outbox} (its registered streaming producer) and frames
wait in the outbox, counted in bytes against the high-water mark:

 - C{drop}: frames that would take the queue over the mark are dropped for
   that client, whole, and counted;
 - C{disconnect}: the client is cut off as a slow consumer;
 - C{block}: nothing is dropped; the L{PublisherGate} stops reading from every
   client until the queue is back under the low-water mark, and cuts off a
   client stuck over the mark longer than the stall timeout.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ..control import Subscription
from ..interfaces import DELIVERY_POLICIES, IRelayLogic
from ..wire import HEADER_SIZE, PAYLOAD_SIZE_OFFSET, UINT32, MiB
from .accounting import Accounting, ClientStats
from .logger import RelayLogger

#: Bytes a queue holds (a client's outbox, the NATS bridge's) before its
#: slow-consumer policy applies, unless told otherwise.
HIGH_WATER = 8 * MiB
#: Bytes of the relay's own frames to a client (answers to its control
#: frames, heartbeats) that may wait in its queue; past it the client is cut
#: off on its own, whatever the policy: they never hold the publishers back.
OWN_LIMIT = 1 * MiB
#: Why the relay cuts a subscriber off (the disconnect policy, the stall
#: timeout, the relay's own frames left unread).
SLOW_CONSUMER = "slow consumer"
STALLED_CONSUMER = "stalled consumer"
UNREAD_ANSWERS = "unread answers"
#: Bytes, and writes, handed to a transport past which the outbox forgets
#: the writes the transport has passed on to the kernel (see L{Outbox.hangUp}).
LEDGER_BYTES = 64 * 1024
LEDGER_WRITES = 64
#: The place in an outbox's queue where its replay starts.
_REPLAY: tuple[list[bytes], int, int] = ([], 0, 0)


class Replaying(Protocol):
    """What an outbox needs of the replay that has its client (L{recovery.Replay})."""

    subscription: Subscription

    def begin(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class DeliverySettings:
    """The slow-consumer policy of one relay and its thresholds."""

    policy: str
    high_water: int = HIGH_WATER
    low_water: int = 2 * MiB
    stall_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.policy not in DELIVERY_POLICIES:
            raise ValueError(
                f"slow-consumer policy {self.policy!r} is not one of "
                f"{', '.join(DELIVERY_POLICIES)}"
            )
        if not 0 <= self.low_water < self.high_water:
            raise ValueError(
                f"the low-water mark ({self.low_water}) must be below the high-water "
                f"mark ({self.high_water})"
            )
        if self.stall_timeout <= 0:
            raise ValueError(f"stall timeout {self.stall_timeout} must be positive")

    @classmethod
    def for_logic(
        cls,
        logic: IRelayLogic,
        *,
        policy: str | None = None,
        high_water: int | None = None,
        low_water: int | None = None,
        stall_timeout: float | None = None,
    ) -> DeliverySettings:
        """
        The domain's policy with the operator's overrides. A high-water mark
        given alone brings the low-water mark down to a quarter of it.
        """
        high = cls.high_water if high_water is None else high_water
        if low_water is None:
            low_water = min(cls.low_water, high // 4)
        return cls(
            policy=logic.delivery if policy is None else policy,
            high_water=high,
            low_water=low_water,
            stall_timeout=cls.stall_timeout if stall_timeout is None else stall_timeout,
        )


@implementer(IPushProducer)
class Outbox:
    """
    One client's outbound stream: written straight to the transport while
    it keeps up, queued (bounded by policy) while it does not.

    Frames count as delivered (C{frames_out}) when all their bytes are
    written to the socket; frames still queued, or still in the transport's
    buffer when the relay hangs up on the client, count as lost
    (C{frames_lost}). The relay's own frames to the client (sent with
    C{frames} 0: answers, heartbeats) keep their place in the queue but not
    under the policy: they are bounded by L{OWN_LIMIT} instead, so a client
    that asks and does not read cannot hold the publishers back.
    """

    log = RelayLogger(namespace="relay")

    def __init__(
        self,
        transport: ITransport,
        stats: ClientStats,
        settings: DeliverySettings,
        accounting: Accounting,
        gate: PublisherGate,
        clock: IReactorTime,
        unparked: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param unparked: called when a parked outbox (L{parked}) can take
            frames again.
        """
        self.transport = transport
        self.stats = stats
        self.settings = settings
        self.accounting = accounting
        self.gate = gate
        self.clock = clock
        #: Writes waiting for the transport: (runs, frames, bytes) each.
        self.queue: deque[tuple[list[bytes], int, int]] = deque()
        self.queued = 0
        #: The frames queued for the transport: ahead of whatever is sent now.
        self.queued_frames = 0
        #: Of the bytes queued, those of the relay's own frames.
        self.own = 0
        self.writable = True
        self.closed = False
        #: Whether this outbox holds the publishers back (block policy).
        self.blocking = False
        #: Whether this outbox dropped a write (drop policy) and takes nothing
        #: more until its transport takes from its queue: the relay sends
        #: nothing to it meanwhile and counts what it misses.
        self.parked = False
        self.unparked = unparked
        #: The replay that has the client, once what is queued is written.
        self.replay: Replaying | None = None
        self._closeDeadline: IDelayedCall | None = None
        #: The transport as the file descriptor whose buffer L{hangUp} takes
        #: back from (Unix, TCP); None where that is not possible (TLS).
        self._descriptor = transport if isinstance(transport, FileDescriptor) else None
        #: Bytes handed to the transport, and the writes it may still hold,
        #: oldest first: (end in bytes written, frames, replayed, runs).
        self.written = 0
        self._ledger: deque[tuple[int, int, bool, list[bytes]]] = deque()
        self._settled = 0
        self._hungUp = False
        cast(IConsumer, transport).registerProducer(self, True)

    def send(self, runs: list[bytes], frames: int, size: int) -> None:
        """Deliver C{runs}, holding C{frames} whole frames, or apply the policy."""
        if self.closed:
            if frames:  # the connection is closing: these never reach the client
                self.accounting.lost(self.stats, frames, size)
            return
        if self.writable and not self.queue:
            self.write(runs, frames, size)
            return
        if not frames:
            self._queueOwn(runs, size)
            return
        policy = self.settings.policy
        over = self.queued - self.own + size > self.settings.high_water
        if over and policy == "drop":
            self.accounting.dropped(self.stats, frames, size)
            self.parked = True
            return
        if over and policy == "disconnect":
            self.cut(
                SLOW_CONSUMER,
                f"{self.queued} bytes queued, the next {size} would pass the "
                f"high-water mark of {self.settings.high_water}",
            )
            return
        self.queue.append((runs, frames, size))
        self.queued += size
        self.queued_frames += frames
        if over and not self.blocking:
            self.blocking = True
            self.gate.block(self)

    def _queueOwn(self, runs: list[bytes], size: int) -> None:
        if self.own + size > OWN_LIMIT:
            self.cut(
                UNREAD_ANSWERS,
                f"{self.own} bytes of the relay's answers to it are unread, the next "
                f"{size} would pass the limit of {OWN_LIMIT}",
            )
            return
        self.queue.append((runs, 0, size))
        self.queued += size
        self.own += size

    def _dequeued(self, frames: int, size: int) -> None:
        self.queued -= size
        self.queued_frames -= frames
        if not frames:
            self.own -= size

    def write(self, runs: list[bytes], frames: int, size: int, *, replayed: bool = False) -> None:
        """
        Hand C{runs} to the transport now, past the queue, and count them
        (as C{replayed} from the audit log too, if they are).
        """
        if len(runs) == 1:
            self.transport.write(runs[0])
        else:
            self.transport.writeSequence(runs)
        self.accounting.delivered(self.stats, frames, size)
        if replayed:
            self.accounting.replayed(self.stats, frames)
        if self._descriptor is not None:
            self.written += size
            ledger = self._ledger
            ledger.append((self.written, frames, replayed, runs))
            if self.written - self._settled > LEDGER_BYTES or len(ledger) > LEDGER_WRITES:
                self._settle()

    def _unsent(self) -> int:
        """Bytes the transport holds that it has not passed on to the kernel."""
        held = cast(FileDescriptor, self._descriptor)
        return len(held.dataBuffer) - held.offset + held._tempDataLen

    def _settle(self) -> None:
        """Forget the writes the transport has passed on to the kernel."""
        sent = self.written - self._unsent()
        ledger = self._ledger
        while ledger and ledger[0][0] <= sent:
            ledger.popleft()
        self._settled = sent

    def startReplay(self, replay: Replaying) -> None:
        """Hand the client to C{replay} once what is queued for it is written."""
        self.replay = replay
        if self.writable and not self.queue:
            replay.begin()
        else:
            self.queue.append(_REPLAY)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: queue from now on."""
        self.writable = False

    def resumeProducing(self) -> None:
        """The transport drained: refill it from the queue until it is full again."""
        self.writable = True
        queue = self.queue
        while queue and self.writable:
            item = queue.popleft()
            if item is _REPLAY:
                # What follows in the queue is the relay's own frames (the
                # client is off the live stream): they go out as before.
                assert self.replay is not None
                self.replay.begin()
                continue
            runs, frames, size = item
            self._dequeued(frames, size)
            self.write(runs, frames, size)
        if self.blocking and self.queued - self.own <= self.settings.low_water:
            self.blocking = False
            self.gate.unblock(self)
        if self.parked and not self.closed:
            self.parked = False
            self.unparked()
        if self.replay is not None:
            self.replay.resume()

    def stopProducing(self) -> None:
        """The connection is gone; what is queued can no longer be delivered."""
        self.close()

    def close(self) -> None:
        """Deliver nothing more; count what is still queued as lost."""
        if self.closed:
            return
        self.closed = True
        if self.replay is not None:
            self.replay.stop()
        if self.queue:
            self.accounting.lost(self.stats, self.queued_frames, self.queued)
        self.queue.clear()
        self.queued = self.own = self.queued_frames = 0
        if self.blocking:
            self.blocking = False
            self.gate.unblock(self)

    def cut(self, reason: str, detail: str) -> None:
        """Disconnect this client at once, without flushing, for C{reason}."""
        if self.closed:
            return
        self.accounting.cutOff(self.stats, reason, detail)
        self.close()
        self.hangUp()

    def hangUp(self) -> None:
        """
        End the connection now, whether the client reads or not. Of what
        the transport still holds, none is sent: its frames count as lost,
        not delivered, and so does the one the kernel has only the start of
        (the client library discards such a torn tail). What the kernel has
        is left to it: the connection is closed in order, not reset, so a
        frame counts as delivered exactly when all its bytes were written to
        the socket. Over TLS, whose buffer holds encrypted bytes, the
        connection is aborted and the frames handed to it stay counted.
        """
        if self._hungUp:
            return
        self._hungUp = True
        held = self._descriptor
        if held is None:
            cast(ITCPTransport, self.transport).abortConnection()
            return
        if held.disconnected:
            return
        self._recall(self.written - self._unsent())
        held.dataBuffer, held.offset = b"", 0
        held._tempDataBuffer, held._tempDataLen = [], 0
        held.disconnecting = True  # nothing may start it reading or writing again
        held.stopReading()
        held.stopWriting()
        self.clock.callLater(0, _closeInOrder, held)

    def _recall(self, sent: int) -> None:
        """Count the frames of the writes past byte C{sent} as lost, not delivered."""
        frames = size = replayed = 0
        ledger = self._ledger
        while ledger and ledger[-1][0] > sent:
            end, count, from_log, runs = ledger.pop()
            data = b"".join(runs)
            whole, kept = _whole(data, sent - (end - len(data)))
            lost = count and count - whole
            frames += lost
            size += len(data) - kept
            replayed += lost if from_log else 0
        if size:
            self.accounting.recalled(self.stats, frames, size, replayed)

    def flushAndClose(self, deadline: float) -> None:
        """
        Hand everything queued to the transport and close the connection once
        it is written, or abort it after C{deadline} seconds if the client
        does not take it.
        """
        if self.closed:
            return
        while self.queue:
            item = self.queue.popleft()
            if item is not _REPLAY:
                runs, frames, size = item
                self._dequeued(frames, size)
                self.write(runs, frames, size)
        self.close()
        transport = self.transport
        cast(IConsumer, transport).unregisterProducer()
        transport.loseConnection()
        self._closeDeadline = self.clock.callLater(deadline, self.hangUp)

    def disconnected(self) -> None:
        """The connection is gone: no deadline is needed any more."""
        self.close()
        if self._closeDeadline is not None and self._closeDeadline.active():
            self._closeDeadline.cancel()


#: Reads of at most 64 KiB each that L{_closeInOrder} discards.
_DISCARD_READS = 64


def _closeInOrder(held: FileDescriptor) -> None:
    """
    Close C{held} as Twisted closes a connection whose buffer is written,
    after discarding what the client sent and the relay did not read: a
    socket closed with unread bytes is reset, and a reset throws away what
    the kernel still had to deliver.
    """
    handle = getattr(held, "socket", None)
    if isinstance(handle, socket.socket):
        try:
            for _ in range(_DISCARD_READS):
                if not handle.recv(1 << 16, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
    held.connectionLost(Failure(ConnectionDone()))


def _whole(data: bytes, written: int) -> tuple[int, int]:
    """
    How many frames at the start of C{data} lie wholly within its first
    C{written} bytes, and how many bytes they take.
    """
    frames = position = 0
    while position + HEADER_SIZE <= written:
        end = position + HEADER_SIZE + UINT32.unpack_from(data, position + PAYLOAD_SIZE_OFFSET)[0]
        if end > written:
            break
        frames, position = frames + 1, end
    return frames, position


class PublisherGate:
    """
    Holds every publisher back, by pausing the transports' reading so the
    kernel pushes back on the publishers, while anything holds it: an
    outbox over its high-water mark (block policy), or the audit log when it
    cannot be written. A client stuck over the mark longer than the stall
    timeout is cut off, so no such pause lasts longer than that.

    @param publishers: the transports to pause, read at each pause and resume.
    """

    log = RelayLogger(namespace="relay")

    def __init__(
        self, clock: IReactorTime, publishers: Callable[[], Iterable[IPushProducer]]
    ) -> None:
        self.clock = clock
        self.publishers = publishers
        #: Set once the relay drains: the publishers are never resumed.
        self.draining = False
        #: What holds the publishers back: why, and its stall timer if it has one.
        self.blockers: dict[object, tuple[str, IDelayedCall | None]] = {}
        self.paused_since: float | None = None
        self.pauses = 0
        self.paused_seconds = 0.0
        self.longest_pause = 0.0

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def block(self, outbox: Outbox) -> None:
        """Hold the publishers back until C{outbox} is under its low-water mark."""
        timeout = outbox.settings.stall_timeout
        self.hold(
            outbox,
            f"client {outbox.stats.client_id} is over the high-water mark "
            f"({outbox.queued} bytes queued)",
            self.clock.callLater(timeout, self._stalled, outbox, timeout),
        )

    def hold(self, holder: object, why: str, timer: IDelayedCall | None = None) -> None:
        """Hold the publishers back until L{unblock}C{(holder)}."""
        self.blockers[holder] = (why, timer)
        if self.paused_since is not None:
            self.log.info("publishers held back as well: {why}", why=why)
            return
        self.paused_since = self.clock.seconds()
        self.pauses += 1
        self.log.info("publishers paused: {why}", why=why)
        for publisher in self.publishers():
            publisher.pauseProducing()

    def unblock(self, holder: object) -> None:
        if holder not in self.blockers:
            return
        _, call = self.blockers.pop(holder)
        if call is not None and call.active():
            call.cancel()
        if not self.blockers and self.paused_since is not None:
            pause = self.clock.seconds() - self.paused_since
            self.paused_since = None
            self.paused_seconds += pause
            self.longest_pause = max(self.longest_pause, pause)
            if not self.draining:
                self.log.info("publishers resumed after {pause:.3f}s", pause=pause)
                for publisher in self.publishers():
                    publisher.resumeProducing()

    def joined(self, publisher: IPushProducer) -> None:
        """A client connecting while publishers are held back is held back too."""
        if self.paused:
            publisher.pauseProducing()

    def _stalled(self, outbox: Outbox, timeout: float) -> None:
        outbox.cut(
            STALLED_CONSUMER,
            f"over the high-water mark for {timeout:g}s with {outbox.queued} bytes queued",
        )


class Draining(Protocol):
    """A connected client as a drain sees it (a L{protocol.RelayProtocol})."""

    stats: ClientStats
    outbox: Outbox
    transport: ITransport


class Drain:
    """
    A relay's shutdown: stop reading from every client, give what is queued
    for them at most C{timeout} seconds to be written, then close whatever
    is left. C{done} fires once every client is gone.

    @param clients: the connected clients, a live view: those left at the
        timeout are closed.
    """

    log = RelayLogger(namespace="relay")

    def __init__(self, clients: Collection[Draining], clock: IReactorTime, timeout: float) -> None:
        self.done: Deferred[None] = Deferred()
        if not clients:
            self.done.callback(None)
            return
        for client in tuple(clients):
            client.transport.pauseProducing()  # type: ignore[attr-defined]
            client.outbox.flushAndClose(timeout)
        timer = clock.callLater(timeout, self._timedOut, clients, timeout)
        self.done.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def left(self, remaining: int) -> None:
        """A client is gone; C{remaining} are still connected."""
        if not remaining and not self.done.called:
            self.done.callback(None)

    def _timedOut(self, clients: Collection[Draining], timeout: float) -> None:
        for client in tuple(clients):
            self.log.error(
                "client {client_id} did not take all its data within the drain "
                "timeout of {timeout}s; closing it",
                client_id=client.stats.client_id,
                timeout=timeout,
            )
            client.outbox.hangUp()
