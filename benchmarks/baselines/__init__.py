"""
Baseline relays the benchmark measures ours against, in the same run. Each
keeps its clients in a set and differs only in what it does with the bytes.
"""

from __future__ import annotations

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol


class BaselineClient(Protocol):
    """A client of a baseline relay, in its factory's set while connected."""

    def connectionMade(self) -> None:
        self.factory.clients.add(self)

    def connectionLost(self, reason) -> None:
        self.factory.clients.discard(self)


def serve(protocol: type[BaselineClient], description: str) -> None:
    """Run a baseline relay with C{protocol} on the endpoint C{description}."""
    factory = Factory.forProtocol(protocol)
    factory.clients = set()
    endpoints.serverFromString(reactor, description).listen(factory)
    reactor.run()
