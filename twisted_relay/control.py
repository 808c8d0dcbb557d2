"""
Control frames: how a client tells the relay what it wants to receive.

A control frame is a system-domain (4) frame whose TLVs are all control TLVs
from the vendor range. The relay consumes it (it is never forwarded) and
replaces the sender's subscription with what it says; a TLV left out means
the default. A client that sends none receives everything, as plain
Protocol V2 clients expect.

    250 RelayRole          1 byte: 0 publish and subscribe (default), 1 publish only
    251 SubscribeSources   the source types to receive, one byte each (all if absent)
    252 SubscribeTLVTypes  the TLV types to receive, one byte each (all if absent):
                           a frame is received if any of its TLVs is of one of them

The relay answers each control frame it applies with a RelayInfo frame (system
domain, TLV 253: its relay_domain, then its name), so a client learns which
relay it reached.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .wire import HEADER_SIZE, Domain, FrameRejected, Header, build_frame, tlv_spans

RELAY_ROLE = 250
SUBSCRIBE_SOURCES = 251
SUBSCRIBE_TLV_TYPES = 252
CONTROL_TLVS = frozenset({RELAY_ROLE, SUBSCRIBE_SOURCES, SUBSCRIBE_TLV_TYPES})
#: The relay's answer to a control frame: its relay_domain (1 byte), then its name.
RELAY_INFO = 253

ROLE_BOTH = 0
ROLE_PUBLISH_ONLY = 1


class BadControlFrame(FrameRejected):
    reason = "bad_control_frame"


@dataclass(frozen=True)
class Subscription:
    """What one client receives. The default receives everything."""

    publish_only: bool = False
    sources: frozenset[int] | None = None
    tlv_types: frozenset[int] | None = None

    @property
    def filtered(self) -> bool:
        """Whether frames must be picked one by one for this client."""
        return self.sources is not None or self.tlv_types is not None

    @property
    def role(self) -> str:
        if self.publish_only:
            return "publisher"
        return "filtered subscriber" if self.filtered else "subscriber"

    def wants(self, buf: bytes, start: int, end: int, header: Header) -> bool:
        if self.sources is not None and header.source not in self.sources:
            return False
        if self.tlv_types is None:
            return True
        try:
            return any(
                tlv_type in self.tlv_types
                for tlv_type, _, _ in tlv_spans(buf, start + HEADER_SIZE, end)
            )
        except FrameRejected:
            return False


def is_control(header: Header) -> bool:
    return header.relay_domain == Domain.SYSTEM


def parse_control(buf: bytes, start: int, end: int) -> Subscription | None:
    """
    The subscription a system-domain frame asks for, or C{None} if it is not
    a control frame (it has no TLVs or some that are not control TLVs).

    @raise BadControlFrame: a control TLV with an impossible value.
    """
    fields: dict[int, bytes] = {}
    for tlv_type, value_start, value_end in tlv_spans(buf, start + HEADER_SIZE, end):
        if tlv_type not in CONTROL_TLVS:
            return None
        fields[tlv_type] = bytes(buf[value_start:value_end])
    if not fields:
        return None
    role = fields.get(RELAY_ROLE, bytes([ROLE_BOTH]))
    if role not in (bytes([ROLE_BOTH]), bytes([ROLE_PUBLISH_ONLY])):
        raise BadControlFrame(f"RelayRole value {role.hex()} is not 00 or 01")
    sources = fields.get(SUBSCRIBE_SOURCES)
    tlv_types = fields.get(SUBSCRIBE_TLV_TYPES)
    return Subscription(
        publish_only=role[0] == ROLE_PUBLISH_ONLY,
        sources=None if sources is None else frozenset(sources),
        tlv_types=None if tlv_types is None else frozenset(tlv_types),
    )


def control_frame(
    *,
    publish_only: bool = False,
    sources: Iterable[int] | None = None,
    tlv_types: Iterable[int] | None = None,
    source: int = 0,
    sequence: int = 0,
) -> bytes:
    """
    The control frame a client sends to declare its role and subscription.
    With no arguments it restores the default: receive everything.
    """
    tlvs = [(RELAY_ROLE, bytes([ROLE_PUBLISH_ONLY if publish_only else ROLE_BOTH]))]
    if sources is not None:
        tlvs.append((SUBSCRIBE_SOURCES, bytes(sorted(set(sources)))))
    if tlv_types is not None:
        tlvs.append((SUBSCRIBE_TLV_TYPES, bytes(sorted(set(tlv_types)))))
    return build_frame(Domain.SYSTEM, source, sequence, tlvs)


def relay_info_frame(domain: int, name: str) -> bytes:
    """The relay's answer to a control frame."""
    return build_frame(Domain.SYSTEM, 0, 0, [(RELAY_INFO, bytes([domain]) + name.encode())])


def parse_relay_info(header: Header, frame: bytes) -> tuple[int, str] | None:
    """C{(relay_domain, name)} if C{frame} is a relay's answer, else C{None}."""
    if header.relay_domain != Domain.SYSTEM:
        return None
    try:
        spans = list(tlv_spans(frame, HEADER_SIZE, len(frame)))
    except FrameRejected:
        return None
    if len(spans) != 1 or spans[0][0] != RELAY_INFO or spans[0][2] - spans[0][1] < 1:
        return None
    _, start, end = spans[0]
    return frame[start], frame[start + 1 : end].decode(errors="replace")
