"""
Tests for the execution-integrity features on in-memory connections: the
write-ahead log in front of fan-out, replay from the log spliced onto the
live stream, heartbeats on a fake clock, and who may publish or subscribe.
"""

from __future__ import annotations

import os
import socket
from collections import deque

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_relay.access import Access, AccessList, peer_of
from twisted_relay.app.services import RelayService
from twisted_relay.audit import AuditLog, audit_files
from twisted_relay.client import Incoming
from twisted_relay.control import (
    NO_AUDIT_LOG,
    NOT_SUBSCRIBED,
    REPLAYING,
    control_frame,
    parse_heartbeat,
    parse_recovery_response,
    recovery_frame,
)
from twisted_relay.domains import EXECUTION
from twisted_relay.interfaces import IRelayLogic
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
    temp_dir,
)


def delivered(incoming: Incoming, data: bytes) -> list[bytes]:
    """The frames of C{data} a client of the package hands its application."""
    return [
        pair[1] for f in frames_in(data) for pair in incoming.deliver(unpack_header(f), f)
    ]


def run_cooperator(relay) -> None:
    """Let the relay's cooperator run its tasks until none is left (bounded)."""
    for _ in range(10_000):
        if not relay.clock.getDelayedCalls():
            return
        relay.clock.advance(0)
    raise AssertionError("cooperator still busy after 10,000 turns")


class DomainTests(SynchronousTestCase):
    def test_executionDefaults(self) -> None:
        """The execution domain audits and restricts publishers by default."""
        verifyObject(IRelayLogic, EXECUTION)
        self.assertTrue(EXECUTION.audit)
        self.assertTrue(EXECUTION.restrict_publishers)


class WriteAheadTests(SynchronousTestCase):
    def test_loggedBeforeForwarded(self) -> None:
        """Every forwarded frame is in the log, with its sender's client id."""
        relay = audited_relay(self)
        publisher, subscriber = connect(relay), connect(relay)
        frames = frames_for(Domain.EXECUTION, 40, source=42)
        publisher.dataReceived(b"".join(frames))
        self.assertEqual(published(subscriber.transport.value()), frames)
        records = [r for f in audit_files(relay.writeahead.audit.directory) for r in f.records()]
        self.assertEqual([r.frame for r in records], frames)
        self.assertEqual({r.client_id for r in records}, {publisher.stats.client_id})
        self.assertEqual(relay.sequences, {42: 40})

    def test_restartKnowsSequences(self) -> None:
        """A relay opening an existing log starts from its last sequence per source."""
        relay = audited_relay(self, rotate=2048)
        publisher = connect(relay)
        publisher.dataReceived(b"".join(frames_for(Domain.EXECUTION, 30, source=42)))
        publisher.dataReceived(b"".join(frames_for(Domain.EXECUTION, 7, source=43)))
        directory = relay.writeahead.audit.directory
        relay.writeahead.stop()
        again = make_relay(Domain.EXECUTION, audit=AuditLog(directory, 2048))
        again.writeahead.start()
        self.addCleanup(again.writeahead.stop)
        self.assertEqual(again.sequences, {42: 30, 43: 7})


class ReplayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = audited_relay(self, rotate=4096)
        self.publisher = connect(self.relay)
        self.frames = frames_for(Domain.EXECUTION, 200, source=42)
        self.others = frames_for(Domain.EXECUTION, 200, source=43)

    def publish(self, frames: list[bytes]) -> None:
        self.publisher.dataReceived(b"".join(frames))

    def test_catchUpThenLive(self) -> None:
        """
        A subscriber that missed frames asks from its next sequence, gets the
        answer, the missed frames from the log, then live frames: complete and
        in order, none twice.
        """
        self.publish(self.frames[:120])
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 51}))
        self.publish(self.frames[120:150])  # while the replay waits to start
        run_cooperator(self.relay)
        self.publish(self.frames[150:])
        received = frames_in(late.transport.value())
        self.assertEqual(
            parse_recovery_response(unpack_header(received[0]), received[0]), (42, 51, REPLAYING)
        )
        self.assertEqual(received[1:], self.frames[50:])
        self.assertEqual(late.stats.frames_replayed, 100)
        self.assertIsNone(late.outbox.replay)

    def test_spliceWhileLive(self) -> None:
        """Frames published during a long replay arrive once, after the replayed ones."""
        self.publish(self.frames[:100])
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 1}))
        for n in range(100, 200, 5):
            self.publish(self.frames[n : n + 5])
            self.relay.clock.advance(0)
        run_cooperator(self.relay)
        self.assertEqual(published(late.transport.value()), self.frames)

    def test_otherSourcesStayLive(self) -> None:
        """
        Frames of other sources received live before the request are not
        repeated; those published during the replay still arrive.
        """
        self.publish(self.frames[:50])
        late = connect(self.relay)
        self.publish(self.others[:10])
        late.dataReceived(recovery_frame({42: 41}))
        self.publish(self.others[10:20])
        run_cooperator(self.relay)
        self.assertEqual(
            published(late.transport.value()),
            self.others[:10] + self.frames[40:50] + self.others[10:20],
        )

    def test_liveBeforeAnswerSuperseded(self) -> None:
        """
        Live frames of the source that reach a client before the relay's answer
        come again in the replay; the client library drops the early copies.
        """
        late = connect(self.relay)
        self.publish(self.frames[:10])
        late.dataReceived(recovery_frame({42: 5}))
        run_cooperator(self.relay)
        incoming = Incoming()
        incoming.recovering[42] = 5
        self.assertEqual(delivered(incoming, late.transport.value()), self.frames[:10])
        self.assertEqual(incoming.answers, [(42, 5, REPLAYING)])

    def test_liveBeforeRefusalKept(self) -> None:
        """
        Without a replay to follow (no audit log), the frames held while waiting
        for the answer are delivered with it, in order, before later ones.
        """
        relay = make_relay(Domain.EXECUTION)
        publisher, late = connect(relay), connect(relay)
        publisher.dataReceived(b"".join(self.frames[:3]))
        late.dataReceived(recovery_frame({42: 2}))
        publisher.dataReceived(b"".join(self.frames[3:5]))
        incoming = Incoming()
        incoming.recovering[42] = 2
        self.assertEqual(delivered(incoming, late.transport.value()), self.frames[:5])
        self.assertEqual(incoming.answers, [(42, 2, NO_AUDIT_LOG)])

    def test_ownFramesNotReplayed(self) -> None:
        """A client is not replayed what it published on this connection (no echo)."""
        self.publish(self.frames[:10])
        self.publisher.dataReceived(recovery_frame({42: 1}))
        run_cooperator(self.relay)
        self.assertEqual(published(self.publisher.transport.value()), [])

    def test_filteredSubscription(self) -> None:
        """The replay honours the client's subscription."""
        self.publish([f for pair in zip(self.frames[:20], self.others[:20]) for f in pair])
        late = connect(self.relay)
        late.dataReceived(control_frame(sources=[43], recover={43: 11}))
        run_cooperator(self.relay)
        self.assertEqual(published(late.transport.value()), self.others[10:20])

    def test_beyondTheLog(self) -> None:
        """Asking from a sequence not reached yet replays nothing; live follows."""
        self.publish(self.frames[:10])
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 11}))
        run_cooperator(self.relay)
        self.publish(self.frames[10:12])
        self.assertEqual(published(late.transport.value()), self.frames[10:12])

    def test_relayFramesQueuedDuringReplay(self) -> None:
        """
        The relay's own frames queued behind the start of a replay go out, and
        live frames flow after it (nothing stays stuck in the queue).
        """
        self.publish(self.frames[:50])
        late = connect(self.relay)
        late.outbox.pauseProducing()
        late.dataReceived(recovery_frame({42: 1}))
        late.dataReceived(control_frame())  # its RelayInfo answer queues too
        late.outbox.resumeProducing()
        run_cooperator(self.relay)
        self.publish(self.frames[50:60])
        self.assertEqual(late.outbox.queue, deque())
        self.assertEqual(published(late.transport.value()), self.frames[:60])

    def test_subscriptionChangeDuringReplay(self) -> None:
        """A subscription changed while replaying applies to the rest of the replay."""
        self.publish([f for pair in zip(self.frames[:20], self.others[:20]) for f in pair])
        late = connect(self.relay)
        late.outbox.pauseProducing()
        late.dataReceived(recovery_frame({42: 1, 43: 1}))
        late.dataReceived(control_frame(sources=[43]))
        late.outbox.resumeProducing()
        run_cooperator(self.relay)
        self.assertEqual(published(late.transport.value()), self.others[:20])

    def test_damagedLogCutsTheReplay(self) -> None:
        """A replay that meets a damaged record ends the connection, with the reason."""
        for n in range(0, 200, 10):
            self.publish(self.frames[n : n + 10])
        oldest = audit_files(self.relay.writeahead.audit.directory)[0]
        with open(oldest.path, "r+b") as f:
            f.seek(oldest.header_size + 40)
            f.write(b"\xff")
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 1}))
        run_cooperator(self.relay)
        self.assertTrue(late.transport.disconnecting)
        self.assertEqual(late.stats.close_reason, "replay failed")
        self.assertEqual(self.relay.totals.cut_offs, {"replay failed": 1})

    def test_recordBeingWritten(self) -> None:
        """
        A record the log's writer is still appending, past the forwarded
        ones, ends the replay there: it is not damage.
        """
        self.publish(self.frames[:20])
        audit = self.relay.writeahead.audit
        newest = audit_files(audit.directory)[-1]
        with open(newest.path, "ab") as f:
            f.write(b"\x40\x00\x00\x00" + b"\x00" * 10)  # the start of a 64-byte record
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 1}))
        run_cooperator(self.relay)
        self.assertFalse(late.transport.disconnecting)
        self.assertEqual(frames_in(late.transport.value())[1:], self.frames[:20])
        self.assertIsNone(late.outbox.replay)

    def test_oldFilesArchived(self) -> None:
        """Files removed by retention while the relay runs are skipped, not fatal."""
        for n in range(0, 200, 10):
            self.publish(self.frames[n : n + 10])
        files = audit_files(self.relay.writeahead.audit.directory)
        os.unlink(files[0].path)
        late = connect(self.relay)
        late.dataReceived(recovery_frame({42: 1}))
        run_cooperator(self.relay)
        self.assertEqual(published(late.transport.value()), self.frames[files[1].first_index :])

    def test_publishOnlyRefused(self) -> None:
        """A connection that receives nothing cannot read the log through a replay."""
        self.publish(self.frames[:10])
        late = connect(self.relay)
        late.dataReceived(control_frame(publish_only=True) + recovery_frame({42: 1}))
        run_cooperator(self.relay)
        answers = [
            parse_recovery_response(unpack_header(f), f) for f in frames_in(late.transport.value())
        ]
        self.assertIn((42, 1, NOT_SUBSCRIBED), answers)
        self.assertEqual(published(late.transport.value()), [])

    def test_noAuditLog(self) -> None:
        """A relay without an audit log says so and the client stays live."""
        relay = make_relay(Domain.EXECUTION)
        publisher, late = connect(relay), connect(relay)
        late.dataReceived(recovery_frame({42: 1}))
        [answer] = frames_in(late.transport.value())
        self.assertEqual(parse_recovery_response(unpack_header(answer), answer), (42, 1, NO_AUDIT_LOG))
        publisher.dataReceived(self.frames[0])
        self.assertEqual(published(late.transport.value()), self.frames[:1])


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = make_relay(Domain.EXECUTION)
        self.service = RelayService(self.relay, 0)
        self.service.startService()
        self.addCleanup(self.service._heartbeat.stop)
        self.publisher = connect(self.relay)
        self.publisher.dataReceived(control_frame(publish_only=True))
        self.subscriber = connect(self.relay)
        self.frames = frames_for(Domain.EXECUTION, 100, source=42)

    def heartbeats(self, client) -> list[tuple[float, dict[int, int]]]:
        beats = [parse_heartbeat(unpack_header(f), f) for f in frames_in(client.transport.value())]
        return [beat for beat in beats if beat is not None]

    def test_onePerIdleInterval(self) -> None:
        """An idle subscriber gets exactly one heartbeat per interval after the first."""
        for _ in range(5):
            self.relay.clock.advance(1.0)
        self.assertEqual(len(self.heartbeats(self.subscriber)), 4)

    def test_noneWhileTrafficFlows(self) -> None:
        """While frames reach a subscriber, it gets no heartbeat."""
        for n in range(10):
            self.publisher.dataReceived(self.frames[n])
            self.relay.clock.advance(1.0)
        self.assertEqual(self.heartbeats(self.subscriber), [])
        self.relay.clock.advance(1.0)
        self.assertEqual(self.heartbeats(self.subscriber), [(1.0, {42: 10})])

    def test_notToPublishers(self) -> None:
        """A publish-only client never gets a heartbeat."""
        for _ in range(5):
            self.relay.clock.advance(1.0)
        self.assertEqual(self.heartbeats(self.publisher), [])
        self.assertEqual(self.relay.totals.heartbeats, 4)

    def test_notCountedAsFrames(self) -> None:
        """Heartbeats are counted apart from relayed frames."""
        for _ in range(3):
            self.relay.clock.advance(1.0)
        self.assertEqual(self.subscriber.stats.frames_out, 0)
        self.assertEqual(self.subscriber.stats.heartbeats, 2)

    def test_lastForwardedWhileLogFails(self) -> None:
        """
        While the audit log cannot be written (its file swapped for
        /dev/full: ENOSPC), heartbeats carry the last sequence forwarded, not
        the last accepted; once the held frames go out, they catch up.
        """
        relay = make_relay(Domain.EXECUTION, audit=AuditLog(temp_dir(self)))
        service = RelayService(relay, 0)
        service.startService()  # as twist starts it: the audit log opens here
        self.addCleanup(relay.writeahead.stop)
        self.addCleanup(service._heartbeat.stop)
        publisher, subscriber = connect(relay), connect(relay)
        publisher.dataReceived(control_frame(publish_only=True))
        frames = frames_for(Domain.EXECUTION, 20, source=42)
        publisher.dataReceived(b"".join(frames[:10]))
        full = DiskFull(relay.writeahead.audit)
        publisher.dataReceived(b"".join(frames[10:]))
        self.assertEqual(relay.sequences, {42: 20})
        relay.clock.advance(1.0)
        relay.clock.advance(1.0)
        self.assertEqual(self.heartbeats(subscriber), [(1.0, {42: 10})])
        full.free()
        for _ in range(3):
            relay.clock.advance(1.0)
        self.assertEqual(published(subscriber.transport.value()), frames)
        self.assertEqual(self.heartbeats(subscriber)[-1], (1.0, {42: 20}))


