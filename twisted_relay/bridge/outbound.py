"""
The bridge's outbound side: the frames its relay accepted, queued as NATS
messages, one per run of whole frames (never one per frame), and the two
senders that empty the queue.

Core NATS (market, signal) is at most once: over the high-water mark whole
chunks are dropped and counted. Lossless domains (execution) go through
JetStream: each message is published again, with the same C{Nats-Msg-Id},
until the stream acknowledges it (the stream drops the duplicates), one at
a time so the stream keeps the relay's order; while too much waits to be
acknowledged the relay's publishers are held back rather than anything
dropped.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from asyncio import selector_events
from collections import deque
from collections.abc import Callable

from nats.errors import Error as NatsError

from ..engine.delivery import PublisherGate
from ..engine.logger import RelayLogger
from ..ratelimit import RateLimiter
from .messages import HEADER_ROOM, BridgeCounters, message_id, pieces

#: Seconds to wait for the stream's acknowledgement before publishing again.
ACK_TIMEOUT = 2.0
#: Longest wait between two attempts: retrying goes on for as long as it takes.
_MAX_BACKOFF = 2.0
#: CPython releases whose socket transports forget, in writelines(), to pause
#: the writer over the high-water mark (gh-127655, fixed in 3.12.9 and 3.13.2).
_UNPAUSED_WRITELINES = any(low <= sys.version_info[:3] < high for low, high in (
    ((3, 12), (3, 12, 9)),
    ((3, 13), (3, 13, 2)),
))


@functools.cache
def pause_in_writelines() -> None:
    """
    Where the release needs it, make asyncio's socket transports pause their
    writer in writelines() as write() does (the upstream fix). nats-py writes
    with writelines(): without this its drain() never waits, so a stalled
    NATS server grows asyncio's buffer without bound instead of filling the
    outbound queue, which drops (or holds the publishers) at its mark.
    """
    if not _UNPAUSED_WRITELINES:
        return
    transport = getattr(selector_events, "_SelectorSocketTransport")
    writelines = transport.writelines

    def pausing_writelines(self, list_of_data) -> None:
        writelines(self, list_of_data)
        self._maybe_pause_protocol()

    transport.writelines = pausing_writelines


class Outbound:
    """
    The queue of frames for NATS and its senders.

    @ivar limit: the largest message, the server's max_payload less room for
        headers; known once connected.
    """

    log = RelayLogger(namespace="relay.nats")

    def __init__(
        self,
        subject: str,
        origin: str,
        *,
        durable: bool,
        high_water: int,
        gate: PublisherGate,
        counters: BridgeCounters,
        sampled: RateLimiter,
    ) -> None:
        self.subject = subject
        self.origin = origin
        self.durable = durable
        self.high_water = high_water
        self.gate = gate
        self.counters = counters
        self._sampled = sampled
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued = 0
        self.limit = 1024 * 1024 - HEADER_ROOM
        self.wakeup = asyncio.Event()
        #: Whether this queue holds the relay's publishers back.
        self._holding = False
        #: The bridge's start time and message count keep ids unique when a
        #: publisher's sequences start again.
        self.boot = time.time_ns()
        self._messages = 0

    @property
    def frames(self) -> int:
        """Frames waiting to be published."""
        return sum(frames for _, frames in self.queue)

    def publish(self, runs: list[bytes], frames: int) -> None:
        """
        Queue the frames the relay just accepted, as one message; over the
        high-water mark the chunk is dropped whole and counted.
        """
        data = runs[0] if len(runs) == 1 else b"".join(runs)
        if len(data) > self.limit:
            for piece, count in pieces(data, self.limit):
                if len(piece) > self.limit:
                    self._dropped(
                        count,
                        f"a frame of {len(piece)} bytes is over the NATS server's max_payload "
                        f"(raise it to at least the domain's max frame + {HEADER_ROOM} bytes)",
                    )
                else:
                    self.publish([piece], count)
            return
        if self.durable:
            self._enqueue(data, frames)
            if self.queued > self.high_water and not self._holding:
                self._holding = True
                self.gate.hold(
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
        self.wakeup.set()

    def _sent(self, chunks: int) -> None:
        """The first C{chunks} queued chunks went out as one message (acknowledged: JetStream)."""
        self.counters.chunks_out += 1
        for _ in range(chunks):
            data, frames = self.queue.popleft()
            self.queued -= len(data)
            self.counters.frames_out += frames
        if self._holding and self.queued <= self.high_water // 4:
            self._holding = False
            self.gate.unblock(self)

    async def send(self, nc, current: Callable[[], bool]) -> None:
        """
        Hand the queued chunks to nats-py, which pushes back while its buffer
        is full, while C{current()} (the connection C{nc} is the bridge's).
        """
        while current():
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue and current():
                data, frames = self.queue[0]
                try:
                    await nc.publish(self.subject, data)
                except NatsError as e:
                    # At most once: what NATS cannot take now (reconnecting with
                    # its buffer full, say) is dropped whole and counted.
                    self.queue.popleft()
                    self.queued -= len(data)
                    self._dropped(frames, repr(e))
                    continue
                self._sent(1)

    async def sendDurably(self, js, current: Callable[[], bool]) -> None:
        """
        Publish the queued chunks to the stream in order, several to a
        message, each message again (same id) until it is acknowledged.
        """
        while current():
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue and current():
                parts: list[bytes] = []
                size = 0
                for data, _ in self.queue:
                    if parts and size + len(data) > self.limit:
                        break
                    parts.append(data)
                    size += len(data)
                chunks, message = len(parts), b"".join(parts)
                if not await self._publishDurably(js, message, current):
                    return
                self._sent(chunks)

    async def _publishDurably(self, js, message: bytes, current: Callable[[], bool]) -> bool:
        """
        Publish C{message} until the stream acknowledges it: C{True}; C{False}
        if the connection was replaced first (the next sender publishes it).
        """
        self._messages += 1
        headers = {
            "Nats-Msg-Id": message_id(f"{self.origin}:{self.boot}:{self._messages}", message)
        }
        delay = 0.1
        while current():
            try:
                ack = await js.publish(self.subject, message, timeout=ACK_TIMEOUT, headers=headers)
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
            return current()
        return False
