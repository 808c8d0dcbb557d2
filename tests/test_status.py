"""
Tests for L{twisted_relay.app.status}: /health and /metrics, through treq's
StubTreq on the resources (no port), and on a real relay process with treq.
"""

from __future__ import annotations

import json
import signal
import time

import pytest_twisted
import treq
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay import __version__, scan
from twisted_relay.app import status
from twisted_relay.app.status import status_root
from twisted_relay.client import BlockingClient
from twisted_relay.engine.delivery import DeliverySettings
from twisted_relay.wire import Domain

from .helpers import audited_relay, connect, frames_for, make_relay


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = make_relay(
            delivery=DeliverySettings("drop", high_water=100, low_water=10)
        )
        self.treq = StubTreq(status_root(self.relay, ["unix:/tmp/torq/market_data.sock"]))
        self.publisher, self.subscriber = connect(self.relay), connect(self.relay)

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.treq.get(f"http://relay{path}", headers=headers))
        self.headers = response.headers
        return response.code, self.successResultOf(response.content())

    def test_health(self) -> None:
        """/health gives the domain, endpoints, clients with their counters, and totals."""
        frames = frames_for(Domain.MARKET_DATA, 3)
        self.publisher.dataReceived(b"".join(frames) + frames_for(Domain.SIGNAL, 1)[0])
        self.relay.clock.advance(7)
        code, body = self.get("/health")
        self.assertEqual(code, 200)
        health = json.loads(body)
        self.assertEqual(
            (health["status"], health["domain"], health["relay_domain"], health["uptime_s"]),
            ("ok", "market", 1, 7),
        )
        self.assertEqual((health["reasons"], health["clients_omitted"]), ([], 0))
        self.assertEqual(health["listening"], ["unix:/tmp/torq/market_data.sock"])
        publisher, subscriber = health["clients"]
        self.assertEqual((publisher["id"], publisher["frames_in"]), (1, 3))
        self.assertEqual(publisher["rejects"], {"filtered": 1})
        self.assertEqual(subscriber["frames_out"], 3)
        self.assertEqual(health["totals"]["bytes_out"], sum(map(len, frames)))

    def test_degradedWhileDropping(self) -> None:
        """Drops make the relay degraded (503, with the reason), for a minute after the last one."""
        self.subscriber.outbox.pauseProducing()
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 5)))
        self.relay.clock.advance(2)
        code, body = self.get("/health")
        health = json.loads(body)
        self.assertEqual((code, health["status"]), (503, "degraded"))
        self.assertEqual(
            health["reasons"], ["frames dropped for client 2, 2s ago (degraded for 60s after each)"]
        )
        self.relay.clock.advance(59)
        code, body = self.get("/health")
        self.assertEqual((code, json.loads(body)["reasons"]), (200, []))

    def test_degradedWhilePublishersHeldBack(self) -> None:
        """Under the block policy a subscriber over its mark holds the publishers: 503, saying which."""
        relay = make_relay(
            Domain.EXECUTION, delivery=DeliverySettings("block", high_water=100, low_water=10)
        )
        publisher, subscriber = connect(relay), connect(relay)
        subscriber.outbox.pauseProducing()
        publisher.dataReceived(b"".join(frames_for(Domain.EXECUTION, 3)))
        self.treq = StubTreq(status_root(relay, []))
        code, body = self.get("/health")
        health = json.loads(body)
        self.assertEqual((code, health["status"]), (503, "degraded"))
        [reason] = health["reasons"]
        self.assertRegex(
            reason, r"^publishers held back: client 2 is over the high-water mark \(\d+ bytes"
        )
        subscriber.outbox.resumeProducing()
        self.assertEqual(self.get("/health")[0], 200)

    def test_stopping(self) -> None:
        """While the relay drains its clients at shutdown, /health answers 503 "stopping"."""
        self.relay.drain(5)
        code, body = self.get("/health")
        health = json.loads(body)
        self.assertEqual((code, health["status"]), (503, "stopping"))
        self.assertEqual(health["reasons"], ["draining the clients"])

    def test_clientsBounded(self) -> None:
        """/health lists the busiest clients, in connection order, and counts the others."""
        self.patch(status, "HEALTH_CLIENTS", 2)
        quiet = connect(self.relay)
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 3)))
        quiet.outbox.pauseProducing()  # it receives nothing: the least busy
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 3)))
        health = json.loads(self.get("/health")[1])
        self.assertEqual([client["id"] for client in health["clients"]], [1, 2])
        self.assertEqual(health["clients_omitted"], 1)

    def test_metrics(self) -> None:
        """/metrics is a Prometheus exposition of the live counters."""
        self.publisher.dataReceived(
            b"".join(frames_for(Domain.MARKET_DATA, 4)) + frames_for(Domain.SIGNAL, 1)[0]
        )
        code, body = self.get("/metrics")
        self.assertEqual(code, 200)
        values = samples(body.decode())
        market = (("domain", "market"),)
        self.assertEqual(values[("torq_relay_frames_in_total", market)], 4)
        self.assertEqual(values[("torq_relay_frames_out_total", market)], 4)
        self.assertEqual(
            values[("torq_relay_rejects_total", (("domain", "market"), ("reason", "filtered")))], 1
        )
        self.assertEqual(
            values[("torq_relay_rejects_total", (("domain", "market"), ("reason", "bad_magic")))], 0
        )
        self.assertEqual(values[("torq_relay_clients", market)], 2)
        self.assertEqual(values[("torq_relay_buffered_bytes", market)], 0)

    def test_infoAndProcess(self) -> None:
        """/metrics has the relay's version and settings, and the process's own metrics."""
        values = samples(self.get("/metrics")[1].decode())
        info = (
            ("delivery", "drop"),
            ("domain", "market"),
            ("scan", "native" if scan.NATIVE else "python"),
            ("version", __version__),
        )
        self.assertEqual(values[("torq_relay_info", info)], 1)
        self.assertGreater(values[("process_open_fds", ())], 0)
        self.assertGreater(values[("process_resident_memory_bytes", ())], 0)
        self.assertLessEqual(values[("process_start_time_seconds", ())], time.time())
        self.assertIn(("process_cpu_seconds_total", ()), values)

    def test_contentNegotiation(self) -> None:
        """A scraper asking for OpenMetrics gets it; any other gets the classic text format."""
        code, body = self.get(
            "/metrics", accept="application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"
        )
        self.assertEqual(code, 200)
        [kind] = self.headers.getRawHeaders("content-type")
        self.assertTrue(kind.startswith("application/openmetrics-text; version=1.0.0"), kind)
        self.assertTrue(body.endswith(b"# EOF\n"))
        families = {f.name: f for f in openmetrics_families(body.decode())}
        self.assertEqual(families["torq_relay_clients"].samples[0].value, 2)
        for accept in ({}, {"accept": "text/plain;version=0.0.4"}):
            body = self.get("/metrics", **accept)[1]
            [kind] = self.headers.getRawHeaders("content-type")
            self.assertEqual(kind, "text/plain; version=0.0.4; charset=utf-8")
            self.assertNotIn(b"# EOF", body)


