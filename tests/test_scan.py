"""
Tests for the native per-frame loops: L{twisted_relay.scan}'s scan and the
audit log's record builder give the same answers as their pure-Python
versions, on valid streams and on damaged ones.
"""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import audit_records_python
from twisted_relay.control import Subscription
from twisted_relay.domains import EXECUTION, SIGNAL
from twisted_relay.scan import NO_WALK, allowed_types, pick_runs_python, scan_run_python
from twisted_relay.validation import FramePolicy
from twisted_relay.wire import HEADER_SIZE, FrameRejected, build_frame, unpack_header

from .helpers import native_loops
from .relayprocess import REPO

NATIVE = native_loops()

frame_specs = st.lists(
    st.tuples(
        st.sampled_from([1, 1, 1, 2, 4]),  # relay_domain, mostly the relay's own
        st.sampled_from([7, 7, 7, 8]),  # source
        st.integers(0, 3),  # how far the sequence moves: mostly by one
        st.integers(0, 40),  # payload size
    ),
    min_size=0,
    max_size=30,
)


def stream(specs, first: int = 1) -> bytes:
    frames, sequence = [], first
    for domain, source, step, size in specs:
        sequence += step
        frames.append(build_frame(domain, source, sequence, b"p" * size))
    return b"".join(frames)


#: The scan's checks when the domain asks for none (the market relay).
UNCHECKED = (False, NO_WALK)


def both(test: SynchronousTestCase, *args):
    """The native scan's answer, checked equal to the pure-Python one's."""
    python = scan_run_python(*args)
    test.assertEqual(NATIVE.scan_run(*args), python)
    return python


class ScanTests(SynchronousTestCase):
    def both(self, *args):
        return both(self, *args, *UNCHECKED)

    def test_run(self) -> None:
        """A run of one source's consecutive frames is passed over whole."""
        data = stream([(1, 7, 1, 10)] * 5, first=0)
        self.assertEqual(self.both(data, 0, len(data), 1000, 1, 7, 0), (len(data), 5, 5))

    def test_stops(self) -> None:
        """It stops at another domain, another source, a jump, a partial frame."""
        one = len(build_frame(1, 7, 1, b""))
        for specs in (
            [(1, 7, 1, 0), (2, 7, 1, 0)],
            [(1, 7, 1, 0), (1, 8, 1, 0)],
            [(1, 7, 1, 0), (1, 7, 2, 0)],
            [(1, 7, 1, 0), (1, 7, 0, 0)],
        ):
            data = stream(specs, first=0)
            self.assertEqual(self.both(data, 0, len(data), 1000, 1, 7, 0), (one, 1, 1))
        data = stream([(1, 7, 1, 0)] * 2, first=0)
        self.assertEqual(self.both(data, 0, len(data) - 1, 1000, 1, 7, 0), (one, 1, 1))

    def test_lastSequence(self) -> None:
        """The largest sequence has no successor, in either version."""
        top = 2**64 - 1
        data = build_frame(1, 7, top, b"") + build_frame(1, 7, 0, b"")
        self.assertEqual(self.both(data, 0, len(data), 1000, 1, 7, top - 1), (32, 1, top))

    @settings(max_examples=300, deadline=None)
    @given(
        specs=frame_specs,
        damage=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
        start=st.integers(0, 100),
        max_payload=st.sampled_from([20, 1000]),
        source=st.sampled_from([7, 8, -1]),
        last=st.integers(0, 3),
    )
    def test_sameAnswers(self, specs, damage, start, max_payload, source, last) -> None:
        """On any stream, damaged anywhere, both versions stop at the same place."""
        data = bytearray(stream(specs))
        for position, value in damage:
            if data:
                data[position % len(data)] = value
        data = bytes(data)
        start = min(start, len(data))
        self.both(data, start, len(data), max_payload, 1, source, last)


#: TLVs a checked relay sees: allowed and not, standard and extended.
tlv_specs = st.lists(
    st.tuples(st.sampled_from([20, 21, 40, 60, 200, 1, 90]), st.integers(0, 300)),
    max_size=4,
)


def checked_stream(domain: int, specs) -> bytes:
    return b"".join(
        build_frame(domain, 9, sequence, [(t, b"v" * size) for t, size in tlvs])
        for sequence, tlvs in enumerate(specs, start=1)
    )


