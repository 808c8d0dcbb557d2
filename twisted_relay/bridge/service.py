"""
The NATS bridge (C{--nats}): relays on several hosts share their streams
through a NATS cluster. The bridge is one more peer of its relay's
broadcast: what the relay accepts goes out through L{outbound}, frames from
other origins come in through L{inbound}; this module is its life cycle:
joining NATS (for as long as it takes), the connection's callbacks, and a
stop in two steps.

It needs Twisted's asyncio reactor (nats-py runs on asyncio); the bridge
package is imported only when C{--nats} is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import SlowConsumerError
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType
from nats.js.errors import APIError, NotFoundError
from twisted.application.service import Service
from twisted.internet.defer import Deferred

from ..engine.delivery import HIGH_WATER
from ..engine.logger import RelayLogger
from ..engine.relay import RelayFactory
from ..ratelimit import RateLimiter
from .connection import NatsConnection, redact
from .inbound import Inbound
from .messages import HEADER_ROOM, BridgeCounters, Subjects
from .outbound import ACK_TIMEOUT, Outbound, pause_in_writelines

#: Seconds a stopping bridge gives its connection to drain.
_CLOSE_TIMEOUT = 3.0
#: Seconds between nats-py's attempts to connect to a server.
_RETRY_WAIT = 0.5
#: How long the stream keeps messages.
STREAM_MAX_AGE = 24 * 3600.0


class _NotJoined(Exception):
    """What the bridge still waits for before it has joined, in words for the log."""


def _why(error: BaseException) -> str:
    """An error of nats-py in a few words: its description, not its repr."""
    if isinstance(error, APIError) and error.description:
        return error.description
    return str(error).removeprefix("nats: ") or type(error).__name__


class State(Enum):
    """Where the bridge is in its life."""

    #: Connecting and setting up its subscription or stream, until it works.
    JOINING = "joining"
    #: Joined: sending and receiving (through nats-py's reconnections too).
    JOINED = "joined"
    #: A stop began: it takes nothing more from NATS, and sends what is left.
    DRAINING = "draining"
    #: Stopped.
    STOPPED = "stopped"


class NatsBridge(Service):
    """Connects the relay to NATS and carries its broadcast both ways."""

    log = RelayLogger(namespace="relay.nats")

    def __init__(
        self,
        relay: RelayFactory,
        connection: NatsConnection,
        origin: str,
        high_water: int = HIGH_WATER,
        replicas: int = 0,
    ) -> None:
        self.relay = relay
        self.connection = connection
        #: The servers as shown (logs, /health): no credentials.
        self.servers = connection.shown
        self.origin = origin
        #: JetStream replicas; 0 picks 3 when 3 or more servers are known, else 1.
        self.replicas = replicas
        #: Lossless domains go through JetStream.
        self.durable = relay.logic.delivery == "block"
        self.names = Subjects(relay.logic.name, origin)
        self.subject = self.names.publishing
        self.counters = BridgeCounters()
        self.state = State.JOINING
        sampled = RateLimiter(relay.clock)
        self.outbound = Outbound(
            self.subject,
            origin,
            durable=self.durable,
            high_water=high_water,
            gate=relay.gate,
            counters=self.counters,
            sampled=sampled,
        )
        self.inbound = Inbound(
            relay,
            origin,
            durable=self.durable,
            own_prefix=f"{origin}:{self.outbound.boot}:",
            counters=self.counters,
            sampled=sampled,
            receiving=lambda: self.state in (State.JOINING, State.JOINED),
        )
        self._sampled = sampled
        #: nats-py retries a server every half second: one line in ten seconds says so.
        self._unreachable = RateLimiter(relay.clock, burst=1, interval=10.0)
        self._nc: Any = None
        self._js: Any = None
        self._consumer: Any = None
        self._subscription: Any = None
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def queued(self) -> int:
        """Bytes waiting to be published to NATS."""
        return self.outbound.queued

    def publish(self, runs: list[bytes], frames: int) -> None:
        """The relay accepted C{runs}: they go out to NATS (the relay's outlet)."""
        self.outbound.publish(runs, frames)

    def startService(self) -> None:
        super().startService()
        pause_in_writelines()
        if self.connection.shown != self.connection.servers:
            self.log.warn(
                "NATS bridge: credentials in a --nats URL show in the process arguments "
                "to every user (ps): give them in --nats-user-file, NATS_USER and "
                "NATS_PASSWORD, --nats-token-file or --nats-creds instead"
            )
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
        if self.state in (State.DRAINING, State.STOPPED):
            return
        self.state = State.DRAINING
        if self._receiver is not None:
            await asyncio.wait([self._receiver], timeout=_CLOSE_TIMEOUT)
        try:
            if self._consumer is not None:
                await asyncio.wait_for(self._consumer.unsubscribe(), _CLOSE_TIMEOUT)
            elif self._subscription is not None:
                await asyncio.wait_for(self._subscription.drain(), _CLOSE_TIMEOUT)
        except (NatsError, OSError, asyncio.TimeoutError) as e:
            self.log.warn("NATS bridge: stopping its subscription: {error}", error=_why(e))

    async def _join(self) -> None:
        """Connect, and set up subscription or stream; until it works, however long."""
        delay = 0.5
        while self.running:
            try:
                await self._connect()
                return
            except _NotJoined as e:
                waiting = str(e)
            except (NatsError, OSError, asyncio.TimeoutError) as e:
                waiting = f"cannot connect to NATS at {', '.join(self.servers)} yet: {_why(e)}"
            self.log.warn(
                "NATS bridge: {waiting}; retrying in {delay:g}s",
                waiting=waiting,
                delay=delay,
            )
            if self._nc is not None and not self._nc.is_closed:
                try:
                    await self._nc.close()
                except (NatsError, OSError):
                    pass  # a connection given up on: the next attempt makes its own
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        self._nc = nc = await nats.connect(
            **self.connection.connect_arguments(),
            name=f"twisted_relay {self.relay.logic.name} {self.origin}",
            no_echo=True,
            # The first server listed is this host's; the others are failover.
            dont_randomize=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=_RETRY_WAIT,
            connect_timeout=2,
            error_cb=self._error,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            closed_cb=self._closed,
        )
        # Room for the message's headers within the server's limit.
        self.outbound.limit = nc.max_payload - HEADER_ROOM
        self.counters.connected = True

        def current() -> bool:
            """Whether C{nc} is still the bridge's: the loops end with their connection."""
            return self._nc is nc

        if self.durable:
            await self._joinStream(current)
        else:
            self._subscription = await nc.subscribe(
                self.names.receiving,
                cb=self.inbound.received,
                pending_bytes_limit=64 * 1024 * 1024,
            )
            await nc.flush()
            self._spawn(lambda: self.outbound.send(nc, current), "publishing")
        if self.state is State.JOINING:
            self.state = State.JOINED
        self.log.info(
            "NATS bridge connected to {server} ({how}) as origin {origin}: publishing "
            "to {subject}, receiving {receiving} ({mode})",
            server=_server(nc),
            how=self.connection.described,
            origin=self.origin,
            subject=self.subject,
            receiving=self.names.receiving,
            mode=f"JetStream stream {self.names.stream}" if self.durable else "core NATS",
        )

    async def _joinStream(self, current: Callable[[], bool]) -> None:
        """Create (or find) the domain's stream and this relay's durable consumer."""
        self._js = js = self._nc.jetstream()
        stream = self.names.stream
        replicas = self.replicas or (3 if len(self._nc.servers) >= 3 else 1)
        try:
            await js.add_stream(
                name=stream,
                subjects=[self.names.receiving],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=STREAM_MAX_AGE,
            )
        except NatsError as e:
            try:
                info = await js.stream_info(stream)
            except NotFoundError:
                raise _NotJoined(
                    f"JetStream stream {stream} not found yet, nor created: {_why(e)}"
                ) from None
            except (NatsError, asyncio.TimeoutError) as again:
                raise _NotJoined(
                    f"JetStream does not answer for stream {stream} yet: {_why(again)}"
                ) from None
            self.log.warn(
                "NATS bridge: using the existing stream {stream} ({replicas} replicas): {error}",
                stream=stream,
                replicas=info.config.num_replicas,
                error=_why(e),
            )
        try:
            self._consumer = consumer = await js.pull_subscribe(
                self.names.receiving,
                durable=self.names.durable,
                stream=stream,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.NEW,
                    ack_wait=ACK_TIMEOUT * 2,
                    max_ack_pending=65536,
                ),
            )
            # Where this relay's consumer got to before (a restart): every stream
            # message up to it was delivered here and acknowledged, in order.
            self.inbound.delivered = (await consumer.consumer_info()).ack_floor.stream_seq
        except APIError as e:
            raise _NotJoined(
                f"JetStream consumer {self.names.durable} of stream {stream} not ready "
                f"yet: {_why(e)}"
            ) from None
        self._spawn(lambda: self.outbound.sendDurably(js, current), "publishing to the stream")
        self._receiver = self._spawn(
            lambda: self.inbound.receiveDurably(
                consumer, js, stream, lambda: current() and self._consumer is consumer
            ),
            "reading the stream",
        )

    def _spawn(
        self, work: Callable[[], Coroutine[Any, Any, None]], what: str
    ) -> asyncio.Task[None]:
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
        outbound = self.outbound
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while outbound.queue and self.counters.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.state = State.STOPPED
        await self._endTasks()
        if self._nc is not None and not self._nc.is_closed:
            await self._closeConnection(self._nc)
        if outbound.queue:
            self.log.warn(
                "NATS bridge stopping with {frames} frames not published{how}",
                frames=outbound.frames,
                how=" (not acknowledged by the stream)" if self.durable else "",
            )

    async def _closeConnection(self, nc: Any) -> None:
        """
        Drain C{nc}, or else close it: with NATS down either may fail on the
        socket, which is what a stop then expects, not a failure of the stop.
        """
        try:
            await asyncio.wait_for(nc.drain(), _CLOSE_TIMEOUT)
            return
        except (NatsError, OSError, asyncio.TimeoutError):
            pass
        try:
            await asyncio.wait_for(nc.close(), _CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            self.log.error("NATS bridge: the connection did not close in time")
        except Exception as e:
            # Not only NatsError and OSError: on Python 3.12 and later nats-py's
            # close writes to the lost connection with writelines(), which then
            # fails on the transport's cleared writer (TypeError).
            self.log.info("NATS bridge: the connection closed on {error}", error=_why(e))

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
        if not self.counters.connected:
            self._unreachable.log(
                "unreachable",
                self.log.warn,
                "NATS bridge: cannot connect to NATS at {servers} yet: {error}; retrying "
                "every {wait:g}s",
                servers=", ".join(self.servers),
                error=_why(error),
                wait=_RETRY_WAIT,
            )
            return
        self._sampled.log("error", self.log.warn, "NATS bridge: {error}", error=_why(error))

    async def _closed(self) -> None:
        """The connection is closed for good (not by a stop): start again."""
        self.counters.connected = False
        if self.running and self.state is State.JOINED:
            self.state = State.JOINING
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
        self.log.info("NATS bridge reconnected to {server}", server=_server(self._nc))


def _server(nc: Any) -> str:
    """The server C{nc} is connected to, for the log: no credentials."""
    return redact(nc.connected_url.geturl()) if nc.connected_url else "?"