class FsyncHistogramTests(SynchronousTestCase):
    def test_fsyncsTimed(self) -> None:
        """Every sync of the audit log is one observation of the fsync histogram."""
        relay = audited_relay(self)
        site = StubTreq(status_root(relay, []))
        publisher, _ = connect(relay), connect(relay)
        for n in range(3):
            publisher.dataReceived(frames_for(Domain.EXECUTION, 3)[n])
        response = self.successResultOf(site.get("http://relay/metrics"))
        values = samples(self.successResultOf(response.content()).decode())
        execution = (("domain", "execution"),)
        self.assertEqual(values[("torq_relay_audit_fsync_seconds_count", execution)], 3)
        self.assertEqual(
            values[("torq_relay_audit_fsync_seconds_bucket", (*execution, ("le", "+Inf")))], 3
        )
        self.assertGreater(values[("torq_relay_audit_fsync_seconds_sum", execution)], 0)


@pytest_twisted.ensureDeferred
async def test_status_of_a_real_relay(http_relay):
    """A real relay started with --http serves /health and /metrics."""
    path, url = http_relay("signal")
    with BlockingClient(path) as subscriber, BlockingClient(path) as publisher:
        frames = frames_for(Domain.SIGNAL, 10)
        publisher.publish(b"".join(frames))
        assert len(subscriber.receive(10, timeout=10)) == 10
        health = json.loads(await (await treq.get(f"{url}/health")).text())
        assert health["domain"] == "signal" and health["status"] == "ok"
        assert [c["frames_in"] for c in health["clients"]] == [0, 10]
        response = await treq.get(f"{url}/metrics")
        assert response.code == 200
        values = samples(await response.text())
        assert values[("torq_relay_frames_out_total", (("domain", "signal"),))] == 10