class CheckedScanTests(SynchronousTestCase):
    """The scan running a checked domain's CRC-32 and strict TLV walk."""

    def scan(self, policy: FramePolicy, data: bytes, domain: int = SIGNAL.domain):
        return both(
            self, data, 0, len(data), policy.max_frame_size, domain, 9, 0, *policy.scan_checks
        )

    def policy(self, logic=SIGNAL, verify: bool = True) -> FramePolicy:
        return FramePolicy.for_logic(logic, verify_checksum=verify)

    def test_run(self) -> None:
        """Valid signal frames, standard and extended TLVs, pass in one call."""
        data = checked_stream(2, [[(20, 10)], [(21, 300), (60, 0)], [], [(200, 255)]])
        self.assertEqual(self.scan(self.policy(), data), (len(data), 4, 4))

    def test_stops(self) -> None:
        """It stops at a bad checksum, a type not allowed, a truncated or malformed TLV."""
        good = build_frame(2, 9, 1, [(20, b"x")])
        bad_crc = bytearray(build_frame(2, 9, 2, [(20, b"x")]))
        bad_crc[-1] ^= 1
        for second in (
            bytes(bad_crc),
            build_frame(2, 9, 2, [(40, b"x")]),  # an execution type
            build_frame(2, 9, 2, b"\x14\x05ab"),  # declares 5 bytes, has 2
            build_frame(2, 9, 2, b"\xff\x00\x14\x01"),  # extended header cut short
            build_frame(2, 9, 2, b"\xff\x01\x14\x01\x00x"),  # reserved byte set
        ):
            data = good + second
            self.assertEqual(self.scan(self.policy(), data), (len(good), 1, 1))

    def test_unchecked(self) -> None:
        """With no checks asked for, a bad checksum or TLV is passed over."""
        data = build_frame(1, 9, 1, b"\x01\x05ab")
        self.assertEqual(
            both(self, data, 0, len(data), 1000, 1, 9, 0, *UNCHECKED), (len(data), 1, 1)
        )

    def verdict(self, policy: FramePolicy, frame: bytes, domain: int) -> bool:
        """Whether the relay's reference checks accept C{frame} in a run."""
        header = unpack_header(frame, 0)
        if (header.relay_domain, header.source, header.sequence) != (domain, 9, 1):
            return False
        if header.payload_size != len(frame) - HEADER_SIZE or header.magic != 0xDEADBEEF:
            return False
        if header.version != 1:
            return False
        try:
            policy.check(frame, 0, len(frame))
        except FrameRejected:
            return False
        return True

    def test_everyBitFlip(self) -> None:
        """
        Every single-bit flip of valid signal and execution frames: native and
        Python agree, each passes exactly the frames the reference checks
        accept, and with the CRC-32 on none passes.
        """
        for logic, tlvs in (
            (SIGNAL, [(20, b"s" * 12), (200, b"e" * 300)]),
            (EXECUTION, [(40, b"o" * 20), (60, b"r" * 3)]),
        ):
            frame = build_frame(logic.domain, 9, 1, tlvs)
            for verify in (True, False):
                policy = self.policy(logic, verify)
                passed = 0
                for bit in range(len(frame) * 8):
                    flipped = bytearray(frame)
                    flipped[bit // 8] ^= 1 << bit % 8
                    flipped = bytes(flipped)
                    _, frames, _ = self.scan(policy, flipped, logic.domain)
                    expected = self.verdict(policy, flipped, logic.domain)
                    self.assertEqual(frames == 1, expected, (logic.name, verify, bit))
                    passed += frames
                if verify:
                    self.assertEqual(passed, 0)

    @settings(max_examples=300, deadline=None)
    @given(
        specs=st.lists(tlv_specs, max_size=8),
        damage=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
        strict=st.booleans(),
        verify=st.booleans(),
    )
    def test_sameAnswers(self, specs, damage, strict, verify) -> None:
        """On any checked stream, damaged anywhere, both versions agree."""
        data = bytearray(checked_stream(2, specs))
        for position, value in damage:
            if data:
                data[position % len(data)] = value
        allowed = allowed_types(SIGNAL.allowed_tlv_types) if strict else NO_WALK
        both(self, bytes(data), 0, len(data), SIGNAL.max_frame_size, 2, 9, 0, verify, allowed)

    def test_allowedSize(self) -> None:
        """The native scan refuses an C{allowed} that is not a 256-byte table."""
        self.assertRaises(ValueError, NATIVE.scan_run, b"", 0, 0, 10, 1, 1, 0, False, b"x")


class PickTests(SynchronousTestCase):
    """A subscription's pick: native, pure Python and L{Subscription.wants} agree."""

    @settings(max_examples=300, deadline=None)
    @given(
        frames=st.lists(st.tuples(st.integers(0, 3), tlv_specs), max_size=12),
        damage=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
        filters=st.lists(
            st.tuples(
                st.none() | st.frozensets(st.integers(0, 3), max_size=3),
                st.none() | st.frozensets(st.sampled_from([20, 21, 40, 200]), max_size=3),
            ),
            max_size=4,
        ),
    )
    def test_sameAnswers(self, frames, damage, filters) -> None:
        """
        Whatever the payloads hold, malformed TLVs included, every version
        picks alike, for each of several filters in one pass.
        """
        built = [
            bytearray(build_frame(1, source, 1, [(t, b"v" * size) for t, size in tlvs]))
            for source, tlvs in frames
        ]
        for position, value in damage:  # payload bytes only: the run stays whole frames
            frame = built[position % len(built)] if built else None
            if frame is not None and len(frame) > HEADER_SIZE:
                frame[HEADER_SIZE + position % (len(frame) - HEADER_SIZE)] = value
        run = b"".join(built)
        subscriptions = [Subscription(sources=s, tlv_types=t) for s, t in filters]
        tables = [subscription.tables for subscription in subscriptions]
        python = pick_runs_python(run, tables)
        self.assertEqual(NATIVE.pick_runs(run, tables), python)
        for subscription, (spans, count, size) in zip(subscriptions, python):
            expected, offset = [], 0
            for frame in built:
                end = offset + len(frame)
                if subscription.wants(run, offset, end, unpack_header(run, offset)):
                    expected.append((offset, end))
                offset = end
            self.assertEqual((count, size), (len(expected), sum(e - s for s, e in expected)))
            self.assertEqual(
                b"".join(run[s:e] for s, e in spans), b"".join(run[s:e] for s, e in expected)
            )
            self.assertTrue(all(a[1] < b[0] for a, b in zip(spans, spans[1:])))

    def test_tableSize(self) -> None:
        """The native pick refuses tables that are not 256 bytes, and filters not pairs."""
        self.assertRaises(ValueError, NATIVE.pick_runs, b"", [(b"x", b"")])
        self.assertRaises(ValueError, NATIVE.pick_runs, b"", [(b"", b"x")])
        self.assertRaises(ValueError, NATIVE.pick_runs, b"", [(b"",)])
        self.assertRaises(TypeError, NATIVE.pick_runs, b"", [(1, b"")])


class AuditRecordsTests(SynchronousTestCase):
    """The audit log's record builder: native and pure Python agree."""

    @settings(max_examples=200, deadline=None)
    @given(
        runs=st.lists(frame_specs, max_size=4),
        received=st.integers(0, 2**64 - 1),
        client=st.integers(0, 2**32 - 1),
        crc=st.integers(0, 2**32 - 1),
        sequence=st.sampled_from([1, 2**64 - 200]),
    )
    def test_sameRecords(self, runs, received, client, crc, sequence) -> None:
        """Any runs of frames give the same records, chain, count and sequences."""
        data = [stream(specs, first=sequence) for specs in runs]
        self.assertEqual(
            NATIVE.audit_records(data, received, client, crc),
            audit_records_python(data, received, client, crc),
        )

    def test_notWholeFrames(self) -> None:
        """A run that does not hold whole frames is refused, not read past."""
        frame = build_frame(3, 42, 1, b"x" * 10)
        for broken in (frame[:-1], frame + frame[:20]):
            self.assertRaises(ValueError, NATIVE.audit_records, [broken], 0, 0, 0)


class PurePythonTests(SynchronousTestCase):
    def test_askedFor(self) -> None:
        """TWISTED_RELAY_PURE_PYTHON=1 makes the relay run the pure-Python loops, and say why."""
        code = (
            "from twisted_relay import scan; from twisted_relay.audit import writer; "
            "print(scan.NATIVE, scan.scan_run is scan.scan_run_python, "
            "writer.audit_records is writer.audit_records_python, scan.FALLBACK_REASON)"
        )
        env = {**os.environ, "TWISTED_RELAY_PURE_PYTHON": "1"}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=60, check=True,
        ).stdout
        self.assertEqual(out, "False True True TWISTED_RELAY_PURE_PYTHON=1 asks for it\n")


class AuditRecordsInputTests(SynchronousTestCase):
    def test_bytesOnly(self) -> None:
        """The native builder, which releases the GIL, takes immutable runs only."""
        frame = build_frame(3, 42, 1, b"x" * 10)
        self.assertRaises(TypeError, NATIVE.audit_records, [bytearray(frame)], 0, 0, 0)
        self.assertEqual(NATIVE.audit_records([frame], 0, 0, 0)[2], 1)
