"""
Tests for L{twisted_relay.client}: the Twisted client protocol over an
in-memory transport, and the blocking client and the reconnecting service
against a real relay process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.client import (
    Account,
    BlockingClient,
    PublishRefused,
    RelayClientProtocol,
    RelayClosed,
    RelayDead,
    endpoint_string,
    relay_service,
    socket_address,
)
from twisted_relay.control import (
    account_answer_frame,
    error_frame,
    heartbeat_frame,
    parse_control,
    relay_info_frame,
)
from twisted_relay.testing import free_ports
from twisted_relay.wire import Domain, build_frame

from .helpers import frames_for, split
from .relayprocess import RelayProcess


class Recorder(RelayClientProtocol):
    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.relay_frames: list[bytes] = []

    def frameReceived(self, header, frame) -> None:
        self.frames.append((header.sequence, frame))

    def relayFrameReceived(self, header, frame) -> None:
        self.relay_frames.append(frame)


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Recorder()
        self.client.makeConnection(StringTransport())

    def test_framesAcrossReads(self) -> None:
        """Frames cut anywhere arrive whole, with their header, in order."""
        frames = frames_for(Domain.MARKET_DATA, 5)
        for chunk in split(b"".join(frames), [3, 50, 51, 200, 201]):
            self.client.dataReceived(chunk)
        self.assertEqual(self.client.frames, list(zip(range(1, 6), frames)))

    def test_publishAndDeclare(self) -> None:
        """publish writes frames as given; declare writes the control frame."""
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        self.client.publish(frame)
        self.client.declare(sources=[1, 2])
        written = self.client.transport.value()
        self.assertEqual(written[: len(frame)], frame)
        subscription = parse_control(written, len(frame), len(written)).subscription
        self.assertEqual(subscription.sources, {1, 2})

    def test_relayFramesNeverDelivered(self) -> None:
        """The relay's RelayInfo and other system frames are kept from the application."""
        frames = frames_for(Domain.MARKET_DATA, 2)
        self.client.dataReceived(
            frames[0]
            + relay_info_frame(1, "market")
            + build_frame(Domain.SYSTEM, 80, 0, [(99, b"later")])
            + frames[1]
        )
        self.assertEqual(self.client.frames, list(zip((1, 2), frames)))
        self.assertEqual(len(self.client.relay_frames), 2)  # seen apart, when asked for
        incoming = self.client.incoming
        self.assertEqual((incoming.relay_info, incoming.relay_infos), ((1, "market"), 1))
        self.assertEqual(incoming.other_system_frames, 1)

    def test_tornTailDiscarded(self) -> None:
        """A connection that ends mid-frame delivers the whole frames only, and says so."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        frames = frames_for(Domain.MARKET_DATA, 3)
        self.client.dataReceived(b"".join(frames)[:-5])
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client.frames, list(zip(range(1, 3), frames[:2])))
        self.assertEqual(self.client.incoming.torn, len(frames[2]) - 5)
        [warning] = [e for e in events if "middle of a frame" in e.get("log_format", "")]
        self.assertEqual(warning["torn"], len(frames[2]) - 5)

    def test_accountAnswered(self) -> None:
        """account() asks with a fresh token and fires with the relay's answer to it."""
        asked = self.client.account()
        request = self.client.transport.value()
        self.assertEqual(parse_control(request, 0, len(request)).account, 1)
        frame = frames_for(Domain.MARKET_DATA, 1)[0]
        answer = Account(1, 4, 2, 1, {"filtered": 3})
        self.client.dataReceived(account_answer_frame(Domain.MARKET_DATA, answer) + frame)
        self.assertEqual(self.successResultOf(asked), answer)
        self.assertEqual(self.client.frames, [(1, frame)])

    def test_flushRefused(self) -> None:
        """flush() fails with the refusals since the previous flush, and only those."""
        first = self.client.flush()
        self.client.dataReceived(
            account_answer_frame(Domain.MARKET_DATA, Account(1, 5, 0, 0, {}))
        )
        self.assertEqual(self.successResultOf(first).accepted, 5)
        second = self.client.flush()
        self.client.dataReceived(
            account_answer_frame(Domain.MARKET_DATA, Account(2, 7, 0, 0, {"bad_checksum": 2}))
        )
        refused = self.failureResultOf(second, PublishRefused).value
        self.assertEqual((refused.account.accepted, dict(refused.account.refused)), (2, {"bad_checksum": 2}))
        self.assertIn("refused 2 of the frames published (2 bad_checksum); 2 accepted", str(refused))

    def test_accountLost(self) -> None:
        """An account asked for fails if the connection ends before the answer."""
        asked = self.client.account()
        self.client.dataReceived(error_frame(Domain.MARKET_DATA, "bad_magic", "bad magic 0x1"))
        self.client.connectionLost(Failure(ConnectionDone()))
        closed = self.failureResultOf(asked, RelayClosed).value
        self.assertEqual(closed.error, ("bad_magic", "bad magic 0x1"))

    def test_accountTimesOut(self) -> None:
        """An account not answered within its timeout fails, and is forgotten."""
        self.client.clock = clock = Clock()
        asked = self.client.account(timeout=5)
        clock.advance(5)
        self.failureResultOf(asked, defer.TimeoutError)
        self.assertEqual(self.client._accounts, {})

    def test_garbageCloses(self) -> None:
        """A stream that is not Protocol V2 closes the connection."""
        self.client.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.client.transport.disconnecting)


class HeartbeatWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.client = Recorder()
        self.client.clock = self.clock = Clock()
        self.client.makeConnection(StringTransport())
        self.beat = heartbeat_frame(Domain.EXECUTION, 1, 0.5, {42: 7})

    def test_heartbeatsTakenOut(self) -> None:
        """Heartbeats are not frames for the application; their news is kept."""
        self.client.dataReceived(self.beat)
        self.assertEqual(self.client.frames, [])
        self.assertEqual(self.client.incoming.last_sequences, {42: 7})

    def test_threeMissedHeartbeats(self) -> None:
        """Three intervals with nothing from the relay: it is dead, the connection goes."""
        self.client.dataReceived(self.beat)
        self.clock.advance(1.4)
        self.client.dataReceived(frames_for(Domain.EXECUTION, 1)[0])
        self.clock.advance(1.4)
        self.assertFalse(self.client.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.client.transport.disconnecting)

    def test_noWatchWithoutHeartbeats(self) -> None:
        """A relay that never sent a heartbeat (--heartbeat 0) is not timed."""
        self.client.dataReceived(frames_for(Domain.EXECUTION, 1)[0])
        self.clock.advance(3600)
        self.assertFalse(self.client.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def test_blocking_client_relay_dead() -> None:
    """The blocking client raises RelayDead after three silent heartbeat intervals."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    try:
        client = BlockingClient(path)
        relay_end, _ = server.accept()
        relay_end.sendall(heartbeat_frame(Domain.EXECUTION, 1, 0.1, {}))
        started = time.monotonic()
        with pytest.raises(RelayDead):
            list(client.frames(timeout=5))
        assert 0.3 <= time.monotonic() - started < 2
        relay_end.close()
        client.close()
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_blocking_client_torn_tail() -> None:
    """The blocking client never hands out part of a frame the connection ended in."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "torn.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    try:
        client = BlockingClient(path)
        relay_end, _ = server.accept()
        frames = frames_for(Domain.MARKET_DATA, 3)
        relay_end.sendall(b"".join(frames)[:-5])
        relay_end.close()
        assert [frame for _, frame in client.frames(timeout=5)] == frames[:2]
        assert client.incoming.torn == len(frames[2]) - 5
        client.close()
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def relay_path():
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "r.sock")
    relay = RelayProcess(workdir, "--domain", "execution", "--listen", f"unix:{path}")
    relay.start().wait_listening()
    yield path, relay, workdir
    if relay.process.poll() is None:
        relay.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class AddressTests(SynchronousTestCase):
    def test_shorthand(self) -> None:
        """A socket path is short for unix:path=..., colons escaped; endpoint strings stay."""
        self.assertEqual(endpoint_string("/tmp/a:b.sock"), "unix:path=/tmp/a\\:b.sock")
        self.assertEqual(endpoint_string("r.sock"), "unix:path=r.sock")
        self.assertEqual(endpoint_string("tcp:h:1"), "tcp:h:1")

    def test_forms(self) -> None:
        """Positional and named arguments, as Twisted's endpoint strings take them."""
        for address, expected in [
            ("/tmp/a:b.sock", (socket.AF_UNIX, "/tmp/a:b.sock")),
            ("unix:/tmp/r.sock", (socket.AF_UNIX, "/tmp/r.sock")),
            ("unix:path=/tmp/r.sock:timeout=2", (socket.AF_UNIX, "/tmp/r.sock")),
            ("tcp:10.0.0.5:7001", (socket.AF_INET, ("10.0.0.5", 7001))),
            ("tcp:host=10.0.0.5:port=7001", (socket.AF_INET, ("10.0.0.5", 7001))),
        ]:
            self.assertEqual(socket_address(address), expected, address)

    def test_refused(self) -> None:
        """What cannot be connected to is one line saying what to give instead."""
        for address, message in [
            ("tcp:localhost", "needs a host and a port"),
            ("unix:", "names no socket path"),
            ("udp:h:1", "endpoint type 'udp' is not one of unix, tcp"),
        ]:
            with self.assertRaises(ValueError) as raised:
                socket_address(address)
            self.assertIn(message, str(raised.exception))


