"""Tests for L{twisted_relay.ratelimit}: the bound on log lines (and control frames)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.ratelimit import RateLimiter


class RateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock, burst=5, interval=1.0)

    def let(self, count: int, key: str = "k") -> list[int | None]:
        return [self.limiter.allow(key) for _ in range(count)]

    def test_burst(self) -> None:
        """Up to the burst at once, then nothing; the next let through says how many were held."""
        self.assertEqual(self.let(7), [0, 0, 0, 0, 0, None, None])
        self.clock.advance(0.2)
        self.assertEqual(self.let(2), [2, None])

    def test_noDoubleBurstAtAnEdge(self) -> None:
        """Two bursts back to back are not both let through, wherever they fall in time."""
        self.clock.advance(0.99)
        self.let(5)
        self.clock.advance(0.02)
        allowed = [r for r in self.let(5) if r is not None]
        self.assertLessEqual(len(allowed), 1)

    def test_steadyRate(self) -> None:
        """Over a long flood, the rate let through is the burst per interval."""
        allowed = 0
        for _ in range(1000):
            self.clock.advance(0.01)
            allowed += self.limiter.allow("k") is not None
        self.assertTrue(5 * 10 <= allowed <= 5 * 10 + 5, allowed)

    def test_clockSteppedBack(self) -> None:
        """A clock that steps back neither hands out tokens nor takes them for long."""
        self.let(5)
        self.clock.rightNow -= 3600
        self.assertEqual(self.let(1), [None])
        self.clock.advance(0.3)
        self.assertEqual(self.let(1), [1])

    def test_keysApart(self) -> None:
        """Each key has its own allowance; a forgotten key starts afresh."""
        self.let(5, "a")
        self.assertEqual(self.let(1, "b"), [0])
        self.assertEqual(self.let(1, "a"), [None])
        self.limiter.forget("a")
        self.assertEqual(self.let(1, "a"), [0])
