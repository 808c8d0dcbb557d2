"""
Tests for L{twisted_relay.live}: the tap's counts, rates, gaps apart from the
frames the relay dropped to it, and latency.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.control import Account
from twisted_relay.live import SAMPLES, TapView, duration, percentile
from twisted_relay.wire import build_frame, unpack_header


def frames(source: int, sequences, timestamp: int = 0) -> list[tuple]:
    built = [build_frame(1, source, seq, b"x" * 8, timestamp=timestamp) for seq in sequences]
    return [(unpack_header(frame), frame) for frame in built]


class TapViewTests(SynchronousTestCase):
    def test_countsAndRate(self) -> None:
        """A second's line gives its rate and the totals; the next second starts from nothing."""
        view = TapView(100.0)
        view.take(frames(1, range(1, 201)), 0)
        line = view.tick(100.5)
        self.assertIn("400 frames/s", line)
        self.assertIn("| 200 frames |", line)
        self.assertIn("      0 frames/s", view.tick(101.5))
        self.assertEqual((view.frames, view.size), (200, 200 * 40))

    def test_gapsAndRepeats(self) -> None:
        """Sequence gaps are counted per source, repeats apart."""
        view = TapView(0)
        view.take(frames(1, [1, 2, 5]) + frames(2, [7, 8]) + frames(1, [6, 6, 9]), 0)
        self.assertEqual((view.gaps, view.duplicates), (4, 1))
        self.assertEqual(view.last, {1: 9, 2: 8})

    def test_dropsToThisTapAreNotUpstreamGaps(self) -> None:
        """A gap is upstream only beyond what the relay dropped to this tap, across connections."""
        view = TapView(0)
        view.take(frames(1, [1, 2, 10]), 0)
        view.accounted(Account(1, 0, 3, 7, {}))
        self.assertEqual((view.dropped, view.upstream_gaps), (7, 0))
        view.reconnected()
        view.take(frames(1, [11, 20]), 0)
        self.assertEqual((view.dropped, view.upstream_gaps), (7, 8))
        view.accounted(Account(1, 0, 1, 8, {}))
        self.assertEqual((view.dropped, view.upstream_gaps), (15, 0))
        self.assertIn("dropped to this tap 15 | gaps upstream 0", view.tick(1))

    def test_tlvFilterHasNoGaps(self) -> None:
        """Under a TLV filter, sequences skip by design: no gaps are claimed."""
        view = TapView(0, gaps=False)
        view.take(frames(1, [1, 5, 9]), 0)
        self.assertEqual(view.gaps, 0)
        self.assertIn("gaps n/a (TLV filter)", view.summary(1))

    def test_latency(self) -> None:
        """Latency is the time taken minus the frame's timestamp, p50 and p99 of the second."""
        view = TapView(0)
        for delay in range(1, 101):
            view.take(frames(1, [delay], timestamp=1_000_000_000), 1_000_000_000 + delay * 1000)
        self.assertIn("latency p50 51µs p99 100µs", view.tick(1))

    def test_latencySampledWhenBusy(self) -> None:
        """A busy second keeps a bounded number of samples; the next one samples every n-th."""
        view = TapView(0)
        view.take(frames(1, range(1, 3 * SAMPLES + 1)), 5)
        self.assertEqual(len(view.window.latencies), SAMPLES)
        view.tick(1)
        view.take(frames(1, range(1, 3 * SAMPLES + 1)), 5)
        self.assertEqual(len(view.window.latencies), SAMPLES)
        view.tick(2)
        for sequence in range(1, 10):  # frames one at a time, after the busy second
            view.take(frames(2, [sequence]), 5)
        self.assertEqual(len(view.window.latencies), 3)

    def test_summary(self) -> None:
        """The summary is the whole run: frames, bytes, rate, drops to this tap, gaps."""
        view = TapView(10.0)
        view.take(frames(3, [1, 2, 4]), 0)
        self.assertEqual(
            view.summary(12.0),
            "3 frames, 120 bytes in 2.0s (2 frames/s); the relay dropped 0 to this tap; "
            "gaps upstream 1",
        )


class FormatTests(SynchronousTestCase):
    def test_percentile(self) -> None:
        """Nearest-rank percentiles; none of nothing."""
        self.assertEqual(percentile(list(range(100)), 0.5), 50)
        self.assertEqual(percentile([3, 1, 2], 0.99), 3)
        self.assertIsNone(percentile([], 0.5))

    def test_duration(self) -> None:
        """Three figures in the unit that fits."""
        self.assertEqual(
            [duration(ns) for ns in (None, 850, 12_345, 2_500_000, 3_000_000_000)],
            ["-", "850ns", "12.3µs", "2.5ms", "3s"],
        )
