"""
The ceiling: a bulk forwarder that writes every chunk it reads to every other
client without looking at it. No framing, no checks, no counters: the upper
bound for any relay on Twisted's reactor on this machine.

    python -m benchmarks.baselines.ceiling unix:/tmp/ceiling.sock
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol


class CeilingProtocol(Protocol):
    def connectionMade(self) -> None:
        self.factory.clients.add(self)

    def connectionLost(self, reason) -> None:
        self.factory.clients.discard(self)

    def dataReceived(self, data: bytes) -> None:
        for client in self.factory.clients:
            if client is not self:
                client.transport.write(data)


def main(description: str) -> None:
    factory = Factory.forProtocol(CeilingProtocol)
    factory.clients = set()
    endpoints.serverFromString(reactor, description).listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
