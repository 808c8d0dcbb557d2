"""
Rate limiting for log events, so a flood of bad frames cannot flood the log.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol


class Clock(Protocol):
    """What a rate limiter reads the time from (a Twisted reactor or C{Clock})."""

    def seconds(self) -> float: ...


class RateLimiter:
    """
    Let events through for each key at C{burst} per C{interval} seconds, as
    a token bucket: up to C{burst} at once, then one each time a token has
    come back (no window edge lets two bursts through back to back). The
    others are counted, so the next event let through can say how many
    were held back: nothing is hidden, only summarised.
    """

    def __init__(self, clock: Clock, burst: int = 5, interval: float = 1.0) -> None:
        self._clock = clock
        self._burst = burst
        self._rate = burst / interval
        #: By key: tokens left, when they were counted, events held back.
        self._buckets: dict[Hashable, list] = {}

    def allow(self, key: Hashable) -> int | None:
        """
        C{None} if this event should not be let through; otherwise how many
        events of this key were held back since the last one let through.
        """
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [self._burst - 1, now, 0]
            return 0
        # A clock stepped back gives nothing back, and takes nothing either.
        tokens = min(self._burst, bucket[0] + max(0.0, now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            held, bucket[2] = bucket[2], 0
            return held
        bucket[0] = tokens
        bucket[2] += 1
        return None

    def log(self, key: Hashable, emit: Callable[..., None], format: str, **fields: object) -> None:
        """
        Emit C{format} with C{fields} through C{emit} (a L{Logger} method)
        unless C{key} is over its rate; the event says how many of its kind
        were held back before it.
        """
        held = self.allow(key)
        if held is not None:
            emit(
                format + "{held_back}",
                held_back=f" ({held} more since the last report)" if held else "",
                **fields,
            )

    def forget(self, key: Hashable) -> None:
        """Drop what is known of C{key}, whose events will not come again."""
        self._buckets.pop(key, None)
