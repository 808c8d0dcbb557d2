"""
The bridge's inbound side: frames from other relays, through the relay's own
ingest (one per origin), broadcast to the local clients through the same
write-ahead log and delivery policies as a local publisher's.

No loops: the connection is C{no_echo}, each message's origin token is
checked on receipt, and what came in from NATS is never published again.
From a lossless domain's stream, each receiving relay reads with its own
durable consumer, in stream order, delivers each stream sequence once, and
acknowledges a message only once its frames are in the audit log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from ..engine.accounting import ClientStats
from ..engine.ingest import Ingest
from ..engine.logger import RelayLogger
from ..engine.relay import RelayFactory
from ..ratelimit import RateLimiter
from .messages import BridgeCounters, origin_of

#: Other relays tracked at once; past that the longest known is forgotten.
_MAX_ORIGINS = 1024


class Inbound:
    """
    What the bridge takes from NATS.

    @param receiving: whether the bridge still takes messages; no longer
        once a stop begins.
    @param own_prefix: how this relay's own stream message ids begin, so an
        echo of its own can be told from another relay using its origin.
    """

    log = RelayLogger(namespace="relay.nats")

    def __init__(
        self,
        relay: RelayFactory,
        origin: str,
        *,
        durable: bool,
        own_prefix: str,
        counters: BridgeCounters,
        sampled: RateLimiter,
        receiving: Callable[[], bool],
    ) -> None:
        self.relay = relay
        self.origin = origin
        self.durable = durable
        self.own_prefix = own_prefix
        self.counters = counters
        self.receiving = receiving
        self._sampled = sampled
        #: The other relays heard from, by origin, in the order first heard.
        self.peers: dict[str, Ingest] = {}
        #: The last stream sequence delivered locally (JetStream).
        self.delivered = 0
        self._gapCheckedAt = 0.0
        self._fetchFailing = False

    async def received(self, msg) -> None:
        """A core NATS message."""
        self.deliver(msg)

    def deliver(self, msg) -> Ingest | None:
        """
        Frames from another relay: checked, then broadcast like a local
        publisher's; returns the peer they came through (C{None}: ignored).
        """
        origin = origin_of(msg.subject)
        if origin == self.origin:
            self.counters.echoes += 1
            own = self.durable and (msg.headers or {}).get("Nats-Msg-Id", "").startswith(
                self.own_prefix
            )
            if not own:
                self._sampled.log(
                    "relay id",
                    self.log.error,
                    "NATS bridge: another relay publishes as {origin}: its frames are "
                    "ignored here; give each relay its own --relay-id",
                    origin=origin,
                )
            return None
        peer = self.peers.get(origin)
        if peer is None:
            if len(self.peers) >= _MAX_ORIGINS:
                del self.peers[next(iter(self.peers))]
            peer = self.peers[origin] = self._peer(origin)
        stats = peer.stats
        accepted, refused = stats.frames_in, sum(stats.rejects.values())
        # A message holds whole frames: one that breaks off ends there.
        peer.feed(msg.data)
        peer.end("a NATS message ends")
        counters = self.counters
        counters.chunks_in += 1
        counters.frames_in += stats.frames_in - accepted
        refused = sum(stats.rejects.values()) - refused
        if refused:
            counters.malformed += 1
            self._sampled.log(
                "malformed",
                self.log.error,
                "NATS bridge: refused {refused} frames of a message of {size} bytes from "
                "{origin} on {subject} (the reasons are logged as client 0's)",
                refused=refused,
                size=len(msg.data),
                origin=origin,
                subject=msg.subject,
            )
        return peer

    def _peer(self, origin: str) -> Ingest:
        """
        The bridge as one publisher of its relay for the frames of C{origin},
        client id 0 in the counters and the audit log. Each NATS message goes
        through the relay's own scan and checks, as a local client's bytes do:
        another relay checked its frames, but NATS is open to more than
        relays. Control frames are a local client's: from NATS they are
        filtered. One per origin, so each relay's sequences are tracked apart.
        """
        return Ingest(
            self.relay,
            ClientStats(client_id=0, peer=f"NATS bridge, origin {origin}"),
            onControl=None,
            onFramingLost=None,
            bridged=True,
            lost_framing="NATS bridge: dropped the rest of a message from client {client_id}",
        )

    async def receiveDurably(self, consumer, js, stream: str, current: Callable[[], bool]) -> None:
        """
        Deliver the stream's messages from other relays, in stream order, once
        each, while C{current()} (C{consumer} is the bridge's); a message is
        acknowledged only once its frames are in the audit log, so what the
        stream lets go of is on this host.
        """
        while self.receiving() and current():
            if self.relay.gate.paused:
                # Local subscribers or the audit log hold the relay back: the
                # stream keeps the messages meanwhile.
                await asyncio.sleep(0.05)
                continue
            try:
                messages = await consumer.fetch(256, timeout=1)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except NatsError as e:
                self._sampled.log(
                    "fetch",
                    self.log.warn,
                    "NATS bridge: reading the stream failed ({error}); trying again",
                    error=repr(e),
                )
                self._fetchFailing = True
                await asyncio.sleep(0.5)
                continue
            if self._fetchFailing:
                self._fetchFailing = False
                self.log.info("NATS bridge: reading the stream again")
            for msg in messages:
                if not self.receiving():
                    return  # the rest is not acknowledged: the stream keeps it
                sequence = msg.metadata.sequence.stream
                if sequence <= self.delivered:
                    self.counters.duplicates += 1
                elif sequence != self.delivered + 1 and not await self._skipGap(
                    js, stream, sequence
                ):
                    # An earlier message is still to be redelivered: this one
                    # comes again after it.
                    continue
                else:
                    if not (self.receiving() and current()):
                        return  # stopped while it looked for a gap
                    # An unexpected error here restarts this loop with the
                    # message unacknowledged and not counted as delivered.
                    peer = self.deliver(msg)
                    self.delivered = sequence
                    if peer is not None and not await self.logged(peer):
                        return
                try:
                    await msg.ack()
                except NatsError:
                    pass  # it will be redelivered, and left out as a duplicate

    async def logged(self, peer: Ingest) -> bool:
        """
        Wait while the audit log holds back the frames just taken from
        C{peer}. C{False} if the bridge stops receiving first (or its
        connection is replaced): then the frames from NATS not yet in the
        log are taken back, since the stream, which had no acknowledgement
        for them, delivers them again.
        """
        writeahead = self.relay.writeahead
        try:
            while writeahead is not None and writeahead.holds(peer):
                if not self.receiving():
                    self.withdraw()
                    return False
                if writeahead.failure is None:
                    # With the log's writer: look again as soon as a batch landed.
                    await writeahead.landed(0.05).asFuture(asyncio.get_running_loop())
                else:
                    await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.withdraw()
            raise
        return True

    def withdraw(self) -> None:
        """Take back the frames from NATS that the audit log still holds."""
        writeahead = self.relay.writeahead
        frames = 0 if writeahead is None else writeahead.withdraw()
        # Their sequences come again: each origin's tracking starts afresh.
        self.peers.clear()
        if frames:
            self.log.warn(
                "NATS bridge: {frames} frames from NATS were not in the audit log yet; "
                "left to the stream, which delivers them again",
                frames=frames,
            )

    async def _skipGap(self, js, stream: str, sequence: int) -> bool:
        """
        Whether the stream messages before C{sequence} that were not delivered
        here are gone (removed by the stream's limits while this relay was
        away): then they are counted and logged, and C{sequence} is next.
        """
        now = time.monotonic()
        if now - self._gapCheckedAt < 1.0:
            return False
        self._gapCheckedAt = now
        try:
            first = (await js.stream_info(stream)).state.first_seq
        except (NatsError, asyncio.TimeoutError):
            return False  # the stream is electing a leader, say: wait
        if first <= self.delivered + 1:
            return False
        self.counters.stream_gaps += first - self.delivered - 1
        self.log.error(
            "NATS bridge: stream {stream} messages {low}-{high} expired before this relay "
            "read them",
            stream=stream,
            low=self.delivered + 1,
            high=first - 1,
        )
        self.delivered = first - 1
        return sequence == first
