"""
Tests for L{twisted_relay.engine.relay} and L{twisted_relay.engine.protocol}: framing,
filtering, checks and fan-out of one relay, over in-memory transports.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay import scan
from twisted_relay.control import control_frame, parse_error
from twisted_relay.engine import ingest
from twisted_relay.engine.accounting import CONTROL_RATE
from twisted_relay.wire import MAGIC, Domain, Header, build_frame, frame_checksum, unpack_header

from .helpers import RecordingTransport, connect, frames_for, make_relay, native_loops, split


def disconnect(client) -> None:
    client.connectionLost(Failure(ConnectionDone()))


class BroadcastTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = make_relay()
        self.publisher = connect(self.relay)
        self.subscribers = [connect(self.relay) for _ in range(3)]

    def test_fanOut(self) -> None:
        """Every other client receives the accepted frames byte for byte; the sender does not."""
        frames = frames_for(Domain.MARKET_DATA, 5)
        self.publisher.dataReceived(b"".join(frames))
        for client in self.subscribers:
            self.assertEqual(client.transport.value(), b"".join(frames))
        self.assertEqual(self.publisher.transport.value(), b"")

    def test_echo(self) -> None:
        """With echo on, the sender receives its own frames too."""
        relay = make_relay(echo=True)
        publisher, subscriber = connect(relay), connect(relay)
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        publisher.dataReceived(frame)
        self.assertEqual(publisher.transport.value(), frame)
        self.assertEqual(subscriber.transport.value(), frame)

    def test_everyClientPublishes(self) -> None:
        """Connections are bidirectional: any client's frames reach all the others."""
        a, b = frames_for(Domain.MARKET_DATA, 2, source=1)
        self.subscribers[0].dataReceived(a)
        self.subscribers[1].dataReceived(b)
        self.assertEqual(self.publisher.transport.value(), a + b)
        self.assertEqual(self.subscribers[0].transport.value(), b)
        self.assertEqual(self.subscribers[1].transport.value(), a)
        self.assertEqual(self.subscribers[2].transport.value(), a + b)

    def test_oneWritePerChunk(self) -> None:
        """A chunk of whole frames reaches each client as one slice in one write."""
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 10)))
        for client in self.subscribers:
            self.assertEqual(len(client.transport.calls), 1)
            self.assertEqual(len(client.transport.calls[0]), 1)

    def test_runsAroundARejectedFrame(self) -> None:
        """A refused frame splits the chunk into two runs, written together."""
        a, b = frames_for(Domain.MARKET_DATA, 2)
        other = frames_for(Domain.SIGNAL, 1)[0]
        self.publisher.dataReceived(a + other + b)
        calls = self.subscribers[0].transport.calls
        self.assertEqual(calls, [[a, b]])

    def test_partialFrameCarriedOver(self) -> None:
        """A frame split across chunks is forwarded once, when complete."""
        a, b = frames_for(Domain.MARKET_DATA, 2)
        self.publisher.dataReceived(a + b[:10])
        self.assertEqual(self.subscribers[0].transport.value(), a)
        self.publisher.dataReceived(b[10:])
        self.assertEqual(self.subscribers[0].transport.value(), a + b)

    def test_everySplitThroughTheRelay(self) -> None:
        """Split anywhere, a mixed stream yields exactly the accepted frames, in order."""
        market = frames_for(Domain.MARKET_DATA, 4)
        stream = market[0] + frames_for(Domain.SIGNAL, 1)[0] + b"".join(market[1:])
        for i in range(len(stream) + 1):
            relay = make_relay()
            publisher, subscriber = connect(relay), connect(relay)
            publisher.dataReceived(stream[:i])
            publisher.dataReceived(stream[i:])
            self.assertEqual(subscriber.transport.value(), b"".join(market), f"split at {i}")
            self.assertEqual(relay.totals.rejects["filtered"], 1)

    @settings(max_examples=150, deadline=None)
    @given(
        count=st.integers(1, 8),
        cuts=st.lists(st.integers(0, 5000), max_size=10),
        garbage=st.binary(min_size=4, max_size=64),
    )
    def test_garbageAfterFrames(self, count: int, cuts: list[int], garbage: bytes) -> None:
        """Garbage never reaches subscribers, never raises, and breaks only its sender."""
        frames = frames_for(Domain.MARKET_DATA, count)
        garbage = b"\x00" + garbage  # not a header: it cannot start with the magic
        stream = b"".join(frames) + garbage
        relay = make_relay()
        publisher, subscriber, bystander = connect(relay), connect(relay), connect(relay)
        for chunk in split(stream, cuts):
            publisher.dataReceived(chunk)
        self.assertEqual(subscriber.transport.value(), b"".join(frames))
        self.assertTrue(publisher.transport.disconnecting)
        self.assertEqual(relay.totals.rejects["bad_magic"], 1)
        bystander.dataReceived(frames[0])
        self.assertEqual(subscriber.transport.value(), b"".join(frames) + frames[0])


