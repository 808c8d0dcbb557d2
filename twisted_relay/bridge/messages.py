"""
What the bridge's NATS messages are made of, without nats-py: subjects and
origins, message ids, runs of frames cut to the server's payload limit, and
the bridge's counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..wire import frame_spans

#: Bytes of a message's room kept for its headers within the server's max_payload.
HEADER_ROOM = 4096


@dataclass
class BridgeCounters:
    """What crossed the bridge, and what did not."""

    frames_out: int = 0
    chunks_out: int = 0
    frames_in: int = 0
    chunks_in: int = 0
    chunks_dropped: int = 0
    frames_dropped: int = 0
    echoes: int = 0
    malformed: int = 0
    retries: int = 0
    duplicates: int = 0
    stream_gaps: int = 0
    failures: int = 0
    slow_consumer: int = 0
    reconnects: int = 0
    connected: bool = False


@dataclass(frozen=True)
class Subjects:
    """
    The names one relay uses on NATS: it publishes to C{torq.<domain>.<origin>}
    and receives C{torq.<domain>.>}, which a lossless domain's stream holds.
    """

    domain: str
    origin: str

    @property
    def publishing(self) -> str:
        return f"torq.{self.domain}.{self.origin}"

    @property
    def receiving(self) -> str:
        return f"torq.{self.domain}.>"

    @property
    def stream(self) -> str:
        return f"TORQ_{self.domain.upper()}"

    @property
    def durable(self) -> str:
        """This relay's durable consumer of the stream."""
        return f"relay-{self.origin}"


def origin_of(subject: str) -> str:
    """The origin token of C{torq.<domain>.<origin>}: anything after it is not the relays'."""
    return subject.split(".")[2]


def pieces(data: bytes, limit: int) -> Iterator[tuple[bytes, int]]:
    """
    C{data}, runs of whole frames, cut at frame boundaries into C{(piece,
    frames)} of at most C{limit} bytes (a frame larger than that alone).
    """
    first = count = 0
    for _, start, end, _ in frame_spans([data]):
        if count and end - first > limit:
            yield data[first:start], count
            first, count = start, 0
        count += 1
    if count:
        yield data[first:], count


def message_id(prefix: str, data: bytes) -> str:
    """
    C{prefix} (the origin, the bridge's start and its message count), then
    the first and last sequence of each source in C{data}: the same for
    every attempt at one message, so the stream keeps one copy.
    """
    spans: dict[int, tuple[int, int]] = {}
    for _, _, _, header in frame_spans([data]):
        spans[header.source] = (spans.get(header.source, (header.sequence,))[0], header.sequence)
    return prefix + "".join(f":{s}:{a}-{b}" for s, (a, b) in sorted(spans.items()))
