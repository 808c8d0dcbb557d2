"""
The relay proper: the registry of connected clients, their counters, and the
fan-out of accepted frames to every client but the sender.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .control import Subscription
from .delivery import DeliverySettings, Outbox, PublisherGate
from .interfaces import IRelayLogic
from .protocol import RelayProtocol
from .ratelimit import RateLimiter
from .validation import FramePolicy
from .wire import HEADER_SIZE, FrameError, Header, unpack_header

_PEERCRED = struct.Struct("3i")

#: The subscription of a client that has not asked for anything else.
EVERYTHING = Subscription()


def describe_peer(transport: ITransport) -> str:
    """
    Who is on the other end: the process id, uid and gid of a Unix socket
    peer (from SO_PEERCRED), or the address of a network peer.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if (
        isinstance(handle, socket.socket)
        and handle.family == socket.AF_UNIX
        and hasattr(socket, "SO_PEERCRED")
    ):
        creds = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        pid, uid, gid = _PEERCRED.unpack(creds)
        return f"pid {pid} uid {uid} gid {gid}"
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


@dataclass(slots=True)
class Counters:
    """
    Traffic counters. C{frames_in} counts accepted frames; C{bytes_in} every
    byte read, accepted or not; C{frames_out} frames handed to a client's
    transport; C{rejects} the refused frames by reason; C{frames_dropped} the
    frames the drop policy did not deliver; C{frames_lost} the frames still
    queued for a client when its connection ended; the sequence counters what
    publishers' C{sequence} fields gave away (frames missing, repeated, going
    backwards).
    """

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    frames_dropped: int = 0
    bytes_dropped: int = 0
    frames_lost: int = 0
    bytes_lost: int = 0
    control_frames: int = 0
    sequence_gaps: int = 0
    sequence_duplicates: int = 0
    sequence_regressions: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    cut_offs: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class ClientStats(Counters):
    """One connected client: who it is, since when, and its traffic."""

    client_id: int = 0
    peer: str = ""
    connected_at: float = 0.0
    role: str = EVERYTHING.role
    #: Why the relay closed this connection, if it did.
    close_reason: str = ""


