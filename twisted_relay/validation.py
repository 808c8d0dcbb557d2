"""
What the relay checks inside each whole frame, per domain.

The domain (L{IRelayLogic}) states its defaults; the operator may override the
frame size limit and checksum verification on the command line. The result is
one immutable L{FramePolicy} shared by every connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from .framing import Framer
from .interfaces import IRelayLogic
from .scan import NO_WALK, allowed_types
from .wire import (
    CHECKSUM_OFFSET,
    HEADER_SIZE,
    MAGIC,
    UINT32,
    VERSION,
    BadChecksum,
    FrameError,
    Header,
    IncompleteFrame,
    NotForwarded,
    UnknownTLVType,
    frame_checksum,
    tlv_spans,
    unpack_header,
)


@dataclass(frozen=True)
class FramePolicy:
    """The checks one relay applies to each frame after framing it."""

    max_frame_size: int
    verify_checksum: bool
    strict_tlv: bool
    allowed_tlv_types: frozenset[int]

    def __post_init__(self) -> None:
        if self.max_frame_size < HEADER_SIZE:
            raise ValueError(
                f"max frame size {self.max_frame_size} is smaller than the "
                f"{HEADER_SIZE}-byte header"
            )

    @classmethod
    def for_logic(
        cls,
        logic: IRelayLogic,
        *,
        max_frame_size: int | None = None,
        verify_checksum: bool | None = None,
    ) -> FramePolicy:
        """The domain's policy, with the operator's overrides where given."""
        return cls(
            max_frame_size=logic.max_frame_size if max_frame_size is None else max_frame_size,
            verify_checksum=(
                logic.verify_checksum if verify_checksum is None else verify_checksum
            ),
            strict_tlv=logic.strict_tlv,
            allowed_tlv_types=frozenset(logic.allowed_tlv_types),
        )

    @property
    def scan_checks(self) -> tuple[bool, bytes]:
        """L{check} as the scan runs it: C{(verify, allowed)} of L{scan_run}."""
        allowed = allowed_types(self.allowed_tlv_types) if self.strict_tlv else NO_WALK
        return self.verify_checksum, allowed

    @property
    def inspects_frames(self) -> bool:
        """Whether L{check} has anything to do; if not, callers skip it."""
        return self.verify_checksum or self.strict_tlv

    def check(self, buf: bytes, start: int, end: int) -> None:
        """
        Check the frame at C{buf[start:end]}, whose header the scan has
        already checked.

        @raise FrameRejected: the frame must be dropped.
        """
        if self.verify_checksum:
            expected = UINT32.unpack_from(buf, start + CHECKSUM_OFFSET)[0]
            actual = frame_checksum(buf, start, end)
            if actual != expected:
                header = unpack_header(buf, start)
                raise BadChecksum(
                    f"checksum 0x{expected:08x} does not match the frame's CRC-32 "
                    f"0x{actual:08x} (source {header.source}, sequence {header.sequence})"
                )
        if self.strict_tlv:
            allowed = self.allowed_tlv_types
            for tlv_type, _, _ in tlv_spans(buf, start + HEADER_SIZE, end):
                if tlv_type not in allowed:
                    header = unpack_header(buf, start)
                    raise UnknownTLVType(
                        f"TLV type {tlv_type} is not allowed on this relay "
                        f"(source {header.source}, sequence {header.sequence})"
                    )


def not_forwarded(logic: IRelayLogic, header: Header) -> NotForwarded:
    """The refusal of a frame that C{logic}'s C{should_forward} does not carry."""
    return NotForwarded(
        f"frame of relay_domain {header.relay_domain} (source {header.source}, sequence "
        f"{header.sequence}) is not carried by the {logic.name} relay"
    )


def refusal(logic: IRelayLogic, policy: FramePolicy, frame: bytes) -> FrameError | None:
    """
    Why the relay of C{logic} would refuse C{frame} under C{policy}, with
    the relay's own reason; C{None} if it would take it. What a publisher
    checks before sending (the relay may be started with other overrides).
    """
    try:
        if len(frame) < HEADER_SIZE:
            return IncompleteFrame(f"{len(frame)} bytes are not one whole frame")
        header = unpack_header(frame)
        if (
            header.magic != MAGIC
            or header.version != VERSION
            or header.payload_size > policy.max_frame_size - HEADER_SIZE
        ):
            return Framer(policy.max_frame_size).lost(frame, 0)
        if len(frame) != HEADER_SIZE + header.payload_size:
            return IncompleteFrame(
                f"{len(frame)} bytes are not one whole frame of payload_size "
                f"{header.payload_size}"
            )
        if not logic.should_forward(header):
            return not_forwarded(logic, header)
        policy.check(frame, 0, len(frame))
    except FrameError as error:
        return error
    return None
