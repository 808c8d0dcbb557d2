"""
The relay proper: the registry of connected clients, their counters, and the
fan-out of accepted frames to every client but the sender.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..access import Access, Peer, peer_of
from ..control import (
    BUSY,
    NO_AUDIT_LOG,
    NOT_SUBSCRIBED,
    NOTHING,
    Subscription,
    heartbeat_frame,
    recovery_response_frame,
)
from ..interfaces import IRelayLogic
from ..ratelimit import RateLimiter
from ..validation import FramePolicy
from ..wire import FrameError, Header, frame_spans
from .delivery import DeliverySettings, Outbox, PublisherGate
from .protocol import RelayProtocol
from .recovery import Replay

if TYPE_CHECKING:
    from ..bridge.service import NatsBridge
    from .writeahead import WriteAhead

#: The subscription of a client that has not asked for anything else.
EVERYTHING = Subscription()


@dataclass(slots=True)
class Counters:
    """
    Traffic counters. C{frames_in} counts accepted frames; C{bytes_in} every
    byte read, accepted or not; C{frames_out} frames handed to a client's
    transport; C{rejects} the refused frames by reason; C{frames_dropped} the
    frames the drop policy did not deliver; C{frames_lost} the frames still
    queued for a client when its connection ended; C{frames_replayed} the
    frames sent from the audit log (also in C{frames_out}); C{heartbeats}
    the heartbeats sent to idle clients; the sequence counters what
    publishers' C{sequence} fields gave away (frames missing, repeated, going
    backwards).
    """

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    frames_replayed: int = 0
    heartbeats: int = 0
    frames_dropped: int = 0
    bytes_dropped: int = 0
    frames_lost: int = 0
    bytes_lost: int = 0
    control_frames: int = 0
    sequence_gaps: int = 0
    sequence_duplicates: int = 0
    sequence_regressions: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    cut_offs: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class ClientStats(Counters):
    """One connected client: who it is, since when, and its traffic."""

    client_id: int = 0
    peer: str = ""
    connected_at: float = 0.0
    role: str = EVERYTHING.role
    #: Why the relay closed this connection, if it did.
    close_reason: str = ""


class RelayFactory(ServerFactory):
    """
    Tracks the connected clients and broadcasts every accepted frame to all of
    them except its sender (unless C{echo}), each through its L{Outbox}.

    L{broadcast} is the one place where accepted frames enter fan-out.
    """

    protocol = RelayProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        logic: IRelayLogic,
        policy: FramePolicy,
        *,
        delivery: DeliverySettings | None = None,
        echo: bool = False,
        access: Access | None = None,
        heartbeat: float = 1.0,
        clock: IReactorTime | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.logic = logic
        self.policy = policy
        self.delivery = delivery or DeliverySettings.for_logic(logic)
        self.echo = echo
        self.access = access or Access()
        #: Seconds of silence after which a client gets a heartbeat; 0: never.
        self.heartbeat_interval = heartbeat
        #: Puts accepted frames in the audit log first, when there is one.
        self.writeahead: WriteAhead | None = None
        #: Carries the broadcast to and from other hosts (--nats), when there is one.
        self.bridge: NatsBridge | None = None
        #: The last sequence accepted per source.
        self.sequences: dict[int, int] = {}
        self.clock = clock
        self.cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        #: Connected clients by id, in connection order.
        self.clients: dict[int, RelayProtocol] = {}
        self.totals = Counters()
        self.connections = 0
        self.gate = PublisherGate(self, clock)
        self.draining = False
        #: When a client was last dropped from, cut off or lost frames.
        self.last_trouble: float | None = None
        self._ids = itertools.count(1)
        self._heartbeats = itertools.count(1)
        self._sampledLog = RateLimiter(clock)
        self._drained: Deferred[None] | None = None

    def register(self, client: RelayProtocol) -> ClientStats:
        """
        Add a newly connected client; returns its counters. A TLS client's
        rights are settled once its handshake is done (L{identified}); until
        then it may neither publish nor receive.
        """
        peer = peer_of(client.transport)
        stats = ClientStats(
            client_id=next(self._ids),
            peer=peer.description,
            connected_at=self.clock.seconds(),
        )
        client.stats = stats
        client.subscription = EVERYTHING
        client.outbox = Outbox(self, client)
        #: The first audit record this client could have received live.
        client.audit_index = self.writeahead.audit.records if self.writeahead else 0
        self.clients[stats.client_id] = client
        self.connections += 1
        self.gate.joined(client)
        self.log.info(
            "client {client_id} connected ({peer}); {clients} connected",
            client_id=stats.client_id,
            peer=stats.peer,
            clients=len(self.clients),
        )
        if client.handshaking:
            client.may_publish = client.may_subscribe = False
            client.subscription = NOTHING  # until it is known who it is
        else:
            self.identified(client, peer)
        return stats

    def identified(self, client: RelayProtocol, peer: Peer) -> None:
        """
        Settle what C{client}, now known to be C{peer}, may do; a peer that
        may do nothing is disconnected.
        """
        if peer.description != client.stats.peer:
            self.log.info(
                "client {client_id} identified: {peer}",
                client_id=client.stats.client_id,
                peer=peer.description,
            )
            client.stats.peer = peer.description
        client.may_publish = self.access.may_publish(peer)
        client.may_subscribe = self.access.may_subscribe(peer)
        if not (client.may_publish or client.may_subscribe):
            client.outbox.cut(
                "not allowed",
                f"{peer.description} may neither publish nor subscribe",
            )
            return
        self.subscribe(client, EVERYTHING)

    def unregister(self, client: RelayProtocol, reason: Failure) -> None:
        """Forget a client whose connection is gone."""
        stats = client.stats
        client.outbox.disconnected()
        del self.clients[stats.client_id]
        self._sampledLog.forget(("dropped", stats.client_id))
        self.log.info(
            "client {client_id} disconnected after {duration:.3f}s "
            "({reason}): {frames_in} frames in, {frames_out} out, "
            "{frames_dropped} dropped, {frames_lost} lost, {rejected} rejected; "
            "{clients} connected",
            client_id=stats.client_id,
            duration=self.clock.seconds() - stats.connected_at,
            reason=stats.close_reason or reason.getErrorMessage(),
            frames_in=stats.frames_in,
            frames_out=stats.frames_out,
            frames_dropped=stats.frames_dropped,
            frames_lost=stats.frames_lost,
            rejected=sum(stats.rejects.values()),
            rejects=dict(stats.rejects),
            clients=len(self.clients),
        )
        if self._drained is not None and not self.clients:
            self._drained.callback(None)

    def subscribe(self, client: RelayProtocol, subscription: Subscription) -> None:
        """
        Replace what C{client} receives (once its replay is over, if it is
        replaying); a client not allowed to subscribe receives nothing.
        """
        if not client.may_subscribe:
            subscription = replace(subscription, publish_only=True)
        if subscription == EVERYTHING:
            subscription = EVERYTHING
        if client.outbox.replay is not None:
            client.outbox.replay.subscription = subscription
        else:
            client.subscription = subscription
        client.stats.role = subscription.role

    def recover(self, client: RelayProtocol, wanted: Mapping[int, int]) -> None:
        """Replay to C{client} each source of C{wanted} from the sequence given."""
        log = self.log
        refusal = None
        if self.writeahead is None:
            refusal, detail = NO_AUDIT_LOG, "this relay keeps no audit log"
        elif client.outbox.replay is not None:
            refusal, detail = BUSY, "a replay is already running for it"
        elif client.subscription.publish_only:
            refusal, detail = NOT_SUBSCRIBED, "it receives nothing (publish-only or not allowed)"
        if refusal is not None:
            log.warn(
                "client {client_id} asked for a replay of {wanted}: {detail}",
                client_id=client.stats.client_id,
                wanted=dict(wanted),
                detail=detail,
            )
            for source, first in sorted(wanted.items()):
                answer = recovery_response_frame(self.logic.domain, source, first, refusal)
                client.outbox.send([answer], 0, len(answer))
            return
        replay = Replay(self, client, self.writeahead, dict(wanted))
        log.info(
            "client {client_id} asked for a replay of {wanted} (source: first sequence); "
            "replaying from the audit log, live again after record {detached_at}",
            client_id=client.stats.client_id,
            wanted=dict(wanted),
            detached_at=replay.detached_at,
        )
        client.outbox.startReplay(replay)

    def replayed(self, client: RelayProtocol, replay: Replay) -> None:
        """C{client}'s replay reached the end of the log: it is back on the live stream."""
        client.outbox.replay = None
        client.subscription = replay.subscription
        self.log.info(
            "client {client_id} caught up: {frames} frames replayed; live from record "
            "{record}",
            client_id=client.stats.client_id,
            frames=replay.frames,
            record=self.writeahead.forwarded,
        )

    def received(self, sender: RelayProtocol, size: int) -> None:
        """Count bytes read from C{sender}, before framing."""
        sender.stats.bytes_in += size
        self.totals.bytes_in += size

    def broadcast(self, sender: RelayProtocol, runs: list[bytes], frames: int) -> None:
        """
        Accept C{runs}, contiguous slices holding C{frames} frames from
        C{sender}: count them, log them in the audit log if there is one,
        and fan them out once they are logged.
        """
        sender.stats.frames_in += frames
        self.totals.frames_in += frames
        if self.writeahead is None or self.writeahead.admit(sender, runs, frames):
            self.fanOut(sender, runs, frames)

    def fanOut(self, sender: RelayProtocol, runs: list[bytes], frames: int) -> None:
        """
        Send C{runs} to every client but C{sender}, each through its outbox,
        and to the NATS bridge unless they came from it. A client with a
        filtered subscription gets the frames it wants,
        picked one by one. A client whose write fails is cut off; the others
        are not affected.
        """
        bridge = self.bridge
        if bridge is not None and not sender.bridged:
            bridge.publish(runs, frames)
        size = sum(map(len, runs))
        echo = self.echo
        picking: list[tuple[bytes, int, int, Header]] | None = None
        for client in tuple(self.clients.values()):
            if client is sender and not echo:
                continue
            subscription = client.subscription
            if subscription is EVERYTHING:
                self._deliver(client, runs, frames, size)
            elif not subscription.publish_only:
                if picking is None:
                    picking = list(frame_spans(runs))
                picked = [run[s:e] for run, s, e, header in picking if subscription.wants(run, s, e, header)]
                if picked:
                    self._deliver(client, picked, len(picked), sum(map(len, picked)))

    def _deliver(self, client: RelayProtocol, runs: list[bytes], frames: int, size: int) -> None:
        try:
            client.outbox.send(runs, frames, size)
        except Exception:
            self.log.failure(
                "write to client {client_id} failed; disconnecting it",
                client_id=client.stats.client_id,
            )
            client.outbox.close()
            client.transport.abortConnection()

    def delivered(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames handed to C{client}'s transport."""
        stats, totals = client.stats, self.totals
        stats.frames_out += frames
        stats.bytes_out += size
        totals.frames_out += frames
        totals.bytes_out += size

    def replayedOut(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames sent to C{client} from the audit log."""
        self.delivered(client, frames, size)
        client.stats.frames_replayed += frames
        self.totals.frames_replayed += frames

    def heartbeat(self) -> None:
        """
        Send a heartbeat to every client that was sent nothing since the
        last call (publish-only clients excepted).
        """
        frame = None
        writeahead = self.writeahead
        for client in tuple(self.clients.values()):
            stats = client.stats
            if client.outbox.replay is None and client.subscription.publish_only:
                continue
            if stats.bytes_out != client.heard:
                client.heard = stats.bytes_out
                continue
            if frame is None:
                frame = heartbeat_frame(
                    self.logic.domain,
                    next(self._heartbeats),
                    self.heartbeat_interval,
                    self.sequences if writeahead is None else writeahead.forwardedSequences(),
                )
            self._deliver(client, [frame], 0, len(frame))
            client.heard = stats.bytes_out
            stats.heartbeats += 1
            self.totals.heartbeats += 1

    def lost(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames still queued for C{client} when its connection ended."""
        self.last_trouble = self.clock.seconds()
        stats, totals = client.stats, self.totals
        stats.frames_lost += frames
        stats.bytes_lost += size
        totals.frames_lost += frames
        totals.bytes_lost += size

    def dropped(self, client: RelayProtocol, frames: int, size: int) -> None:
        """Count frames the drop policy did not deliver to C{client}."""
        self.last_trouble = self.clock.seconds()
        stats, totals = client.stats, self.totals
        stats.frames_dropped += frames
        stats.bytes_dropped += size
        totals.frames_dropped += frames
        totals.bytes_dropped += size
        self._sampledLog.log(
            ("dropped", stats.client_id),
            self.log.warn,
            "slow client {client_id}: dropped {frames} frames ({frames_dropped} so "
            "far), its queue is at the high-water mark of {high_water} bytes",
            client_id=stats.client_id,
            frames=frames,
            frames_dropped=stats.frames_dropped,
            high_water=self.delivery.high_water,
        )

    def cutOff(self, client: RelayProtocol, reason: str, detail: str) -> None:
        """Count and log that C{client} is being disconnected by the relay."""
        self.last_trouble = self.clock.seconds()
        client.stats.cut_offs[reason] += 1
        client.stats.close_reason = reason
        self.totals.cut_offs[reason] += 1
        self.log.warn(
            "disconnecting client {client_id} ({reason}): {detail}",
            client_id=client.stats.client_id,
            reason=reason,
            detail=detail,
        )

    def rejected(self, sender: RelayProtocol, error: FrameError) -> None:
        """Count a refused frame and log it, at a bounded rate per reason."""
        sender.stats.rejects[error.reason] += 1
        self.totals.rejects[error.reason] += 1
        if error.fatal:
            self._sampledLog.log(
                error.reason,
                self.log.error,
                sender.lostFramingLog + ": {error}; header bytes {header}",
                client_id=sender.stats.client_id,
                error=str(error),
                reason=error.reason,
                header=error.header.hex(" "),
            )
        else:
            self._sampledLog.log(
                error.reason,
                self.log.warn,
                "dropped frame ({reason}): {error}",
                reason=error.reason,
                error=str(error),
                client_id=sender.stats.client_id,
            )

    def sequenceAnomaly(
        self, sender: RelayProtocol, kind: str, source: int, sequence: int, last: int
    ) -> None:
        """
        Log a gap, duplicate or regression in a publisher's sequence: every
        one on a lossless (block) relay, a bounded number per second otherwise.
        """
        event = dict(
            format="sequence {kind} from client {client_id}, source {source}: {sequence} "
            "after {last}",
            kind=kind,
            client_id=sender.stats.client_id,
            source=source,
            sequence=sequence,
            last=last,
        )
        if self.delivery.policy == "block":
            self.log.warn(**event)
        else:
            self._sampledLog.log(("sequence", kind), self.log.warn, **event)

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Stop reading from every client, give what is queued for them at most
        C{timeout} seconds to be written, then close whatever is left.
        """
        self.draining = True
        self._drained = drained = Deferred()
        if not self.clients:
            drained.callback(None)
            return drained
        for client in tuple(self.clients.values()):
            client.transport.pauseProducing()
            client.outbox.flushAndClose(timeout)
        timer = self.clock.callLater(timeout, self._drainTimedOut, timeout)

        def finished(result: None) -> None:
            if timer.active():
                timer.cancel()

        return drained.addCallback(finished)

    def _drainTimedOut(self, timeout: float) -> None:
        for client in tuple(self.clients.values()):
            self.log.error(
                "client {client_id} did not take all its data within the drain "
                "timeout of {timeout}s; closing it",
                client_id=client.stats.client_id,
                timeout=timeout,
            )
            client.transport.abortConnection()

