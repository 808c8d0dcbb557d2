"""
Tests for L{twisted_relay.engine.delivery}, L{twisted_relay.control} and sequence
tracking: slow consumers under each policy, subscriptions, gaps, drain.
"""

from __future__ import annotations

import socket

from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.control import (
    ACCOUNT,
    EVERYTHING,
    RELAY_ROLE,
    SUBSCRIBE_SOURCES,
    Account,
    account_frame,
    control_frame,
    parse_account,
    parse_error,
    parse_relay_info,
    recovery_frame,
)
from twisted_relay.domains import MARKET
from twisted_relay.engine import relay as relay_module
from twisted_relay.engine.delivery import (
    LEDGER_WRITES,
    OWN_LIMIT,
    UNREAD_ANSWERS,
    DeliverySettings,
)
from twisted_relay.scan import pick_runs
from twisted_relay.wire import Domain, build_frame, unpack_header

from .helpers import (
    DiskFull,
    RecordingTransport,
    audited_relay,
    connect,
    frames_for,
    frames_in,
    make_relay,
    published,
)


def disconnect(client) -> None:
    client.connectionLost(Failure(ConnectionDone()))


def sequences(data: bytes) -> list[int]:
    """The sequence numbers of the whole frames in C{data}, which must be frame-aligned."""
    out, offset = [], 0
    while offset < len(data):
        header = unpack_header(data, offset)
        out.append(header.sequence)
        offset += 32 + header.payload_size
    assert offset == len(data), "not frame-aligned"
    return out


def relay_with(policy: str, high: int = 1000, low: int = 200, stall: float = 2.0, **kw):
    return make_relay(
        delivery=DeliverySettings(policy, high_water=high, low_water=low, stall_timeout=stall), **kw
    )


class SettingsTests(SynchronousTestCase):
    def test_domainDefaults(self) -> None:
        """Each domain brings its policy; marks default to 8 MiB and 2 MiB, stall to 2 s."""
        settings = DeliverySettings.for_logic(MARKET)
        self.assertEqual(
            (settings.policy, settings.high_water, settings.low_water, settings.stall_timeout),
            ("drop", 8 * 1024 * 1024, 2 * 1024 * 1024, 2.0),
        )

    def test_overrides(self) -> None:
        """A high-water mark given alone pulls the low-water mark down to a quarter."""
        settings = DeliverySettings.for_logic(MARKET, policy="block", high_water=4000)
        self.assertEqual((settings.policy, settings.low_water), ("block", 1000))

    def test_invalid(self) -> None:
        """Unknown policies, inverted marks and non-positive stall timeouts are refused."""
        self.assertRaises(ValueError, DeliverySettings, "lossy")
        self.assertRaises(ValueError, DeliverySettings, "drop", high_water=10, low_water=10)
        self.assertRaises(ValueError, DeliverySettings, "block", stall_timeout=0)


class OutboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.frames = frames_for(Domain.MARKET_DATA, 40)  # 54 bytes each

    def slow(self, policy: str, **kw):
        relay = relay_with(policy, **kw)
        publisher, slow, fast = connect(relay), connect(relay), connect(relay)
        slow.outbox.pauseProducing()  # what the transport does when its buffer is full
        return relay, publisher, slow, fast

    def test_writesThroughWhileWritable(self) -> None:
        """A client that keeps up gets frames straight from the transport; nothing queues."""
        relay, publisher, slow, fast = self.slow("drop")
        publisher.dataReceived(self.frames[0])
        self.assertEqual(fast.outbox.queued, 0)
        self.assertEqual(fast.transport.value(), self.frames[0])

    def test_dropWholeFrames(self) -> None:
        """Over the mark, frames are dropped whole for the slow client only, and counted."""
        relay, publisher, slow, fast = self.slow("drop")
        for frame in self.frames:
            publisher.dataReceived(frame)
        self.assertEqual(fast.transport.value(), b"".join(self.frames))
        self.assertLessEqual(slow.outbox.queued, 1000)
        slow.outbox.resumeProducing()
        got = sequences(slow.transport.value())
        self.assertEqual(got, list(range(1, len(got) + 1)))
        self.assertEqual(len(got) + slow.stats.frames_dropped, 40)
        self.assertEqual(slow.stats.frames_dropped, 40 - 1000 // 54)
        self.assertEqual(relay.totals.frames_dropped, slow.stats.frames_dropped)
        self.assertEqual(slow.stats.frames_out, len(got))
        self.assertFalse(publisher.transport.disconnecting)

    def test_stuckClientParked(self) -> None:
        """
        Once a write does not fit, a drop-policy client is sent nothing until
        its transport takes from its queue; what it misses is counted exactly.
        """
        relay, publisher, slow, fast = self.slow("drop")
        for frame in self.frames[:19]:  # 18 fit under the mark of 1000 bytes
            publisher.dataReceived(frame)
        self.assertTrue(slow.outbox.parked)
        sent = []
        self.patch(slow.outbox, "send", lambda *args: sent.append(args))
        for frame in self.frames[19:]:
            publisher.dataReceived(frame)
        self.assertEqual(sent, [])
        self.assertEqual(relay.totals.frames_dropped, 40 - 18)
        self.assertEqual(slow.stats.bytes_dropped, (40 - 18) * 54)
        del slow.outbox.send
        slow.outbox.resumeProducing()
        self.assertFalse(slow.outbox.parked)
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        publisher.dataReceived(frame)
        self.assertEqual(slow.transport.value(), b"".join(self.frames[:18]) + frame)
        self.assertEqual((slow.stats.frames_out, slow.stats.frames_dropped), (19, 22))

    def test_parkedByFilter(self) -> None:
        """A parked filtered client is counted the frames it would have had, and none of its own."""
        relay, publisher, slow, fast = self.slow("drop")
        slow.dataReceived(control_frame(sources=[7]))
        for frame in self.frames[:19]:
            publisher.dataReceived(frame)
        self.assertTrue(slow.outbox.parked)
        publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 5, source=8)))
        slow.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 3, source=7)))
        publisher.dataReceived(b"".join(self.frames[19:23]))
        self.assertEqual(relay.totals.frames_dropped, 1 + 4)
        self.assertEqual(fast.stats.frames_out, 19 + 5 + 3 + 4)

    def test_parkedClientResubscribing(self) -> None:
        """A parked client that changes its subscription is fanned out to again, counted exactly."""
        relay, publisher, slow, fast = self.slow("drop")
        for frame in self.frames[:25]:
            publisher.dataReceived(frame)
        slow.dataReceived(control_frame(sources=[7]))
        slow.outbox.resumeProducing()
        for frame in self.frames[25:]:
            publisher.dataReceived(frame)
        got = sequences(slow.transport.value()[len(slow.transport.value()) - 15 * 54 :])
        self.assertEqual(got, list(range(26, 41)))
        self.assertEqual((slow.stats.frames_out, slow.stats.frames_dropped), (18 + 15, 7))

    def test_parkedClientReplaying(self) -> None:
        """A parked client that asks for a replay is sent what it missed once, not also dropped."""
        relay = audited_relay(
            self, delivery=DeliverySettings("drop", high_water=1000, low_water=200)
        )
        publisher, slow = connect(relay), connect(relay)
        slow.outbox.pauseProducing()
        frames = frames_for(Domain.EXECUTION, 40, source=42)
        for frame in frames[:25]:
            publisher.dataReceived(frame)
        self.assertTrue(slow.outbox.parked)
        slow.dataReceived(recovery_frame({42: 1}))
        for frame in frames[25:]:
            publisher.dataReceived(frame)
        for _ in range(1000):
            slow.outbox.resumeProducing()
            relay.clock.advance(0)
        data = slow.transport.value()
        received = [f for f in frames_in(data) if unpack_header(f).relay_domain != Domain.SYSTEM]
        fitted = 1000 // len(frames[0])  # what its queue took before it was parked
        self.assertEqual(received, frames[:fitted] + frames)
        self.assertEqual(slow.stats.frames_out, len(received))
        self.assertEqual(relay.totals.frames_dropped, 25 - fitted)

    def test_parkedClientLeaving(self) -> None:
        """A parked client that disconnects leaves with its count exact, and fan-out goes on."""
        relay, publisher, slow, fast = self.slow("drop")
        for frame in self.frames[:25]:
            publisher.dataReceived(frame)
        disconnect(slow)
        self.assertEqual(slow.stats.frames_dropped, 25 - 18)
        publisher.dataReceived(self.frames[25])
        self.assertEqual(relay.totals.frames_dropped, 25 - 18)
        self.assertEqual(fast.stats.frames_out, 26)

    def test_queueFlushesInOrder(self) -> None:
        """Queued frames reach the client in order once its transport drains."""
        relay, publisher, slow, fast = self.slow("drop")
        for frame in self.frames[:10]:
            publisher.dataReceived(frame)
        self.assertEqual(slow.transport.value(), b"")
        slow.outbox.resumeProducing()
        publisher.dataReceived(self.frames[10])
        self.assertEqual(slow.transport.value(), b"".join(self.frames[:11]))

    def test_disconnect(self) -> None:
        """Under disconnect, the slow client is cut off, counted; the others carry on."""
        relay, publisher, slow, fast = self.slow("disconnect")
        for frame in self.frames:
            publisher.dataReceived(frame)
        self.assertTrue(slow.transport.disconnecting)
        self.assertEqual(dict(relay.totals.cut_offs), {"slow consumer": 1})
        self.assertEqual(fast.transport.value(), b"".join(self.frames))
        disconnect(slow)
        self.assertEqual(list(relay.clients), [1, 3])

    def test_blockPausesEveryPublisher(self) -> None:
        """Under block, a client over the mark pauses reading from every client."""
        relay, publisher, slow, fast = self.slow("block")
        for frame in self.frames[:18]:  # 18 * 54 bytes fit under the mark of 1000
            publisher.dataReceived(frame)
        self.assertEqual(publisher.transport.producerState, "producing")
        publisher.dataReceived(self.frames[18])
        self.assertEqual(
            [c.transport.producerState for c in (publisher, slow, fast)], ["paused"] * 3
        )
        late = connect(relay)
        self.assertEqual(late.transport.producerState, "paused")
        relay.clock.advance(1.5)
        slow.outbox.resumeProducing()
        self.assertEqual(
            [c.transport.producerState for c in (publisher, slow, fast, late)], ["producing"] * 4
        )
        self.assertEqual(sequences(slow.transport.value()), list(range(1, 20)))
        self.assertEqual((relay.gate.pauses, relay.gate.longest_pause), (1, 1.5))
        self.assertEqual(relay.totals.frames_dropped, 0)

    def test_blockStallTimeout(self) -> None:
        """A client stuck over the mark past the stall timeout is cut; publishers resume."""
        relay, publisher, slow, fast = self.slow("block", stall=2.0)
        publisher.dataReceived(b"".join(self.frames[:20]))
        self.assertEqual(publisher.transport.producerState, "paused")
        relay.clock.advance(1.9)
        self.assertFalse(slow.transport.disconnecting)
        relay.clock.advance(0.1)
        self.assertTrue(slow.transport.disconnecting)
        self.assertEqual(dict(relay.totals.cut_offs), {"stalled consumer": 1})
        self.assertEqual(publisher.transport.producerState, "producing")
        self.assertEqual(relay.gate.longest_pause, 2.0)
        publisher.dataReceived(self.frames[20])
        self.assertEqual(fast.transport.value(), b"".join(self.frames[:21]))

    def test_cutClientLosesWhatWasQueued(self) -> None:
        """Frames still queued at a cut-off count as lost, not as delivered."""
        relay, publisher, slow, fast = self.slow("block", stall=2.0)
        publisher.dataReceived(b"".join(self.frames[:20]))
        relay.clock.advance(2)
        self.assertEqual((slow.stats.frames_out, slow.stats.frames_lost), (0, 20))
        self.assertEqual(slow.stats.bytes_lost, 20 * 54)
        self.assertEqual((fast.stats.frames_out, fast.stats.frames_lost), (20, 0))
        self.assertEqual(relay.totals.frames_lost, 20)

    def test_brokenClientClosedWithinDeadline(self) -> None:
        """A client closed for lost framing that never reads is aborted after the stall timeout."""
        relay, publisher, slow, fast = self.slow("drop", stall=3.0)
        publisher.dataReceived(self.frames[0])
        slow.dataReceived(b"garbage!")
        self.assertTrue(slow.transport.disconnecting)
        frame, told = frames_in(slow.transport.value())  # the frame, then why it is closed
        self.assertEqual(frame, self.frames[0])
        self.assertEqual(parse_error(unpack_header(told), told)[0], "bad_magic")
        self.assertEqual(slow.stats.frames_out, 1)
        relay.clock.advance(2.9)
        self.assertFalse(slow.transport.disconnected)
        relay.clock.advance(0.1)
        self.assertTrue(slow.transport.disconnected)

    def test_blockerLeavingResumes(self) -> None:
        """A blocking client that disconnects releases the publishers at once."""
        relay, publisher, slow, fast = self.slow("block")
        publisher.dataReceived(b"".join(self.frames[:20]))
        disconnect(slow)
        self.assertEqual(publisher.transport.producerState, "producing")
        self.assertEqual(relay.clock.getDelayedCalls(), [])