class RejectTests(SynchronousTestCase):
    """Each kind of bad frame is dropped or closes its sender, counted by reason."""

    def publish(self, domain: int, data: bytes, **overrides):
        relay = make_relay(domain, **overrides)
        publisher, subscriber = connect(relay), connect(relay)
        publisher.dataReceived(data)
        return relay, publisher, subscriber

    def assertDropped(self, domain: int, bad: bytes, reason: str, **overrides) -> None:
        good = frames_for(domain, 2)
        relay, publisher, subscriber = self.publish(domain, good[0] + bad + good[1], **overrides)
        self.assertEqual(subscriber.transport.value(), good[0] + good[1])
        self.assertEqual(dict(publisher.stats.rejects), {reason: 1})
        self.assertEqual(dict(relay.totals.rejects), {reason: 1})
        self.assertFalse(publisher.transport.disconnecting)
        self.assertEqual(publisher.stats.frames_in, 2)

    def assertClosed(self, domain: int, bad: bytes, reason: str) -> None:
        good = frames_for(domain, 1)[0]
        relay, publisher, subscriber = self.publish(domain, good + bad + good)
        self.assertEqual(subscriber.transport.value(), good)
        self.assertTrue(publisher.transport.disconnecting)
        told = publisher.transport.value()  # the relay's last frame to it: why
        error = parse_error(unpack_header(told), told)
        self.assertEqual(error[0], reason)
        self.assertRegex(error[1], r"at offset \d+ of its stream$")
        self.assertEqual(dict(relay.totals.rejects), {reason: 1})
        self.assertEqual(publisher.stats.close_reason, reason)
        publisher.dataReceived(good)
        self.assertEqual(subscriber.transport.value(), good)
        disconnect(publisher)
        self.assertEqual(dict(relay.totals.rejects), {reason: 1})

    def test_wrongDomainFiltered(self) -> None:
        """A frame of another domain is dropped as filtered."""
        self.assertDropped(Domain.MARKET_DATA, frames_for(Domain.SIGNAL, 1)[0], "filtered")
        self.assertDropped(Domain.EXECUTION, frames_for(Domain.MARKET_DATA, 1)[0], "filtered")

    def corrupt(self, frame: bytes) -> bytes:
        return frame[:-1] + bytes([frame[-1] ^ 0xFF])

    def test_badChecksum(self) -> None:
        """Signal and execution drop a frame whose CRC-32 does not match."""
        for domain in (Domain.SIGNAL, Domain.EXECUTION):
            self.assertDropped(domain, self.corrupt(frames_for(domain, 1)[0]), "bad_checksum")

    def test_marketIgnoresChecksum(self) -> None:
        """The market relay forwards a frame with a wrong checksum, unless told to check."""
        bad = self.corrupt(frames_for(Domain.MARKET_DATA, 1)[0])
        _, _, subscriber = self.publish(Domain.MARKET_DATA, bad)
        self.assertEqual(subscriber.transport.value(), bad)
        self.assertDropped(Domain.MARKET_DATA, bad, "bad_checksum", verify_checksum=True)

    def test_checksumOverride(self) -> None:
        """--no-checksum makes the signal relay forward a frame with a wrong CRC."""
        bad = self.corrupt(frames_for(Domain.SIGNAL, 1)[0])
        _, _, subscriber = self.publish(Domain.SIGNAL, bad, verify_checksum=False)
        self.assertEqual(subscriber.transport.value(), bad)

    def test_unknownTLVType(self) -> None:
        """Strict domains drop a frame carrying a TLV type outside their families."""
        self.assertDropped(
            Domain.SIGNAL, build_frame(Domain.SIGNAL, 20, 5, [(40, b"order")]), "unknown_tlv_type"
        )
        self.assertDropped(
            Domain.EXECUTION, build_frame(Domain.EXECUTION, 42, 5, [(1, b"t")]), "unknown_tlv_type"
        )

    def test_allowedFamilies(self) -> None:
        """Risk (60-79) and vendor (200-254) TLVs pass on signal and execution."""
        for domain, tlv in ((Domain.SIGNAL, 61), (Domain.EXECUTION, 71), (Domain.SIGNAL, 200)):
            frame = build_frame(domain, 41, 1, [(tlv, b"r" * 300)])
            _, _, subscriber = self.publish(domain, frame)
            self.assertEqual(subscriber.transport.value(), frame)

    def test_truncatedTLV(self) -> None:
        """A TLV running past the payload is dropped with the frame."""
        self.assertDropped(
            Domain.EXECUTION, build_frame(Domain.EXECUTION, 42, 5, bytes([40, 9, 1])), "truncated_tlv"
        )

    def test_extendedReservedByte(self) -> None:
        """An extended TLV whose reserved byte is not 0 is dropped with the frame."""
        for domain, tlv in ((Domain.SIGNAL, 20), (Domain.EXECUTION, 40)):
            payload = bytes([255, 1, tlv, 3, 0]) + b"abc"
            self.assertDropped(domain, build_frame(domain, 42, 5, payload), "bad_tlv")

    def test_badMagic(self) -> None:
        """Bad magic closes the sender, after forwarding what came before."""
        self.assertClosed(Domain.MARKET_DATA, b"\x12\x34\x56\x78" + b"\x00" * 28, "bad_magic")

    def test_unsupportedVersion(self) -> None:
        """An unknown protocol version closes the sender."""
        self.assertClosed(
            Domain.MARKET_DATA, Header(MAGIC, 1, 9, 1, 0, 1, 0, 0, 0).pack(), "unsupported_version"
        )

    def test_oversize(self) -> None:
        """A payload_size over the domain's maximum closes the sender before buffering."""
        huge = Header(MAGIC, 2, 1, 20, 0, 1, 0, 32 * 1024, 0).pack()
        self.assertClosed(Domain.SIGNAL, huge, "frame_too_large")

    def test_maxFrameOverride(self) -> None:
        """--max-frame lowers the limit below the domain's."""
        frame = build_frame(1, 1, 1, b"x" * 100)
        relay, publisher, _ = self.publish(Domain.MARKET_DATA, frame, max_frame_size=100)
        self.assertTrue(publisher.transport.disconnecting)
        self.assertEqual(relay.totals.rejects["frame_too_large"], 1)

    def test_vanishMidFrame(self) -> None:
        """A client that disconnects inside a frame is counted; nothing partial is sent."""
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        relay, publisher, subscriber = self.publish(Domain.MARKET_DATA, frame[:-3])
        disconnect(publisher)
        self.assertEqual(subscriber.transport.value(), b"")
        self.assertEqual(dict(relay.totals.rejects), {"incomplete_frame": 1})

    def test_rejectLogIsRateLimited(self) -> None:
        """A flood of bad frames produces a bounded number of log events."""
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        bad = frames_for(Domain.SIGNAL, 1)[0]
        relay, publisher, _ = self.publish(Domain.MARKET_DATA, bad * 1000)
        self.assertEqual(relay.totals.rejects["filtered"], 1000)
        warnings = [e for e in events if e.get("reason") == "filtered"]
        self.assertEqual(len(warnings), 5)
        relay.clock.advance(1)
        publisher.dataReceived(bad)
        warnings = [e for e in events if e.get("reason") == "filtered"]
        self.assertEqual(len(warnings), 6)
        self.assertEqual(warnings[-1]["held_back"], " (995 more since the last report)")


