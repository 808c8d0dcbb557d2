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

The relay answers each control frame that sets a subscription with a
RelayInfo frame (system domain, TLV 253: its relay_domain, then its name), so
a client learns which relay it reached.

Two Protocol V2 system TLVs are also understood (layouts in docs/protocol.md):

    100 Heartbeat          sent by the relay to a client that received nothing
                           for an interval: the interval (u32 ms), then the last
                           sequence forwarded per source (source u8, sequence u64)
    110 RecoveryRequest    sent by a client, in a control frame: source u8, first
                           sequence wanted u64; one TLV per source
    111 RecoveryResponse   the relay's answer, before the replayed frames:
                           source u8, first sequence wanted u64, status u8
    102 Error              sent by the relay to a client it closes because the
                           client's stream cannot be relayed: the reason it is
                           counted under (length u8, then the name), then what
                           happened (UTF-8)

and one of the relay's own, from the vendor range:

    254 Account            asked for by a client, in a control frame: a token
                           (u32); answered by the relay, after everything the
                           client sent before it is accepted or refused (and,
                           with an audit log, logged), with the token and the
                           connection's counts (L{Account})
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .scan import NO_WALK, allowed_types
from .wire import (
    HEADER_SIZE,
    SOURCE_SEQUENCE,
    UINT32,
    Domain,
    FrameRejected,
    Header,
    Source,
    build_frame,
    tlv_spans,
)

__all__ = [
    "ACCOUNT",
    "Account",
    "BUSY",
    "BadControlFrame",
    "ControlFlood",
    "CONTROL_TLVS",
    "Control",
    "ERROR",
    "EVERYTHING",
    "HEARTBEAT",
    "NOTHING",
    "NOT_SUBSCRIBED",
    "NO_AUDIT_LOG",
    "RECOVERY_REQUEST",
    "RECOVERY_RESPONSE",
    "RELAY_INFO",
    "RELAY_ROLE",
    "RELAY_SOURCES",
    "REPLAYING",
    "ROLE_BOTH",
    "ROLE_PUBLISH_ONLY",
    "SUBSCRIBE_SOURCES",
    "SUBSCRIBE_TLV_TYPES",
    "Subscription",
    "account_answer_frame",
    "account_frame",
    "control_frame",
    "error_frame",
    "heartbeat_frame",
    "is_control",
    "parse_account",
    "parse_control",
    "parse_error",
    "parse_heartbeat",
    "parse_recovery_response",
    "parse_relay_info",
    "recovery_frame",
    "recovery_response_frame",
    "relay_info_frame",
]

RELAY_ROLE = 250
SUBSCRIBE_SOURCES = 251
SUBSCRIBE_TLV_TYPES = 252
#: The relay's answer to a control frame: its relay_domain (1 byte), then its name.
RELAY_INFO = 253
HEARTBEAT = 100
ERROR = 102
RECOVERY_REQUEST = 110
RECOVERY_RESPONSE = 111
#: A client's request for its connection's account (token u32), and the relay's answer.
ACCOUNT = 254
CONTROL_TLVS = frozenset(
    {RELAY_ROLE, SUBSCRIBE_SOURCES, SUBSCRIBE_TLV_TYPES, RECOVERY_REQUEST, ACCOUNT}
)

#: RecoveryResponse status: the replay from the audit log follows.
REPLAYING = 0
#: RecoveryResponse status: this relay keeps no audit log; nothing follows.
NO_AUDIT_LOG = 1
#: RecoveryResponse status: a replay is already running for this connection.
BUSY = 2
#: RecoveryResponse status: this connection receives nothing (publish-only,
#: or not allowed to subscribe).
NOT_SUBSCRIBED = 3

_RECOVERY_RESPONSE = struct.Struct("<BQB")
#: An account answer's fixed part: token, frames accepted, delivered, dropped.
_ACCOUNT = struct.Struct("<IQQQ")
#: Then, per refusal reason: its count and the length of its name.
_REFUSED = struct.Struct("<QB")

#: The source type the relay of each domain puts on the frames it makes.
RELAY_SOURCES: dict[int, int] = {
    Domain.MARKET_DATA: Source.MARKET_DATA_RELAY,
    Domain.SIGNAL: Source.SIGNAL_RELAY,
    Domain.EXECUTION: Source.EXECUTION_RELAY,
}

ROLE_BOTH = 0
ROLE_PUBLISH_ONLY = 1


class BadControlFrame(FrameRejected):
    reason = "bad_control_frame"


class ControlFlood(FrameRejected):
    """A control frame past its connection's rate: refused, not applied."""

    reason = "control_flood"


@dataclass(frozen=True)
class Subscription:
    """What one client receives. The default receives everything."""

    publish_only: bool = False
    sources: frozenset[int] | None = None
    tlv_types: frozenset[int] | None = None
    #: The filters as L{scan.pick_run} takes them.
    tables: tuple[bytes, bytes] = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        return self._hash

    def __post_init__(self) -> None:
        # Hashed once: the fan-out looks subscriptions up for every read.
        object.__setattr__(self, "_hash", hash((self.publish_only, self.sources, self.tlv_types)))
        tables = tuple(
            NO_WALK if wanted is None else allowed_types(wanted)
            for wanted in (self.sources, self.tlv_types)
        )
        object.__setattr__(self, "tables", tables)

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