def test_one_endpoint_syntax():
    """
    The relay listens on a bare socket path and a TCP port; both client
    classes' and the CLI's endpoint strings reach it, positional or named.
    """
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    path = os.path.join(workdir, "r.sock")
    [port] = free_ports(1)
    relay = RelayProcess(
        workdir, "--domain", "market", "--listen", path,
        "--listen", f"tcp:{port}:interface=127.0.0.1",
    )
    relay.start().wait_listening(2)
    try:
        frames = frames_for(Domain.MARKET_DATA, 5)
        for sub, pub in [
            (f"unix:path={path}", f"tcp:host=127.0.0.1:port={port}"),
            (f"tcp:127.0.0.1:{port}", path),
        ]:
            with BlockingClient(sub) as subscriber, BlockingClient(pub) as publisher:
                subscriber.introduce()
                publisher.introduce(publish_only=True)
                publisher.publish(b"".join(frames))
                assert [f for _, f in subscriber.receive(5, timeout=10)] == frames
        command = os.path.join(os.path.dirname(sys.executable), "twisted-relay")
        shown = subprocess.run(
            [command, "publish", f"unix:path={path}", "--count", "3"],
            capture_output=True, text=True, timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
    finally:
        relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_blocking_clients_through_a_relay(relay_path):
    """Two blocking clients exchange frames through a real relay, filtered as declared."""
    path, _, _ = relay_path
    frames = frames_for(Domain.EXECUTION, 20)
    with BlockingClient(path) as subscriber, BlockingClient(f"unix:{path}") as publisher:
        assert subscriber.introduce(sources=[7]) == (Domain.EXECUTION, "execution")
        publisher.declare(publish_only=True)
        publisher.publish(b"".join(frames))
        received = subscriber.receive(20, timeout=10)  # the RelayInfo answer is not one
        assert [frame for _, frame in received] == frames
        assert [header.sequence for header, _ in received] == list(range(1, 21))
        assert subscriber.receive(1, timeout=0.2) == []


def test_blocking_flush(relay_path):
    """
    flush() returns once the execution relay logged what was published, and
    raises with the reasons when it refused some; frames received meanwhile stay.
    """
    path, _, _ = relay_path
    orders = frames_for(Domain.EXECUTION, 10)
    corrupt = bytearray(frames_for(Domain.EXECUTION, 11)[10])
    corrupt[-1] ^= 1
    with BlockingClient(path) as subscriber, BlockingClient(path) as publisher:
        subscriber.introduce()
        publisher.publish(b"".join(orders))
        assert publisher.flush().as_dict() == {
            "accepted": 10, "refused": {}, "delivered": 0, "dropped": 0
        }
        publisher.publish(bytes(corrupt) + frames_for(Domain.MARKET_DATA, 1)[0])
        with pytest.raises(PublishRefused) as refused:
            publisher.flush()
        assert dict(refused.value.account.refused) == {"bad_checksum": 1, "filtered": 1}
        assert subscriber.account().delivered == 10
        assert [f for _, f in subscriber.receive(10, timeout=5)] == orders


@pytest_twisted.ensureDeferred
async def test_service_reconnects(relay_path):
    """The relay service reconnects after the relay restarts, and frames flow again."""
    path, relay, workdir = relay_path
    received = {1: Deferred(), 2: Deferred()}
    lost: Deferred[None] = Deferred()

    class Waiter(RelayClientProtocol):
        def frameReceived(self, header, frame) -> None:
            received[header.sequence].callback(frame)

        def connectionLost(self, reason) -> None:
            # Resume the test once the service too has seen the loss.
            if not lost.called:
                reactor.callLater(0, lost.callback, None)

    service = relay_service(reactor, f"unix:path={path}", Factory.forProtocol(Waiter))
    service.startService()
    try:
        await service.whenConnected(failAfterFailures=50)
        first, second = frames_for(Domain.EXECUTION, 2)
        with BlockingClient(path) as publisher:
            publisher.publish(first)
            assert await received[1].addTimeout(10, reactor) == first
        relay.stop()
        await lost.addTimeout(10, reactor)
        restarted = RelayProcess(workdir, "--domain", "execution", "--listen", f"unix:{path}")
        restarted.start().wait_listening()
        try:
            await service.whenConnected(failAfterFailures=100)
            with BlockingClient(path) as publisher:
                publisher.publish(second)
                assert await received[2].addTimeout(10, reactor) == second
        finally:
            restarted.stop()
    finally:
        await service.stopService()
