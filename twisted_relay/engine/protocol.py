"""
The per-connection protocol: a thin adapter from Twisted to the engine.
Bytes read go to the connection's L{Ingest}; frames for the client go out
through its L{Outbox}; the relay (its factory) learns of the connection's
life through the few calls of L{Relay}.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..access import Peer, peer_of
from ..control import NOTHING, Control, Subscription, error_frame
from ..wire import FramingLost
from .accounting import ClientStats
from .delivery import DeliverySettings, Outbox, PublisherGate
from .ingest import Ingest, IngestSink
from .logger import RelayLogger


class Relay(IngestSink, TypingProtocol):
    """What a connection needs of its factory (the L{relay.RelayFactory})."""

    delivery: DeliverySettings
    gate: PublisherGate
    clock: IReactorTime
    #: Whether the relay is shutting down: a connection ending now loses nothing of its own.
    draining: bool

    def register(self, client: RelayProtocol, peer: Peer) -> None:
        """A client connected; C{peer} is who it is as far as is known yet."""

    def identified(self, client: RelayProtocol, peer: Peer) -> None:
        """A TLS client's handshake is done: it is known to be C{peer}."""

    def controlReceived(self, client: RelayProtocol, control: Control) -> None:
        """C{client} sent a control frame: apply it."""

    def unregister(self, client: RelayProtocol, reason: Failure) -> None:
        """C{client}'s connection is gone."""

    def unpark(self, client: RelayProtocol) -> None:
        """C{client}'s transport took from its queue: send to it again (drop policy)."""


@implementer(IHandshakeListener)
class RelayProtocol(Protocol):
    """
    One client of the relay; what it writes is published, and it receives
    what the others publish, through its outbox.

    Twisted calls C{connectionMade}, C{dataReceived}, C{handshakeCompleted}
    and C{connectionLost}; the ingest calls back with a control frame or
    when the framing is lost. The relay reads C{stats}, C{outbox} and
    C{ingest}, and is the only writer of C{subscription}, C{may_subscribe}
    and C{audit_index}.
    """

    log = RelayLogger(namespace="relay")
    factory: Relay
    #: Set by Twisted before C{connectionMade}.
    transport: ITransport
    stats: ClientStats
    outbox: Outbox
    ingest: Ingest
    #: What the client receives; nothing until the relay settles it.
    subscription: Subscription = NOTHING
    may_subscribe = True
    #: The first audit record this client could have received live.
    audit_index = 0
    _closing = False

    @property
    def handshaking(self) -> bool:
        """Whether the peer is not known yet: a TLS handshake is under way."""
        return ISSLTransport.providedBy(self.transport)

    def connectionMade(self) -> None:
        relay = self.factory
        peer = peer_of(self.transport)
        self.stats = relay.accounting.connected(peer.description)
        self.outbox = Outbox(
            self.transport,
            self.stats,
            relay.delivery,
            relay.accounting,
            relay.gate,
            relay.clock,
            unparked=lambda: relay.unpark(self),
        )
        self.ingest = Ingest(
            relay,
            self.stats,
            onControl=self._controlReceived,
            onFramingLost=self._framingLost,
        )
        relay.register(self, peer)

    def handshakeCompleted(self) -> None:
        """The TLS peer is known now: settle what it may do."""
        if not self._closing:
            self.factory.identified(self, peer_of(self.transport))

    def dataReceived(self, data: bytes) -> None:
        """
        Relay C{data}; nothing raised while doing so may reach the reactor or
        another client, so an unexpected error closes this connection only.
        """
        if self._closing:
            return
        try:
            self.ingest.feed(data)
        except Exception:
            self.log.failure(
                "unexpected error relaying client {client_id}'s data; closing it",
                client_id=self.stats.client_id,
            )
            self._closing = True
            self.stats.close_reason = "internal error"
            self.outbox.close()
            self.outbox.hangUp()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._closing or self.factory.draining:
            self.ingest.release()
        else:
            self.ingest.end("connection closed")
        self.factory.unregister(self, reason)

    def _controlReceived(self, control: Control) -> None:
        self.factory.controlReceived(self, control)

    def _framingLost(self, error: FramingLost) -> None:
        """
        The stream cannot be relayed any more: tell the client why, then
        close once what is queued is sent.
        """
        self._closing = True
        self.stats.close_reason = error.reason
        where = "" if error.offset is None else f" at offset {error.offset} of its stream"
        told = error_frame(self.factory.logic.domain, error.reason, error.detail + where)
        self.outbox.send([told], 0, len(told))
        self.outbox.flushAndClose(self.factory.delivery.stall_timeout)
