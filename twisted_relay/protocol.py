"""
The per-connection protocol: a thin adapter from a transport's bytes to the
relay. It frames each received chunk in one pass, applies the domain's filter
and checks, and hands contiguous runs of accepted frames to the factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .framing import Framer
from .wire import HEADER_SIZE, FrameRejected, FramingLost, IncompleteFrame, NotForwarded

if TYPE_CHECKING:
    from .relay import ClientStats, RelayFactory


class RelayProtocol(Protocol):
    """
    One client of the relay; what it writes is published, and it receives
    what the others publish.
    """

    log = Logger()
    factory: RelayFactory
    stats: ClientStats
    _closing = False

    def connectionMade(self) -> None:
        self.stats = self.factory.register(self)
        self._framer = Framer(self.factory.policy.max_frame_size)

    def connectionLost(self, reason: Failure) -> None:
        if self._framer.buffered and not self._closing:
            self.factory.rejected(
                self,
                IncompleteFrame(
                    f"connection closed with {self._framer.buffered} bytes of an "
                    f"incomplete frame",
                    offset=self._framer.position,
                    client_id=self.stats.client_id,
                ),
            )
        self.factory.unregister(self, reason)

    def dataReceived(self, data: bytes) -> None:
        """
        Relay C{data}; nothing raised while doing so may reach the reactor or
        another client, so an unexpected error closes this connection only.
        """
        if self._closing:
            return
        try:
            self._relay(data)
        except Exception:
            self.log.failure(
                "unexpected error relaying client {client_id}'s data; closing it",
                client_id=self.stats.client_id,
            )
            self._closing = True
            self.transport.abortConnection()

    def _relay(self, data: bytes) -> None:
        factory = self.factory
        factory.received(self, len(data))
        framer = self._framer
        should_forward = factory.logic.should_forward
        policy = factory.policy
        check = policy.check if policy.inspects_frames else None
        runs: list[bytes] = []
        frames = 0
        run_start = None
        lost = None
        try:
            for buf, start, header in framer.feed(data):
                end = start + HEADER_SIZE + header.payload_size
                try:
                    if not should_forward(header):
                        raise NotForwarded(
                            f"frame of relay_domain {header.relay_domain} (source "
                            f"{header.source}, sequence {header.sequence}) is not "
                            f"carried by the {factory.logic.name} relay"
                        )
                    if check is not None:
                        check(buf, start, end, header)
                except FrameRejected as error:
                    if run_start is not None:
                        runs.append(buf[run_start:start])
                        run_start = None
                    error.offset = framer.position + start
                    error.client_id = self.stats.client_id
                    factory.rejected(self, error)
                else:
                    frames += 1
                    if run_start is None:
                        run_start = start
        except FramingLost as error:
            lost = error
        if run_start is not None:
            runs.append(buf[run_start:end])
        if frames:
            factory.broadcast(self, runs, frames)
        if lost is not None:
            self._loseFraming(lost)

    def _loseFraming(self, error: FramingLost) -> None:
        """The stream cannot be cut into frames any more: count, log, close."""
        error.client_id = self.stats.client_id
        self._closing = True
        self.factory.rejected(self, error)
        self.transport.loseConnection()