class SocketTransport(FileDescriptor):
    """
    A transport built as Twisted's TCP and Unix ones are, over a socket
    that takes C{room} bytes and then nothing (a client that stopped
    reading): C{kernel} is what the client will receive.
    """

    def __init__(self, room: int) -> None:
        super().__init__(MemoryReactor())
        self.connected = True
        self.room = room
        self.kernel = b""
        self.reasons: list[Failure] = []

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 7000)

    def writeSomeData(self, data: bytes) -> int:
        taken = bytes(data[: self.room])
        self.room -= len(taken)
        self.kernel += taken
        return len(taken)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self.reasons.append(reason)
        self.protocol.connectionLost(reason)


class HangUpTests(SynchronousTestCase):
    """What a client that is cut off receives, and how it is counted."""

    def setUp(self) -> None:
        self.frames = frames_for(Domain.MARKET_DATA, 40)  # 54 bytes each
        self.relay = relay_with("block", high=500, low=100, stall=2.0)
        self.publisher = connect(self.relay)

    def stuck(self, room: int):
        transport = SocketTransport(room)
        client = connect(self.relay, transport)  # type: ignore[arg-type]
        transport.protocol = client
        return client, transport

    def test_transportBufferTakenBack(self) -> None:
        """
        At a cut-off, the frames the transport still holds count as lost, and
        so does the one the socket took only the start of; the connection is
        closed in order, with nothing more written.
        """
        client, transport = self.stuck(room=3 * 54 + 10)
        self.publisher.dataReceived(b"".join(self.frames[:10]))
        transport.doWrite()
        self.assertEqual(client.stats.frames_out, 10)
        client.outbox.cut("stalled consumer", "test")
        self.relay.clock.advance(0)
        self.assertEqual(transport.kernel, b"".join(self.frames[:4])[: 3 * 54 + 10])
        self.assertEqual((client.stats.frames_out, client.stats.frames_lost), (3, 7))
        self.assertEqual((client.stats.bytes_out, client.stats.bytes_lost), (3 * 54, 7 * 54))
        self.assertEqual((self.relay.totals.frames_out, self.relay.totals.frames_lost), (3, 7))
        [reason] = transport.reasons
        self.assertTrue(reason.check(ConnectionDone))
        self.assertEqual(transport.dataBuffer + b"".join(transport._tempDataBuffer), b"")

    def test_stalledClientCountedExactly(self) -> None:
        """A client cut off by the stall timeout is counted as what its socket took."""
        client, transport = self.stuck(room=5 * 54)
        for frame in self.frames[:30]:
            self.publisher.dataReceived(frame)
            transport.doWrite()
        client.outbox.pauseProducing()  # the transport's buffer is full
        self.publisher.dataReceived(b"".join(self.frames[30:]))
        self.relay.clock.advance(2)
        self.relay.clock.advance(0)
        self.assertEqual((client.stats.frames_out, client.stats.frames_lost), (5, 35))
        self.assertEqual(self.relay.gate.paused, False)

    def test_drainTimeoutCountsExactly(self) -> None:
        """What a client did not take within the drain timeout counts as lost."""
        client, transport = self.stuck(room=2 * 54)
        self.publisher.dataReceived(b"".join(self.frames[:6]))
        transport.doWrite()
        drained = self.relay.drain(3)
        self.relay.clock.advance(3)
        self.relay.clock.advance(0)
        self.assertEqual((client.stats.frames_out, client.stats.frames_lost), (2, 4))
        self.assertEqual(transport.kernel, b"".join(self.frames[:2]))
        disconnect(self.publisher)
        self.successResultOf(drained)

    def test_hungUpStaysShut(self) -> None:
        """
        Once hung up, nothing starts the connection reading again (the gate
        resuming publishers), and what the client sent unread is discarded so
        the close is not a reset.
        """
        client, transport = self.stuck(room=0)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport.socket = ours
        theirs.sendall(b"unread" * 1000)
        client.outbox.cut("stalled consumer", "test")
        transport.resumeProducing()
        self.assertNotIn(transport, transport.reactor.readers)
        self.relay.clock.advance(0)
        self.assertRaises(BlockingIOError, ours.recv, 1, socket.MSG_DONTWAIT)
        self.assertEqual(len(transport.reasons), 1)

    def test_readingClientKeepsLittle(self) -> None:
        """For a client that keeps up, the outbox remembers no more than it must."""
        client, transport = self.stuck(room=1 << 30)
        frame = frames_for(Domain.MARKET_DATA, 1, size=4000)[0]
        for _ in range(1000):
            self.publisher.dataReceived(frame)
            transport.doWrite()
        self.assertLessEqual(len(client.outbox._ledger), LEDGER_WRITES + 1)
        client.outbox.cut("slow consumer", "test")
        self.assertEqual((client.stats.frames_out, client.stats.frames_lost), (1000, 0))


class SubscriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = make_relay()
        self.publisher = connect(self.relay)
        self.other = connect(self.relay)

    def declare(self, client, **subscription) -> None:
        """Send a control frame; the relay answers with its domain and name."""
        client.dataReceived(control_frame(**subscription))
        answer = client.transport.value()
        header = unpack_header(answer)
        self.assertEqual(parse_relay_info(header, answer), (1, "market"))
        client.transport.clear()

    def test_publishOnly(self) -> None:
        """A publish-only client receives nothing, and its control frame is not forwarded."""
        self.declare(self.other, publish_only=True)
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 3)))
        self.assertEqual(self.other.transport.value(), b"")
        self.assertEqual(self.publisher.transport.value(), b"")
        self.assertEqual(self.other.stats.role, "publisher")
        self.assertEqual(self.relay.totals.control_frames, 1)
        self.assertEqual(dict(self.relay.totals.rejects), {})

    def test_bySource(self) -> None:
        """A client subscribed to some sources receives only their frames, in order."""
        self.declare(self.other, sources=[2, 3])
        frames = [build_frame(1, source, seq, b"") for seq in range(1, 4) for source in (1, 2, 3)]
        self.publisher.dataReceived(b"".join(frames))
        expected = [f for f in frames if unpack_header(f).source in (2, 3)]
        self.assertEqual(self.other.transport.value(), b"".join(expected))
        self.assertEqual(self.other.stats.frames_out, 6)  # the answer is not a relayed frame

    def test_byTLVType(self) -> None:
        """A client subscribed to TLV types receives frames holding any of them."""
        self.declare(self.other, tlv_types=[2])
        trade = build_frame(1, 1, 1, [(1, b"t" * 40)])
        quote = build_frame(1, 1, 2, [(2, b"q" * 52)])
        both = build_frame(1, 1, 3, [(1, b"t"), (2, b"q")])
        garbage = build_frame(1, 1, 4, b"\x02")
        self.publisher.dataReceived(trade + quote + both + garbage)
        self.assertEqual(self.other.transport.value(), quote + both)

    def test_sharedFilterPickedOnce(self) -> None:
        """
        Clients with the same filter get the same frames, picked once per
        chunk; wanted frames side by side go out as one slice.
        """
        third = connect(self.relay, RecordingTransport())
        self.declare(self.other, sources=[2])
        self.declare(third, sources=[2])
        third.transport.calls.clear()
        frames = [build_frame(1, 2, seq, b"x" * seq) for seq in range(1, 6)]
        frames.insert(3, build_frame(1, 1, 1, b""))
        calls = []

        def counting(run, filters):
            calls.append((run, len(filters)))
            return pick_runs(run, filters)

        self.patch(relay_module, "pick_runs", counting)
        self.publisher.dataReceived(b"".join(frames))
        expected = b"".join(f for f in frames if unpack_header(f).source == 2)
        self.assertEqual(self.other.transport.value(), expected)
        self.assertEqual(third.transport.value(), expected)
        self.assertEqual(calls, [(b"".join(frames), 1)])
        self.assertEqual([len(call) for call in third.transport.calls], [2])

    def test_distinctFiltersOnePass(self) -> None:
        """Distinct filters are picked together, in one pass over the read, each exactly."""
        clients = [connect(self.relay, RecordingTransport()) for _ in range(3)]
        for n, client in enumerate(clients):
            self.declare(client, sources=[n + 1])
        calls = []

        def counting(run, filters):
            calls.append(len(filters))
            return pick_runs(run, filters)

        self.patch(relay_module, "pick_runs", counting)
        frames = [build_frame(1, source, 1, b"x" * source) for source in (1, 2, 3, 2)]
        self.publisher.dataReceived(b"".join(frames))
        self.assertEqual(calls, [3])
        for n, client in enumerate(clients):
            wanted = b"".join(f for f in frames if unpack_header(f).source == n + 1)
            self.assertEqual(client.transport.value(), wanted)

    def test_resetToDefault(self) -> None:
        """A control frame without a filter restores receiving everything."""
        self.declare(self.other, sources=[9])
        self.declare(self.other)
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        self.publisher.dataReceived(frame)
        self.assertEqual(self.other.transport.value(), frame)
        self.assertIs(self.other.subscription, EVERYTHING)

    def test_defaultClientsUnchanged(self) -> None:
        """Clients that send no control frame receive everything, as before."""
        filtered = connect(self.relay)
        self.declare(filtered, sources=[9])
        frames = b"".join(frames_for(Domain.MARKET_DATA, 3))
        self.publisher.dataReceived(frames)
        self.assertEqual(self.other.transport.value(), frames)
        self.assertEqual(filtered.transport.value(), b"")

    def test_badControlFrames(self) -> None:
        """A control frame with a bad value or checksum is rejected and changes nothing."""
        bad_role = build_frame(Domain.SYSTEM, 0, 0, [(RELAY_ROLE, b"\x07")])
        corrupt = bytearray(control_frame(publish_only=True))
        corrupt[-1] ^= 1
        self.other.dataReceived(bad_role + bytes(corrupt))
        self.assertEqual(
            dict(self.other.stats.rejects), {"bad_control_frame": 1, "bad_checksum": 1}
        )
        self.assertEqual(self.other.stats.role, "subscriber")

    def test_subscribingMidChunkWithEcho(self) -> None:
        """With echo, frames after a sender's own control frame follow its new subscription."""
        relay = make_relay(echo=True)
        sender = connect(relay)
        wanted = build_frame(1, 2, 1, b"")
        unwanted = build_frame(1, 3, 1, b"")
        sender.dataReceived(unwanted + control_frame(sources=[2]) + wanted + unwanted)
        value = sender.transport.value()
        answer = value[len(unwanted) : -len(wanted)]
        self.assertEqual((value[: len(unwanted)], value[-len(wanted) :]), (unwanted, wanted))
        self.assertEqual(parse_relay_info(unpack_header(answer), answer), (1, "market"))

    def test_otherSystemFramesFiltered(self) -> None:
        """A system frame that is not a control frame is filtered like any other domain."""
        heartbeat = build_frame(Domain.SYSTEM, 60, 1, [(100, b"hb"), (SUBSCRIBE_SOURCES, b"")])
        self.publisher.dataReceived(heartbeat)
        self.assertEqual(dict(self.publisher.stats.rejects), {"filtered": 1})
        self.assertEqual(self.other.transport.value(), b"")