#: The subscription of a client that has not asked for anything else.
EVERYTHING = Subscription()

#: Receives no relayed frame: a publisher's, or a client's while it is not
#: on the live stream (not yet identified, or replaying).
NOTHING = Subscription(publish_only=True)


def is_control(header: Header) -> bool:
    return header.relay_domain == Domain.SYSTEM


@dataclass(frozen=True)
class Control:
    """
    What one control frame asks for: a new subscription (C{None}: keep the
    current one), the first sequence wanted per source to be replayed, and
    the connection's account (the client's token; C{None}: not asked for).
    """

    subscription: Subscription | None
    recovery: Mapping[int, int]
    account: int | None = None


def parse_control(buf: bytes, start: int, end: int) -> Control | None:
    """
    What a system-domain frame asks for, or C{None} if it is not a control
    frame (it has no TLVs or some that are not control TLVs).

    @raise BadControlFrame: a control TLV with an impossible value.
    """
    fields: dict[int, bytes] = {}
    recovery: dict[int, int] = {}
    account = None
    for tlv_type, value_start, value_end in tlv_spans(buf, start + HEADER_SIZE, end):
        if tlv_type not in CONTROL_TLVS:
            return None
        value = bytes(buf[value_start:value_end])
        if tlv_type == ACCOUNT:
            if len(value) != UINT32.size:
                raise BadControlFrame(f"Account request of {len(value)} bytes is not a u32 token")
            (account,) = UINT32.unpack(value)
        elif tlv_type == RECOVERY_REQUEST:
            if len(value) != SOURCE_SEQUENCE.size:
                raise BadControlFrame(
                    f"RecoveryRequest value of {len(value)} bytes is not source u8 + "
                    f"sequence u64"
                )
            source, sequence = SOURCE_SEQUENCE.unpack(value)
            recovery[source] = sequence
        else:
            fields[tlv_type] = value
    if not fields and not recovery and account is None:
        return None
    return Control(_subscription(fields) if fields else None, recovery, account)


def _subscription(fields: dict[int, bytes]) -> Subscription:
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
    recover: Mapping[int, int] | None = None,
    source: int = 0,
    sequence: int = 0,
) -> bytes:
    """
    The control frame a client sends to declare its role and subscription,
    and to ask for the replay of each source of C{recover} from the
    sequence given. With no arguments it restores the default: receive
    everything.
    """
    tlvs = [(RELAY_ROLE, bytes([ROLE_PUBLISH_ONLY if publish_only else ROLE_BOTH]))]
    if sources is not None:
        tlvs.append((SUBSCRIBE_SOURCES, bytes(sorted(set(sources)))))
    if tlv_types is not None:
        tlvs.append((SUBSCRIBE_TLV_TYPES, bytes(sorted(set(tlv_types)))))
    tlvs += _recovery_tlvs(recover or {})
    return build_frame(Domain.SYSTEM, source, sequence, tlvs)


def recovery_frame(recover: Mapping[int, int]) -> bytes:
    """A control frame that only asks for a replay, keeping the subscription."""
    return build_frame(Domain.SYSTEM, 0, 0, _recovery_tlvs(recover))


def _recovery_tlvs(recover: Mapping[int, int]) -> list[tuple[int, bytes]]:
    return [(RECOVERY_REQUEST, SOURCE_SEQUENCE.pack(s, q)) for s, q in sorted(recover.items())]


def account_frame(token: int) -> bytes:
    """A control frame that asks for the connection's account, answered with C{token}."""
    return build_frame(Domain.SYSTEM, 0, 0, [(ACCOUNT, UINT32.pack(token))])


@dataclass(frozen=True)
class Account:
    """
    One connection's counts since it connected, as the relay answered an
    account request: the frames it published that the relay accepted, and
    those it refused by reason; the frames the relay delivered to it, and
    those it dropped to it (the drop policy; a subscriber too slow).
    """

    token: int
    accepted: int
    delivered: int
    dropped: int
    refused: Mapping[str, int]

    @property
    def refusals(self) -> int:
        return sum(self.refused.values())

    def since(self, before: Account | None) -> Account:
        """The counts from C{before}'s answer to this one (all of them if C{None})."""
        if before is None:
            return self
        refused = {
            reason: count - before.refused.get(reason, 0)
            for reason, count in self.refused.items()
            if count > before.refused.get(reason, 0)
        }
        return Account(
            self.token,
            self.accepted - before.accepted,
            self.delivered - before.delivered,
            self.dropped - before.dropped,
            refused,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "delivered": self.delivered,
            "dropped": self.dropped,
        }