class IsolationTests(SynchronousTestCase):
    def test_failingWriteCutsOnlyThatClient(self) -> None:
        """A client whose transport raises is aborted; the others still receive."""

        class Broken(RecordingTransport):
            def write(self, data):
                raise OSError("broken pipe")

        relay = make_relay()
        publisher, broken, healthy = connect(relay), connect(relay, Broken()), connect(relay)
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        publisher.dataReceived(frame)
        self.assertTrue(broken.transport.disconnecting)
        self.assertEqual(healthy.transport.value(), frame)
        self.assertFalse(publisher.transport.disconnecting)
        self.flushLoggedErrors(OSError)

    def test_domainHookErrorCutsOnlyTheSender(self) -> None:
        """An exception from the domain's hook closes the sender; nothing escapes."""
        relay = make_relay()

        class Faulty:
            name = "faulty"

            def should_forward(self, header):
                raise ZeroDivisionError()

        relay.logic = Faulty()
        publisher, subscriber = connect(relay), connect(relay)
        publisher.dataReceived(frames_for(Domain.MARKET_DATA, 1)[0])
        self.assertTrue(publisher.transport.disconnecting)
        self.assertEqual(subscriber.transport.value(), b"")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class RegistryTests(SynchronousTestCase):
    def test_idsAndTimes(self) -> None:
        """Clients get increasing unique ids and their connection time."""
        relay = make_relay()
        first = connect(relay)
        relay.clock.advance(5)
        second = connect(relay)
        self.assertEqual((first.stats.client_id, second.stats.client_id), (1, 2))
        self.assertEqual((first.stats.connected_at, second.stats.connected_at), (0, 5))
        self.assertEqual(list(relay.clients), [1, 2])
        self.assertEqual(second.stats.peer, "UNIXAddress(None)")

    def test_removedOnDisconnect(self) -> None:
        """A client leaves the registry the moment its connection is lost; ids are not reused."""
        relay = make_relay()
        first, second = connect(relay), connect(relay)
        disconnect(first)
        self.assertEqual(list(relay.clients.values()), [second])
        self.assertEqual(connect(relay).stats.client_id, 3)
        self.assertEqual(relay.accounting.connections, 3)

    def test_counters(self) -> None:
        """Frames and bytes are counted in and out, per client and in total."""
        relay = make_relay()
        publisher, a, b = connect(relay), connect(relay), connect(relay)
        frames = frames_for(Domain.MARKET_DATA, 3)
        data = b"".join(frames) + frames_for(Domain.SIGNAL, 1)[0] + b"\xef\xbe"
        publisher.dataReceived(data)
        accepted = sum(map(len, frames))
        self.assertEqual((publisher.stats.frames_in, publisher.stats.bytes_in), (3, len(data)))
        for client in (a, b):
            self.assertEqual((client.stats.frames_out, client.stats.bytes_out), (3, accepted))
        totals = relay.totals
        self.assertEqual((totals.frames_in, totals.bytes_in), (3, len(data)))
        self.assertEqual((totals.frames_out, totals.bytes_out), (6, 2 * accepted))
        self.assertEqual(dict(totals.rejects), {"filtered": 1})


