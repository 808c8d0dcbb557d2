"""
Baseline relays the benchmark measures ours against, in the same run. Each
keeps its clients in a set and differs only in what it does with the bytes.

They run as the relay does under C{twistd -n relay}: on the reactor twistd
installs when given no C{-r} (Twisted's default, epoll on Linux), with
Twisted's own read size and write buffer and the kernel's socket buffer
sizes, none of which the relay changes. Each logs its reactor class in
twistd's words, for the runner to compare.
"""

from __future__ import annotations

from twisted.internet import endpoints, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class BaselineClient(Protocol):
    """A client of a baseline relay, in its factory's set while connected."""

    factory: BaselineFactory

    def connectionMade(self) -> None:
        self.factory.clients.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.factory.clients.discard(self)


class BaselineFactory(Factory):
    """The connected clients of a baseline relay."""

    noisy = False

    def __init__(self) -> None:
        self.clients: set[BaselineClient] = set()


def serve(
    protocol: type[BaselineClient],
    description: str,
    factory_class: type[BaselineFactory] = BaselineFactory,
) -> None:
    """Run a baseline relay with C{protocol} on the endpoint C{description}."""
    kind = type(reactor)
    print(f"reactor class: {kind.__module__}.{kind.__qualname__}.", flush=True)
    factory = factory_class.forProtocol(protocol)
    endpoints.serverFromString(reactor, description).listen(factory)
    reactor.run()