def answers(data: bytes) -> tuple[list[bytes], list[Account]]:
    """The relayed frames of C{data} and, apart, the accounts among them."""
    frames, accounts = [], []
    for frame in frames_in(data):
        account = parse_account(unpack_header(frame), frame)
        if account is None:
            frames.append(frame)
        else:
            accounts.append(account)
    return frames, accounts


class AccountTests(SynchronousTestCase):
    """A client's account request, answered in order with its connection's counts."""

    def test_publisherCounts(self) -> None:
        """The answer counts what was accepted and refused before it, by reason, not after."""
        relay = make_relay(Domain.SIGNAL)
        publisher, subscriber = connect(relay), connect(relay)
        good = frames_for(Domain.SIGNAL, 3)
        corrupt = bytearray(frames_for(Domain.SIGNAL, 4)[3])
        corrupt[-1] ^= 1
        market = frames_for(Domain.MARKET_DATA, 1)[0]
        publisher.dataReceived(
            b"".join(good) + bytes(corrupt) + market + account_frame(7) + good[0]
        )
        frames, accounts = answers(publisher.transport.value())
        self.assertEqual(frames, [])
        self.assertEqual(
            accounts, [Account(7, 3, 0, 0, {"bad_checksum": 1, "filtered": 1})]
        )
        self.assertEqual(accounts[0].refusals, 2)
        self.assertEqual(published(subscriber.transport.value()), good + good[:1])
        self.assertEqual(relay.totals.control_frames, 1)

    def test_subscriberCounts(self) -> None:
        """A subscriber's answer comes after the frames sent to it, and counts them."""
        relay = make_relay()
        publisher, subscriber = connect(relay), connect(relay)
        frames = frames_for(Domain.MARKET_DATA, 5)
        publisher.dataReceived(b"".join(frames))
        subscriber.dataReceived(account_frame(1))
        received, accounts = answers(subscriber.transport.value())
        self.assertEqual(received, frames)
        self.assertEqual(accounts, [Account(1, 0, 5, 0, {})])

    def test_queuedAndDropped(self) -> None:
        """
        A slow subscriber's answer waits behind its queue: the frames ahead
        of it count as delivered, those dropped to it (parked) as dropped.
        """
        relay = relay_with("drop", high=300)
        publisher = connect(relay)
        slow = connect(relay)
        slow.outbox.pauseProducing()
        frames = frames_for(Domain.MARKET_DATA, 40, size=20)
        for frame in frames:
            publisher.dataReceived(frame)
        queued = slow.outbox.queued_frames
        slow.dataReceived(account_frame(3))
        slow.outbox.resumeProducing()
        received, accounts = answers(slow.transport.value())
        self.assertEqual((len(received), queued), (5, 5))  # 5 x 54 bytes under the mark
        self.assertEqual(accounts, [Account(3, 0, 5, 35, {})])
        self.assertEqual(slow.stats.frames_dropped, 35)

    def test_withSubscription(self) -> None:
        """One control frame may set a subscription and ask for the account: both answered."""
        relay = make_relay()
        client = connect(relay)
        frame = build_frame(
            Domain.SYSTEM, 0, 0, [(RELAY_ROLE, b"\x01"), (ACCOUNT, (9).to_bytes(4, "little"))]
        )
        client.dataReceived(frame)
        info, account = frames_in(client.transport.value())
        self.assertEqual(parse_relay_info(unpack_header(info), info), (1, "market"))
        self.assertEqual(parse_account(unpack_header(account), account), Account(9, 0, 0, 0, {}))

    def test_badRequest(self) -> None:
        """An account request whose token is not 4 bytes is a bad control frame."""
        relay = make_relay()
        client = connect(relay)
        client.dataReceived(build_frame(Domain.SYSTEM, 0, 0, [(ACCOUNT, b"\x01")]))
        self.assertEqual(dict(client.stats.rejects), {"bad_control_frame": 1})
        self.assertEqual(client.transport.value(), b"")

    def test_afterTheAuditLog(self) -> None:
        """With an audit log, the answer waits until the frames before it are logged."""
        relay = audited_relay(self)
        publisher = connect(relay)
        holdup = DiskFull(relay.writeahead.audit)
        self.addCleanup(holdup.free)
        orders = frames_for(Domain.EXECUTION, 3, source=42)
        publisher.dataReceived(b"".join(orders) + account_frame(5))
        self.assertEqual(publisher.transport.value(), b"")
        holdup.free()
        relay.clock.advance(relay.writeahead.retry_interval)
        _, accounts = answers(publisher.transport.value())
        self.assertEqual(accounts, [Account(5, 3, 0, 0, {})])
        self.assertEqual(relay.writeahead.forwarded, 3)

    def test_notHeldToTheControlRate(self) -> None:
        """Account requests past the control-frame rate are answered all, and refuse nothing."""
        relay = make_relay()
        client = connect(relay)
        client.dataReceived(b"".join(account_frame(n) for n in range(1, 151)))
        _, accounts = answers(client.transport.value())
        self.assertEqual([a.token for a in accounts], list(range(1, 151)))
        self.assertEqual(accounts[-1].refused, {})
        self.assertEqual(client.stats.control_frames, 150)

    def test_auditLogIdle(self) -> None:
        """With an audit log and nothing held, the answer is immediate."""
        relay = audited_relay(self)
        client = connect(relay)
        client.dataReceived(account_frame(2))
        _, accounts = answers(client.transport.value())
        self.assertEqual(accounts, [Account(2, 0, 0, 0, {})])


