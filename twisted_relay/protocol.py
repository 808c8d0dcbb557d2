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

from .control import is_control, parse_control
from .framing import Framer
from .wire import (
    HEADER_SIZE,
    BadChecksum,
    FrameRejected,
    FramingLost,
    Header,
    IncompleteFrame,
    NotForwarded,
    frame_checksum,
)

if TYPE_CHECKING:
    from .control import Subscription
    from .delivery import Outbox
    from .relay import ClientStats, RelayFactory


class RelayProtocol(Protocol):
    """
    One client of the relay; what it writes is published, and it receives
    what the others publish, through its outbox.
    """

    log = Logger()
    factory: RelayFactory
    stats: ClientStats
    outbox: Outbox
    subscription: Subscription
    _closing = False

    def connectionMade(self) -> None:
        self.factory.register(self)
        self._framer = Framer(self.factory.policy.max_frame_size)
        #: Last sequence seen per source on this connection.
        self._sequences: dict[int, int] = {}

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
            self.stats.close_reason = "internal error"
            self.outbox.close()
            self.transport.abortConnection()

    def _relay(self, data: bytes) -> None:
        factory = self.factory
        factory.received(self, len(data))
        framer = self._framer
        should_forward = factory.logic.should_forward
        policy = factory.policy
        check = policy.check if policy.inspects_frames else None
        sequences = self._sequences
        index: list[tuple[int, int, Header]] | None = [] if factory.filtered else None
        runs: list[bytes] = []
        frames = 0
        run_start = None
        lost = None
        try:
            for buf, start, header in framer.feed(data):
                end = start + HEADER_SIZE + header.payload_size
                try:
                    if is_control(header) and self._control(buf, start, end, header):
                        accepted = False
                    elif not should_forward(header):
                        raise NotForwarded(
                            f"frame of relay_domain {header.relay_domain} (source "
                            f"{header.source}, sequence {header.sequence}) is not "
                            f"carried by the {factory.logic.name} relay"
                        )
                    else:
                        if check is not None:
                            check(buf, start, end, header)
                        accepted = True
                except FrameRejected as error:
                    error.offset = framer.position + start
                    error.client_id = self.stats.client_id
                    factory.rejected(self, error)
                    accepted = False
                if not accepted:
                    if run_start is not None:
                        runs.append(buf[run_start:start])
                        run_start = None
                    continue
                frames += 1
                if run_start is None:
                    run_start = start
                if index is not None:
                    index.append((start, end, header))
                last = sequences.get(header.source)
                if last is None or header.sequence == last + 1:
                    sequences[header.source] = header.sequence
                else:
                    self._sequenceAnomaly(header, last)
        except FramingLost as error:
            lost = error
        if run_start is not None:
            runs.append(buf[run_start:end])
        if frames:
            factory.broadcast(self, runs, frames, buf, index)
        if lost is not None:
            self._loseFraming(lost)

    def _control(self, buf: bytes, start: int, end: int, header: Header) -> bool:
        """
        Apply the control frame at C{buf[start:end]}; C{False} if the frame
        is not one. Control frames always carry a valid checksum.
        """
        subscription = parse_control(buf, start, end)
        if subscription is None:
            return False
        actual = frame_checksum(buf, start, end)
        if actual != header.checksum:
            raise BadChecksum(
                f"control frame checksum 0x{header.checksum:08x} does not match its "
                f"CRC-32 0x{actual:08x}"
            )
        self.factory.subscribe(self, subscription)
        self.stats.control_frames += 1
        self.factory.totals.control_frames += 1
        self.log.info(
            "client {client_id} is now a {role}{details}",
            client_id=self.stats.client_id,
            role=subscription.role,
            details=_describe(subscription),
        )
        return True

    def _sequenceAnomaly(self, header: Header, last: int) -> None:
        """Count a sequence that does not follow the source's last one."""
        stats, totals = self.stats, self.factory.totals
        sequence = header.sequence
        if sequence > last:
            missing = sequence - last - 1
            stats.sequence_gaps += missing
            totals.sequence_gaps += missing
            kind = "gap"
        elif sequence == last:
            stats.sequence_duplicates += 1
            totals.sequence_duplicates += 1
            kind = "duplicate"
        else:
            stats.sequence_regressions += 1
            totals.sequence_regressions += 1
            kind = "regression"
        if sequence != last:
            self._sequences[header.source] = sequence
        self.factory.sequenceAnomaly(self, kind, header, last)

    def _loseFraming(self, error: FramingLost) -> None:
        """The stream cannot be cut into frames any more: count, log, close."""
        error.client_id = self.stats.client_id
        self._closing = True
        self.stats.close_reason = error.reason
        self.factory.rejected(self, error)
        self.outbox.flushAndClose()


def _describe(subscription: Subscription) -> str:
    parts = []
    if subscription.sources is not None:
        parts.append(f"sources {sorted(subscription.sources)}")
    if subscription.tlv_types is not None:
        parts.append(f"TLV types {sorted(subscription.tlv_types)}")
    return f" ({', '.join(parts)})" if parts else ""
