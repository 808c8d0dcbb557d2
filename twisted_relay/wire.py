"""
Protocol V2 wire format: the 32-byte header, frame building, CRC-32, the TLV
walk, and one exception class per way a frame can be wrong.

This module is the only place that knows how the bytes are laid out; the relay,
its tests and its clients all build and read frames through it.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from enum import IntEnum
from typing import ClassVar, NamedTuple

__all__ = [
    "BadChecksum",
    "BadTLV",
    "BadMagic",
    "CHECKED_HEADER_SIZE",
    "CHECKSUM_OFFSET",
    "COMPLIANCE_TLVS",
    "Domain",
    "EXECUTION_TLVS",
    "EXTENDED_TLV",
    "FrameError",
    "FrameRejected",
    "FrameTooLarge",
    "FramingLost",
    "HEADER",
    "HEADER_SIZE",
    "Header",
    "IncompleteFrame",
    "IncompleteFrameTimeout",
    "KiB",
    "MAGIC",
    "MAGIC_BYTES",
    "MARKET_DATA_TLVS",
    "MAX_EXTENDED_TLV",
    "MAX_STANDARD_TLV",
    "MiB",
    "NotForwarded",
    "PAYLOAD_SIZE_OFFSET",
    "PORTFOLIO_RISK_TLVS",
    "PartialFramesOverLimit",
    "REJECT_REASONS",
    "ROUTING",
    "SIGNAL_TLVS",
    "SOURCE_SEQUENCE",
    "SYSTEM_TLVS",
    "Source",
    "TLV_NAMES",
    "TruncatedTLV",
    "UINT32",
    "UnknownTLVType",
    "UnsupportedVersion",
    "VENDOR_TLVS",
    "VERSION",
    "build_frame",
    "encode_tlvs",
    "frame_checksum",
    "frame_spans",
    "iter_tlvs",
    "tlv_spans",
    "unpack_header",
]

MAGIC = 0xDEADBEEF
VERSION = 1
HEADER = struct.Struct("<IBBBBQQII")
HEADER_SIZE = HEADER.size
#: The header fields that framing and routing need, in one unpack: magic,
#: relay_domain, version, source, sequence, payload_size.
ROUTING = struct.Struct("<IBBBxQ8xI")
PAYLOAD_SIZE_OFFSET = 24
#: A little-endian u32 field (payload_size, checksum), read in place.
UINT32 = struct.Struct("<I")
#: A source type and one of its sequence numbers, as system frames and the
#: audit log carry them.
SOURCE_SEQUENCE = struct.Struct("<BQ")
CHECKSUM_OFFSET = 28
#: Bytes of the header covered by the checksum (everything before it).
CHECKED_HEADER_SIZE = 28
MAGIC_BYTES = struct.pack("<I", MAGIC)

KiB = 1024
MiB = 1024 * KiB

#: Largest value a standard TLV can carry, and the marker of an extended TLV.
MAX_STANDARD_TLV = 255
EXTENDED_TLV = 255
MAX_EXTENDED_TLV = 0xFFFF
_EXTENDED = struct.Struct("<BBBH")


class Domain(IntEnum):
    """The relay domains of the `relay_domain` header field."""

    MARKET_DATA = 1
    SIGNAL = 2
    EXECUTION = 3
    SYSTEM = 4


class Source(IntEnum):
    """The source service types named by Protocol V2."""

    BINANCE = 1
    KRAKEN = 2
    COINBASE = 3
    POLYGON = 4
    GEMINI = 5
    ARBITRAGE_STRATEGY = 20
    MARKET_MAKER = 21
    TREND_FOLLOWER = 22
    KRAKEN_SIGNAL_STRATEGY = 23
    PORTFOLIO_MANAGER = 40
    RISK_MANAGER = 41
    EXECUTION_ENGINE = 42
    DASHBOARD = 60
    METRICS_COLLECTOR = 61
    STATE_MANAGER = 62
    MARKET_DATA_RELAY = 80
    SIGNAL_RELAY = 81
    EXECUTION_RELAY = 82


#: TLV type families of Protocol V2, inclusive ranges.
MARKET_DATA_TLVS = range(1, 20)
SIGNAL_TLVS = range(20, 40)
EXECUTION_TLVS = range(40, 60)
PORTFOLIO_RISK_TLVS = range(60, 80)
COMPLIANCE_TLVS = range(80, 100)
SYSTEM_TLVS = range(100, 120)
VENDOR_TLVS = range(200, 255)

#: Names of the TLV types, from protocol-v2.md, as the tools print them.
TLV_NAMES = {
    1: "Trade", 2: "Quote", 3: "OrderBook", 11: "PoolSwap", 16: "PoolSync", 18: "GasPrice",
    20: "SignalIdentity", 22: "Economics", 32: "ArbitrageSignal",
    40: "OrderRequest", 41: "OrderStatus", 42: "Fill", 43: "OrderCancel", 44: "OrderModify",
    45: "ExecutionReport", 60: "RiskDecision", 61: "PositionUpdate", 71: "CircuitBreaker",
    100: "Heartbeat", 101: "Snapshot", 102: "Error", 110: "RecoveryRequest",
    111: "RecoveryResponse", 112: "SequenceSync",
}


class Header(NamedTuple):
    """A decoded 32-byte Protocol V2 header, fields in wire order."""

    magic: int
    relay_domain: int
    version: int
    source: int
    flags: int
    sequence: int
    timestamp: int
    payload_size: int
    checksum: int

    def pack(self) -> bytes:
        return HEADER.pack(*self)


def unpack_header(data: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    """Decode the header at C{offset}; the caller guarantees 32 bytes are there."""
    return Header._make(HEADER.unpack_from(data, offset))


def frame_checksum(
    data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> int:
    """
    CRC-32 of the frame at C{data[start:end]}: its first 28 header bytes, then
    its payload, so the checksum field itself is left out.
    """
    if end is None:
        end = len(data)
    crc = zlib.crc32(data[start : start + CHECKED_HEADER_SIZE])
    return zlib.crc32(data[start + HEADER_SIZE : end], crc)


def encode_tlvs(tlvs: Iterable[tuple[int, bytes]]) -> bytes:
    """
    Encode C{(type, value)} pairs, choosing the standard form when the value
    fits in 255 bytes and the extended form otherwise.
    """
    parts = []
    for tlv_type, value in tlvs:
        if not 0 < tlv_type < EXTENDED_TLV:
            raise ValueError(f"TLV type {tlv_type} is outside 1-254")
        if len(value) <= MAX_STANDARD_TLV:
            parts.append(bytes((tlv_type, len(value))))
        elif len(value) <= MAX_EXTENDED_TLV:
            parts.append(_EXTENDED.pack(EXTENDED_TLV, 0, tlv_type, len(value)))
        else:
            raise ValueError(
                f"TLV type {tlv_type} value of {len(value)} bytes is over the "
                f"{MAX_EXTENDED_TLV}-byte limit of an extended TLV"
            )
        parts.append(bytes(value))
    return b"".join(parts)


def build_frame(
    domain: int,
    source: int,
    sequence: int,
    payload_or_tlvs: bytes | Iterable[tuple[int, bytes]],
    *,
    timestamp: int | None = None,
    flags: int = 0,
) -> bytes:
    """
    Build a complete frame with C{payload_size} and the CRC-32 filled in.

    @param payload_or_tlvs: the raw payload, or C{(type, value)} pairs to
        encode as TLVs.
    @param timestamp: nanoseconds since the epoch; now when not given.
    """
    if isinstance(payload_or_tlvs, (bytes, bytearray, memoryview)):
        payload = bytes(payload_or_tlvs)
    else:
        payload = encode_tlvs(payload_or_tlvs)
    if timestamp is None:
        timestamp = time.time_ns()
    head = HEADER.pack(
        MAGIC, domain, VERSION, source, flags, sequence, timestamp, len(payload), 0
    )
    crc = zlib.crc32(payload, zlib.crc32(head[:CHECKED_HEADER_SIZE]))
    return head[:CHECKED_HEADER_SIZE] + UINT32.pack(crc) + payload


def frame_spans(runs: Iterable[bytes]) -> Iterator[tuple[bytes, int, int, Header]]:
    """
    C{(run, start, end, header)} for each frame of C{runs}, runs of whole
    frames already checked (what the relay accepted).
    """
    for run in runs:
        offset = 0
        while offset < len(run):
            header = unpack_header(run, offset)
            end = offset + HEADER_SIZE + header.payload_size
            yield run, offset, end, header
            offset = end


def tlv_spans(
    buf: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """
    Walk the TLVs of the payload C{buf[start:end]}, yielding C{(type,
    value_start, value_end)} offsets into C{buf} for standard and extended
    TLVs alike, without copying anything.

    @raise TruncatedTLV: a TLV runs past the end of the payload.
    @raise BadTLV: an extended TLV's reserved byte is not 0.
    """
    if end is None:
        end = len(buf)
    offset = start
    while offset < end:
        tlv_start = offset
        tlv_type = buf[offset]
        if tlv_type == EXTENDED_TLV:
            if offset + _EXTENDED.size > end:
                raise TruncatedTLV(
                    f"extended TLV header at payload offset {offset - start} needs "
                    f"{_EXTENDED.size} bytes, {end - offset} left"
                )
            _, reserved, tlv_type, length = _EXTENDED.unpack_from(buf, offset)
            if reserved:
                raise BadTLV(
                    f"extended TLV at payload offset {offset - start} has reserved byte "
                    f"{reserved}, which must be 0"
                )
            value = offset + _EXTENDED.size
        else:
            if offset + 2 > end:
                raise TruncatedTLV(
                    f"TLV type {tlv_type} at payload offset {offset - start} has no "
                    f"length byte"
                )
            length = buf[offset + 1]
            value = offset + 2
        offset = value + length
        if offset > end:
            raise TruncatedTLV(
                f"TLV type {tlv_type} at payload offset {tlv_start - start} declares "
                f"{length} bytes, {end - value} left in the payload"
            )
        yield tlv_type, value, offset


def iter_tlvs(payload: bytes | bytearray | memoryview) -> Iterator[tuple[int, memoryview]]:
    """Walk a TLV payload, yielding C{(type, value)}; see L{tlv_spans}."""
    view = memoryview(payload)
    for tlv_type, start, end in tlv_spans(view):
        yield tlv_type, view[start:end]


class FrameError(Exception):
    """
    A frame the relay cannot accept.

    C{reason} is the short, stable name under which it is counted; C{fatal}
    says whether the stream's framing is lost with it. C{offset} (in the
    connection's byte stream) and C{client_id} are filled in by whoever knows
    them, so the message names the place as precisely as possible.
    """

    reason: ClassVar[str]
    fatal: ClassVar[bool]

    def __init__(
        self,
        detail: str,
        *,
        offset: int | None = None,
        client_id: int | None = None,
        header: bytes = b"",
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.offset = offset
        self.client_id = client_id
        self.header = header

    def __str__(self) -> str:
        message = self.detail
        if self.offset is not None:
            message += f" at offset {self.offset}"
        if self.client_id is not None:
            message += f" from client {self.client_id}"
        return message


class FramingLost(FrameError):
    """The stream can no longer be cut into frames: the connection must close."""

    fatal = True


class BadMagic(FramingLost):
    reason = "bad_magic"


class UnsupportedVersion(FramingLost):
    reason = "unsupported_version"


class FrameTooLarge(FramingLost):
    reason = "frame_too_large"


class IncompleteFrameTimeout(FramingLost):
    """A frame begun and not completed in the time the relay allows."""

    reason = "incomplete_frame_timeout"


class PartialFramesOverLimit(FramingLost):
    """The frames begun and not completed, by every client together, hold too much."""

    reason = "partial_frames_over_limit"


class FrameRejected(FrameError):
    """One frame is dropped; the frames around it are still trustworthy."""

    fatal = False


class IncompleteFrame(FrameRejected):
    """The connection ended part-way through a frame."""

    reason = "incomplete_frame"


class NotForwarded(FrameRejected):
    """The domain's C{should_forward} refused the frame (wrong domain, say)."""

    reason = "filtered"


class BadChecksum(FrameRejected):
    reason = "bad_checksum"


class UnknownTLVType(FrameRejected):
    reason = "unknown_tlv_type"


class TruncatedTLV(FrameRejected):
    reason = "truncated_tlv"


class BadTLV(FrameRejected):
    """A TLV that breaks the format otherwise (an extended TLV's reserved byte set)."""

    reason = "bad_tlv"


#: Every reason a frame can be refused for, in a stable order for reports.
REJECT_REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (
        BadMagic,
        UnsupportedVersion,
        FrameTooLarge,
        IncompleteFrameTimeout,
        PartialFramesOverLimit,
        IncompleteFrame,
        NotForwarded,
        BadChecksum,
        UnknownTLVType,
        TruncatedTLV,
        BadTLV,
    )
)
