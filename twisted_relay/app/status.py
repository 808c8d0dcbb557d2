"""
The relay's HTTP status endpoint (C{--http}): C{/health} as JSON for people,
scripts and load balancers (200 when ok, 503 when degraded or stopping),
C{/metrics} for Prometheus (the classic text format or OpenMetrics, as the
scraper asks). Both read the live counters of the relay at request time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .. import __version__, scan
from ..engine.accounting import Counters
from ..engine.delivery import SLOW_CONSUMER, STALLED_CONSUMER
from ..engine.relay import RelayFactory
from ..wire import REJECT_REASONS

if TYPE_CHECKING:
    from ..bridge.service import NatsBridge

#: How long after a client was dropped from, cut off or lost frames the
#: relay reports itself degraded.
DEGRADED_FOR = 60.0

#: At most this many clients, the busiest (most bytes in and out since they
#: connected), are listed in C{/health}; C{clients_omitted} counts the rest.
HEALTH_CLIENTS = 100

#: Bounds of the audit log's fsync latency histogram, in seconds: from a
#: fast NVMe drive's 50 microseconds to a disk in trouble.
FSYNC_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)

#: Counters of L{Counters} exported as Prometheus counters: name, help.
_COUNTERS = (
    ("frames_in", "Frames accepted from publishers."),
    ("bytes_in", "Bytes read from clients, accepted or not."),
    ("frames_out", "Frames written whole to subscribers' sockets (over TLS: handed to TLS)."),
    ("bytes_out", "Bytes written to subscribers' sockets."),
    ("frames_dropped", "Frames not delivered to a lagging subscriber (drop policy)."),
    ("frames_lost", "Frames queued or buffered for a subscriber when it was cut off or left."),
    ("control_frames", "Control frames applied."),
    ("frames_replayed", "Frames sent to subscribers from the audit log (replays)."),
    ("heartbeats", "Heartbeats sent to idle subscribers."),
    ("sequence_gaps", "Frames missing from publishers' sequences."),
    ("sequence_duplicates", "Repeated sequence numbers from publishers."),
    ("sequence_regressions", "Sequence numbers going backwards."),
)


def _counters(counters: Counters) -> dict:
    return {
        **{name: getattr(counters, name) for name, _ in _COUNTERS},
        "bytes_dropped": counters.bytes_dropped,
        "bytes_lost": counters.bytes_lost,
        "rejects": dict(counters.rejects),
        "cut_offs": dict(counters.cut_offs),
    }


def health(
    factory: RelayFactory,
    started_at: float,
    listening: list[str],
    bridge: NatsBridge | None = None,
) -> dict:
    """Everything an operator asks first, as one JSON-ready dict."""
    totals = factory.totals  # first: it brings every client's counters up to date
    now = factory.clock.seconds()
    gate = factory.gate
    reasons = _reasons(factory, now, bridge)
    clients = list(factory.clients.values())
    busiest = sorted(clients, key=lambda c: c.stats.bytes_in + c.stats.bytes_out, reverse=True)
    shown = {client.stats.client_id for client in busiest[:HEALTH_CLIENTS]}
    return {
        "status": "stopping" if factory.draining else "degraded" if reasons else "ok",
        "reasons": reasons,
        "audit": _audit(factory),
        "nats": _bridge(bridge),
        "domain": factory.logic.name,
        "relay_domain": factory.logic.domain,
        "version": __version__,
        "uptime_s": round(now - started_at, 3),
        "listening": listening,
        "delivery": factory.delivery.policy,
        "clients": [
            {
                "id": client.stats.client_id,
                "peer": client.stats.peer,
                "connected_at": client.stats.connected_at,
                "role": client.stats.role,
                "buffered_bytes": client.outbox.queued,
                **_counters(client.stats),
            }
            for client in clients
            if client.stats.client_id in shown
        ],
        "clients_omitted": len(clients) - len(shown),
        "totals": {
            **_counters(totals),
            "connections": factory.accounting.connections,
            "publisher_pauses": gate.pauses,
            "publishers_paused_s": round(gate.paused_seconds, 3),
            "longest_pause_s": round(gate.longest_pause, 3),
            "publishers_paused_now": gate.paused,
        },
    }


def _reasons(factory: RelayFactory, now: float, bridge: NatsBridge | None) -> list[str]:
    """Why the relay is not simply ok, one sentence each; empty if it is."""
    accounting = factory.accounting
    reasons = []
    if factory.draining:
        reasons.append("draining the clients")
    reasons.extend(f"publishers held back: {why}" for why, _ in factory.gate.blockers.values())
    trouble = accounting.last_trouble
    if trouble is not None and now - trouble < DEGRADED_FOR:
        reasons.append(
            f"{accounting.trouble}, {now - trouble:.0f}s ago (degraded for {DEGRADED_FOR:g}s "
            "after each)"
        )
    if bridge is not None and not bridge.counters.connected:
        reasons.append("not connected to NATS")
    return reasons


def _bridge(bridge: NatsBridge | None) -> dict | None:
    """The NATS bridge's state, or None without one."""
    if bridge is None:
        return None
    return {
        "origin": bridge.origin,
        "subject": bridge.subject,
        "servers": bridge.servers,
        "queued_bytes": bridge.queued,
        **asdict(bridge.counters),
    }


