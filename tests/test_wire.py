"""Tests for L{twisted_relay.wire}."""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from twisted_relay import wire
from twisted_relay.wire import (
    HEADER_SIZE,
    MAGIC,
    BadMagic,
    Header,
    TruncatedTLV,
    build_frame,
    encode_tlvs,
    frame_checksum,
    iter_tlvs,
    unpack_header,
)


def reference_crc32(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, reflected), bit by bit, independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


class HeaderTests(SynchronousTestCase):
    def test_size(self) -> None:
        """The header is exactly 32 bytes, with no padding."""
        self.assertEqual(HEADER_SIZE, 32)

    def test_layout(self) -> None:
        """Every field sits at the offset protocol-v2.md gives it, little-endian."""
        header = Header(MAGIC, 3, 1, 42, 0x80, 0x0102030405060708, 7, 300, 0xAABBCCDD)
        raw = header.pack()
        self.assertEqual(raw[0:4], b"\xef\xbe\xad\xde")
        self.assertEqual(raw[4:8], bytes([3, 1, 42, 0x80]))
        self.assertEqual(raw[8:16], struct.pack("<Q", 0x0102030405060708))
        self.assertEqual(raw[16:24], struct.pack("<Q", 7))
        self.assertEqual(raw[24:28], struct.pack("<I", 300))
        self.assertEqual(raw[28:32], struct.pack("<I", 0xAABBCCDD))

    def test_roundTrip(self) -> None:
        """A packed header unpacks to the same fields, at any offset."""
        header = Header(MAGIC, 1, 1, 2, 0, 99, 123456789, 0, 5)
        self.assertEqual(unpack_header(b"xyz" + header.pack(), 3), header)


class BuildFrameTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """build_frame fills payload_size and keeps the fields it is given."""
        frame = build_frame(2, 20, 17, b"\x14\x01z", timestamp=55, flags=4)
        header = unpack_header(frame)
        self.assertEqual(
            header[:8], (MAGIC, 2, 1, 20, 4, 17, 55, 3)
        )
        self.assertEqual(frame[HEADER_SIZE:], b"\x14\x01z")

    def test_checksumVector(self) -> None:
        """The checksum is CRC-32 of the first 28 header bytes and the payload."""
        self.assertEqual(reference_crc32(b"123456789"), 0xCBF43926)
        frame = build_frame(3, 42, 1, [(40, bytes(range(37)))], timestamp=1)
        expected = reference_crc32(frame[:28] + frame[32:])
        self.assertEqual(unpack_header(frame).checksum, expected)
        self.assertEqual(frame_checksum(frame), expected)

    def test_checksumInBuffer(self) -> None:
        """frame_checksum reads a frame in place, in the middle of a buffer."""
        frame = build_frame(1, 1, 1, b"abc")
        buf = b"\x00" * 5 + frame + b"\xff" * 7
        self.assertEqual(
            frame_checksum(buf, 5, 5 + len(frame)), unpack_header(frame).checksum
        )

    def test_defaultTimestamp(self) -> None:
        """Without a timestamp the frame is stamped with the current time."""
        import time

        before = time.time_ns()
        stamp = unpack_header(build_frame(1, 1, 1, b"")).timestamp
        self.assertTrue(before <= stamp <= time.time_ns())


class TLVTests(SynchronousTestCase):
    def test_standardAndExtended(self) -> None:
        """Values up to 255 bytes use the standard form, longer ones the extended."""
        small, large = b"s" * 255, b"L" * 256
        payload = encode_tlvs([(40, small), (42, large)])
        self.assertEqual(payload[:2], bytes([40, 255]))
        self.assertEqual(payload[257:262], bytes([255, 0, 42]) + struct.pack("<H", 256))
        self.assertEqual(
            [(t, bytes(v)) for t, v in iter_tlvs(payload)], [(40, small), (42, large)]
        )

    def test_empty(self) -> None:
        """An empty payload holds no TLVs."""
        self.assertEqual(list(iter_tlvs(b"")), [])

    def test_encodeRefusesBadTypes(self) -> None:
        """Types 0 and 255 and values over 65,535 bytes cannot be encoded."""
        self.assertRaises(ValueError, encode_tlvs, [(0, b"")])
        self.assertRaises(ValueError, encode_tlvs, [(255, b"")])
        self.assertRaises(ValueError, encode_tlvs, [(1, b"x" * 65536)])

    def assertTruncated(self, payload: bytes, fragment: str) -> None:
        error = self.assertRaises(TruncatedTLV, list, iter_tlvs(payload))
        self.assertIn(fragment, str(error))

    def test_valueOverrun(self) -> None:
        """A standard TLV longer than what is left is reported with its numbers."""
        self.assertTruncated(
            bytes([40, 1, 1]) + bytes([41, 10, 1, 2]),
            "TLV type 41 at payload offset 3 declares 10 bytes, 2 left",
        )

    def test_missingLength(self) -> None:
        """A lone type byte at the end of the payload is a truncated TLV."""
        self.assertTruncated(bytes([40, 0, 41]), "TLV type 41 at payload offset 2 has no length")

    def test_extendedHeaderCut(self) -> None:
        """An extended TLV needs its full 5-byte header."""
        self.assertTruncated(bytes([255, 0, 40, 1]), "extended TLV header at payload offset 0")

    def test_extendedOverrun(self) -> None:
        """An extended TLV longer than the payload is truncated."""
        self.assertTruncated(
            b"\x01\x00" + bytes([255, 0, 40]) + struct.pack("<H", 300) + b"x" * 10,
            "TLV type 40 at payload offset 2 declares 300 bytes, 10 left",
        )


class ErrorTests(SynchronousTestCase):
    def test_message(self) -> None:
        """An error names what was wrong, where in the stream, and from whom."""
        error = BadMagic("bad magic 0x12345678", offset=96, client_id=7)
        self.assertEqual(str(error), "bad magic 0x12345678 at offset 96 from client 7")
        self.assertEqual(str(BadMagic("bad magic 0x12345678")), "bad magic 0x12345678")

    def test_reasonsAreDistinct(self) -> None:
        """Every error kind is counted under its own reason."""
        self.assertEqual(len(set(wire.REJECT_REASONS)), len(wire.REJECT_REASONS))
        self.assertIn("bad_magic", wire.REJECT_REASONS)
        self.assertIn("incomplete_frame", wire.REJECT_REASONS)
