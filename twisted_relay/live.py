"""
What C{twisted-relay tap} knows of the stream it taps: counts, rates over
the last second, sequence gaps, latency from each frame's timestamp, and
what the relay says it dropped to this tap; and the line that shows it.

The relay drops frames to a tap that is too slow (drop policy): those
leave sequence gaps the tap sees too, but they are not upstream losses. The
relay counts them exactly (its account of the connection,
L{twisted_relay.control.Account}), so a gap is counted upstream only beyond
the frames the relay dropped to this tap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .control import Account
from .wire import Header

#: Latency samples kept per second at most: the percentiles of a busy
#: second come from every n-th frame.
SAMPLES = 20_000


@dataclass
class Window:
    """One second's frames, bytes and latency samples (ns)."""

    started: float
    frames: int = 0
    size: int = 0
    latencies: list[int] = field(default_factory=list)


def percentile(samples: list[int], fraction: float) -> int | None:
    """The C{fraction} percentile of C{samples} (nearest rank), C{None} if there are none."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def duration(ns: int | None) -> str:
    """A latency for a person: ns, µs, ms or s, three figures."""
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(ns) >= scale:
            return f"{ns / scale:.3g}{unit}"
    return f"{ns}ns"


class TapView:
    """
    The tap's counts. L{take} takes frames with the time they were taken
    (ns since the epoch, as the frames' timestamps); L{tick} closes the
    second and returns its line; L{accounted} takes the relay's account of
    this connection.

    @param gaps: whether sequence gaps mean anything (not under a TLV
        filter, which skips frames of a source by design).
    """

    def __init__(self, now: float, *, gaps: bool = True) -> None:
        self.track_gaps = gaps
        self.started = now
        self.frames = 0
        self.size = 0
        self.gaps = 0
        self.duplicates = 0
        #: The last sequence per source.
        self.last: dict[int, int] = {}
        #: The relay's latest account of this connection, if it gave one.
        self.account: Account | None = None
        self.window = Window(now)
        self._stride = 1
        #: Frames dropped to this tap on its connections before the current one.
        self._dropped_before = 0

    def take(self, frames: Iterable[tuple[Header, bytes]], now_ns: int) -> None:
        """Frames taken at C{now_ns}: counted, their latency sampled, their sequences checked."""
        window = self.window
        latencies, stride, last = window.latencies, self._stride, self.last
        track = self.track_gaps
        count = size = gaps = duplicates = 0
        seen = window.frames  # every n-th frame of the second, however it came
        for header, frame in frames:
            count += 1
            size += len(frame)
            if (seen + count) % stride == 0 and len(latencies) < SAMPLES:
                latencies.append(now_ns - header.timestamp)
            source, sequence = header.source, header.sequence
            previous = last.get(source)
            last[source] = sequence
            if previous is not None and track and sequence != previous + 1:
                if sequence > previous:
                    gaps += sequence - previous - 1
                else:
                    duplicates += 1
        self.frames += count
        self.size += size
        self.gaps += gaps
        self.duplicates += duplicates
        window.frames += count
        window.size += size

    def accounted(self, account: Account) -> None:
        """The relay's account of the connection came."""
        self.account = account

    def reconnected(self) -> None:
        """A new connection: its accounts start from nothing."""
        self._dropped_before = self.dropped
        self.account = None

    @property
    def dropped(self) -> int:
        """Frames the relay dropped to this tap, by its latest accounts."""
        return self._dropped_before + (0 if self.account is None else self.account.dropped)

    @property
    def upstream_gaps(self) -> int:
        """Sequence gaps beyond the frames the relay dropped to this tap."""
        return max(0, self.gaps - self.dropped)

    def tick(self, now: float) -> str:
        """Close the second that began at the last tick: its line."""
        window = self.window
        elapsed = max(now - window.started, 1e-9)
        self._stride = max(1, window.frames // SAMPLES)
        line = (
            f"{window.frames / elapsed:11,.0f} frames/s {window.size / elapsed / 1e6:8.2f} MB/s"
            f" | {self.frames:,} frames | dropped to this tap {self.dropped:,} | "
            f"{self._gaps()} | latency p50 {duration(percentile(window.latencies, 0.5))} "
            f"p99 {duration(percentile(window.latencies, 0.99))}"
        )
        self.window = Window(now)
        return line

    def _gaps(self) -> str:
        if not self.track_gaps:
            return "gaps n/a (TLV filter)"
        told = f"gaps upstream {self.upstream_gaps:,}"
        return told + (f", {self.duplicates:,} repeated" if self.duplicates else "")

    def summary(self, now: float) -> str:
        """The whole run in one line."""
        elapsed = max(now - self.started, 1e-9)
        return (
            f"{self.frames:,} frames, {self.size:,} bytes in {elapsed:.1f}s "
            f"({self.frames / elapsed:,.0f} frames/s); the relay dropped {self.dropped:,} to "
            f"this tap; {self._gaps()}"
        )
