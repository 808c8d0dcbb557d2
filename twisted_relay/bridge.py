"""
The NATS bridge (C{--nats}): relays on several hosts share their streams
through a NATS cluster. The bridge is one more peer of its relay's
broadcast: accepted local frames go out to C{torq.<domain>.<origin>}, one
NATS message per run of whole frames (never one per frame), and frames from
other origins come in and are broadcast to the local clients through the
same write-ahead log and delivery policies. No loops: the connection is
C{no_echo}, each message's origin token is checked on receipt, and what came
in from NATS is never published again.

It needs Twisted's asyncio reactor (nats-py runs on asyncio); this module is
imported only when C{--nats} is given.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nats
from nats.errors import SlowConsumerError
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .ratelimit import RateLimiter
from .wire import HEADER_SIZE, MAGIC, ROUTING

if TYPE_CHECKING:
    from .relay import ClientStats, RelayFactory

#: Bytes of outbound chunks the bridge keeps before it drops whole chunks.
DEFAULT_HIGH_WATER = 8 * 1024 * 1024


@dataclass
class BridgeCounters:
    """What crossed the bridge, and what did not."""

    frames_out: int = 0
    chunks_out: int = 0
    frames_in: int = 0
    chunks_in: int = 0
    chunks_dropped: int = 0
    frames_dropped: int = 0
    echoes: int = 0
    malformed: int = 0
    slow_consumer: int = 0
    reconnects: int = 0
    connected: bool = False
    servers: list[str] = field(default_factory=list)


class _Peer:
    """The bridge as a sender in the relay's counters and audit log (client id 0)."""

    def __init__(self) -> None:
        from .relay import ClientStats

        self.stats: ClientStats = ClientStats(client_id=0, peer="NATS bridge")


class NatsBridge(Service):
    """Connects the relay to NATS and carries its broadcast both ways."""

    log = Logger()

    def __init__(
        self,
        relay: RelayFactory,
        servers: list[str],
        origin: str,
        high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        self.relay = relay
        self.servers = servers
        self.origin = origin
        self.high_water = high_water
        self.subject = f"torq.{relay.logic.name}.{origin}"
        self.peer = _Peer()
        self.counters = BridgeCounters(servers=servers)
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued = 0
        self._nc = None
        self._wakeup = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self._sampled = RateLimiter(relay.clock)
        relay.bridge = self

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromFuture(asyncio.ensure_future(self._connect()))
        self._started.addErrback(
            lambda failure: self.log.failure("NATS bridge did not start", failure)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromFuture(asyncio.ensure_future(self._close()))

    async def _connect(self) -> None:
        self._nc = await nats.connect(
            servers=self.servers,
            name=f"twisted_relay {self.relay.logic.name} {self.origin}",
            no_echo=True,
            # The first server listed is this host's; the others are failover.
            dont_randomize=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
        )
        self.counters.connected = True
        await self._nc.subscribe(
            f"torq.{self.relay.logic.name}.*", cb=self._received, pending_bytes_limit=64 * 1024 * 1024
        )
        await self._nc.flush()
        self._pump = asyncio.ensure_future(self._send())
        self.log.info(
            "NATS bridge connected to {server} as origin {origin}: publishing to "
            "{subject}, receiving torq.{domain}.*",
            server=self._nc.connected_url.netloc if self._nc.connected_url else "?",
            origin=self.origin,
            subject=self.subject,
            domain=self.relay.logic.name,
        )

    async def _close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()

    def publish(self, runs: list[bytes], frames: int) -> None:
        """
        Queue the frames the relay just accepted, as one message; over the
        high-water mark the chunk is dropped whole and counted.
        """
        data = runs[0] if len(runs) == 1 else b"".join(runs)
        if self.queued + len(data) > self.high_water:
            counters = self.counters
            counters.chunks_dropped += 1
            counters.frames_dropped += frames
            held = self._sampled.allow("dropped")
            if held is not None:
                self.log.warn(
                    "NATS bridge: dropped {frames} frames, its outbound queue is at the "
                    "high-water mark of {high_water} bytes ({frames_dropped} dropped so far)",
                    frames=frames,
                    high_water=self.high_water,
                    frames_dropped=counters.frames_dropped,
                )
            return
        self.queue.append((data, frames))
        self.queued += len(data)
        self._wakeup.set()

    async def _send(self) -> None:
        """Hand the queued chunks to nats-py, which pushes back while its buffer is full."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.queue:
                data, frames = self.queue[0]
                await self._nc.publish(self.subject, data)
                self.queue.popleft()
                self.queued -= len(data)
                self.counters.chunks_out += 1
                self.counters.frames_out += frames

    async def _received(self, msg) -> None:
        """Frames from another relay: checked, then broadcast like a local publisher's."""
        origin = msg.subject.rpartition(".")[2]
        if origin == self.origin:
            self.counters.echoes += 1
            return
        data = msg.data
        frames = _count_frames(data, self.relay.sequences)
        if frames is None:
            self.counters.malformed += 1
            self.log.error(
                "NATS bridge: a message from {origin} on {subject} is not whole frames; "
                "dropped ({size} bytes)",
                origin=origin,
                subject=msg.subject,
                size=len(data),
            )
            return
        self.counters.chunks_in += 1
        self.counters.frames_in += frames
        self.relay.broadcast(self.peer, [data], frames)

    async def _error(self, error: Exception) -> None:
        if isinstance(error, SlowConsumerError):
            self.counters.slow_consumer += 1
            held = self._sampled.allow("slow consumer")
            if held is not None:
                self.log.warn(
                    "NATS bridge: messages from NATS dropped by the client, the relay is a "
                    "slow consumer ({count} so far)",
                    count=self.counters.slow_consumer,
                )
            return
        self.log.warn("NATS bridge: {error}", error=repr(error))

    async def _disconnected(self) -> None:
        self.counters.connected = False
        self.log.warn("NATS bridge disconnected; reconnecting")

    async def _reconnected(self) -> None:
        self.counters.connected = True
        self.counters.reconnects += 1
        self.log.info(
            "NATS bridge reconnected to {server}",
            server=self._nc.connected_url.netloc if self._nc.connected_url else "?",
        )


def _count_frames(data: bytes, sequences: dict[int, int]) -> int | None:
    """
    The number of whole frames C{data} is made of, or None if it is not
    that; the last sequence of each source goes into C{sequences}.
    """
    unpack, offset, count, end = ROUTING.unpack_from, 0, 0, len(data)
    last: dict[int, int] = {}
    while offset + HEADER_SIZE <= end:
        magic, _, _, source, sequence, size = unpack(data, offset)
        if magic != MAGIC:
            return None
        last[source] = sequence
        offset += HEADER_SIZE + size
        count += 1
    if offset != end or not count:
        return None
    sequences.update(last)
    return count
