"""
Tests for the native per-frame loops: L{twisted_relay.scan}'s scan and the
audit log's record builder give the same answers as their pure-Python
versions, on valid streams and on damaged ones.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import audit_records_python
from twisted_relay.scan import scan_run_python
from twisted_relay.wire import build_frame

from .relayprocess import REPO


def build_native():
    """Compile twisted_relay/_cscan.c on its own and load it."""
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    workdir = tempfile.mkdtemp(prefix="tr-cscan-")
    try:
        source = os.path.join(REPO, "twisted_relay", "_cscan.c")
        command = build_ext(Distribution({"ext_modules": [Extension("_cscan", [source])]}))
        command.build_lib = command.build_temp = workdir
        command.ensure_finalized()
        command.run()
        spec = importlib.util.spec_from_file_location("_cscan", command.get_ext_fullpath("_cscan"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


NATIVE = build_native()

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


class ScanTests(SynchronousTestCase):
    def both(self, *args):
        python = scan_run_python(*args)
        self.assertEqual(NATIVE.scan_run(*args), python)
        return python

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
