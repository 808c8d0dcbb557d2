"""
A Twisted client that collects what a relay (L{RelayProcess}, from
L{twisted_relay.testing}) sends, for the integration tests. Every wait is
bounded.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol

from twisted_relay.client import RelayClientProtocol
from twisted_relay.testing import RelayProcess, limit_file_size  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECEIVE_TIMEOUT = 10.0


class Collector(RelayClientProtocol):
    """A relay client (the package's) that keeps every frame it receives, in order."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def frameReceived(self, header, frame: bytes) -> None:
        self.received += frame
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(bytes(self.received))

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        """Write C{data} as it is, whole frames or not."""
        self.transport.write(data)

    def receive(self, size: int, timeout: float = RECEIVE_TIMEOUT) -> Deferred[bytes]:
        """Fires with all frames received once they hold at least C{size} bytes."""
        if len(self.received) >= size:
            return succeed(bytes(self.received))
        d: Deferred[bytes] = Deferred()
        self._waiting.append((size, d))
        return d.addTimeout(timeout, reactor)

    def wait_closed(self, timeout: float = RECEIVE_TIMEOUT) -> Deferred[None]:
        return self.closed.addTimeout(timeout, reactor)


def dial(endpoint: str) -> Deferred[Collector]:
    """A L{Collector} connected to the relay at the client endpoint string."""
    return connectProtocol(clientFromString(reactor, endpoint), Collector())
