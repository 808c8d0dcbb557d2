"""Tests for L{twisted_relay.framing}."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.framing import Framer
from twisted_relay.wire import (
    HEADER_SIZE,
    MAGIC,
    MAGIC_BYTES,
    BadMagic,
    FrameTooLarge,
    Header,
    UnsupportedVersion,
    build_frame,
)

from .helpers import frames_for, split


def cut(framer: Framer, chunks, out: list[bytes] | None = None) -> list[bytes]:
    """Feed C{chunks} and return the whole frames, as bytes, appended to C{out}."""
    out = [] if out is None else out
    for chunk in chunks:
        for buf, start, header in framer.frames(chunk):
            out.append(buf[start : start + HEADER_SIZE + header.payload_size])
    return out


class FramerTests(SynchronousTestCase):
    def test_everySplit(self) -> None:
        """A stream cut into two chunks at every byte position yields the same frames."""
        frames = frames_for(1, 3) + [build_frame(1, 2, 9, b"")] + frames_for(1, 2, size=300)
        stream = b"".join(frames)
        for i in range(len(stream) + 1):
            framer = Framer(1024)
            self.assertEqual(cut(framer, [stream[:i], stream[i:]]), frames, f"split at {i}")
            self.assertEqual(framer.buffered, 0)
            self.assertEqual(framer.position, len(stream))

    def test_byteByByte(self) -> None:
        """A stream delivered one byte at a time yields every frame once."""
        frames = frames_for(1, 4, size=40)
        stream = b"".join(frames)
        framer = Framer(1024)
        self.assertEqual(cut(framer, [stream[i : i + 1] for i in range(len(stream))]), frames)

    def test_oneBufferPerChunk(self) -> None:
        """All frames of a chunk are offsets into one buffer: the chunk itself."""
        stream = b"".join(frames_for(1, 3))
        for buf, _, _ in Framer(1024).frames(stream):
            self.assertIs(buf, stream)

    def test_largeFrameCollected(self) -> None:
        """A frame arriving in many reads is held until complete, then yielded once."""
        frame = build_frame(1, 1, 1, b"p" * 100_000)
        framer = Framer(200_000)
        for i in range(0, 100_000, 1000):
            self.assertEqual(cut(framer, [frame[i : i + 1000]]), [])
            self.assertEqual(framer.buffered, i + 1000)
        self.assertEqual(cut(framer, [frame[100_000:]]), [frame])
        self.assertEqual(framer.buffered, 0)

    def test_trickleCostsNoObjectPerRead(self) -> None:
        """A large frame arriving a byte at a time is held in memory about once."""
        import tracemalloc

        frame = build_frame(1, 1, 1, b"p" * 200_000)
        framer = Framer(300_000)
        cut(framer, [frame[:HEADER_SIZE]])
        tracemalloc.start()
        try:
            for i in range(HEADER_SIZE, len(frame) - 1):
                cut(framer, [frame[i : i + 1]])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 * len(frame))
        self.assertEqual(cut(framer, [frame[-1:]]), [frame])

    def assertLost(self, error_type, data: bytes, max_frame: int = 1024):
        framer = Framer(max_frame)
        return self.assertRaises(error_type, cut, framer, [data])

    def test_oversizeRefusedAtHeader(self) -> None:
        """A payload_size over the limit is refused from the header alone."""
        header = Header(MAGIC, 1, 1, 1, 0, 1, 0, 10_000_000, 0).pack()
        error = self.assertLost(FrameTooLarge, header)
        self.assertIn("payload_size 10000000 is over this relay's limit of 992", str(error))
        self.assertEqual(error.header, header)

    def test_limitIsInclusive(self) -> None:
        """A frame of exactly the maximum size is accepted."""
        frame = build_frame(1, 1, 1, b"x" * (1024 - HEADER_SIZE))
        self.assertEqual(cut(Framer(1024), [frame]), [frame])

    def test_badMagic(self) -> None:
        """Bytes that do not start with the magic lose the framing, with the offset."""
        good = frames_for(1, 1)[0]
        framer = Framer(1024)
        self.assertEqual(cut(framer, [good]), [good])
        error = self.assertRaises(BadMagic, cut, framer, [b"\x78\x56\x34\x12" + b"\x00" * 28])
        self.assertEqual(str(error), f"bad magic 0x12345678 at offset {len(good)}")

    def test_badMagicInPartialHeader(self) -> None:
        """Four bytes are enough to see that a header is not one."""
        self.assertLost(BadMagic, b"GET / HTTP/1.1\r\n")

    def test_unsupportedVersion(self) -> None:
        """A header of another protocol version loses the framing."""
        header = Header(MAGIC, 1, 2, 1, 0, 1, 0, 0, 0).pack()
        error = self.assertLost(UnsupportedVersion, header)
        self.assertIn("unsupported protocol version 2", str(error))

    def test_framesBeforeTheBreakAreYielded(self) -> None:
        """The whole frames before a broken header come out before the error."""
        good = frames_for(1, 2)
        framer = Framer(1024)
        seen = []
        with self.assertRaises(BadMagic):
            for buf, start, header in framer.frames(b"".join(good) + b"\x00" * 32):
                seen.append(buf[start : start + HEADER_SIZE + header.payload_size])
        self.assertEqual(seen, good)

    @settings(max_examples=200, deadline=None)
    @given(
        sizes=st.lists(st.integers(0, 600), min_size=1, max_size=12),
        cuts=st.lists(st.integers(0, 10_000), max_size=20),
    )
    def test_anySplit(self, sizes: list[int], cuts: list[int]) -> None:
        """Frames of any sizes, split anywhere, come out whole and in order."""
        frames = [build_frame(1, 3, i, b"v" * n) for i, n in enumerate(sizes)]
        self.assertEqual(cut(Framer(1024), split(b"".join(frames), cuts)), frames)

    @settings(max_examples=200, deadline=None)
    @given(
        garbage=st.binary(min_size=1, max_size=200).filter(
            lambda g: not MAGIC_BYTES.startswith(g[:4])
        ),
        at=st.integers(0, 400),
    )
    def test_garbageNeverYieldsAFrameItDidNotGet(self, garbage: bytes, at: int) -> None:
        """Garbage after valid frames loses the framing or waits; it is never a frame."""
        frames = frames_for(1, 2)
        stream = b"".join(frames) + garbage
        at %= len(stream) + 1
        framer = Framer(1024)
        out: list[bytes] = []
        if len(garbage) >= 4:
            self.assertRaises(BadMagic, cut, framer, [stream[:at], stream[at:]], out)
        else:
            cut(framer, [stream[:at], stream[at:]], out)
            self.assertEqual(framer.buffered, len(garbage))
        self.assertEqual(out, frames)
