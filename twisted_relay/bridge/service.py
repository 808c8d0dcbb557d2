"""
The NATS bridge (C{--nats}): relays on several hosts share their streams
through a NATS cluster. The bridge is one more peer of its relay's
broadcast: accepted local frames go out to C{torq.<domain>.<origin>}, one
NATS message per run of whole frames (never one per frame), and frames from
other origins come in and are broadcast to the local clients through the
same write-ahead log and delivery policies. No loops: the connection is
C{no_echo}, each message's origin token is checked on receipt, and what came
in from NATS is never published again.

Lossless domains (slow-consumer policy C{block}: execution) go through
JetStream: a file-backed stream on C{torq.<domain>.>}, each message with a
C{Nats-Msg-Id} made of its origin and the first and last sequence of each
source it carries; a message is published again, with the same id, until
the stream acknowledges it (the stream drops the duplicates), one at a time
so the stream keeps the relay's order; and while too much waits to be
acknowledged the relay's publishers are held back rather than anything
dropped. Each receiving relay reads with its own durable consumer, in stream
order, and delivers each stream sequence once. Other domains use core NATS:
over the bridge's high-water mark whole chunks are dropped and counted.

It needs Twisted's asyncio reactor (nats-py runs on asyncio); this module is
imported only when C{--nats} is given.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import nats
from nats.errors import Error as NatsError
from nats.errors import SlowConsumerError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..engine.accounting import ClientStats
from ..engine.delivery import HIGH_WATER
from ..engine.ingest import Ingest
from ..engine.relay import RelayFactory
from ..ratelimit import RateLimiter
from ..wire import frame_spans

#: Bytes of a message's room kept for its headers within the server's max_payload.
_HEADER_ROOM = 4096
#: Seconds to wait for the stream's acknowledgement before publishing again.
_ACK_TIMEOUT = 2.0
#: Longest wait between two attempts: retrying goes on for as long as it takes.
_MAX_BACKOFF = 2.0
#: Seconds a stopping bridge gives its connection to drain.
_CLOSE_TIMEOUT = 3.0
#: Other relays tracked at once; past that the longest known is forgotten.
_MAX_ORIGINS = 1024
#: How long the stream keeps messages.
STREAM_MAX_AGE = 24 * 3600.0


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
    retries: int = 0
    duplicates: int = 0
    stream_gaps: int = 0
    failures: int = 0
    slow_consumer: int = 0
    reconnects: int = 0
    connected: bool = False


class NatsBridge(Service):
    """Connects the relay to NATS and carries its broadcast both ways."""

    log = Logger()

    def __init__(
        self,
        relay: RelayFactory,
        servers: list[str],
        origin: str,
        high_water: int = HIGH_WATER,
        replicas: int = 0,
    ) -> None:
        self.relay = relay
        self.servers = servers
        self.origin = origin
        self.high_water = high_water
        #: JetStream replicas; 0 picks 3 when 3 or more servers are known, else 1.
        self.replicas = replicas
        #: Lossless domains go through JetStream.
        self.durable = relay.logic.delivery == "block"
        self.stream = f"TORQ_{relay.logic.name.upper()}"
        self.subject = f"torq.{relay.logic.name}.{origin}"
        #: What the bridge receives (and, for a lossless domain, what its stream holds).
        self.receiving = f"torq.{relay.logic.name}.>"
        #: The other relays heard from, by origin, in the order first heard.
        self.peers: dict[str, Ingest] = {}
        self.counters = BridgeCounters()
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued = 0
        self._nc = None
        self._consumer = None
        self._subscription = None
        #: Whether messages from NATS are taken; no longer once a stop begins.
        self._receiving = True
        self._receiver: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._holding = False
        #: The last stream sequence delivered locally (JetStream).
        self._delivered = 0
        self._boot = time.time_ns()
        self._messages = 0
        self._limit = 1024 * 1024 - _HEADER_ROOM
        self._gapCheckedAt = 0.0
        self._fetchFailing = False
        #: Whether a connection was set up, so that its closing means joining again.
        self._joined = False
        self._sampled = RateLimiter(relay.clock)

    def startService(self) -> None:
        super().startService()
        self._spawn(self._join, "joining NATS")

    def stopReceiving(self) -> Deferred[None]:
        """
        The first step of a stop, before the relay drains its clients: take
        nothing more from NATS, so that whatever was taken reaches them.
        """
        return Deferred.fromFuture(asyncio.ensure_future(self._stopReceiving()))

    def stopService(self) -> Deferred[None]:
        """After the drain: send what the local clients published, then close."""
        super().stopService()
        return Deferred.fromFuture(asyncio.ensure_future(self._close()))

    async def _stopReceiving(self) -> None:
        """
        Stream messages not taken yet stay in the stream (they are not
        acknowledged); core NATS messages already received are taken first.
        """
        if not self._receiving:
            return
        self._receiving = False
        if self._receiver is not None:
            await asyncio.wait([self._receiver], timeout=_CLOSE_TIMEOUT)
        try:
            if self._consumer is not None:
                await asyncio.wait_for(self._consumer.unsubscribe(), _CLOSE_TIMEOUT)
            elif self._subscription is not None:
                await asyncio.wait_for(self._subscription.drain(), _CLOSE_TIMEOUT)
        except (NatsError, asyncio.TimeoutError) as e:
            self.log.warn("NATS bridge: stopping its subscription: {error}", error=repr(e))

    async def _join(self) -> None:
        """Connect, and set up subscription or stream; until it works, however long."""
        delay = 0.5
        while self.running:
            try:
                await self._connect()
                return
            except (NatsError, OSError, asyncio.TimeoutError) as e:
                self.log.warn(
                    "NATS bridge: cannot join NATS yet ({error}); trying again in {delay:.1f}s",
                    error=repr(e),
                    delay=delay,
                )
                if self._nc is not None and not self._nc.is_closed:
                    await self._nc.close()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
            closed_cb=self._closed,
        )
        # Room for the message's headers within the server's limit.
        self._limit = self._nc.max_payload - _HEADER_ROOM
        self.counters.connected = True
        if self.durable:
            await self._joinStream()
        else:
            self._subscription = await self._nc.subscribe(
                self.receiving,
                cb=self._received,
                pending_bytes_limit=64 * 1024 * 1024,
            )
            await self._nc.flush()
            self._spawn(self._send, "publishing")
        self._joined = True
        self.log.info(
            "NATS bridge connected to {server} as origin {origin}: publishing to "
            "{subject}, receiving {receiving} ({mode})",
            server=self._nc.connected_url.netloc if self._nc.connected_url else "?",
            origin=self.origin,
            subject=self.subject,
            receiving=self.receiving,
            mode=f"JetStream stream {self.stream}" if self.durable else "core NATS",
        )

    async def _joinStream(self) -> None:
        """Create (or find) the domain's stream and this relay's durable consumer."""
        self._js = self._nc.jetstream()
        replicas = self.replicas or (3 if len(self._nc.servers) >= 3 else 1)
        subjects = [self.receiving]
        try:
            await self._js.add_stream(
                name=self.stream,
                subjects=subjects,
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=STREAM_MAX_AGE,
            )
        except NatsError as e:
            info = await self._js.stream_info(self.stream)
            self.log.warn(
                "NATS bridge: using the existing stream {stream} ({replicas} replicas): {error}",
                stream=self.stream,
                replicas=info.config.num_replicas,
                error=str(e),
            )
        self._consumer = await self._js.pull_subscribe(
            self.receiving,
            durable=f"relay-{self.origin}",
            stream=self.stream,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.NEW, ack_wait=_ACK_TIMEOUT * 2, max_ack_pending=65536
            ),
        )
        # Where this relay's consumer got to before (a restart): every stream
        # message up to it was delivered here and acknowledged, in order.
        self._delivered = (await self._consumer.consumer_info()).ack_floor.stream_seq
        self._spawn(self._sendDurably, "publishing to the stream")
        self._receiver = self._spawn(self._receiveDurably, "reading the stream")

    def _spawn(self, work, what: str) -> asyncio.Task:
        """
        Run C{work()} for the bridge's lifetime; if it fails, log the failure
        and run it again, so no part of the bridge stops silently.
        """

        async def guarded() -> None:
            while self.running:
                try:
                    await work()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.counters.failures += 1
                    self.log.failure("NATS bridge: {what} failed; starting it again", what=what)
                    await asyncio.sleep(1.0)

        task = asyncio.ensure_future(guarded())
        self._tasks.append(task)
        return task

    async def _endTasks(self) -> None:
        """
        Cancel the bridge's tasks and wait for them, bounded: nats-py can
        swallow a cancellation. Each loop also ends by itself once the bridge
        stops or its connection is replaced, so none runs on beside the next.
        """
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT)
            if pending:
                self.log.error(
                    "NATS bridge: {count} tasks did not end within {timeout}s of being "
                    "cancelled; going on without them",
                    count=len(pending),
                    timeout=_CLOSE_TIMEOUT,
                )

    async def _close(self) -> None:
        """Send what is queued (bounded), end the bridge's tasks, and close the connection."""
        await self._stopReceiving()
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while self.queue and self.counters.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._endTasks()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await asyncio.wait_for(self._nc.drain(), _CLOSE_TIMEOUT)
            except (NatsError, asyncio.TimeoutError):
                try:
                    await asyncio.wait_for(self._nc.close(), _CLOSE_TIMEOUT)
                except asyncio.TimeoutError:
                    self.log.error("NATS bridge: the connection did not close in time")
        if self.queue:
            self.log.warn(
                "NATS bridge stopping with {frames} frames not published{how}",
                frames=sum(frames for _, frames in self.queue),
                how=" (not acknowledged by the stream)" if self.durable else "",
            )

    def publish(self, runs: list[bytes], frames: int) -> None:
        """
        Queue the frames the relay just accepted, as one message; over the
        high-water mark the chunk is dropped whole and counted.
        """
        data = runs[0] if len(runs) == 1 else b"".join(runs)
        if len(data) > self._limit:
            for piece, count in _pieces(data, self._limit):
                if len(piece) > self._limit:
                    self._dropped(
                        count,
                        f"a frame of {len(piece)} bytes is over the NATS server's max_payload "
                        f"(raise it to at least the domain's max frame + {_HEADER_ROOM} bytes)",
                    )
                else:
                    self.publish([piece], count)
            return
        if self.durable:
            self._enqueue(data, frames)
            if self.queued > self.high_water and not self._holding:
                self._holding = True
                self.relay.gate.hold(
                    self, f"{self.queued} bytes wait for the JetStream stream to acknowledge them"
                )
            return
        if self.queued + len(data) > self.high_water:
            self._dropped(
                frames, f"its outbound queue is at the high-water mark of {self.high_water} bytes"
            )
            return
        self._enqueue(data, frames)

    def _dropped(self, frames: int, why: str) -> None:
        counters = self.counters
        counters.chunks_dropped += 1
        counters.frames_dropped += frames
        self._sampled.log(
            "dropped",
            self.log.warn,
            "NATS bridge: dropped {frames} frames, {why} ({frames_dropped} dropped so far)",
            frames=frames,
            why=why,
            frames_dropped=counters.frames_dropped,
        )

    def _enqueue(self, data: bytes, frames: int) -> None:
        self.queue.append((data, frames))
        self.queued += len(data)
        self._wakeup.set()

    def _sent(self, chunks: int) -> None:
        """The first C{chunks} queued chunks went out as one message (acknowledged: JetStream)."""
        self.counters.chunks_out += 1
        for _ in range(chunks):
            data, frames = self.queue.popleft()
            self.queued -= len(data)
            self.counters.frames_out += frames
        if self._holding and self.queued <= self.high_water // 4:
            self._holding = False
            self.relay.gate.unblock(self)

    async def _sendDurably(self) -> None:
        """
        Publish the queued chunks to the stream in order, several to a
        message, each message again (same id) until it is acknowledged.
        """
        nc, js = self._nc, self._js
        while self._nc is nc:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.queue and self._nc is nc:
                parts: list[bytes] = []
                size = 0
                for data, _ in self.queue:
                    if parts and size + len(data) > self._limit:
                        break
                    parts.append(data)
                    size += len(data)
                chunks, message = len(parts), b"".join(parts)
                if not await self._publishDurably(nc, js, message):
                    return
                self._sent(chunks)

    async def _publishDurably(self, nc, js, message: bytes) -> bool:
        """
        Publish C{message} until the stream acknowledges it: C{True}; C{False}
        if the connection was replaced first (the next sender publishes it).
        """
        # The bridge's start time and message count keep ids unique when a
        # publisher's sequences start again.
        self._messages += 1
        headers = {
            "Nats-Msg-Id": _message_id(f"{self.origin}:{self._boot}:{self._messages}", message)
        }
        delay = 0.1
        while self._nc is nc:
            try:
                ack = await js.publish(
                    self.subject, message, timeout=_ACK_TIMEOUT, headers=headers
                )
            except (NatsError, asyncio.TimeoutError) as e:
                self.counters.retries += 1
                self._sampled.log(
                    "retry",
                    self.log.warn,
                    "NATS bridge: the stream did not acknowledge a message ({error}); "
                    "publishing it again in {delay:.1f}s",
                    error=repr(e),
                    delay=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
                continue
            if ack.duplicate:
                self.counters.duplicates += 1
            return self._nc is nc
        return False

    async def _receiveDurably(self) -> None:
        """
        Deliver the stream's messages from other relays, in stream order, once
        each; a message is acknowledged only once its frames are in the audit
        log, so what the stream lets go of is on this host.
        """
        consumer = self._consumer
        while self._receiving and self._consumer is consumer:
            if self.relay.gate.paused:
                # Local subscribers or the audit log hold the relay back: the
                # stream keeps the messages meanwhile.
                await asyncio.sleep(0.05)
                continue
            try:
                messages = await self._consumer.fetch(256, timeout=1)
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
                if not self._receiving:
                    return  # the rest is not acknowledged: the stream keeps it
                sequence = msg.metadata.sequence.stream
                if sequence <= self._delivered:
                    self.counters.duplicates += 1
                elif sequence != self._delivered + 1 and not await self._skipGap(sequence):
                    # An earlier message is still to be redelivered: this one
                    # comes again after it.
                    continue
                else:
                    if not (self._receiving and self._consumer is consumer):
                        return  # stopped while it looked for a gap
                    # An unexpected error here restarts this loop with the
                    # message unacknowledged and not counted as delivered.
                    peer = self._deliver(msg)
                    self._delivered = sequence
                    if peer is not None and not await self._logged(peer):
                        return
                try:
                    await msg.ack()
                except NatsError:
                    pass  # it will be redelivered, and left out as a duplicate

    async def _logged(self, peer: Ingest) -> bool:
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
                if not self._receiving:
                    self._withdraw()
                    return False
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self._withdraw()
            raise
        return True

    def _withdraw(self) -> None:
        frames = self.relay.writeahead.withdraw()
        # Their sequences come again: each origin's tracking starts afresh.
        self.peers.clear()
        if frames:
            self.log.warn(
                "NATS bridge: {frames} frames from NATS were not in the audit log yet; "
                "left to the stream, which delivers them again",
                frames=frames,
            )

    async def _skipGap(self, sequence: int) -> bool:
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
            first = (await self._js.stream_info(self.stream)).state.first_seq
        except (NatsError, asyncio.TimeoutError):
            return False  # the stream is electing a leader, say: wait
        if first <= self._delivered + 1:
            return False
        self.counters.stream_gaps += first - self._delivered - 1
        self.log.error(
            "NATS bridge: stream {stream} messages {low}-{high} expired before this relay "
            "read them",
            stream=self.stream,
            low=self._delivered + 1,
            high=first - 1,
        )
        self._delivered = first - 1
        return sequence == first

    async def _send(self) -> None:
        """Hand the queued chunks to nats-py, which pushes back while its buffer is full."""
        nc = self._nc
        while self._nc is nc:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.queue and self._nc is nc:
                data, frames = self.queue[0]
                try:
                    await self._nc.publish(self.subject, data)
                except NatsError as e:
                    # At most once: what NATS cannot take now (reconnecting with
                    # its buffer full, say) is dropped whole and counted.
                    self.queue.popleft()
                    self.queued -= len(data)
                    self._dropped(frames, repr(e))
                    continue
                self._sent(1)

    async def _received(self, msg) -> None:
        self._deliver(msg)

    def _deliver(self, msg) -> Ingest | None:
        """
        Frames from another relay: checked, then broadcast like a local
        publisher's; returns the peer they came through (C{None}: ignored).
        """
        # torq.<domain>.<origin>: anything after the origin is not the relays'.
        origin = msg.subject.split(".")[2]
        if origin == self.origin:
            self.counters.echoes += 1
            own = self.durable and (msg.headers or {}).get("Nats-Msg-Id", "").startswith(
                f"{self.origin}:{self._boot}:"
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

    async def _error(self, error: Exception) -> None:
        if isinstance(error, SlowConsumerError):
            self.counters.slow_consumer += 1
            self._sampled.log(
                "slow consumer",
                self.log.warn,
                "NATS bridge: messages from NATS dropped by the client, the relay is a "
                "slow consumer ({count} so far)",
                count=self.counters.slow_consumer,
            )
            return
        self._sampled.log("error", self.log.warn, "NATS bridge: {error}", error=repr(error))

    async def _closed(self) -> None:
        """The connection is closed for good (not by a stop): start again."""
        self.counters.connected = False
        if self.running and self._joined:
            self._joined = False
            self.log.error("NATS bridge: the connection was closed; joining NATS again")
            await self._endTasks()
            self._spawn(self._join, "joining NATS")

    async def _disconnected(self) -> None:
        self.counters.connected = False
        if self.running:
            self.log.warn("NATS bridge disconnected; reconnecting")

    async def _reconnected(self) -> None:
        self.counters.connected = True
        self.counters.reconnects += 1
        self.log.info(
            "NATS bridge reconnected to {server}",
            server=self._nc.connected_url.netloc if self._nc.connected_url else "?",
        )


def _pieces(data: bytes, limit: int) -> Iterator[tuple[bytes, int]]:
    """
    C{data}, runs of whole frames, cut at frame boundaries into C{(piece,
    frames)} of at most C{limit} bytes (a frame larger than that alone).
    """
    first = count = 0
    for _, start, end, _ in frame_spans([data]):
        if count and end - first > limit:
            yield data[first:start], count
            first, count = start, 0
        count += 1
    if count:
        yield data[first:], count


def _message_id(origin: str, data: bytes) -> str:
    """
    C{origin}, then the first and last sequence of each source in C{data}:
    the same for every attempt at one message, so the stream keeps one copy.
    """
    spans: dict[int, tuple[int, int]] = {}
    for _, _, _, header in frame_spans([data]):
        spans[header.source] = (spans.get(header.source, (header.sequence,))[0], header.sequence)
    return origin + "".join(f":{s}:{a}-{b}" for s, (a, b) in sorted(spans.items()))