class PeerTransport(RecordingTransport):
    """An in-memory transport whose handle is one end of a real Unix socket pair."""

    def __init__(self) -> None:
        super().__init__()
        self.handle, self.other = socket.socketpair(socket.AF_UNIX)

    def getHandle(self) -> socket.socket:
        return self.handle

    def close(self) -> None:
        self.handle.close()
        self.other.close()


class AccessTests(SynchronousTestCase):
    def relay(self, **lists) -> object:
        relay = make_relay(Domain.EXECUTION)
        relay.access = Access(**{k: AccessList(v) for k, v in lists.items()})
        return relay

    def connect(self, relay):
        transport = PeerTransport()
        self.addCleanup(transport.close)
        return connect(relay, transport)

    def test_peerCredentials(self) -> None:
        """A Unix socket peer is known by its pid, uid and gid."""
        transport = PeerTransport()
        self.addCleanup(transport.close)
        peer = peer_of(transport)
        self.assertEqual((peer.pid, peer.uid, peer.gid), (os.getpid(), os.getuid(), os.getgid()))
        self.assertEqual(peer.description, f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}")

    def test_entries(self) -> None:
        """Entries name users and groups by name or number; anything else is refused."""
        root = AccessList(["uid:root", "gid:0", "cn:gateway"])
        self.assertEqual((root.uids, root.gids, root.names), ({0}, {0}, {"gateway"}))
        for bad in ("uid:no-such-user-here", "user:1", "uid:", "everyone"):
            self.assertRaises(ValueError, AccessList, [bad])

    def test_publisherNotAllowed(self) -> None:
        """A peer whose uid may not publish is closed at its first frame, with the reason."""
        relay = self.relay(publish=[f"uid:{os.getuid() + 1}"])
        publisher, subscriber = self.connect(relay), self.connect(relay)
        publisher.dataReceived(frames_for(Domain.EXECUTION, 1)[0])
        self.assertEqual(published(subscriber.transport.value()), [])
        self.assertEqual(relay.totals.rejects, {"not_allowed_to_publish": 1})
        self.assertEqual(publisher.stats.close_reason, "not_allowed_to_publish")
        self.assertTrue(publisher.transport.disconnecting)

    def test_publisherAllowed(self) -> None:
        """An allowed uid publishes; control frames are always allowed."""
        relay = self.relay(publish=[f"uid:{os.getuid()}"], subscribe=[f"uid:{os.getuid() + 1}"])
        publisher, subscriber = self.connect(relay), self.connect(relay)
        frame = frames_for(Domain.EXECUTION, 1)[0]
        publisher.dataReceived(control_frame(publish_only=True) + frame)
        self.assertEqual(relay.totals.frames_in, 1)
        # the subscriber's uid may not subscribe: it receives nothing
        self.assertEqual(published(subscriber.transport.value()), [])
        self.assertEqual(subscriber.stats.role, "publisher")

    def test_neither(self) -> None:
        """A peer that may neither publish nor subscribe is cut off at once."""
        other = f"uid:{os.getuid() + 1}"
        relay = self.relay(publish=[other], subscribe=[other])
        client = self.connect(relay)
        self.assertEqual(client.stats.close_reason, "not allowed")
        self.assertEqual(relay.totals.cut_offs, {"not allowed": 1})

    def test_groupMember(self) -> None:
        """A gid entry admits the peer's primary group."""
        relay = self.relay(publish=[f"gid:{os.getgid()}"])
        publisher, subscriber = self.connect(relay), self.connect(relay)
        publisher.dataReceived(frames_for(Domain.EXECUTION, 1)[0])
        self.assertEqual(len(published(subscriber.transport.value())), 1)


class OwnFramesTests(SynchronousTestCase):
    def test_relayFramesAreSystemFrames(self) -> None:
        """The relay's own frames carry its source type and are valid frames."""
        relay = make_relay(Domain.EXECUTION)
        client = connect(relay)
        client.dataReceived(control_frame())
        [answer] = frames_in(client.transport.value())
        header = unpack_header(answer)
        self.assertEqual((header.relay_domain, header.source), (Domain.SYSTEM, 82))
        self.assertEqual(answer, build_frame(4, 82, 0, answer[32:], timestamp=header.timestamp))
