"""
The relay under hostile and careless input, without a reactor: the corpus of
named bad inputs (tests/corpus), every single-bit flip of a valid frame of
each domain, and a property-based fuzzer of the framing, the checks and the
control parser against a model built from what each frame was made to be.
In every case an honest publisher-subscriber pair beside the bad client
loses nothing. The same inputs against real relay processes, with the
resource scenarios, are in tests/test_adversarial_process.py.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.control import (
    RECOVERY_REQUEST,
    BadControlFrame,
    control_frame,
    parse_control,
)
from twisted_relay.wire import HEADER_SIZE, Domain, FrameRejected, build_frame

from .corpus.make_corpus import DOMAINS, unsealed
from .helpers import connect, make_relay

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def corpus() -> dict[str, dict[str, str]]:
    with open(os.path.join(CORPUS, "manifest.json")) as f:
        return json.load(f)


def read(name: str) -> bytes:
    with open(os.path.join(CORPUS, f"{name}.bin"), "rb") as f:
        return f.read()


class Beside:
    """A relay of C{domain}, an honest publisher and subscriber, and a client under test."""

    def __init__(self, domain: int) -> None:
        self.domain = domain
        self.relay = make_relay(domain)
        self.publisher, self.subscriber, self.client = (connect(self.relay) for _ in range(3))
        self.honest: list[bytes] = []
        self.publish()

    def publish(self) -> None:
        tlv = {1: 1, 2: 20, 3: 40}[self.domain]
        frame = build_frame(self.domain, 200, len(self.honest) + 1, [(tlv, b"honest")])
        self.honest.append(frame)
        self.publisher.dataReceived(frame)

    def send(self, data: bytes, pieces: int = 1) -> None:
        """C{data} from the client under test, cut in C{pieces}, then it leaves."""
        step = max(1, -(-len(data) // pieces))
        for start in range(0, len(data), step):
            if self.closed:
                break
            self.client.dataReceived(data[start : start + step])
        if not self.client.transport.disconnected:
            self.client.connectionLost(Failure(ConnectionDone()))
        self.publish()

    @property
    def closed(self) -> bool:
        transport = self.client.transport
        return bool(transport.disconnecting or transport.disconnected)

    def received(self) -> bytes:
        """What the honest subscriber got, after checking it got the honest frames in order."""
        return self.subscriber.transport.value()


class CorpusTests(SynchronousTestCase):
    """Each named bad input gets its documented outcome, whole or cut in pieces."""

    def check(self, name: str, expected: dict[str, str], pieces: int) -> None:
        data = read(name)
        beside = Beside(DOMAINS[expected["domain"]])
        beside.send(data, pieces)
        outcome, _, reason = expected["outcome"].partition(":")
        received = beside.received()
        honest = b"".join(beside.honest)
        rejects = dict(beside.relay.totals.rejects)
        self.assertNotEqual(beside.client.stats.close_reason, "internal error", name)
        if outcome == "forwarded":
            self.assertEqual(received, beside.honest[0] + data + beside.honest[1], name)
            self.assertEqual(rejects, {}, name)
            return
        self.assertEqual(received, honest, name)
        if outcome == "incomplete":
            reason = "incomplete_frame"
        self.assertEqual(rejects, {reason: 1}, name)
        self.assertEqual(beside.closed, outcome == "closed", name)

    def test_corpus(self) -> None:
        """Every file of the corpus, sent whole."""
        for name, expected in corpus().items():
            self.check(name, expected, 1)

    def test_corpusInPieces(self) -> None:
        """Every file of the corpus, sent a few bytes at a time."""
        for name, expected in corpus().items():
            self.check(name, expected, 13)

    def test_corpusComplete(self) -> None:
        """Every file the manifest names is there, and no other."""
        files = {n[: -len(".bin")] for n in os.listdir(CORPUS) if n.endswith(".bin")}
        self.assertEqual(files, set(corpus()))


class BitFlipTests(SynchronousTestCase):
    """Every single-bit flip of a valid frame of each domain."""

    def flips(self, domain: int):
        tlv = {1: 1, 2: 20, 3: 40}[domain]
        frame = build_frame(domain, 3, 1, [(tlv, b"price"), (tlv + 1, b"size")])
        for bit in range(len(frame) * 8):
            flipped = bytearray(frame)
            flipped[bit // 8] ^= 1 << (bit % 8)
            yield bit, bytes(flipped)

    def test_everyFlip(self) -> None:
        """
        No flip escapes into the relay or touches the honest pair; on the
        checked domains no flipped frame is forwarded, on market the ones
        forwarded are passed on byte for byte.
        """
        for name, domain in DOMAINS.items():
            forwarded = 0
            for bit, flipped in self.flips(domain):
                beside = Beside(domain)
                beside.send(flipped)
                self.assertNotEqual(beside.client.stats.close_reason, "internal error", bit)
                received = beside.received()
                if beside.client.stats.frames_in:
                    forwarded += 1
                    self.assertIn(flipped[: HEADER_SIZE], received, (name, bit))
                honest = [frame for frame in beside.honest if frame in received]
                self.assertEqual(honest, beside.honest, (name, bit))
                self.assertTrue(
                    beside.client.stats.frames_in or beside.relay.totals.rejects, (name, bit)
                )
            if name != "market":
                self.assertEqual(forwarded, 0, name)


#: What a frame of the model is made to be: a label, and how to build it.
KINDS = {
    "good": lambda seq: build_frame(2, 5, seq, [(20, b"g" * (seq % 7))]),
    "bad_checksum": lambda seq: unsealed(build_frame(2, 5, seq, [(20, b"c")])),
    "filtered": lambda seq: build_frame(1, 5, seq, [(1, b"m")]),
    "unknown_tlv_type": lambda seq: build_frame(2, 5, seq, [(7, b"u")]),
    "truncated_tlv": lambda seq: build_frame(2, 5, seq, bytes([20, 9, 1])),
    "bad_tlv": lambda seq: build_frame(2, 5, seq, bytes([255, 3, 20, 0, 0])),
    "bad_control_frame": lambda seq: build_frame(Domain.SYSTEM, 0, 0, [(250, b"\x07")]),
}
#: What ends a stream for good: its framing is lost.
FATAL = {
    "bad_magic": b"\x00" * HEADER_SIZE,
    "unsupported_version": build_frame(2, 5, 1, [(20, b"v")])[:5] + b"\x09" + bytes(26),
    "frame_too_large": build_frame(2, 5, 1, b"x" * 40000),
}


class ModelFuzzTests(SynchronousTestCase):
    """The signal relay against the model, on random streams cut at random places."""

    @settings(max_examples=200, deadline=None)
    @given(
        kinds=st.lists(st.sampled_from(sorted(KINDS)), max_size=25),
        fatal=st.none() | st.sampled_from(sorted(FATAL)),
        cuts=st.lists(st.integers(1, 300), max_size=20),
    )
    def test_model(self, kinds, fatal, cuts) -> None:
        """The honest pair and the relay's counts are what the model says, wherever the cuts."""
        frames = [KINDS[kind](seq) for seq, kind in enumerate(kinds, start=1)]
        stream = b"".join(frames) + (FATAL[fatal] if fatal else b"")
        beside = Beside(2)
        position = 0
        for cut in [*cuts, len(stream)]:
            if beside.closed or position >= len(stream):
                break
            beside.client.dataReceived(stream[position : position + cut])
            position += cut
        if not beside.client.transport.disconnected:
            beside.client.connectionLost(Failure(ConnectionDone()))
        beside.publish()
        good = b"".join(f for f, kind in zip(frames, kinds) if kind == "good")
        self.assertEqual(beside.received(), beside.honest[0] + good + beside.honest[1])
        expected = Counter(kind for kind in kinds if kind != "good")
        if fatal:
            expected[fatal] += 1
        self.assertEqual(beside.relay.totals.rejects, expected)
        self.assertEqual(beside.closed, fatal is not None)

    @settings(max_examples=300, deadline=None)
    @given(
        tlvs=st.lists(
            st.tuples(
                st.sampled_from([250, 251, 252, RECOVERY_REQUEST, 9, 253]),
                st.binary(max_size=12),
            ),
            max_size=5,
        )
    )
    def test_controlParser(self, tlvs) -> None:
        """Any TLVs in a system frame: a control, not one, or refused; nothing else."""
        frame = build_frame(Domain.SYSTEM, 0, 0, tlvs)
        try:
            parse_control(frame, 0, len(frame))
        except BadControlFrame:
            pass
        except FrameRejected as error:
            self.fail(f"{tlvs}: {error!r} is not a control frame refusal")

    @settings(max_examples=200, deadline=None)
    @given(
        publish_only=st.booleans(),
        sources=st.none() | st.frozensets(st.integers(0, 255), min_size=1, max_size=5),
        tlv_types=st.none() | st.frozensets(st.integers(0, 255), min_size=1, max_size=5),
        recover=st.dictionaries(st.integers(0, 255), st.integers(0, 2**64 - 1), max_size=4),
    )
    def test_controlRoundTrip(self, publish_only, sources, tlv_types, recover) -> None:
        """What a client declares is what the relay reads."""
        frame = control_frame(
            publish_only=publish_only, sources=sources, tlv_types=tlv_types, recover=recover
        )
        control = parse_control(frame, 0, len(frame))
        assert control is not None and control.subscription is not None
        subscription = control.subscription
        self.assertEqual(
            (subscription.publish_only, subscription.sources, subscription.tlv_types),
            (publish_only, sources, tlv_types),
        )
        self.assertEqual(control.recovery, recover)