class RelayFactory(ServerFactory):
    """
    Tracks the connected clients and broadcasts every accepted frame to all of
    them except its sender (unless C{echo}), each through its L{Outbox}.

    L{broadcast} is the one place where accepted frames enter fan-out.
    """

    protocol = RelayProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        logic: IRelayLogic,
        policy: FramePolicy,
        *,
        delivery: DeliverySettings | None = None,
        echo: bool = False,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.logic = logic
        self.policy = policy
        self.delivery = delivery or DeliverySettings.for_logic(logic)
        self.echo = echo
        self.clock = clock
        #: Connected clients by id, in connection order.
        self.clients: dict[int, RelayProtocol] = {}
        self.totals = Counters()
        self.connections = 0
        self.gate = PublisherGate(self, clock)
        self.draining = False
        #: When a client was last dropped from, cut off or lost frames.
        self.last_trouble: float | None = None
        self._ids = itertools.count(1)
        self._sampledLog = RateLimiter(clock)
        self._drained: Deferred[None] | None = None

    def register(self, client: RelayProtocol) -> ClientStats:
        """Add a newly connected client; returns its counters."""
        stats = ClientStats(
            client_id=next(self._ids),
            peer=describe_peer(client.transport),
            connected_at=self.clock.seconds(),
        )
        client.stats = stats
        client.subscription = EVERYTHING
        client.outbox = Outbox(self, client)
        self.clients[stats.client_id] = client
        self.connections += 1
        self.gate.joined(client)
        self.log.info(
            "client {client_id} connected ({peer}); {clients} connected",
            client_id=stats.client_id,
            peer=stats.peer,
            clients=len(self.clients),
        )
        return stats

    def unregister(self, client: RelayProtocol, reason: Failure) -> None:
        """Forget a client whose connection is gone."""
        stats = client.stats
        client.outbox.disconnected()
        del self.clients[stats.client_id]
        self._sampledLog.forget(("dropped", stats.client_id))
        self.log.info(
            "client {client_id} disconnected after {duration:.3f}s "
            "({reason}): {frames_in} frames in, {frames_out} out, "
            "{frames_dropped} dropped, {frames_lost} lost, {rejected} rejected; "
            "{clients} connected",
            client_id=stats.client_id,
            duration=self.clock.seconds() - stats.connected_at,
            reason=stats.close_reason or reason.getErrorMessage(),
            frames_in=stats.frames_in,
            frames_out=stats.frames_out,
            frames_dropped=stats.frames_dropped,
            frames_lost=stats.frames_lost,
            rejected=sum(stats.rejects.values()),
            rejects=dict(stats.rejects),
            clients=len(self.clients),
        )
        if self._drained is not None and not self.clients:
            self._drained.callback(None)

    def subscribe(self, client: RelayProtocol, subscription: Subscription) -> None:
        """Replace what C{client} receives."""
        if subscription == EVERYTHING:
            subscription = EVERYTHING
        client.subscription = subscription
        client.stats.role = subscription.role

    def received(self, sender: RelayProtocol, size: int) -> None:
        """Count bytes read from C{sender}, before framing."""
        sender.stats.bytes_in += size
        self.totals.bytes_in += size

    def broadcast(self, sender: RelayProtocol, runs: list[bytes], frames: int) -> None:
        """
        Send C{runs}, contiguous slices holding C{frames} accepted frames, to
        every client but C{sender}, each through its outbox. A client with a
        filtered subscription gets the frames it wants, picked one by one. A
        client whose write fails is cut off; the others are not affected.
        """
        size = sum(map(len, runs))
        sender.stats.frames_in += frames
        self.totals.frames_in += frames
        echo = self.echo
        picking: list[tuple[bytes, int, int, Header]] | None = None
        for client in tuple(self.clients.values()):
            if client is sender and not echo:
                continue
            subscription = client.subscription
            if subscription is EVERYTHING:
                self._deliver(client, runs, frames, size)
            elif not subscription.publish_only:
                if picking is None:
                    picking = list(_frames_in(runs))
                picked = [run[s:e] for run, s, e, header in picking if subscription.wants(run, s, e, header)]
                if picked:
                    self._deliver(client, picked, len(picked), sum(map(len, picked)))

    def _deliver(self, client: RelayProtocol, runs: list[bytes], frames: int, size: int) -> None:
        try:
            client.outbox.send(runs, frames, size)
        except Exception:
            self.log.failure(
                "write to client {client_id} failed; disconnecting it",
                client_id=client.stats.client_id,
            )
            client.outbox.close()
            client.transport.abortConnection()

    def delivered(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames handed to C{client}'s transport."""
        stats, totals = client.stats, self.totals
        stats.frames_out += frames
        stats.bytes_out += size
        totals.frames_out += frames
        totals.bytes_out += size

    def lost(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames still queued for C{client} when its connection ended."""
        self.last_trouble = self.clock.seconds()
        stats, totals = client.stats, self.totals
        stats.frames_lost += frames
        stats.bytes_lost += size
        totals.frames_lost += frames
        totals.bytes_lost += size

    def dropped(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames the drop policy did not deliver to C{client}."""
        self.last_trouble = self.clock.seconds()
        stats, totals = client.stats, self.totals
        stats.frames_dropped += frames
        stats.bytes_dropped += size
        totals.frames_dropped += frames
        totals.bytes_dropped += size
        held = self._sampledLog.allow(("dropped", stats.client_id))
        if held is not None:
            self.log.warn(
                "slow client {client_id}: dropped {frames} frames ({frames_dropped} so "
                "far), its queue is at the high-water mark of {high_water} bytes",
                client_id=stats.client_id,
                frames=frames,
                frames_dropped=stats.frames_dropped,
                high_water=self.delivery.high_water,
            )

    def cutOff(self, client: RelayProtocol, reason: str, detail: str) -> None:
        """Count and log that C{client} is being disconnected by the relay."""
        self.last_trouble = self.clock.seconds()
        client.stats.cut_offs[reason] += 1
        client.stats.close_reason = reason
        self.totals.cut_offs[reason] += 1
        self.log.warn(
            "disconnecting client {client_id} ({reason}): {detail}",
            client_id=client.stats.client_id,
            reason=reason,
            detail=detail,
        )

    def rejected(self, sender: RelayProtocol, error: FrameError) -> None:
        """Count a refused frame and log it, at a bounded rate per reason."""
        sender.stats.rejects[error.reason] += 1
        self.totals.rejects[error.reason] += 1
        held = self._sampledLog.allow(error.reason)
        if held is not None and error.fatal:
            self.log.error(
                "closing client {client_id}: {error}; header bytes {header}{held_back}",
                client_id=sender.stats.client_id,
                error=str(error),
                reason=error.reason,
                header=error.header.hex(" "),
                held_back=f" ({held} more since the last report)" if held else "",
            )
        elif held is not None:
            self.log.warn(
                "dropped frame ({reason}): {error}{held_back}",
                reason=error.reason,
                error=str(error),
                client_id=sender.stats.client_id,
                held_back=f" ({held} more since the last report)" if held else "",
            )

    def sequenceAnomaly(
        self, sender: RelayProtocol, kind: str, source: int, sequence: int, last: int
    ) -> None:
        """
        Log a gap, duplicate or regression in a publisher's sequence: every
        one on a lossless (block) relay, a bounded number per second otherwise.
        """
        held = 0
        if self.delivery.policy != "block":
            held = self._sampledLog.allow(("sequence", kind))
            if held is None:
                return
        self.log.warn(
            "sequence {kind} from client {client_id}, source {source}: {sequence} "
            "after {last}{held_back}",
            kind=kind,
            client_id=sender.stats.client_id,
            source=source,
            sequence=sequence,
            last=last,
            held_back=f" ({held} more since the last report)" if held else "",
        )

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Stop reading from every client, give what is queued for them at most
        C{timeout} seconds to be written, then close whatever is left.
        """
        self.draining = True
        self._drained = drained = Deferred()
        if not self.clients:
            drained.callback(None)
            return drained
        for client in tuple(self.clients.values()):
            client.transport.pauseProducing()
            client.outbox.flushAndClose(timeout)
        timer = self.clock.callLater(timeout, self._drainTimedOut, timeout)

        def finished(result: None) -> None:
            if timer.active():
                timer.cancel()

        return drained.addCallback(finished)

    def _drainTimedOut(self, timeout: float) -> None:
        for client in tuple(self.clients.values()):
            self.log.error(
                "client {client_id} did not take all its data within the drain "
                "timeout of {timeout}s; closing it",
                client_id=client.stats.client_id,
                timeout=timeout,
            )
            client.transport.abortConnection()


def _frames_in(runs: list[bytes]) -> Iterator[tuple[bytes, int, int, Header]]:
    """C{(run, start, end, header)} for each frame of runs of whole frames."""
    for run in runs:
        offset = 0
        while offset < len(run):
            header = unpack_header(run, offset)
            end = offset + HEADER_SIZE + header.payload_size
            yield run, offset, end, header
            offset = end
