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
    Let at most C{burst} events per C{interval} seconds through for each key,
    and count the others, so the next event let through can say how many were
    held back: nothing is hidden, only summarised.
    """

    def __init__(self, clock: Clock, burst: int = 5, interval: float = 1.0) -> None:
        self._clock = clock
        self._burst = burst
        self._interval = interval
        self._windows: dict[Hashable, list] = {}

    def allow(self, key: Hashable) -> int | None:
        """
        C{None} if this event should not be logged; otherwise how many events
        of this key were held back since the last one let through.
        """
        now = self._clock.seconds()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self._interval:
            held = window[2] if window is not None else 0
            self._windows[key] = [now, 1, 0]
            return held
        if window[1] < self._burst:
            window[1] += 1
            held, window[2] = window[2], 0
            return held
        window[2] += 1
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
        self._windows.pop(key, None)