#: Frames a checked relay may see: (relay_domain, source, sequence step, TLVs, damage).
checked_frames = st.lists(
    st.tuples(
        st.sampled_from([Domain.SIGNAL] * 4 + [Domain.MARKET_DATA]),
        st.sampled_from([5, 5, 5, 6]),
        st.sampled_from([1, 1, 1, 0, 2]),
        st.lists(st.tuples(st.sampled_from([20, 21, 60, 40]), st.integers(0, 300)), max_size=3),
        st.sampled_from([None] * 6 + ["crc", "tlv"]),
    ),
    max_size=25,
)


class ScanFallbackTests(SynchronousTestCase):
    """A checked relay counts and forwards the same with the native scan or without."""

    def run_relay(self, data: list[bytes], scanner) -> tuple[bytes, object]:
        self.patch(ingest, "scan_run", scanner)
        relay = make_relay(Domain.SIGNAL)
        publisher, subscriber = connect(relay), connect(relay)
        for chunk in data:
            publisher.dataReceived(chunk)
        return subscriber.transport.value(), relay.totals

    @settings(max_examples=150, deadline=None)
    @given(specs=checked_frames, cuts=st.lists(st.integers(0, 10_000), max_size=4))
    def test_sameOutcome(self, specs, cuts) -> None:
        """Same frames out, same refusals by reason, same sequence counters."""
        frames, sequences = [], {}
        for domain, source, step, tlvs, damage in specs:
            sequences[source] = sequences.get(source, 0) + step
            frame = bytearray(
                build_frame(domain, source, sequences[source], [(t, b"t" * n) for t, n in tlvs])
            )
            if damage == "crc":
                frame[28] ^= 0x40
            elif damage == "tlv" and len(frame) > 33:
                frame[33] = 250
                frame[28:32] = frame_checksum(frame).to_bytes(4, "little")
            frames.append(bytes(frame))
        data = split(b"".join(frames), cuts)
        self.assertEqual(
            self.run_relay(data, scan.scan_run_python), self.run_relay(data, native_loops().scan_run)
        )


class ControlFloodTests(SynchronousTestCase):
    """Control frames are taken at a bounded rate per connection, and logged at one."""

    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_flood(self) -> None:
        """20,000 control frames in a second: 100 taken, the rest refused, a few log lines."""
        relay = make_relay()
        flooder, other = connect(relay), connect(relay)
        flooder.dataReceived(control_frame(publish_only=True) * 20_000)
        self.assertEqual(flooder.stats.control_frames, CONTROL_RATE)
        self.assertEqual(dict(flooder.stats.rejects), {"control_flood": 20_000 - CONTROL_RATE})
        self.assertLess(len(self.events), 20)
        other.dataReceived(control_frame(publish_only=True))
        self.assertEqual(other.stats.control_frames, 1)
        relay.clock.advance(1.0)
        flooder.dataReceived(control_frame())
        self.assertEqual(flooder.stats.control_frames, CONTROL_RATE + 1)
        self.assertEqual(flooder.stats.role, "subscriber")