def account_answer_frame(domain: int, account: Account) -> bytes:
    """The relay's answer to an account request."""
    value = _ACCOUNT.pack(account.token, account.accepted, account.delivered, account.dropped)
    for reason, count in sorted(account.refused.items()):
        name = reason.encode()[:255]
        value += _REFUSED.pack(count, len(name)) + name
    return _relay_frame(domain, ACCOUNT, value)


def parse_account(header: Header, frame: bytes) -> Account | None:
    """The L{Account} if C{frame} is a relay's answer to an account request, else C{None}."""
    value = _system_tlv(header, frame, ACCOUNT)
    if value is None or len(value) < _ACCOUNT.size:
        return None
    token, accepted, delivered, dropped = _ACCOUNT.unpack_from(value)
    refused: dict[str, int] = {}
    offset = _ACCOUNT.size
    while offset < len(value):
        if offset + _REFUSED.size > len(value):
            return None
        count, length = _REFUSED.unpack_from(value, offset)
        offset += _REFUSED.size
        if offset + length > len(value):
            return None
        refused[value[offset : offset + length].decode(errors="replace")] = count
        offset += length
    return Account(token, accepted, delivered, dropped, refused)


def recovery_response_frame(domain: int, source: int, first: int, status: int) -> bytes:
    """The relay's answer to a RecoveryRequest for C{source} from C{first}."""
    return _relay_frame(domain, RECOVERY_RESPONSE, _RECOVERY_RESPONSE.pack(source, first, status))


#: The most bytes of an Error frame's account of what happened.
_ERROR_DETAIL = 1024


def error_frame(domain: int, reason: str, detail: str) -> bytes:
    """The relay's last frame to a client it closes: why (C{reason}, as counted), and what happened."""
    name = reason.encode()[:255]
    told = detail.encode()[:_ERROR_DETAIL]
    return _relay_frame(domain, ERROR, bytes([len(name)]) + name + told)


def parse_error(header: Header, frame: bytes) -> tuple[str, str] | None:
    """C{(reason, detail)} if C{frame} is the relay's Error frame, else C{None}."""
    value = _system_tlv(header, frame, ERROR)
    if not value or 1 + value[0] > len(value):
        return None
    end = 1 + value[0]
    return value[1:end].decode(errors="replace"), value[end:].decode(errors="replace")


def heartbeat_frame(
    domain: int, sequence: int, interval: float, sequences: Mapping[int, int]
) -> bytes:
    """A relay's heartbeat: its interval and the last sequence forwarded per source."""
    value = UINT32.pack(round(interval * 1000)) + b"".join(
        SOURCE_SEQUENCE.pack(s, q) for s, q in sorted(sequences.items())
    )
    return _relay_frame(domain, HEARTBEAT, value, sequence)


def _relay_frame(domain: int, tlv_type: int, value: bytes, sequence: int = 0) -> bytes:
    """A frame the relay of C{domain} makes itself: system domain, the relay's source type."""
    return build_frame(Domain.SYSTEM, RELAY_SOURCES.get(domain, 0), sequence, [(tlv_type, value)])


def _system_tlv(header: Header, frame: bytes, tlv_type: int) -> bytes | None:
    """The value of C{frame}'s one TLV if it is a system frame with just that TLV."""
    if not is_control(header):
        return None
    try:
        spans = list(tlv_spans(frame, HEADER_SIZE, len(frame)))
    except FrameRejected:
        return None
    if len(spans) != 1 or spans[0][0] != tlv_type:
        return None
    return frame[spans[0][1] : spans[0][2]]


def parse_heartbeat(header: Header, frame: bytes) -> tuple[float, dict[int, int]] | None:
    """C{(interval, {source: last sequence})} if C{frame} is a heartbeat, else C{None}."""
    value = _system_tlv(header, frame, HEARTBEAT)
    if value is None or (len(value) - UINT32.size) % SOURCE_SEQUENCE.size:
        return None
    (interval_ms,) = UINT32.unpack_from(value)
    return interval_ms / 1000, dict(SOURCE_SEQUENCE.iter_unpack(value[UINT32.size :]))


def parse_recovery_response(header: Header, frame: bytes) -> tuple[int, int, int] | None:
    """C{(source, first sequence, status)} if C{frame} answers a RecoveryRequest."""
    value = _system_tlv(header, frame, RECOVERY_RESPONSE)
    if value is None or len(value) != _RECOVERY_RESPONSE.size:
        return None
    return _RECOVERY_RESPONSE.unpack(value)


def relay_info_frame(domain: int, name: str) -> bytes:
    """The relay's answer to a control frame."""
    return _relay_frame(domain, RELAY_INFO, bytes([domain]) + name.encode())


def parse_relay_info(header: Header, frame: bytes) -> tuple[int, str] | None:
    """C{(relay_domain, name)} if C{frame} is a relay's answer, else C{None}."""
    value = _system_tlv(header, frame, RELAY_INFO)
    if not value:
        return None
    return value[0], value[1:].decode(errors="replace")