class SequenceTests(SynchronousTestCase):
    def feed(self, relay, pairs):
        publisher = connect(relay)
        publisher.dataReceived(b"".join(build_frame(1, s, q, b"") for s, q in pairs))
        return publisher

    def test_counts(self) -> None:
        """Gaps count missing frames; duplicates and regressions count frames, per source."""
        relay = make_relay()
        publisher = self.feed(
            relay,
            [(1, 1), (2, 10), (1, 2), (1, 5), (2, 11), (1, 5), (2, 3), (2, 4), (1, 6), (2, 9)],
        )
        stats = publisher.stats
        self.assertEqual(
            (stats.sequence_gaps, stats.sequence_duplicates, stats.sequence_regressions),
            (2 + 4, 1, 1),
        )
        self.assertEqual(relay.totals.sequence_gaps, 6)
        self.assertEqual(stats.frames_in, 10)

    def test_perConnection(self) -> None:
        """Each connection has its own sequence state."""
        relay = make_relay()
        self.feed(relay, [(1, 1), (1, 2)])
        second = self.feed(relay, [(1, 1), (1, 2)])
        self.assertEqual(relay.totals.sequence_regressions, 0)
        self.assertEqual(second.stats.sequence_gaps, 0)

    def logged(self, domain: int, anomalies: int) -> int:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        relay = make_relay(domain)
        tlv = {Domain.MARKET_DATA: 1, Domain.EXECUTION: 40}[domain]
        publisher = connect(relay)
        publisher.dataReceived(
            b"".join(build_frame(domain, 42, 2 * q, [(tlv, b"x")]) for q in range(anomalies + 1))
        )
        self.assertEqual(publisher.stats.sequence_gaps, anomalies)
        return len([e for e in events if e.get("kind") == "gap"])

    def test_executionLogsEveryAnomaly(self) -> None:
        """The lossless execution relay logs every gap; market logs a bounded sample."""
        self.assertEqual(self.logged(Domain.EXECUTION, 50), 50)
        self.assertEqual(self.logged(Domain.MARKET_DATA, 50), 5)