class PartialFramesTests(SynchronousTestCase):
    """Frames begun and not finished are bounded in all, in time, and freed at once."""

    def setUp(self) -> None:
        self.relay = make_relay()
        self.frame = build_frame(Domain.MARKET_DATA, 7, 1, b"p" * 100_000)
        self.relay.partials.limit = 3 * len(self.frame)

    def test_limitAcrossClients(self) -> None:
        """The client that takes the held bytes past the limit is closed, alone."""
        clients = [connect(self.relay) for _ in range(4)]
        for client in clients:
            client.dataReceived(self.frame[:-1])
        self.assertEqual(
            [dict(c.stats.rejects) for c in clients],
            [{}, {}, {}, {"partial_frames_over_limit": 1}],
        )
        self.assertTrue(clients[3].transport.disconnecting)
        self.assertEqual(self.relay.partials.held, 3 * (len(self.frame) - 1))
        subscriber = connect(self.relay)
        clients[0].dataReceived(self.frame[-1:])
        self.assertEqual(subscriber.transport.value(), self.frame)
        self.assertEqual(self.relay.partials.held, 2 * (len(self.frame) - 1))

    def test_timeout(self) -> None:
        """A frame not finished within the timeout closes its client; a finished one does not."""
        slow, quick = connect(self.relay), connect(self.relay)
        slow.dataReceived(self.frame[:10])
        quick.dataReceived(self.frame[:10])
        self.relay.clock.advance(20)
        quick.dataReceived(self.frame[10:])
        self.relay.clock.advance(10)
        self.relay.expirePartials()
        self.assertEqual(dict(slow.stats.rejects), {"incomplete_frame_timeout": 1})
        self.assertTrue(slow.transport.disconnecting)
        self.assertEqual(dict(quick.stats.rejects), {})
        self.assertFalse(quick.transport.disconnecting)
        self.assertEqual((self.relay.partials.held, self.relay.partials.since), (0, {}))

    def test_releasedAtDisconnect(self) -> None:
        """A client gone mid-frame, or whose framing is lost, holds nothing more."""
        gone, broken = connect(self.relay), connect(self.relay)
        gone.dataReceived(self.frame[:-1])
        broken.dataReceived(self.frame[:50])
        self.assertEqual(self.relay.partials.held, len(self.frame) - 1 + 50)
        broken.dataReceived(self.frame[50:] + b"\x12\x34\x56\x78" + b"\x00" * 10)
        self.assertEqual(dict(broken.stats.rejects), {"bad_magic": 1})
        self.assertEqual(self.relay.partials.held, len(self.frame) - 1)
        disconnect(gone)
        self.assertEqual(dict(gone.stats.rejects), {"incomplete_frame": 1})
        disconnect(broken)
        self.assertEqual((self.relay.partials.held, self.relay.partials.since), (0, {}))

    def test_trickledFrameCounted(self) -> None:
        """A frame arriving in many reads after its header counts in full against the limit."""
        client = connect(self.relay)
        client.dataReceived(self.frame[:32])
        for start in range(32, len(self.frame) - 1, 10_000):
            client.dataReceived(self.frame[start : min(start + 10_000, len(self.frame) - 1)])
        self.assertEqual(self.relay.partials.held, len(self.frame) - 1)
        self.relay.partials.limit = len(self.frame) // 2
        other = connect(self.relay)
        other.dataReceived(self.frame[:40])
        self.assertEqual(dict(other.stats.rejects), {"partial_frames_over_limit": 1})

    def test_progressRestartsTheClock(self) -> None:
        """A publisher that keeps finishing frames is never timed out for the next one."""
        client = connect(self.relay)
        stream = self.frame * 4
        cut = len(self.frame) // 2
        for chunk in (stream[:cut], stream[cut : cut + len(self.frame)]):
            client.dataReceived(chunk)
            self.relay.clock.advance(self.relay.partials.timeout - 1)
            self.relay.expirePartials()
        self.assertEqual(dict(client.stats.rejects), {})
        self.relay.clock.advance(1)
        self.relay.expirePartials()
        self.assertEqual(dict(client.stats.rejects), {"incomplete_frame_timeout": 1})
