"""
Tests for L{twisted_relay.app.status}: /health and /metrics, through treq's
StubTreq on the resources (no port), and on a real relay process with treq.
"""

from __future__ import annotations

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app.status import status_root
from twisted_relay.engine.delivery import DeliverySettings
from twisted_relay.wire import Domain

from .helpers import connect, frames_for, make_relay


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

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.treq.get(f"http://relay{path}"))
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
        self.assertEqual(health["listening"], ["unix:/tmp/torq/market_data.sock"])
        publisher, subscriber = health["clients"]
        self.assertEqual((publisher["id"], publisher["frames_in"]), (1, 3))
        self.assertEqual(publisher["rejects"], {"filtered": 1})
        self.assertEqual(subscriber["frames_out"], 3)
        self.assertEqual(health["totals"]["bytes_out"], sum(map(len, frames)))

    def test_degradedWhileDropping(self) -> None:
        """Drops make the relay degraded, for a minute after the last one."""
        self.subscriber.outbox.pauseProducing()
        self.publisher.dataReceived(b"".join(frames_for(Domain.MARKET_DATA, 5)))
        self.assertEqual(json.loads(self.get("/health")[1])["status"], "degraded")
        self.relay.clock.advance(61)
        self.assertEqual(json.loads(self.get("/health")[1])["status"], "ok")

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


@pytest_twisted.ensureDeferred
async def test_status_of_a_real_relay(http_relay):
    """A real relay started with --http serves /health and /metrics."""
    path, url = http_relay("signal")
    from twisted_relay.client import BlockingClient

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
    from twisted_relay.client import BlockingClient

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