class DrainTests(SynchronousTestCase):
    def test_flushesQueuedThenCloses(self) -> None:
        """Drain stops reading, hands queued frames to the transport and closes."""
        relay = relay_with("block", high=10_000, low=100)
        publisher, slow = connect(relay), connect(relay)
        slow.outbox.pauseProducing()
        frames = b"".join(frames_for(Domain.MARKET_DATA, 5))
        publisher.dataReceived(frames)
        drained = relay.drain(5)
        self.assertEqual(slow.transport.value(), frames)
        self.assertTrue(slow.transport.disconnecting)
        self.assertIsNone(slow.transport.producer)
        self.assertEqual(publisher.transport.producerState, "paused")
        self.assertNoResult(drained)
        disconnect(publisher)
        disconnect(slow)
        self.successResultOf(drained)
        self.assertEqual(relay.clock.getDelayedCalls(), [])

    def test_partialFrameAtShutdownIsNoReject(self) -> None:
        """A publisher stopped mid-frame by the drain is not counted as sending a bad frame."""
        relay = make_relay()
        publisher = connect(relay)
        publisher.dataReceived(frames_for(Domain.MARKET_DATA, 1)[0][:40])
        relay.drain(5)
        disconnect(publisher)
        self.assertEqual(dict(relay.totals.rejects), {})

    def test_timeout(self) -> None:
        """Clients still open when the drain timeout passes are aborted."""
        relay = make_relay()
        client = connect(relay)
        relay.drain(3)
        relay.clock.advance(3)
        self.assertTrue(client.transport.disconnected)


