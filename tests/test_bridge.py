"""
Tests for L{twisted_relay.bridge.service} that need no NATS server: what the bridge
accepts from NATS, and its message ids. The bridge against a real cluster is
in test_nats.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from nats.aio.msg import Msg
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app import tap
from twisted_relay.bridge.connection import NatsConnection, redact
from twisted_relay.bridge.messages import Subjects, message_id, origin_of, pieces
from twisted_relay.bridge.outbound import pause_in_writelines
from twisted_relay.bridge.service import NatsBridge, State
from twisted_relay.control import control_frame
from twisted_relay.wire import Domain

from .helpers import DiskFull, audited_relay, connect, frames_for, make_relay, published
from .relayprocess import REPO


class InboundTests(SynchronousTestCase):
    """Frames from NATS go through the relay's own scan and checks, message by message."""

    def setUp(self) -> None:
        self.relay = make_relay(Domain.EXECUTION)
        self.bridge = NatsBridge(self.relay, NatsConnection(["nats://127.0.0.1:4222"]), "hostB")
        self.relay.outlet = self.bridge
        self.subscriber = connect(self.relay)
        self.frames = frames_for(Domain.EXECUTION, 3)

    def receive(self, *messages: bytes, origin: str = "hostA") -> list[bytes]:
        """Deliver C{messages} from relay C{origin}; the frames the local subscriber got."""
        for data in messages:
            self.bridge.inbound.deliver(Msg(None, subject=f"torq.execution.{origin}", data=data))
        return published(self.subscriber.transport.value())

    def test_wholeCheckedFrames(self) -> None:
        """
        Whole frames of the relay's domain that pass its checks reach the
        local clients byte for byte, counted, with each source's last sequence.
        """
        frames = frames_for(Domain.EXECUTION, 5, source=42)[1:] + frames_for(3, 2, source=7)
        self.assertEqual(self.receive(b"".join(frames)), frames)
        self.assertEqual((self.bridge.counters.frames_in, self.bridge.counters.malformed), (6, 0))
        self.assertEqual(self.relay.sequences, {42: 5, 7: 2})
        self.assertEqual(self.relay.totals.frames_in, 6)

    def test_refused(self) -> None:
        """
        What a local client could not publish is refused, counted with its
        reason; the frames around a refused one still go out, and a message
        whose framing is lost or that breaks off ends there.
        """
        first, second, third = self.frames
        corrupt = bytearray(second)
        corrupt[-1] ^= 1
        cases = [
            (first + bytes(corrupt) + third, [first, third], "bad_checksum"),
            (frames_for(Domain.MARKET_DATA, 1)[0] + first, [first], "filtered"),
            (control_frame(publish_only=True) + first, [first], "filtered"),
            (first + second[:40], [first], "incomplete_frame"),
            (first + b"garbage" * 10 + second, [first], "bad_magic"),
        ]
        for data, delivered, reason in cases:
            before = self.receive()
            after = self.receive(data)
            self.assertEqual(after[len(before) :], delivered, reason)
            rejects = self.bridge.inbound.peers["hostA"].stats.rejects
            self.assertEqual(rejects, {reason: 1}, reason)
            rejects.clear()
        self.assertEqual(self.bridge.counters.malformed, len(cases))

    def test_afreshAfterBrokenMessage(self) -> None:
        """A message that breaks off leaves nothing behind for the next one."""
        first, second, third = self.frames
        self.assertEqual(self.receive(second[:40], third), [third])

    def test_sequencesPerOrigin(self) -> None:
        """
        Each other relay's frames are tracked apart, as each local client's
        are: the same source from two hosts is no sequence anomaly.
        """
        for seq in range(3):
            for origin in ("hostA", "hostC"):
                self.receive(self.frames[seq], origin=origin)
        self.assertEqual(len(self.receive()), 6)
        self.assertEqual(self.relay.totals.sequence_regressions, 0)
        self.assertEqual(self.relay.totals.sequence_duplicates, 0)
        self.receive(self.frames[0], origin="hostA")
        self.assertEqual(self.relay.totals.sequence_regressions, 1)

    def test_published_to_bridge_only_once(self) -> None:
        """Frames from the bridge are broadcast locally but not published again."""
        data = b"".join(self.frames)
        self.receive(data)
        self.assertEqual(self.bridge.queued, 0)
        local = connect(self.relay)
        local.dataReceived(data)
        self.assertEqual(self.bridge.queued, len(data))


