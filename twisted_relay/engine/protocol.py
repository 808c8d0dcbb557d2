"""
The per-connection protocol: a thin adapter from a transport's bytes to the
relay. It frames each received chunk in one pass, applies the domain's filter
and checks, and hands contiguous runs of accepted frames to the factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..access import NotAllowedToPublish, peer_of
from ..control import is_control, parse_control, relay_info_frame
from ..domains import RelayDomain
from ..framing import Framer
from ..scan import scan_run
from ..wire import (
    HEADER_SIZE,
    MAGIC,
    ROUTING,
    VERSION,
    BadChecksum,
    FrameRejected,
    FramingLost,
    Header,
    IncompleteFrame,
    NotForwarded,
    frame_checksum,
    unpack_header,
)

#: The source before any frame: no source byte equals it.
NO_SOURCE = -1

if TYPE_CHECKING:
    from ..control import Control, Subscription
    from .delivery import Outbox
    from .relay import ClientStats, RelayFactory


@implementer(IHandshakeListener)
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
    may_publish = True
    may_subscribe = True
    #: The client's bytes_out when the heartbeat last looked at it.
    heard = -1
    audit_index = 0
    _closing = False
    #: What a control frame asked for, applied by the scan.
    _control: Control | None = None
    #: What the relay logs when this sender's stream cannot be cut into frames.
    lostFramingLog = "closing client {client_id}"
    #: Whether the frames came from another relay through NATS: they are not
    #: published to NATS again.
    bridged = False

    @property
    def handshaking(self) -> bool:
        """Whether the peer is not known yet: a TLS handshake is under way."""
        return ISSLTransport.providedBy(self.transport)

    def handshakeCompleted(self) -> None:
        """The TLS peer is known now: settle what it may do."""
        if not self._closing:
            self.factory.identified(self, peer_of(self.transport))

    def connectionMade(self) -> None:
        self.factory.register(self)
        self._startFraming()

    def _startFraming(self) -> None:
        """Set up the scan's state: what it checks, and where each source got to."""
        factory = self.factory
        self._framer = Framer(factory.policy.max_frame_size)
        self._check = factory.policy.check if factory.policy.inspects_frames else None
        #: The relay_domain the domain forwards, when that is all its
        #: should_forward decides (a RelayDomain): the scan then compares it
        #: itself. None when should_forward must see every frame.
        self._routedDomain = (
            factory.logic.domain
            if type(factory.logic).should_forward is RelayDomain.should_forward
            else None
        )
        #: Last sequence seen per source on this connection, except for the
        #: source of the latest frame (_source), whose last one is in _last.
        self._sequences: dict[int, int] = {}
        self._source = NO_SOURCE
        self._last = 0

    def connectionLost(self, reason: Failure) -> None:
        if self._framer.buffered and not (self._closing or self.factory.draining):
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
        """
        One pass over the chunk: cut it into frames, admit or refuse each,
        track sequences, and forward the accepted frames as contiguous runs.

        This is the hot path. Runs of frames that need nothing but the scan
        (the relay's own domain with no checks to run, continuing their
        source's sequence: nearly all of the market relay's) are passed over
        by L{scan_run}, natively when it is built. Every other frame is
        handled here, one at a time.
        """
        factory = self.factory
        factory.received(self, len(data))
        framer = self._framer
        buf = framer.take(data)
        if buf is None:
            return
        unpack, max_payload = ROUTING.unpack_from, framer.max_payload_size
        routed = self._routedDomain
        # Frames of this domain are accepted by the scan alone.
        unchecked = routed if self._check is None and self.may_publish else None
        source, last = self._source, self._last
        runs: list[bytes] = []
        frames = run_start = offset = 0
        end = len(buf)
        last_start = end - HEADER_SIZE
        lost = None
        try:
            while offset <= last_start:
                if unchecked is not None:
                    offset, skimmed, last = scan_run(
                        buf, offset, end, max_payload, unchecked, source, last
                    )
                    frames += skimmed
                    if offset > last_start:
                        break
                magic, domain, version, src, sequence, size = unpack(buf, offset)
                if magic != MAGIC or version != VERSION or size > max_payload:
                    raise framer.lost(buf, offset)
                frame_end = offset + HEADER_SIZE + size
                if frame_end > end:
                    break
                if domain != unchecked and not self._admit(
                    buf, offset, frame_end, domain == routed
                ):
                    if run_start < offset:
                        runs.append(buf[run_start:offset])
                    run_start = offset = frame_end
                    if self._control is not None:
                        # A control frame: the frames before it go out under
                        # the subscription they arrived under.
                        if frames:
                            factory.broadcast(self, runs, frames)
                            runs, frames = [], 0
                        self._applyControl(self._control)
                        self._control = None
                    continue
                frames += 1
                if src == source and sequence == last + 1:
                    last = sequence
                else:
                    last = self._track(source, last, src, sequence)
                    source = src
                offset = frame_end
            framer.keep(buf, offset)
        except FramingLost as error:
            lost = error
        self._source, self._last = source, last
        if source != NO_SOURCE:
            factory.sequences[source] = last
        if run_start < offset:
            runs.append(buf[run_start:offset])
        if frames:
            factory.broadcast(self, runs, frames)
        if lost is not None:
            self._loseFraming(lost)

    def _admit(self, buf: bytes, start: int, end: int, routed: bool) -> bool:
        """
        The closer look the scan could not take itself: control frames, the
        client's right to publish, the domain's C{should_forward} (unless
        C{routed}: the scan already knows the domain forwards it), then the
        policy's checks. A refused frame is reported here.
        """
        factory = self.factory
        try:
            header = None if routed else unpack_header(buf, start)
            if header is not None and is_control(header):
                if self._takeControl(buf, start, end, header):
                    return False
            if not self.may_publish:
                raise NotAllowedToPublish(
                    f"{self.stats.peer} is not allowed to publish on the "
                    f"{factory.logic.name} relay",
                    header=bytes(buf[start : start + HEADER_SIZE]),
                )
            if header is not None and not factory.logic.should_forward(header):
                raise NotForwarded(
                    f"frame of relay_domain {header.relay_domain} (source "
                    f"{header.source}, sequence {header.sequence}) is not "
                    f"carried by the {factory.logic.name} relay"
                )
            if self._check is not None:
                self._check(buf, start, end)
        except FrameRejected as error:
            error.offset = self._framer.position + start
            error.client_id = self.stats.client_id
            factory.rejected(self, error)
            return False
        return True

    def _track(self, source: int, last: int, src: int, sequence: int) -> int:
        """
        The frame's C{sequence} does not simply continue the previous frame's
        source: file that source's C{last} sequence, check this one against
        its own source's, and return the last sequence of C{src} now.
        """
        sequences = self._sequences
        if source != NO_SOURCE:
            sequences[source] = self.factory.sequences[source] = last
        previous = sequences.get(src)
        if previous is None or sequence == previous + 1:
            return sequence
        self._sequenceAnomaly(src, sequence, previous)
        return previous if sequence == previous else sequence

    def _takeControl(self, buf: bytes, start: int, end: int, header: Header) -> bool:
        """
        Take the control frame at C{buf[start:end]}, to be applied once the
        frames before it are sent; C{False} if the frame is not one. Control
        frames always carry a valid checksum.
        """
        control = parse_control(buf, start, end)
        if control is None:
            return False
        actual = frame_checksum(buf, start, end)
        if actual != header.checksum:
            raise BadChecksum(
                f"control frame checksum 0x{header.checksum:08x} does not match its "
                f"CRC-32 0x{actual:08x}"
            )
        self._control = control
        self.stats.control_frames += 1
        self.factory.totals.control_frames += 1
        return True

    def _applyControl(self, control: Control) -> None:
        """A new subscription, answered with the relay's RelayInfo; a replay."""
        factory = self.factory
        subscription = control.subscription
        if subscription is not None:
            factory.subscribe(self, subscription)
            self.log.info(
                "client {client_id} is now a {role}{details}",
                client_id=self.stats.client_id,
                role=self.stats.role,
                details=_describe(subscription),
            )
            answer = relay_info_frame(factory.logic.domain, factory.logic.name)
            self.outbox.send([answer], 0, len(answer))
        if control.recovery:
            factory.recover(self, control.recovery)

    def _sequenceAnomaly(self, source: int, sequence: int, last: int) -> None:
        """Count a sequence of C{source} that does not follow its C{last}."""
        stats, totals = self.stats, self.factory.totals
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
        self.factory.sequenceAnomaly(self, kind, source, sequence, last)

    def _loseFraming(self, error: FramingLost) -> None:
        """The stream cannot be cut into frames any more: count, log, close."""
        error.client_id = self.stats.client_id
        self._closing = True
        self.stats.close_reason = error.reason
        self.factory.rejected(self, error)
        self.outbox.flushAndClose(self.factory.delivery.stall_timeout)


def _describe(subscription: Subscription) -> str:
    parts = []
    if subscription.sources is not None:
        parts.append(f"sources {sorted(subscription.sources)}")
    if subscription.tlv_types is not None:
        parts.append(f"TLV types {sorted(subscription.tlv_types)}")
    return f" ({', '.join(parts)})" if parts else ""