class OwnFramesTests(SynchronousTestCase):
    """
    The relay's answers to a client's own control frames never hold the
    publishers back; a client that asks and does not read is cut off alone.
    """

    def setUp(self) -> None:
        self.high_water = 64 * 1024
        self.relay = make_relay(
            Domain.EXECUTION,
            delivery=DeliverySettings("block", high_water=self.high_water, low_water=16 * 1024),
        )
        self.publisher, self.subscriber = connect(self.relay), connect(self.relay)
        self.asker = connect(self.relay)
        self.asker.outbox.pauseProducing()  # its transport is full: it does not read
        self.request = recovery_frame({source: 1 for source in range(1, 256)})

    def test_answersHoldNobody(self) -> None:
        """Answers queued past the high-water mark do not pause the publishers."""
        while self.asker.outbox.queued <= 2 * self.high_water:
            self.asker.dataReceived(self.request)
        frames = frames_for(Domain.EXECUTION, 10, source=42)
        self.publisher.dataReceived(b"".join(frames))
        self.assertFalse(self.relay.gate.paused)
        self.assertEqual(self.subscriber.transport.value(), b"".join(frames))
        self.assertEqual(dict(self.asker.stats.cut_offs), {})

    def test_unreadAnswersCut(self) -> None:
        """Past the limit of the relay's own frames, the client alone is cut off."""
        for _ in range(10):
            for _ in range(100):
                self.asker.dataReceived(self.request)
            self.relay.clock.advance(1.0)
        self.assertEqual(dict(self.asker.stats.cut_offs), {UNREAD_ANSWERS: 1})
        self.assertTrue(self.asker.outbox.closed)
        self.assertLessEqual(self.relay.totals.bytes_out, OWN_LIMIT)
        self.assertFalse(self.relay.gate.paused)
        frames = frames_for(Domain.EXECUTION, 10, source=42)
        self.publisher.dataReceived(b"".join(frames))
        self.assertEqual(self.subscriber.transport.value(), b"".join(frames))