class AcknowledgementTests(SynchronousTestCase):
    """
    A stream message is acknowledged once its own frames are in the audit
    log; at a stop, the frames from NATS the log still holds are taken back.
    """

    def setUp(self) -> None:
        self.relay = audited_relay(self)
        self.bridge = NatsBridge(self.relay, NatsConnection(["nats://127.0.0.1:4222"]), "hostB")
        self.relay.outlet = self.bridge
        self.local = connect(self.relay)
        self.subscriber = connect(self.relay)
        self.remote = frames_for(Domain.EXECUTION, 20, source=42)
        self.ours = frames_for(Domain.EXECUTION, 20, source=7)

    def logged(self, peer) -> bool:
        return asyncio.run(asyncio.wait_for(self.bridge.inbound.logged(peer), 5))

    def test_ownFramesOnly(self) -> None:
        """Frames of local publishers still held do not hold a message back."""
        full = DiskFull(self.relay.writeahead.audit)
        peer = self.bridge.inbound.deliver(Msg(None, "torq.execution.hostA", data=self.remote[0]))
        self.local.dataReceived(self.ours[0])
        full.free()
        self.relay.clock.advance(1.0)  # the log is written again: both go out
        full = DiskFull(self.relay.writeahead.audit)
        self.addCleanup(full.free)
        self.local.dataReceived(self.ours[1])
        self.assertTrue(self.relay.writeahead.held)
        self.assertTrue(self.logged(peer))

    def test_takenBackAtStop(self) -> None:
        """
        Stopping while the log holds frames from NATS takes them back, with
        their sequences, and keeps the local publishers' frames.
        """
        self.bridge.inbound.deliver(Msg(None, "torq.execution.hostA", data=b"".join(self.remote[:5])))
        full = DiskFull(self.relay.writeahead.audit)
        self.addCleanup(full.free)
        peer = self.bridge.inbound.deliver(
            Msg(None, "torq.execution.hostA", data=b"".join(self.remote[5:10]))
        )
        self.local.dataReceived(self.ours[0])
        self.assertEqual(self.relay.sequences, {42: 10, 7: 1})
        self.bridge.state = State.DRAINING
        self.assertFalse(self.logged(peer))
        self.assertEqual([h.sender for h in self.relay.writeahead.held], [self.local.ingest])
        self.assertEqual(self.relay.sequences, {42: 5, 7: 1})
        self.assertEqual(published(self.subscriber.transport.value()), self.remote[:5])
        # The stream delivers them again (after a reconnect, say): no anomaly.
        full.free()
        self.relay.clock.advance(1.0)
        self.bridge.inbound.deliver(Msg(None, "torq.execution.hostA", data=b"".join(self.remote[5:10])))
        self.assertEqual(self.relay.totals.sequence_regressions, 0)
        self.assertEqual(
            published(self.subscriber.transport.value()),
            self.remote[:5] + self.ours[:1] + self.remote[5:10],
        )


class MessageIdTests(SynchronousTestCase):
    def test_spans(self) -> None:
        """A message id names the origin and each source's first and last sequence."""
        data = b"".join(frames_for(Domain.EXECUTION, 5, source=42)[1:] + frames_for(3, 2, source=7))
        self.assertEqual(message_id("hostA:1:9", data), "hostA:1:9:7:1-2:42:2-5")

    def test_pieces(self) -> None:
        """Runs are cut at frame boundaries to fit a limit; a larger frame goes alone."""
        small, big = frames_for(3, 3), frames_for(3, 1, size=200)
        data = b"".join(small + big + small)
        cut = list(pieces(data, 2 * len(small[0])))
        self.assertEqual(b"".join(piece for piece, _ in cut), data)
        self.assertEqual([count for _, count in cut], [2, 1, 1, 2, 1])

    def test_subjects(self) -> None:
        """A relay publishes to its origin's subject and receives its domain's, through one stream."""
        names = Subjects("execution", "hostA")
        self.assertEqual(
            (names.publishing, names.receiving, names.stream, names.durable),
            ("torq.execution.hostA", "torq.execution.>", "TORQ_EXECUTION", "relay-hostA"),
        )
        self.assertEqual(origin_of("torq.execution.hostB.extra"), "hostB")


