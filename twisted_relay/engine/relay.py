"""
The relay proper: the registry of connected clients, what each may do and
receive, and the fan-out of accepted frames to every client but the sender.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure

from ..access import Access, Peer
from ..audit import AuditLog
from ..control import (
    BUSY,
    EVERYTHING,
    NO_AUDIT_LOG,
    NOT_SUBSCRIBED,
    NOTHING,
    Account,
    Control,
    Subscription,
    account_answer_frame,
    recovery_response_frame,
    relay_info_frame,
)
from ..interfaces import IRelayLogic
from ..scan import pick_runs
from ..validation import FramePolicy
from .accounting import Accounting, Counters
from .delivery import DeliverySettings, Drain, PublisherGate
from .heartbeat import Heartbeats, Listener
from .ingest import PARTIAL_LIMIT, PARTIAL_TIMEOUT, Ingest, PartialFrames
from .logger import RelayLogger
from .protocol import RelayProtocol
from .recovery import Replay
from .writeahead import Offload, Publisher, WriteAhead


class Outlet(Protocol):
    """Where accepted frames also go besides the local clients (the NATS bridge)."""

    def publish(self, runs: list[bytes], frames: int) -> None:
        """Take C{runs}, runs of whole frames holding C{frames} frames, to send on."""


@dataclass
class _Parked:
    """
    The parked clients (drop policy, L{Outbox.parked}) of one subscription:
    nothing is sent to them, and what they miss is counted here once for
    all of them; each client's share is what it was when it was parked.
    """

    frames: int = 0
    size: int = 0
    #: By client id: the client, and C{frames}, C{size} when it was counted last.
    clients: dict[int, tuple[RelayProtocol, int, int]] = field(default_factory=dict)


class RelayFactory(ServerFactory):
    """
    Tracks the connected clients and broadcasts every accepted frame to all of
    them except its sender (unless C{echo}), each through its L{Outbox};
    L{broadcast} is the one place where accepted frames enter fan-out, through
    the L{WriteAhead} first if there is an C{audit} log.

    @ivar outlet: where accepted local frames also go (the NATS bridge).
    """

    protocol: Callable[..., Any] = RelayProtocol
    log = RelayLogger(namespace="relay")
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
        audit: AuditLog | None = None,
        fsync_interval: float | None = None,
        audit_writer: Offload | None = None,
        partial_limit: int = PARTIAL_LIMIT,
        partial_timeout: float = PARTIAL_TIMEOUT,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param audit: the write-ahead audit log, if any, synced every
            C{fsync_interval} seconds (C{None}: before every forward).
        @param audit_writer: where the log is written and synced before every
            forward, pipelined (a L{WriterThread}); C{None}: in line.
        @param partial_limit: bytes all clients together may hold of frames
            they began and have not finished (L{PartialFrames}).
        @param partial_timeout: seconds a client may take to finish a frame.
        """
        if clock is None:
            from twisted.internet import reactor as clock
        assert clock is not None
        self.logic = logic
        self.policy = policy
        self.delivery = delivery = delivery or DeliverySettings.for_logic(logic)
        self.echo = echo
        self.access = access or Access()
        #: Seconds of silence after which a client gets a heartbeat; 0: never.
        self.heartbeat_interval = heartbeat
        self.clock = clock
        self.accounting = Accounting(
            clock, lossless=delivery.policy == "block", high_water=delivery.high_water
        )
        self.cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))
        #: Connected clients by id, in connection order.
        self.clients: dict[int, RelayProtocol] = {}
        #: The clients frames are fanned out to: all but the parked ones.
        self.receivers: dict[int, RelayProtocol] = {}
        #: The parked clients by subscription, and each one's subscription.
        self._parked: dict[Subscription, _Parked] = {}
        self._parkedAs: dict[int, Subscription] = {}
        #: The last sequence accepted per source.
        self.sequences: dict[int, int] = {}
        self.partials = PartialFrames(clock, partial_limit, partial_timeout)
        self.gate = PublisherGate(
            clock, lambda: [cast(IPushProducer, c.transport) for c in self.clients.values()]
        )
        self.writeahead = (
            None
            if audit is None
            else WriteAhead(
                audit,
                fsync_interval,
                clock,
                gate=self.gate,
                sequences=self.sequences,
                forward=self.fanOut,
                offload=audit_writer,
            )
        )
        self.outlet: Outlet | None = None
        self.heartbeats = Heartbeats(
            logic.domain,
            heartbeat,
            sequences=lambda: (
                self.sequences if self.writeahead is None else self.writeahead.forwardedSequences()
            ),
            accounting=self.accounting,
            deliver=self._deliver,
        )
        self.draining = False
        self._drain: Drain | None = None

    @property
    def totals(self) -> Counters:
        """The relay's counters, every client's brought up to date first."""
        for parked in self._parked.values():
            for client_id in parked.clients:
                self._settle(client_id)
        return self.accounting.totals

    def register(self, client: RelayProtocol, peer: Peer) -> None:
        """
        Add a newly connected client. A TLS client's rights are settled once
        its handshake is done (L{identified}); until then it may neither
        publish nor receive.
        """
        stats = client.stats
        client.audit_index = self.writeahead.forwarded if self.writeahead else 0
        self.clients[stats.client_id] = client
        self.receivers[stats.client_id] = client
        self.gate.joined(cast(IPushProducer, client.transport))
        self.log.info(
            "client {client_id} connected ({peer}); {clients} connected",
            client_id=stats.client_id,
            peer=stats.peer,
            clients=len(self.clients),
        )
        if client.handshaking:
            client.ingest.may_publish = client.may_subscribe = False
        else:
            self.identified(client, peer)

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
        client.ingest.may_publish = self.access.may_publish(peer)
        client.may_subscribe = self.access.may_subscribe(peer)
        if not (client.ingest.may_publish or client.may_subscribe):
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
        if stats.client_id in self._parkedAs:
            self._unpark(client)
        del self.clients[stats.client_id]
        self.receivers.pop(stats.client_id, None)
        self.accounting.disconnected(stats)
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
        if self._drain is not None:
            self._drain.left(len(self.clients))

    def controlReceived(self, client: RelayProtocol, control: Control) -> None:
        """
        A new subscription, answered with the relay's RelayInfo; a replay.
        The answers never hold the publishers back (L{Outbox.send} of the
        relay's own frames), and the log lines are sampled.
        """
        subscription = control.subscription
        if subscription is not None:
            self.subscribe(client, subscription)
            self.accounting.sampled(
                "subscription",
                self.log.info,
                "client {client_id} is now a {role}{details}",
                client_id=client.stats.client_id,
                role=client.stats.role,
                details=_describe(subscription),
            )
            answer = relay_info_frame(self.logic.domain, self.logic.name)
            client.outbox.send([answer], 0, len(answer))
        if control.recovery:
            self.recover(client, control.recovery)
        if control.account is not None:
            self.account(client, control.account)

    def account(self, client: RelayProtocol, token: int) -> None:
        """
        Answer C{client}'s account request, in order: once every frame
        accepted before it is forwarded (logged first, with an audit log).
        What it published is counted as of the request; what it was sent,
        as of the answer: the frames ahead of the answer in its stream.
        """
        stats = client.stats
        accepted, refused = stats.frames_in, dict(stats.rejects)

        def answer() -> None:
            if stats.client_id in self._parkedAs:
                self._settle(stats.client_id)
            account = Account(
                token,
                accepted,
                stats.frames_out + client.outbox.queued_frames,
                stats.frames_dropped,
                refused,
            )
            frame = account_answer_frame(self.logic.domain, account)
            self._deliver(client, [frame], 0, len(frame))  # its failure is its own

        if self.writeahead is None:
            answer()
        else:
            self.writeahead.then(answer)

    def subscribe(self, client: RelayProtocol, subscription: Subscription) -> None:
        """
        Replace what C{client} receives (once its replay is over, if it is
        replaying); a client not allowed to subscribe receives nothing.
        """
        if not client.may_subscribe:
            subscription = replace(subscription, publish_only=True)
        if subscription == EVERYTHING:
            subscription = EVERYTHING
        if client.stats.client_id in self._parkedAs:
            self._unpark(client)  # what it misses is counted by its subscription
        if client.outbox.replay is not None:
            client.outbox.replay.subscription = subscription
        else:
            client.subscription = subscription
        client.stats.role = subscription.role

    def recover(self, client: RelayProtocol, wanted: Mapping[int, int]) -> None:
        """Replay to C{client} each source of C{wanted} from the sequence given."""
        writeahead = self.writeahead
        if writeahead is None:
            self._refuse(client, wanted, NO_AUDIT_LOG, "this relay keeps no audit log")
        elif client.outbox.replay is not None:
            self._refuse(client, wanted, BUSY, "a replay is already running for it")
        elif client.subscription.publish_only:
            self._refuse(
                client, wanted, NOT_SUBSCRIBED, "it receives nothing (publish-only or not allowed)"
            )
        else:
            self._replay(client, writeahead, wanted)

    def _refuse(
        self, client: RelayProtocol, wanted: Mapping[int, int], status: int, detail: str
    ) -> None:
        self.accounting.sampled(
            "refused replay",
            self.log.warn,
            "client {client_id} asked for a replay of {wanted}: {detail}",
            client_id=client.stats.client_id,
            wanted=dict(wanted),
            detail=detail,
        )
        for source, first in sorted(wanted.items()):
            answer = recovery_response_frame(self.logic.domain, source, first, status)
            client.outbox.send([answer], 0, len(answer))

    def _replay(
        self, client: RelayProtocol, writeahead: WriteAhead, wanted: Mapping[int, int]
    ) -> None:
        replay = Replay(
            client,
            writeahead,
            dict(wanted),
            cooperator=self.cooperator,
            domain=self.logic.domain,
            echo=self.echo,
            done=lambda replay: self._replayed(client, replay),
        )
        if client.stats.client_id in self._parkedAs:
            self._unpark(client)  # the replay sends it what it missed from now on
        client.subscription = NOTHING  # off the live stream until the replay is done
        self.accounting.sampled(
            "replay",
            self.log.info,
            "client {client_id} asked for a replay of {wanted} (source: first sequence); "
            "replaying from the audit log, live again after record {detached_at}",
            client_id=client.stats.client_id,
            wanted=dict(wanted),
            detached_at=replay.detached_at,
        )
        client.outbox.startReplay(replay)

    def _replayed(self, client: RelayProtocol, replay: Replay) -> None:
        """C{client}'s replay reached the end of the log: it is back on the live stream."""
        client.outbox.replay = None
        client.subscription = replay.subscription
        self.accounting.sampled(
            "caught up",
            self.log.info,
            "client {client_id} caught up: {frames} frames replayed; live from record "
            "{record}",
            client_id=client.stats.client_id,
            frames=replay.frames,
            record=replay.writeahead.forwarded,
        )

    def broadcast(self, sender: Ingest, runs: list[bytes], frames: int) -> None:
        """
        Accept C{runs}, contiguous slices holding C{frames} frames from
        C{sender}: count them, log them in the audit log if there is one,
        and fan them out once they are logged.
        """
        self.accounting.accepted(sender.stats, frames)
        if self.writeahead is None:
            self.fanOut(sender, runs, frames)
        else:
            self.writeahead.admit(sender, runs, frames)

    def fanOut(self, sender: Publisher, runs: list[bytes], frames: int) -> None:
        """
        Send C{runs} to every client but C{sender}, each through its outbox,
        and to the outlet unless they came from it. A client with a filtered
        subscription gets the frames it wants, picked one by one. A client
        whose write fails is cut off; the others are not affected.
        """
        outlet = self.outlet
        if outlet is not None and not sender.bridged:
            outlet.publish(runs, frames)
        size = sum(map(len, runs))
        echo = self.echo
        picks: dict[Subscription, tuple[list[bytes], int, int]] = {EVERYTHING: (runs, frames, size)}
        parking: list[RelayProtocol] = []
        for client in tuple(self.receivers.values()):
            if client.ingest is sender and not echo:
                continue
            subscription = client.subscription
            if subscription is EVERYTHING:
                self._deliver(client, runs, frames, size)
            elif not subscription.publish_only:
                pick = picks.get(subscription)
                if pick is None:
                    pick = self._pickAll(runs, picks)[subscription]
                if pick[1]:
                    self._deliver(client, *pick)
            if client.outbox.parked:
                parking.append(client)
        if self._parked:
            self._missed(sender, runs, picks)
        for client in parking:  # its outbox counted what it dropped of these
            self._park(client)

    def _pickAll(
        self, runs: list[bytes], picks: dict[Subscription, tuple[list[bytes], int, int]]
    ) -> dict[Subscription, tuple[list[bytes], int, int]]:
        """
        Add to C{picks} the frames of C{runs} each filter of the relay's
        clients wants (parked ones included): one pass over the frames for
        all the distinct filters.
        """
        wanted = {
            client.subscription
            for client in self.receivers.values()
            if client.subscription.filtered and not client.subscription.publish_only
        }
        wanted.update(self._parked)
        wanted.difference_update(picks)
        picks.update(zip(wanted, _pick(runs, list(wanted))))
        return picks

    def _park(self, client: RelayProtocol) -> None:
        """Send nothing more to C{client} until it reads; count what it misses."""
        client_id = client.stats.client_id
        subscription = client.subscription
        self.receivers.pop(client_id, None)
        parked = self._parked.get(subscription)
        if parked is None:
            parked = self._parked[subscription] = _Parked()
        parked.clients[client_id] = (client, parked.frames, parked.size)
        self._parkedAs[client_id] = subscription

    def _missed(
        self,
        sender: Publisher,
        runs: list[bytes],
        picks: dict[Subscription, tuple[list[bytes], int, int]],
    ) -> None:
        """Count the frames of one fan-out for the parked clients, once per subscription."""
        for subscription, parked in self._parked.items():
            pick = picks.get(subscription)
            if pick is None:
                pick = self._pickAll(runs, picks)[subscription]
            parked.frames += pick[1]
            parked.size += pick[2]
        own = self._parkedAs.get(sender.stats.client_id)
        if own is not None and not self.echo:  # a parked client misses none of its own
            _, frames, size = picks[own]
            parked = self._parked[own]
            client, before, before_size = parked.clients[sender.stats.client_id]
            parked.clients[sender.stats.client_id] = (
                client, before + frames, before_size + size
            )

    def _settle(self, client_id: int, *, quiet: bool = True) -> None:
        """Count what a parked client missed since it was counted last."""
        parked = self._parked[self._parkedAs[client_id]]
        client, frames, size = parked.clients[client_id]
        if parked.frames != frames or parked.size != size:
            self.accounting.dropped(
                client.stats, parked.frames - frames, parked.size - size, quiet=quiet
            )
            parked.clients[client_id] = (client, parked.frames, parked.size)

    def unpark(self, client: RelayProtocol) -> None:
        """C{client}'s transport took from its queue: fan out to it again."""
        if client.stats.client_id in self._parkedAs:
            self._unpark(client)

    def _unpark(self, client: RelayProtocol) -> None:
        """Count what C{client} missed, and fan out to it again from the next read."""
        client_id = client.stats.client_id
        client.outbox.parked = False
        self.receivers[client_id] = client
        self._settle(client_id, quiet=False)
        subscription = self._parkedAs.pop(client_id)
        parked = self._parked[subscription]
        del parked.clients[client_id]
        if not parked.clients:
            del self._parked[subscription]

    def _deliver(self, client: Listener, runs: list[bytes], frames: int, size: int) -> None:
        try:
            client.outbox.send(runs, frames, size)
        except Exception:
            self.log.failure(
                "write to client {client_id} failed; disconnecting it",
                client_id=client.stats.client_id,
            )
            client.outbox.close()
            client.outbox.hangUp()

    def heartbeat(self) -> None:
        """Send a heartbeat to every client that was sent nothing since the last call."""
        self.heartbeats.beat(self.clients.values())

    def expirePartials(self) -> None:
        """Lose the streams that began a frame longer ago than the relay allows."""
        for stream in self.partials.expired():
            stream.expire()

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Shut down: stop reading, let the frames with the audit log's writer
        fan out, then what is queued for the clients gets C{timeout} seconds
        (L{Drain}). Each of the two waits is bounded by C{timeout}.
        """
        self.draining = self.gate.draining = True
        for client in self.clients.values():
            client.transport.pauseProducing()  # type: ignore[attr-defined]
        if self.writeahead is None:
            settled: Deferred[None] = succeed(None)
        else:
            settled = self.writeahead.settled(timeout)
        return settled.addCallback(lambda _: self._drainClients(timeout))

    def _drainClients(self, timeout: float) -> Deferred[None]:
        self._drain = Drain(self.clients.values(), self.clock, timeout)
        return self._drain.done


def _pick(
    runs: list[bytes], subscriptions: list[Subscription]
) -> list[tuple[list[bytes], int, int]]:
    """
    For each of C{subscriptions}, the frames of C{runs} it wants, as few
    slices as possible (wanted frames side by side in a run go out as one),
    with their count and size: worked out once per fan-out for all the
    clients that share a subscription, by the native scan where there is one.
    """
    filters = [subscription.tables for subscription in subscriptions]
    picked: list[tuple[list[bytes], int, int]] = [([], 0, 0) for _ in subscriptions]
    for run in runs:
        for n, (spans, count, taken) in enumerate(pick_runs(run, filters)):
            if count == 0:
                continue
            slices, frames, size = picked[n]
            if taken == len(run):
                slices.append(run)
            else:
                slices.extend(run[start:end] for start, end in spans)
            picked[n] = (slices, frames + count, size + taken)
    return picked


def _describe(subscription: Subscription) -> str:
    parts = []
    if subscription.sources is not None:
        parts.append(f"sources {sorted(subscription.sources)}")
    if subscription.tlv_types is not None:
        parts.append(f"TLV types {sorted(subscription.tlv_types)}")
    return f" ({', '.join(parts)})" if parts else ""
