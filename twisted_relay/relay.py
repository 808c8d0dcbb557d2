"""
The relay proper: the registry of connected clients, their counters, and the
fan-out of accepted frames to every client but the sender.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .interfaces import IRelayLogic
from .protocol import RelayProtocol
from .ratelimit import RateLimiter
from .validation import FramePolicy
from .wire import FrameError


_PEERCRED = struct.Struct("3i")


def describe_peer(transport: ITransport) -> str:
    """
    Who is on the other end: the process id, uid and gid of a Unix socket
    peer (from SO_PEERCRED), or the address of a network peer.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if isinstance(handle, socket.socket) and handle.family == socket.AF_UNIX:
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
    byte read, accepted or not; C{rejects} the refused frames by reason.
    """

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    rejects: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class ClientStats(Counters):
    """One connected client: who it is, since when, and its traffic."""

    client_id: int = 0
    peer: str = ""
    connected_at: float = 0.0


class RelayFactory(ServerFactory):
    """
    Tracks the connected clients and broadcasts every accepted frame to all of
    them except its sender (unless C{echo}).

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
        echo: bool = False,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.logic = logic
        self.policy = policy
        self.echo = echo
        self.clock = clock
        #: Connected clients by id, in connection order.
        self.clients: dict[int, RelayProtocol] = {}
        self.totals = Counters()
        self.connections = 0
        self._ids = itertools.count(1)
        self._rejectLog = RateLimiter(clock)

    def register(self, client: RelayProtocol) -> ClientStats:
        """Add a newly connected client; returns its counters."""
        stats = ClientStats(
            client_id=next(self._ids),
            peer=describe_peer(client.transport),
            connected_at=self.clock.seconds(),
        )
        self.clients[stats.client_id] = client
        self.connections += 1
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
        del self.clients[stats.client_id]
        self.log.info(
            "client {client_id} disconnected after {duration:.3f}s "
            "({reason}): {frames_in} frames in, {frames_out} out, "
            "{rejected} rejected; {clients} connected",
            client_id=stats.client_id,
            duration=self.clock.seconds() - stats.connected_at,
            reason=reason.getErrorMessage(),
            frames_in=stats.frames_in,
            frames_out=stats.frames_out,
            rejected=sum(stats.rejects.values()),
            rejects=dict(stats.rejects),
            clients=len(self.clients),
        )

    def received(self, sender: RelayProtocol, size: int) -> None:
        """Count bytes read from C{sender}, before framing."""
        sender.stats.bytes_in += size
        self.totals.bytes_in += size

    def broadcast(self, sender: RelayProtocol, runs: list[bytes], frames: int) -> None:
        """
        Send C{runs}, contiguous slices holding C{frames} accepted frames,
        to every client but C{sender}. A client whose write fails is cut off;
        the others are not affected.
        """
        size = sum(map(len, runs))
        sender.stats.frames_in += frames
        totals = self.totals
        totals.frames_in += frames
        echo = self.echo
        for client in tuple(self.clients.values()):
            if client is sender and not echo:
                continue
            try:
                if len(runs) == 1:
                    client.transport.write(runs[0])
                else:
                    client.transport.writeSequence(runs)
            except Exception:
                self.log.failure(
                    "write to client {client_id} failed; disconnecting it",
                    client_id=client.stats.client_id,
                )
                client.transport.abortConnection()
                continue
            stats = client.stats
            stats.frames_out += frames
            stats.bytes_out += size
            totals.frames_out += frames
            totals.bytes_out += size

    def rejected(self, sender: RelayProtocol, error: FrameError) -> None:
        """Count a refused frame and log it, at a bounded rate per reason."""
        sender.stats.rejects[error.reason] += 1
        self.totals.rejects[error.reason] += 1
        if error.fatal:
            self.log.error(
                "closing client {client_id}: {error}; header bytes {header}",
                client_id=sender.stats.client_id,
                error=str(error),
                reason=error.reason,
                header=error.header.hex(" "),
            )
            return
        held = self._rejectLog.allow(error.reason)
        if held is not None:
            self.log.warn(
                "dropped frame ({reason}): {error}{held_back}",
                reason=error.reason,
                error=str(error),
                client_id=sender.stats.client_id,
                held_back=f" ({held} more since the last report)" if held else "",
            )