class ConnectionTests(SynchronousTestCase):
    """How the bridge authenticates comes from files or the environment, and is never shown."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def file(self, text: str) -> str:
        path = os.path.join(self.directory, str(len(os.listdir(self.directory))))
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_redact(self) -> None:
        """A user, password or token in a server URL is shown as ***; the rest as given."""
        self.assertEqual(redact("nats://u:p@h:4222"), "nats://***@h:4222")
        self.assertEqual(redact("tls://tok@h"), "tls://***@h")
        self.assertEqual(redact("nats://h:4222"), "nats://h:4222")
        shown = NatsConnection(["nats://u:p@h:1", "nats://h:2"]).shown
        self.assertEqual(shown, ["nats://***@h:1", "nats://h:2"])

    def test_userFile(self) -> None:
        """A USER:PASSWORD file gives nats-py user and password, the servers untouched."""
        settings = NatsConnection.from_options(
            ["nats://h:1"], user_file=self.file("relay:pa:ss\n"), environ={}
        )
        arguments = settings.connect_arguments()
        self.assertEqual(
            (arguments["user"], arguments["password"], arguments["servers"]),
            ("relay", "pa:ss", ["nats://h:1"]),
        )
        self.assertNotIn("pa:ss", repr(settings))

    def test_environment(self) -> None:
        """NATS_USER and NATS_PASSWORD, or NATS_TOKEN, come from the environment."""
        env = {"NATS_USER": "relay", "NATS_PASSWORD": "pw"}
        arguments = NatsConnection.from_options(["h"], environ=env).connect_arguments()
        self.assertEqual((arguments["user"], arguments["password"]), ("relay", "pw"))
        arguments = NatsConnection.from_options(
            ["h"], environ={"NATS_TOKEN": "t"}
        ).connect_arguments()
        self.assertEqual(arguments["token"], "t")
        self.assertNotIn("user", arguments)

    def test_mistakes(self) -> None:
        """Each mistake is a ValueError naming it."""
        cases = [
            ({"user_file": self.file("no-colon\n")}, "should hold USER:PASSWORD"),
            ({"user_file": self.file("")}, "is empty"),
            ({"user_file": "/nonexistent/file"}, "cannot read /nonexistent/file"),
            ({"environ": {"NATS_USER": "u"}}, "NATS_USER and NATS_PASSWORD go together"),
            (
                {"token_file": self.file("t\n"), "environ": {"NATS_USER": "u", "NATS_PASSWORD": "p"}},
                "not a user and password and a token",
            ),
            ({"tls_cert": self.file("x")}, "--nats-tls-cert and --nats-tls-key go together"),
            (
                {"tls_cert": self.file("x"), "tls_key": self.file("y")},
                "the NATS TLS settings do not load",
            ),
        ]
        for arguments, message in cases:
            arguments.setdefault("environ", {})
            with self.assertRaises(ValueError) as raised:
                NatsConnection.from_options(["nats://h:1"], **arguments)
            self.assertIn(message, str(raised.exception))
        with self.assertRaises(ValueError) as raised:
            NatsConnection.from_options(["nats://u:p@h"], token_file=self.file("t"), environ={})
        self.assertIn("credentials in a --nats URL", str(raised.exception))

    def test_onlyWithNats(self) -> None:
        """A NATS credential option without --nats is a usage error."""
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["--nats-user-file", self.file("u:p")])
        self.assertEqual(str(raised.exception), "--nats-user-file needs --nats")


REACTOR_PROBE = """
import sys
from twisted_relay.app.tap import Options
options = Options()
options.parseOptions(sys.argv[1:])
from twisted.internet import reactor
print(type(reactor).__name__, "nats" in sys.modules)
"""


async def _writelines_pauses() -> bool:
    """Whether writelines() of more than the socket takes pauses the writer."""
    ours, theirs = socket.socketpair()
    paused = asyncio.Event()

    class Writer(asyncio.Protocol):
        def pause_writing(self) -> None:
            paused.set()

    transport, _ = await asyncio.get_running_loop().create_connection(Writer, sock=ours)
    try:
        transport.set_write_buffer_limits(high=64 * 1024)
        transport.writelines([b"x" * 64 * 1024] * 128)  # nobody reads: most stays buffered
        return paused.is_set()
    finally:
        transport.abort()
        theirs.close()


class WritelinesTests(SynchronousTestCase):
    def test_pausesTheWriter(self) -> None:
        """With the bridge's fix in place, writelines() over the high-water mark pauses the writer."""
        pause_in_writelines()
        self.assertTrue(asyncio.run(asyncio.wait_for(_writelines_pauses(), 5)))


def _probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", REACTOR_PROBE, "--listen", "tcp:0:interface=127.0.0.1", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_no_nats_no_asyncio() -> None:
    """Without --nats the relay keeps the default reactor and imports nothing of NATS."""
    result = _probe("--domain", "market")
    assert result.stdout.split() == ["EPollReactor", "False"], result.stderr


def test_nats_installs_asyncio() -> None:
    """With --nats the relay runs on the asyncio reactor, which nats-py needs; the bridge imports nats-py later."""
    result = _probe("--domain", "market", "--nats", "nats://127.0.0.1:4222")
    assert result.stdout.split() == ["AsyncioSelectorReactor", "False"], result.stderr


def test_nats_refuses_another_reactor() -> None:
    """A reactor chosen beforehand that is not asyncio is refused with a clear reason."""
    probe = "from twisted.internet import epollreactor; epollreactor.install()\n" + REACTOR_PROBE
    result = subprocess.run(
        [sys.executable, "-c", probe, "--nats", "nats://127.0.0.1:4222"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert "--nats needs the asyncio reactor" in result.stderr
