"""
Clients of the relay: a Twisted protocol for services, a reconnecting service
around it, and a small blocking client for scripts. All of them cut the stream
with the relay's own L{Framer}.
"""

from __future__ import annotations

import random
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from .control import control_frame, parse_relay_info
from .framing import Framer
from .wire import HEADER_SIZE, FramingLost, Header

#: The largest frame any shipped domain carries (market data).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024


class Declaring:
    """What a client says to the relay about itself, over its C{publish}."""

    def publish(self, frame: bytes) -> None:
        raise NotImplementedError

    def declare(
        self,
        *,
        publish_only: bool = False,
        sources: Iterable[int] | None = None,
        tlv_types: Iterable[int] | None = None,
    ) -> None:
        """Tell the relay what this connection receives (see docs/delivery.md)."""
        self.publish(control_frame(publish_only=publish_only, sources=sources, tlv_types=tlv_types))


class RelayClientProtocol(Declaring, Protocol):
    """
    One connection to a relay. Override L{frameReceived}; send with
    L{publish}; say what to receive with L{declare}.
    """

    log = Logger()
    max_frame_size = DEFAULT_MAX_FRAME

    def connectionMade(self) -> None:
        self._framer = Framer(self.max_frame_size)

    def dataReceived(self, data: bytes) -> None:
        try:
            for buf, start, header in self._framer.frames(data):
                self.frameReceived(header, buf[start : start + HEADER_SIZE + header.payload_size])
        except FramingLost as error:
            self.log.error("relay stream unreadable, closing: {error}", error=str(error))
            self.transport.loseConnection()

    def frameReceived(self, header: Header, frame: bytes) -> None:
        """A whole frame arrived: C{frame} is its exact bytes."""

    def publish(self, frame: bytes) -> None:
        """Send one or more whole frames to the relay."""
        self.transport.write(frame)


def relay_service(
    reactor: IReactorTime, endpoint: str, factory: Factory
) -> ClientService:
    """
    A service that keeps a connection to the relay at the client endpoint
    string C{endpoint} (C{unix:path=/tmp/torq/market_data.sock},
    C{tcp:host=10.0.0.5:port=7001}), reconnecting with exponential backoff and
    jitter whenever it is lost.
    """
    return ClientService(
        clientFromString(reactor, endpoint),
        factory,
        retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=5.0, jitter=random.random),
    )


class BlockingClient(Declaring):
    """
    A relay client for scripts, on a plain socket: connect to a Unix socket
    path (or C{unix:PATH}, C{tcp:HOST:PORT}), send frames, iterate over the
    frames received.
    """

    def __init__(self, address: str, max_frame_size: int = DEFAULT_MAX_FRAME) -> None:
        if address.startswith("tcp:"):
            _, host, port = address.split(":")
            self.socket = socket.create_connection((host, int(port)))
        else:
            path = address[len("unix:") :] if address.startswith("unix:") else address
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.socket.connect(path)
        self._framer = Framer(max_frame_size)
        self._ready: deque[tuple[Header, bytes]] = deque()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close()

    @property
    def buffered(self) -> int:
        """Bytes received of a frame not yet complete."""
        return self._framer.buffered

    def publish(self, frame: bytes) -> None:
        """Send one or more whole frames."""
        self.socket.sendall(frame)

    def introduce(
        self,
        timeout: float = 2.0,
        *,
        publish_only: bool = False,
        sources: Iterable[int] | None = None,
        tlv_types: Iterable[int] | None = None,
    ) -> tuple[int, str]:
        """
        Declare what this connection receives and return the relay's
        C{(relay_domain, name)} from its answer. Frames that arrive before the
        answer stay for L{frames}.

        @raise TimeoutError: no answer within C{timeout} seconds.
        """
        self.declare(publish_only=publish_only, sources=sources, tlv_types=tlv_types)
        deadline = time.monotonic() + timeout
        earlier: list[tuple[Header, bytes]] = []
        try:
            while True:
                if not self._ready:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._read(remaining):
                        raise TimeoutError(f"no answer from the relay within {timeout}s")
                header, frame = self._ready.popleft()
                info = parse_relay_info(header, frame)
                if info is not None:
                    return info
                earlier.append((header, frame))
        finally:
            self._ready.extendleft(reversed(earlier))

    def frames(self, timeout: float | None = None) -> Iterator[tuple[Header, bytes]]:
        """
        Yield C{(header, frame)} for each frame received, until the relay
        closes the connection or nothing arrives for C{timeout} seconds.
        Stopping early loses nothing: the frames not yet taken stay for the
        next call.
        """
        while True:
            while self._ready:
                yield self._ready.popleft()
            if not self._read(timeout):
                return

    def receive(self, count: int, timeout: float) -> list[tuple[Header, bytes]]:
        """The next C{count} frames, or fewer if C{timeout} seconds pass first."""
        deadline = time.monotonic() + timeout
        received: list[tuple[Header, bytes]] = []
        while len(received) < count:
            if self._ready:
                received.append(self._ready.popleft())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(remaining):
                break
        return received

    def _read(self, timeout: float | None) -> bool:
        """Read once and frame what came; C{False} on timeout or close."""
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(256 * 1024)
        except TimeoutError:
            return False
        if not data:
            return False
        self._ready.extend(
            (header, buf[start : start + HEADER_SIZE + header.payload_size])
            for buf, start, header in self._framer.frames(data)
        )
        return True
