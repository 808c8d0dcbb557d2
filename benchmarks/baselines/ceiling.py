"""
The ceiling: a bulk forwarder that writes every chunk it reads to every other
client without looking at it. No framing, no checks, no counters: the upper
bound for any relay on Twisted's reactor on this machine.

It reads and writes as the relay does (L{twisted_relay.engine.delivery}),
so that the two differ only in the work the relay does on the bytes: each
chunk goes straight to a client's transport while the transport takes it,
and waits in the client's queue while the transport has paused it (its
streaming producer); a queue over the relay's high-water mark stops the
reading of every client until it is back under the low-water mark, as the
relay's block policy does. Without that, a forwarder that never stops
reading buffers the whole stream in its transports and copies it again and
again as Twisted joins its write buffer.

    python -m benchmarks.baselines.ceiling unix:/tmp/ceiling.sock
"""

from __future__ import annotations

import sys
from collections import deque

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from twisted_relay.engine.delivery import HIGH_WATER, DeliverySettings

from . import BaselineClient, BaselineFactory, serve

LOW_WATER = DeliverySettings.low_water


class CeilingFactory(BaselineFactory):
    """
    The clients, and the relay's publisher gate: every client's reading is
    paused while any client's queue is over the high-water mark.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holders: set[CeilingProtocol] = set()

    def hold(self, holder: CeilingProtocol) -> None:
        if not self.holders:
            for client in self.clients:
                client.transport.pauseProducing()
        self.holders.add(holder)

    def release(self, holder: CeilingProtocol) -> None:
        if holder in self.holders:
            self.holders.remove(holder)
            if not self.holders:
                for client in self.clients:
                    client.transport.resumeProducing()


@implementer(IPushProducer)
class CeilingProtocol(BaselineClient):
    """A client: what it writes goes to every other client; it is its own outbox."""

    factory: CeilingFactory

    def connectionMade(self) -> None:
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.writable = True
        self.blocking = False
        self.transport.registerProducer(self, True)
        if self.factory.holders:
            self.transport.pauseProducing()
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        for client in self.factory.clients:
            if client is not self:
                client.send(data)

    def send(self, data: bytes) -> None:
        """Write C{data} now if the transport takes it, else queue it."""
        if self.writable and not self.queue:
            self.transport.write(data)
            return
        self.queue.append(data)
        self.queued += len(data)
        if self.queued > HIGH_WATER and not self.blocking:
            self.blocking = True
            self.factory.hold(self)

    def pauseProducing(self) -> None:
        self.writable = False

    def resumeProducing(self) -> None:
        self.writable = True
        queue = self.queue
        while queue and self.writable:
            data = queue.popleft()
            self.queued -= len(data)
            self.transport.write(data)
        if self.blocking and self.queued <= LOW_WATER:
            self.blocking = False
            self.factory.release(self)

    def stopProducing(self) -> None:
        self.queue.clear()
        self.queued = 0
        if self.blocking:
            self.blocking = False
            self.factory.release(self)


if __name__ == "__main__":
    serve(CeilingProtocol, sys.argv[1], CeilingFactory)