def _audit(factory: RelayFactory) -> dict | None:
    """The audit log's state, or None without one."""
    writeahead = factory.writeahead
    if writeahead is None:
        return None
    audit = writeahead.audit
    return {
        "directory": audit.directory,
        "records": audit.records,
        "chain_head": f"0x{audit.head:08x}",
        "fsync": writeahead.fsync_description,
        "pipelined": writeahead.pipelined,
        "failing": writeahead.failure,
        "write_failures": writeahead.failures,
        "held_frames": writeahead.held_frames,
    }


class RelayCollector:
    """Prometheus metrics read from the relay at each scrape."""

    def __init__(self, factory: RelayFactory, bridge: NatsBridge | None = None) -> None:
        self.factory = factory
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        factory = self.factory
        totals, gate, domain = factory.totals, factory.gate, factory.logic.name
        yield InfoMetricFamily(
            "torq_relay",
            "The relay's version and settings.",
            value={
                "version": __version__,
                "scan": "native" if scan.NATIVE else "python",
                "domain": domain,
                "delivery": factory.delivery.policy,
            },
        )
        yield from _metrics(domain, _counters(totals), _TOTALS_METRICS)
        rejects = CounterMetricFamily(
            "torq_relay_rejects", "Frames refused, by reason.", labels=["domain", "reason"]
        )
        for reason in REJECT_REASONS + tuple(set(totals.rejects) - set(REJECT_REASONS)):
            rejects.add_metric([domain, reason], totals.rejects[reason])
        yield rejects
        cut_offs = CounterMetricFamily(
            "torq_relay_disconnects",
            "Clients disconnected by the relay, by reason.",
            labels=["domain", "reason"],
        )
        for reason in (SLOW_CONSUMER, STALLED_CONSUMER, *totals.cut_offs):
            cut_offs.add_metric([domain, reason], totals.cut_offs[reason])
        yield cut_offs
        relay = {
            "pauses": gate.pauses,
            "paused_seconds": gate.paused_seconds,
            "clients": len(factory.clients),
            "buffered": sum(c.outbox.queued for c in factory.clients.values()),
        }
        yield from _metrics(domain, relay, _RELAY_METRICS)
        audit = _audit(factory)
        if audit is not None:
            yield from _metrics(domain, audit, _AUDIT_METRICS)
        bridge = _bridge(self.bridge)
        if bridge is not None:
            yield from _metrics(domain, bridge, _BRIDGE_METRICS)


#: The counters of L{_COUNTERS}: kind, name, help, key in L{_counters}.
_TOTALS_METRICS = tuple(
    (CounterMetricFamily, f"torq_relay_{name}", text, name) for name, text in _COUNTERS
)

#: The publisher gate's and the clients' metrics, as L{_TOTALS_METRICS}.
_RELAY_METRICS = (
    (
        CounterMetricFamily,
        "torq_relay_publisher_pauses",
        "Times the publishers were held back.",
        "pauses",
    ),
    (
        CounterMetricFamily,
        "torq_relay_publishers_paused_seconds",
        "Seconds the publishers were held back (block policy).",
        "paused_seconds",
    ),
    (GaugeMetricFamily, "torq_relay_clients", "Connected clients.", "clients"),
    (GaugeMetricFamily, "torq_relay_buffered_bytes", "Bytes queued for subscribers.", "buffered"),
)

#: The audit log's metrics, as L{_TOTALS_METRICS}, from L{_audit}.
_AUDIT_METRICS = (
    (GaugeMetricFamily, "torq_relay_audit_records", "Records in the audit log.", "records"),
    (
        CounterMetricFamily,
        "torq_relay_audit_write_failures",
        "Failed writes to the audit log (publishers held back meanwhile).",
        "write_failures",
    ),
    (
        GaugeMetricFamily,
        "torq_relay_audit_held_frames",
        "Accepted frames waiting for the audit log to be writable.",
        "held_frames",
    ),
)