@pytest_twisted.ensureDeferred
async def test_audit_in_status(http_relay):
    """An execution relay reports its audit log in /health and /metrics."""
    path, url = http_relay("execution")
    with BlockingClient(path) as subscriber, BlockingClient(path) as publisher:
        publisher.publish(b"".join(frames_for(Domain.EXECUTION, 7)))
        assert len(subscriber.receive(7, timeout=10)) == 7
        health = json.loads(await (await treq.get(f"{url}/health")).text())
        audit = health["audit"]
        assert (audit["records"], audit["fsync"], audit["failing"]) == (7, "always", None)
        assert audit["pipelined"] is True
        values = samples(await (await treq.get(f"{url}/metrics")).text())
        execution = (("domain", "execution"),)
        assert values[("torq_relay_audit_records", execution)] == 7
        assert values[("torq_relay_audit_write_failures_total", execution)] == 0
        assert values[("torq_relay_audit_held_frames", execution)] == 0
        # One sync per batch, with --audit-fsync always: at least one, at most one a frame.
        assert 1 <= values[("torq_relay_audit_fsync_seconds_count", execution)] <= 7
        assert values[("process_open_fds", ())] > 0


async def until(url: str, check, timeout: float = 10.0) -> tuple[int, dict]:
    """
    The first answer of /health that C{check(code, health)} passes, polled
    for C{timeout}s, each on a new connection, as a load balancer's probe.
    """
    deadline = time.monotonic() + timeout
    while True:
        response = await treq.get(f"{url}/health", persistent=False)
        health = json.loads(await response.text())
        if check(response.code, health):
            return response.code, health
        assert time.monotonic() < deadline, health
        await deferLater(reactor, 0.1)


@pytest_twisted.ensureDeferred
async def test_degraded_real_relay(http_relay):
    """A real market relay dropping frames for a subscriber that reads nothing answers 503 degraded."""
    path, url = http_relay("market", "--high-water", "65536")
    with BlockingClient(path), BlockingClient(path) as publisher:
        await until(url, lambda code, health: len(health["clients"]) == 2)
        publisher.publish(b"".join(frames_for(Domain.MARKET_DATA, 20_000)))
        code, health = await until(url, lambda code, health: code != 200)
        assert (code, health["status"]) == (503, "degraded")
        assert health["reasons"][0].startswith("frames dropped for client 1, ")
        assert health["totals"]["frames_dropped"] > 0


@pytest_twisted.ensureDeferred
async def test_stopping_real_relay(http_relay):
    """A real relay draining a stuck subscriber after SIGTERM answers 503 stopping, then exits."""
    path, url = http_relay("market", "--drain-timeout", "3")
    relay = http_relay.relay
    with BlockingClient(path), BlockingClient(path) as publisher:
        await until(url, lambda code, health: len(health["clients"]) == 2)
        publisher.publish(b"".join(frames_for(Domain.MARKET_DATA, 20_000)))
        await until(url, lambda code, health: health["totals"]["frames_in"] == 20_000)
        relay.process.send_signal(signal.SIGTERM)
        code, health = await until(url, lambda code, health: code != 200)
        assert (code, health["status"]) == (503, "stopping")
        assert health["reasons"] == ["draining the clients"]
        assert relay.wait_exit() == -signal.SIGTERM  # twistd ends by the signal it got
        assert "stopped: 20000 frames accepted" in relay.log()
