"""
One stream of frames into the relay: the scan of each chunk, admission,
sequence tracking and control frames, with no transport in sight.

A local client's connection (L{protocol.RelayProtocol}) and each other relay
heard through NATS (the bridge's inbound side) feed their bytes to an
L{Ingest}; what it accepts goes to its relay's C{broadcast}, what it refuses
is counted by the relay's accounting. What differs between the two is given
as hooks, as Twisted's C{IntNStringReceiver} lets a subclass say what to do
with a string (C{stringReceived}) and with a length over the limit
(C{lengthLimitExceeded}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from ..access import NotAllowedToPublish
from ..control import Control, ControlFlood, is_control, parse_control
from ..domains import RelayDomain
from ..framing import Framer
from ..interfaces import IRelayLogic
from ..scan import scan_run
from ..validation import FramePolicy, not_forwarded
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
    IncompleteFrameTimeout,
    MiB,
    PartialFramesOverLimit,
    frame_checksum,
    unpack_header,
)
from .accounting import CONTROL_RATE, Accounting, ClientStats

#: The source before any frame: no source byte equals it.
NO_SOURCE = -1
#: Bytes all the streams of one relay may hold of frames not yet complete.
PARTIAL_LIMIT = 128 * MiB
#: Seconds a stream may take to complete a frame it began.
PARTIAL_TIMEOUT = 30.0


class PartialFrames:
    """
    The bytes every stream of one relay holds of frames it has begun and not
    finished, bounded in all (C{limit}) and in time (C{timeout}): without
    it, connections that each send all but the last byte of a maximum-size
    frame, or trickle a header a byte at a time, would pin memory and
    connections for ever.
    """

    def __init__(
        self, clock: IReactorTime, limit: int = PARTIAL_LIMIT, timeout: float = PARTIAL_TIMEOUT
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.timeout = timeout
        self.held = 0
        #: The streams holding part of a frame, and since when.
        self.since: dict[Ingest, float] = {}

    def update(self, stream: Ingest, before: int, after: int, restarted: bool = False) -> bool:
        """
        C{stream} now holds C{after} bytes (C{before} until now) of a frame,
        a new one if C{restarted}; C{False} past the limit.
        """
        self.held += after - before
        if after and (restarted or not before):
            self.since[stream] = self.clock.seconds()
        elif before and not after:
            self.since.pop(stream, None)
        return self.held <= self.limit

    def expired(self) -> list[Ingest]:
        """The streams that began a frame more than C{timeout} seconds ago."""
        deadline = self.clock.seconds() - self.timeout
        return [stream for stream, since in self.since.items() if since <= deadline]


class IngestSink(Protocol):
    """What an ingest needs of its relay (the L{relay.RelayFactory})."""

    logic: IRelayLogic
    policy: FramePolicy
    accounting: Accounting
    partials: PartialFrames
    #: The last sequence accepted per source, across every stream.
    sequences: dict[int, int]

    def broadcast(self, sender: Ingest, runs: list[bytes], frames: int) -> None:
        """Accept C{runs}, contiguous slices holding C{frames} frames of C{sender}."""


class Ingest:
    """
    The relay's side of one stream of frames.

    L{feed} takes each chunk read; L{end} says the stream (or one message of
    it) ended. The hooks:

     - C{onControl(control)}: a control frame arrived, to be applied now
       (the frames before it are broadcast already). C{None}: control frames
       are not taken from this stream; they are filtered as frames of another
       domain.
     - C{onFramingLost(error)}: the stream can no longer be cut into frames;
       the error is counted and logged already, the rest of the chunk dropped.
       C{None}: nothing more to do (the next data starts afresh after L{end}).

    @ivar may_publish: whether the frames are relayed; if not, the first one
        loses the stream (L{NotAllowedToPublish}).
    @ivar bridged: whether the frames come from another relay through NATS:
        they are not published to NATS again.
    """

    may_publish = True

    def __init__(
        self,
        relay: IngestSink,
        stats: ClientStats,
        *,
        onControl: Callable[[Control], None] | None,
        onFramingLost: Callable[[FramingLost], None] | None,
        bridged: bool = False,
        lost_framing: str = "closing client {client_id}",
    ) -> None:
        """
        @param lost_framing: what the log says when this stream's framing is lost.
        """
        self.relay = relay
        self.stats = stats
        self.onControl = onControl
        self.onFramingLost = onFramingLost
        self.bridged = bridged
        self.lost_framing = lost_framing
        self.accounting = relay.accounting
        self.partials = relay.partials
        #: Bytes of an incomplete frame, as last told to C{partials}.
        self._held = 0
        policy = relay.policy
        self._framer = Framer(policy.max_frame_size)
        self._check = policy.check if policy.inspects_frames else None
        self._verify, self._allowed = policy.scan_checks
        #: The relay_domain the domain forwards, when that is all its
        #: should_forward decides (a RelayDomain): the scan then compares it
        #: itself. None when should_forward must see every frame.
        self._routedDomain = (
            relay.logic.domain
            if type(relay.logic).should_forward is RelayDomain.should_forward
            else None
        )
        #: Last sequence seen per source on this stream, except for the
        #: source of the latest frame (_source), whose last one is in _last.
        self._sequences: dict[int, int] = {}
        self._source = NO_SOURCE
        self._last = 0
        #: What a control frame asked for, applied by the scan.
        self._control: Control | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return self._framer.buffered

    def feed(self, data: bytes) -> None:
        """
        One pass over the chunk: cut it into frames, admit or refuse each,
        track sequences, and broadcast the accepted frames as contiguous runs.

        This is the hot path. Runs of frames that need nothing but the scan
        (the relay's own domain, passing the policy's checks, continuing
        their source's sequence: nearly all of every relay's) are passed over
        by L{scan_run}, natively when it is built. Every other frame is
        handled here, one at a time, and refused here if it must be.
        """
        relay = self.relay
        self.accounting.received(self.stats, len(data))
        framer = self._framer
        buf = framer.take(data)
        if buf is None:
            # More of a frame begun: held until it is whole, and counted.
            if not self._hold(framer.buffered):
                self._lose(self._overLimit())
            return
        unpack, max_payload = ROUTING.unpack_from, framer.max_payload_size
        routed = self._routedDomain
        # Frames of this domain are accepted by the scan, which runs the
        # policy's checks itself; the one it stops at is looked at below.
        scanned = routed if self.may_publish else None
        unchecked = scanned if self._check is None else None
        verify, allowed = self._verify, self._allowed
        source, last = self._source, self._last
        runs: list[bytes] = []
        frames = run_start = offset = 0
        end = len(buf)
        last_start = end - HEADER_SIZE
        lost = None
        try:
            while offset <= last_start:
                if scanned is not None:
                    offset, skimmed, last = scan_run(
                        buf, offset, end, max_payload, scanned, source, last, verify, allowed
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
                            relay.broadcast(self, runs, frames)
                            runs, frames = [], 0
                        control, self._control = self._control, None
                        self.onControl(control)  # type: ignore[misc]  # set only with a hook
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
            relay.sequences[source] = last
        if run_start < offset:
            runs.append(buf[run_start:offset])
        if frames:
            relay.broadcast(self, runs, frames)
        # A frame finished in this chunk: what is held now is a new one.
        if lost is None and not self._hold(framer.buffered, restarted=offset > 0):
            lost = self._overLimit()
        if lost is not None:
            self._lose(lost)

    def _overLimit(self) -> PartialFramesOverLimit:
        return PartialFramesOverLimit(
            f"{self.partials.held} bytes of incomplete frames held by all clients, "
            f"over the relay's limit of {self.partials.limit}",
            offset=self._framer.position,
        )

    def expire(self) -> None:
        """The frame begun has taken longer than the relay allows: lose the stream."""
        self._lose(
            IncompleteFrameTimeout(
                f"{self._framer.buffered} bytes of a frame not completed within "
                f"{self.partials.timeout:g}s",
                offset=self._framer.position,
            )
        )

    def _lose(self, lost: FramingLost) -> None:
        """The stream cannot go on: count and log C{lost}, drop what is held, call the hook."""
        lost.client_id = self.stats.client_id
        self.accounting.rejected(self.stats, lost, self.lost_framing)
        self.release()
        if self.onFramingLost is not None:
            self.onFramingLost(lost)

    def _hold(self, buffered: int, restarted: bool = False) -> bool:
        """
        Tell the relay this stream holds C{buffered} bytes of a frame
        (C{restarted}: a new one, begun since the last call); C{False} past
        its limit.
        """
        before, self._held = self._held, buffered
        if before == buffered and not (restarted and buffered):
            return True
        return self.partials.update(self, before, buffered, restarted)

    def release(self) -> None:
        """Let go of a frame begun (the stream is gone or lost), freeing its bytes now."""
        self._hold(0)
        self._framer = Framer(self.relay.policy.max_frame_size)

    def end(self, what: str) -> None:
        """
        The stream, or one message of it, ended (C{what}: how, for the log):
        a frame it left incomplete is refused, and the next data starts afresh.
        """
        framer = self._framer
        if framer.buffered:
            self._reject(
                IncompleteFrame(
                    f"{what} with {framer.buffered} bytes of an incomplete frame",
                    offset=framer.position,
                )
            )
        self.release()

    def _reject(self, error: FrameRejected) -> None:
        error.client_id = self.stats.client_id
        self.accounting.rejected(self.stats, error, self.lost_framing)

    def _admit(self, buf: bytes, start: int, end: int, routed: bool) -> bool:
        """
        The closer look the scan could not take itself: control frames, the
        client's right to publish, the domain's C{should_forward} (unless
        C{routed}: the scan already knows the domain forwards it), then the
        policy's checks. A refused frame is reported here.
        """
        logic = self.relay.logic
        try:
            header = None if routed else unpack_header(buf, start)
            if header is not None and self.onControl is not None and is_control(header):
                if self._takeControl(buf, start, end, header):
                    return False
            if not self.may_publish:
                raise NotAllowedToPublish(
                    f"{self.stats.peer} is not allowed to publish on the "
                    f"{logic.name} relay",
                    header=bytes(buf[start : start + HEADER_SIZE]),
                )
            if header is not None and not logic.should_forward(header):
                raise not_forwarded(logic, header)
            if self._check is not None:
                self._check(buf, start, end)
        except FrameRejected as error:
            error.offset = self._framer.position + start
            self._reject(error)
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
            sequences[source] = self.relay.sequences[source] = last
        previous = sequences.get(src)
        if previous is None or sequence == previous + 1:
            return sequence
        self.accounting.sequenceAnomaly(self.stats, src, sequence, previous)
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
        # An account request alone is cheap to answer, and a flush must be
        # answered: it is not held to the rate (its answers are bounded by
        # the outbox's limit on the relay's own frames).
        limited = control.subscription is not None or bool(control.recovery)
        if not self.accounting.control(self.stats, limited=limited):
            raise ControlFlood(
                f"more than {CONTROL_RATE} control frames in a second from "
                f"{self.stats.peer}"
            )
        self._control = control
        return True