#: The NATS bridge's metrics, as L{_AUDIT_METRICS}, from L{_bridge}.
_BRIDGE_METRICS = (
    (CounterMetricFamily, "torq_relay_nats_frames_out", "Frames published to NATS.", "frames_out"),
    (CounterMetricFamily, "torq_relay_nats_chunks_out", "NATS messages published.", "chunks_out"),
    (
        CounterMetricFamily,
        "torq_relay_nats_frames_in",
        "Frames received from other relays through NATS.",
        "frames_in",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_frames_dropped",
        "Frames not published to NATS: the bridge's queue was at its high-water mark.",
        "frames_dropped",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_slow_consumer",
        "NATS slow-consumer events: messages from NATS the client dropped.",
        "slow_consumer",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_malformed",
        "Messages from NATS with frames refused (the reasons are counted as client 0's).",
        "malformed",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_chunks_dropped",
        "Runs of frames not published to NATS (see frames_dropped).",
        "chunks_dropped",
    ),
    (CounterMetricFamily, "torq_relay_nats_chunks_in", "NATS messages received.", "chunks_in"),
    (
        CounterMetricFamily,
        "torq_relay_nats_echoes",
        "Messages of this relay's own origin, left out.",
        "echoes",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_failures",
        "Failures of a bridge task, logged and restarted.",
        "failures",
    ),
    (CounterMetricFamily, "torq_relay_nats_reconnects", "Reconnections to NATS.", "reconnects"),
    (
        CounterMetricFamily,
        "torq_relay_nats_retries",
        "JetStream messages published again for want of an acknowledgement.",
        "retries",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_duplicates",
        "Copies the stream or this relay's consumer left out (JetStream).",
        "duplicates",
    ),
    (
        CounterMetricFamily,
        "torq_relay_nats_stream_gaps",
        "Stream messages given up on: removed before this relay read them.",
        "stream_gaps",
    ),
    (GaugeMetricFamily, "torq_relay_nats_connected", "1 while connected to NATS.", "connected"),
    (
        GaugeMetricFamily,
        "torq_relay_nats_queued_bytes",
        "Bytes waiting to be published to NATS.",
        "queued_bytes",
    ),
)


def _metrics(domain: str, values: dict, table) -> Iterator[Metric]:
    for kind, name, text, key in table:
        metric = kind(name, text, labels=["domain"])
        metric.add_metric([domain], values[key])
        yield metric


class HealthResource(Resource):
    isLeaf = True

    def __init__(
        self, factory: RelayFactory, listening: list[str], bridge: NatsBridge | None = None
    ) -> None:
        super().__init__()
        self.factory = factory
        self.listening = listening
        self.bridge = bridge
        self.started_at = factory.clock.seconds()

    def render_GET(self, request: Request) -> bytes:
        """The health document; 503 unless ok, for load balancers and probes."""
        request.setHeader(b"content-type", b"application/json")
        body = health(self.factory, self.started_at, self.listening, self.bridge)
        if body["status"] != "ok":
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return json.dumps(body, indent=1).encode() + b"\n"


class MetricsResource(Resource):
    """
    The relay's metrics, the process's (C{process_*}) and, with an audit
    log, its fsync latency: this resource times the log's syncs from when
    it is made.
    """

    isLeaf = True

    def __init__(self, factory: RelayFactory, bridge: NatsBridge | None = None) -> None:
        super().__init__()
        self.registry = CollectorRegistry()
        self.registry.register(RelayCollector(factory, bridge))
        ProcessCollector(registry=self.registry)
        if factory.writeahead is not None:
            fsyncs = Histogram(
                "torq_relay_audit_fsync_seconds",
                "Time each fdatasync of the audit log took.",
                ["domain"],
                registry=self.registry,
                buckets=FSYNC_BUCKETS,
            )
            factory.writeahead.audit.sync_timer = fsyncs.labels(factory.logic.name).observe

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)


def status_root(
    factory: RelayFactory, listening: list[str], bridge: NatsBridge | None = None
) -> Resource:
    root = Resource()
    root.putChild(b"health", HealthResource(factory, listening, bridge))
    root.putChild(b"metrics", MetricsResource(factory, bridge))
    return root


class _QuietSite(Site):
    """A site that logs no request: a scraper every 15 s would be 5,760 lines a day."""

    def log(self, request: http.Request) -> None:
        pass


def status_site(
    factory: RelayFactory,
    listening: list[str],
    bridge: NatsBridge | None = None,
    *,
    access_log: bool = False,
) -> Site:
    """
    The web site serving C{/health} and C{/metrics} for C{factory} (and its
    C{bridge}), logging each request only if C{access_log}.
    """
    site = (Site if access_log else _QuietSite)(status_root(factory, listening, bridge))
    site.displayTracebacks = False
    site.noisy = False
    return site
