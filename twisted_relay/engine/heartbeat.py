"""
Heartbeats: a subscriber sent nothing for an interval gets one, so it can
tell a quiet relay from a dead one and learn the last sequence forwarded
per source (where a lossless subscriber resumes from).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from twisted.internet.interfaces import ITransport

from ..control import Subscription, heartbeat_frame
from .accounting import Accounting, ClientStats
from .delivery import Outbox


class Listener(Protocol):
    """A client as the heartbeat sees it (a L{protocol.RelayProtocol})."""

    stats: ClientStats
    outbox: Outbox
    subscription: Subscription
    transport: ITransport


class Heartbeats:
    """
    @param sequences: the last sequence forwarded per source, read at each beat.
    @param deliver: how a frame is sent to one client, failures isolated.
    """

    def __init__(
        self,
        domain: int,
        interval: float,
        *,
        sequences: Callable[[], Mapping[int, int]],
        accounting: Accounting,
        deliver: Callable[[Listener, list[bytes], int, int], None],
    ) -> None:
        self.domain = domain
        self.interval = interval
        self.sequences = sequences
        self.accounting = accounting
        self.deliver = deliver
        self._numbers = itertools.count(1)
        #: Each client's bytes_out at the last beat, by client id.
        self._heard: dict[int, int] = {}

    def beat(self, clients: Iterable[Listener]) -> None:
        """
        Send a heartbeat to every client that was sent nothing since the
        last beat (publish-only clients excepted).
        """
        frame = None
        heard: dict[int, int] = {}
        for client in tuple(clients):
            stats = client.stats
            last = heard[stats.client_id] = self._heard.get(stats.client_id, -1)
            if client.outbox.replay is None and client.subscription.publish_only:
                continue
            heard[stats.client_id] = stats.bytes_out
            if stats.bytes_out != last:
                continue
            if frame is None:
                frame = heartbeat_frame(
                    self.domain, next(self._numbers), self.interval, self.sequences()
                )
            self.deliver(client, [frame], 0, len(frame))
            heard[stats.client_id] = stats.bytes_out
            self.accounting.heartbeat(stats)
        self._heard = heard
