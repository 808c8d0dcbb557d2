"""
Counting in one place: every counter of the relay, per client and in total,
and the log line that goes with each count.

The outbox, the publisher gate, the write-ahead log, the recovery and each
connection's ingest are given the one L{Accounting} of their relay; none of
them counts anything itself, and none of them holds the relay.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ..control import EVERYTHING
from ..ratelimit import RateLimiter
from ..wire import FrameError
from .logger import RelayLogger

#: Control frames one connection may send per second; past it they are
#: refused (C{control_flood}), counted, and logged at a bounded rate.
CONTROL_RATE = 100


@dataclass(slots=True)
class Counters:
    """
    Traffic counters. C{frames_in} counts accepted frames; C{bytes_in} every
    byte read, accepted or not; C{frames_out} frames written whole to a
    client's socket; C{rejects} the refused frames by reason; C{frames_dropped} the
    frames the drop policy did not deliver; C{frames_lost} the frames still
    queued for a client when its connection ended, or still in its
    transport's buffer when the relay hung up on it; C{frames_replayed} the
    frames sent from the audit log (also in C{frames_out}); C{heartbeats}
    the heartbeats sent to idle clients; the sequence counters what
    publishers' C{sequence} fields gave away (frames missing, repeated, going
    backwards).
    """

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    frames_replayed: int = 0
    heartbeats: int = 0
    frames_dropped: int = 0
    bytes_dropped: int = 0
    frames_lost: int = 0
    bytes_lost: int = 0
    control_frames: int = 0
    sequence_gaps: int = 0
    sequence_duplicates: int = 0
    sequence_regressions: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    cut_offs: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class ClientStats(Counters):
    """One connected client: who it is, since when, and its traffic."""

    client_id: int = 0
    peer: str = ""
    connected_at: float = 0.0
    role: str = EVERYTHING.role
    #: Why the relay closed this connection, if it did.
    close_reason: str = ""


class Accounting:
    """
    The relay's counters: C{totals}, and each client's L{ClientStats}, which
    it hands out. Each method counts one kind of event for one client and in
    the totals, and logs it where that is due (at a bounded rate where a
    flood is possible).

    @ivar lossless: whether every sequence anomaly is logged (the block
        policy's relay) rather than a bounded number per second.
    """

    log = RelayLogger(namespace="relay")

    def __init__(self, clock: IReactorTime, *, lossless: bool, high_water: int) -> None:
        self.clock = clock
        self.lossless = lossless
        self.high_water = high_water
        self.totals = Counters()
        #: Connections accepted since the start.
        self.connections = 0
        #: When a client was last dropped from, cut off or lost frames, and which.
        self.last_trouble: float | None = None
        self.trouble: str | None = None
        self._ids = itertools.count(1)
        self._sampled = RateLimiter(clock)
        self._controls = RateLimiter(clock, burst=CONTROL_RATE)

    def connected(self, peer: str) -> ClientStats:
        """The counters of a client that just connected, with its new id."""
        self.connections += 1
        return ClientStats(client_id=next(self._ids), peer=peer, connected_at=self.clock.seconds())

    def disconnected(self, stats: ClientStats) -> None:
        """A client is gone: nothing more will be logged about it."""
        self._sampled.forget(("dropped", stats.client_id))
        self._controls.forget(stats.client_id)

    def received(self, stats: ClientStats, size: int) -> None:
        """Bytes read from a client, before framing."""
        stats.bytes_in += size
        self.totals.bytes_in += size

    def accepted(self, stats: ClientStats, frames: int) -> None:
        """Frames from a client that passed every check."""
        stats.frames_in += frames
        self.totals.frames_in += frames

    def delivered(self, stats: ClientStats, frames: int, size: int) -> None:
        """Frames handed to a client's transport (see L{recalled})."""
        totals = self.totals
        stats.frames_out += frames
        stats.bytes_out += size
        totals.frames_out += frames
        totals.bytes_out += size

    def replayed(self, stats: ClientStats, frames: int) -> None:
        """Of the frames delivered to a client, those that came from the audit log."""
        stats.frames_replayed += frames
        self.totals.frames_replayed += frames

    def heartbeat(self, stats: ClientStats) -> None:
        stats.heartbeats += 1
        self.totals.heartbeats += 1

    def control(self, stats: ClientStats, *, limited: bool = True) -> bool:
        """
        A control frame from a client: C{True} (and counted) if it may be
        taken, C{False} past the client's L{CONTROL_RATE} (if C{limited}).
        """
        if limited and self._controls.allow(stats.client_id) is None:
            return False
        stats.control_frames += 1
        self.totals.control_frames += 1
        return True

    def sampled(self, kind: str, emit: Callable[..., None], format: str, **fields: object) -> None:
        """
        A log line about a client's control frames, at most 5 a second of
        each C{kind}, as refusals are; the next one says how many were held.
        """
        self._sampled.log(("control", kind), emit, format, **fields)

    def lost(self, stats: ClientStats, frames: int, size: int) -> None:
        """Frames still queued for a client when its connection ended."""
        self._troubled(f"frames lost with client {stats.client_id}")
        totals = self.totals
        stats.frames_lost += frames
        stats.bytes_lost += size
        totals.frames_lost += frames
        totals.bytes_lost += size

    def recalled(self, stats: ClientStats, frames: int, size: int, replayed: int) -> None:
        """
        Frames counted as delivered that the transport still held when the
        relay hung up on the client (C{replayed} of them from the audit
        log): lost after all.
        """
        totals = self.totals
        stats.frames_out -= frames
        stats.bytes_out -= size
        stats.frames_replayed -= replayed
        totals.frames_out -= frames
        totals.bytes_out -= size
        totals.frames_replayed -= replayed
        self.lost(stats, frames, size)

    def dropped(self, stats: ClientStats, frames: int, size: int, *, quiet: bool = False) -> None:
        """
        Frames the drop policy did not deliver to a client, logged at a
        bounded rate unless C{quiet} (counts brought up to date on reading).
        """
        self._troubled(f"frames dropped for client {stats.client_id}")
        totals = self.totals
        stats.frames_dropped += frames
        stats.bytes_dropped += size
        totals.frames_dropped += frames
        totals.bytes_dropped += size
        if quiet:
            return
        self._sampled.log(
            ("dropped", stats.client_id),
            self.log.warn,
            "slow client {client_id}: dropped {frames} frames ({frames_dropped} so "
            "far), its queue is at the high-water mark of {high_water} bytes",
            client_id=stats.client_id,
            frames=frames,
            frames_dropped=stats.frames_dropped,
            high_water=self.high_water,
        )

    def cutOff(self, stats: ClientStats, reason: str, detail: str) -> None:
        """A client the relay disconnects, for C{reason}."""
        self._troubled(f"client {stats.client_id} cut off ({reason})")
        stats.cut_offs[reason] += 1
        stats.close_reason = reason
        self.totals.cut_offs[reason] += 1
        self.log.warn(
            "disconnecting client {client_id} ({reason}): {detail}",
            client_id=stats.client_id,
            reason=reason,
            detail=detail,
        )

    def rejected(self, stats: ClientStats, error: FrameError, lost_framing: str) -> None:
        """
        A refused frame, logged at a bounded rate per reason; C{lost_framing}
        is what the log says when the error loses the stream's framing.
        """
        stats.rejects[error.reason] += 1
        self.totals.rejects[error.reason] += 1
        if error.fatal:
            self._sampled.log(
                error.reason,
                self.log.error,
                lost_framing + ": {error}; header bytes {header}",
                client_id=stats.client_id,
                error=str(error),
                reason=error.reason,
                header=error.header.hex(" "),
            )
        else:
            self._sampled.log(
                error.reason,
                self.log.warn,
                "dropped frame ({reason}): {error}",
                reason=error.reason,
                error=str(error),
                client_id=stats.client_id,
            )

    def sequenceAnomaly(self, stats: ClientStats, source: int, sequence: int, last: int) -> None:
        """
        A sequence of C{source} that does not follow its C{last}: a gap, a
        duplicate or a regression, each logged on a lossless relay, a bounded
        number per second otherwise.
        """
        totals = self.totals
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
        event: dict[str, Any] = dict(
            format="sequence {kind} from client {client_id}, source {source}: {sequence} "
            "after {last}",
            kind=kind,
            client_id=stats.client_id,
            source=source,
            sequence=sequence,
            last=last,
        )
        if self.lossless:
            self.log.warn(**event)
        else:
            self._sampled.log(("sequence", kind), self.log.warn, **event)

    def _troubled(self, what: str) -> None:
        """Remember C{what} happened now: the relay reports itself degraded for a while."""
        self.last_trouble = self.clock.seconds()
        self.trouble = what
