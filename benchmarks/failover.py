"""
What a NATS node failure costs the execution stream between two hosts: two
execution relays bridged through a 3-node NATS cluster (relay A on node 1,
relay B on node 3), orders published on A at a steady rate, node 1 killed
with SIGKILL part-way. Every order is verified at B's subscriber (count,
order, bytes); the report gives the longest time B's subscriber went without
an order, and what A's bridge did meanwhile.

    python -m benchmarks.failover [--rate 5000] [--count 40000] [--kill-at 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request

from twisted_relay.client import BlockingClient
from twisted_relay.testing import (
    NatsCluster,
    RelayProcess,
    bridged_relay,
    orders,
    start_bridged,
)


def start(workdir: str, cluster: NatsCluster, name: str, node: int) -> tuple[str, str, RelayProcess]:
    path, url, relay = bridged_relay(
        cluster, workdir, name, node, "execution",
        "--audit-dir", os.path.join(workdir, f"{name}-audit"),
    )
    start_bridged(relay)
    return path, url, relay


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5000, help="orders per second")
    parser.add_argument("--count", type=int, default=40_000)
    parser.add_argument("--kill-at", type=float, default=2.0, help="seconds into the run")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="trf-", dir="/tmp")
    cluster = NatsCluster(workdir).start()
    relays = []
    try:
        path_a, url_a, relay_a = start(workdir, cluster, "hostA", 0)
        path_b, _, relay_b = start(workdir, cluster, "hostB", 2)
        relays = [relay_a, relay_b]
        frames = orders(args.count)
        arrivals: list[tuple[float, bytes]] = []
        with BlockingClient(path_a) as publisher, BlockingClient(path_b) as far:
            publisher.introduce(publish_only=True)
            far.introduce()

            def receive() -> None:
                for _, frame in far.frames(timeout=60):
                    arrivals.append((time.monotonic(), frame))
                    if len(arrivals) == args.count:
                        return

            reading = threading.Thread(target=receive)
            reading.start()
            started = time.monotonic()
            killed_at = None
            batch = max(1, int(args.rate / 200))
            for n in range(0, args.count, batch):
                if killed_at is None and time.monotonic() - started >= args.kill_at:
                    cluster.nodes[0].kill()
                    killed_at = time.monotonic()
                publisher.publish(b"".join(frames[n : n + batch]))
                ahead = started + (n + batch) / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            reading.join(120)
        with urllib.request.urlopen(f"{url_a}/health", timeout=10) as response:
            bridge = json.load(response)["nats"]
    finally:
        for relay in relays:
            relay.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    times = [t for t, _ in arrivals]
    gaps = [b - a for a, b in zip(times, times[1:])]
    stall = max(gaps, default=0.0)
    report = {
        "orders": args.count,
        "rate": args.rate,
        "verified": [frame for _, frame in arrivals] == frames,
        "received": len(arrivals),
        "longest_stall_s": round(stall, 3),
        "stall_started_after_kill_s": (
            round(times[gaps.index(stall) if gaps else 0] - killed_at, 3)
            if killed_at and times
            else None
        ),
        "publisher_retries": bridge["retries"],
        "stream_duplicates_dropped": bridge["duplicates"],
        "reconnects": bridge["reconnects"],
    }
    print(json.dumps(report))
    return 0 if report["verified"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
