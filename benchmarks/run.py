"""
Run the relay benchmark: the real relay (C{twistd -n relay}) and the two
baselines, each in its own process, with one publisher process and N
subscriber processes on Unix sockets. Every subscriber verifies every frame;
a case that loses, reorders or corrupts anything is reported as FAILED, not
as a number.

    python -m benchmarks.run                 # the full matrix (several minutes)
    python -m benchmarks.run --smoke         # seconds: checks the harness works
    python -m benchmarks.run --only market:64:4 --only latency --only bridge

Results are printed as a Markdown table and, with --json FILE, saved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import twisted
from twisted_relay.domains import find_domain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120.0
TICKS = os.sysconf("SC_CLK_TCK")

#: Frames per run by frame size: about 1-3 s of work for the relay.
COUNTS = {64: 2_000_000, 128: 1_500_000, 1024: 300_000}


@dataclass
class Case:
    relay: str  # "relay", "floor" or "ceiling"
    domain: str
    size: int
    subscribers: int
    count: int
    rate: int | None = None
    #: The audit log: None for the domain's default, "off", or an --audit-fsync value.
    audit: str | None = None
    result: dict = field(default_factory=dict)

    @property
    def fsync(self) -> str | None:
        """The relay's --audit-fsync; C{None}: it keeps no audit log."""
        if self.audit == "off" or (self.audit is None and not find_domain(self.domain).audit):
            return None
        return self.audit or "always"

    @property
    def audited(self) -> str:
        """The audit log as the report shows it."""
        if self.fsync is None:
            return "off" if self.audit == "off" else "-"
        return "fsync always" if self.fsync == "always" else f"fsync {self.fsync} ms"

    @property
    def name(self) -> str:
        kind = f"latency@{self.rate}/s" if self.rate else "throughput"
        audit = f" audit {self.audit}" if self.audit else ""
        return f"{self.relay} {self.domain} {self.size}B x{self.subscribers}{audit} {kind}"


def relay_command(case: Case, path: str, audit_dir: str) -> list[str]:
    if case.relay == "relay":
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if case.fsync is not None:
            audit = ["--audit-dir", audit_dir, "--audit-fsync", case.fsync]
        else:
            audit = ["--no-audit"] if case.audit == "off" else []
        # Lossless for the measurement: every frame must arrive to be verified.
        # No heartbeats: the subscribers verify a stream of published frames
        # only (heartbeats go to idle clients alone, so they cost nothing here).
        return [
            twistd, "-n", "--pidfile=", "relay", "--domain", case.domain,
            "--listen", f"unix:{path}", "--slow-consumer", "block",
            "--stall-timeout", "60", "--stats-interval", "0", "--heartbeat", "0", *audit,
        ]
    return [sys.executable, "-m", f"benchmarks.baselines.{case.relay}", f"unix:{path}"]


def read_json(process: subprocess.Popen, timeout: float = TIMEOUT) -> dict:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{process.args[2:4]} gave no answer within {timeout}s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{process.args[2:4]} exited with {process.wait()}")
    return json.loads(line)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def wait_connectable(path: str, relay: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if relay.poll() is not None:
            raise RuntimeError(f"relay exited with {relay.returncode}")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    raise RuntimeError("relay did not listen within 30s")


def peer(role: str, case: Case, path: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "benchmarks.peers", role, path,
            "--domain-name", case.domain, "--size", str(case.size), "--count", str(case.count),
            *extra,
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def start_relay(command: list[str], path: str, workdir: str, name: str) -> subprocess.Popen:
    log = open(os.path.join(workdir, f"{name}.log"), "wb")
    relay = subprocess.Popen(
        command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    log.close()
    try:
        wait_connectable(path, relay)
    except BaseException:
        relay.kill()
        relay.wait()
        raise
    return relay


def wait_for_route_interest(node, subject: str) -> None:
    """Until C{node} has learnt, over its routes, of a subscription to C{subject}."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        routes = node.monitoring("/routez?subs=1")["routes"]
        if any(subject in (route.get("subscriptions_list") or ()) for route in routes):
            return
        time.sleep(0.05)
    raise RuntimeError(f"no interest in {subject} reached {node.name} within 30s")


def start_relays(case: Case, workdir: str, cluster) -> tuple[str, str, list[subprocess.Popen]]:
    """
    The relay processes of C{case}: the publisher's socket, the subscribers'
    socket, and the processes. A bridge case runs two relays bridged through
    NATS nodes 1 and 3 (as if on two hosts): the publisher on the first, the
    subscribers on the second.
    """
    audit_dir = tempfile.mkdtemp(prefix="audit-", dir=workdir)
    if case.relay != "bridge":
        path = os.path.join(workdir, f"{case.relay}.sock")
        return path, path, [start_relay(relay_command(case, path, audit_dir), path, workdir, case.relay)]
    processes, paths = [], []
    try:
        for name, node in (("benchA", 0), ("benchB", 2)):
            path = os.path.join(workdir, f"{name}.sock")
            command = relay_command(Case("relay", case.domain, case.size, 0, 0), path, audit_dir)
            command += ["--nats", cluster.urls(node), "--relay-id", name]
            command += ["--nats-high-water", str(1 << 30)]
            processes.append(start_relay(command, path, workdir, name))
            paths.append(path)
        wait_for_route_interest(cluster.nodes[0], f"torq.{case.domain}.>")
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        raise
    return paths[0], paths[1], processes


def run_case(case: Case, workdir: str) -> dict:
    cluster = None
    if case.relay == "bridge":
        from twisted_relay.testing import NatsCluster

        cluster = NatsCluster(tempfile.mkdtemp(prefix="nats-", dir=workdir)).start()
    processes: list[subprocess.Popen] = []
    try:
        publish_path, subscribe_path, relays = start_relays(case, workdir, cluster)
        processes += relays
        extra = ["--latency"] if case.rate else []
        subscribers = [peer("subscribe", case, subscribe_path, *extra) for _ in range(case.subscribers)]
        processes += subscribers
        for subscriber in subscribers:
            read_json(subscriber)
        publisher = peer(
            "publish", case, publish_path, *(["--rate", str(case.rate)] if case.rate else [])
        )
        processes.append(publisher)
        read_json(publisher)
        time.sleep(0.2)  # let the relay accept every connection before data flows
        cpu_before = sum(cpu_seconds(relay.pid) for relay in relays)
        publisher.stdin.write(b"go\n")
        publisher.stdin.flush()
        published = read_json(publisher)
        received = [read_json(subscriber) for subscriber in subscribers]
        cpu = sum(cpu_seconds(relay.pid) for relay in relays) - cpu_before
        rss = max(peak_rss_mib(relay.pid) for relay in relays)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        if cluster is not None:
            cluster.stop()
        for name in os.listdir(workdir):
            if name.startswith(("audit-", "nats-")):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    log_name = "benchA" if case.relay == "bridge" else case.relay
    with open(os.path.join(workdir, f"{log_name}.log"), errors="replace") as f:
        scan = re.search(r"scan (native|pure Python)", f.read())
    started = published["started_ns"]
    verified = all(
        r["verified"] and r["crc"] == published["crc"] and r["frames"] == case.count
        for r in received
    )
    slowest = max(r["last_ns"] for r in received) - started
    result = {
        "verified": verified,
        "msg_per_s": case.count / (slowest / 1e9),
        "mb_per_s": case.count * case.size / (slowest / 1e9) / 1e6,
        "relay_cpu_s": cpu,
        "relay_peak_rss_mib": rss,
    }
    if scan:
        result["scan"] = scan[1]
    if case.rate:
        result["latency_us"] = {
            key: max(r["latency_us"][key] for r in received)
            for key in ("p50", "p99", "p99.9", "max")
        }
    return result


def median_of(case: Case, workdir: str, repeat: int) -> dict:
    """
    The run with the median throughput of C{repeat} runs; if any run fails
    verification, that failure is the result.
    """
    runs = []
    for _ in range(repeat):
        try:
            result = run_case(case, workdir)
        except RuntimeError as e:
            result = {"verified": False, "error": str(e)}
        if not result["verified"]:
            return result
        runs.append(result)
    runs.sort(key=lambda r: r["msg_per_s"])
    return {**runs[len(runs) // 2], "runs_msg_per_s": [round(r["msg_per_s"]) for r in runs]}


def matrix(smoke: bool) -> list[Case]:
    scale = 200 if smoke else 1
    cases = []
    sizes = (64,) if smoke else (64, 128, 1024)
    fan_outs = (4,) if smoke else (1, 4, 8)
    for size in sizes:
        count = COUNTS[size] // scale
        for subscribers in fan_outs:
            for relay in ("floor", "ceiling"):
                cases.append(Case(relay, "market", size, subscribers, count))
            for domain in ("market", "signal", "execution"):
                cases.append(Case("relay", domain, size, subscribers, count))
    # The execution relay's throughput under each audit log setting.
    count = COUNTS[128] // scale
    for audit in ("off", "10", "always"):
        cases.append(Case("relay", "execution", 128, 4, count, audit=audit))
    rate, seconds = 100_000, (0.2 if smoke else 5)
    # "bridge": host to host, two relays bridged through a 3-node NATS cluster.
    for relay in ("relay", "floor", "ceiling", "bridge"):
        cases.append(Case(relay, "market", 64, 4, int(rate * seconds), rate=rate))
    if not smoke:
        # Throughput host to host, paced: core NATS is at most once, and an
        # unpaced publisher starves relay B of CPU on 2 cores until its NATS
        # server cuts it off as a slow consumer.
        for rate in (1_000_000, 2_000_000, 3_000_000):
            cases.append(Case("bridge", "market", 128, 1, 2 * rate, rate=rate))
    return cases


def selected(case: Case, only: list[str]) -> bool:
    if not only:
        return True
    for spec in only:
        if spec == "bridge" and case.relay == "bridge":
            return True
        if spec == "latency" and case.rate and case.relay != "bridge":
            return True
        parts = spec.split(":")
        if not case.rate and parts == [case.domain, str(case.size), str(case.subscribers)][: len(parts)]:
            return True
    return False


def report(cases: list[Case]) -> str:
    def ratio(case: Case, baseline: str) -> str:
        for other in cases:
            if (other.relay, other.size, other.subscribers, other.rate) == (
                baseline, case.size, case.subscribers, case.rate
            ) and other.result.get("verified"):
                return f"{case.result['msg_per_s'] / other.result['msg_per_s']:.2f}"
        return "-"

    lines = [
        "| relay | domain | audit log | frame | subs | msg/s per sub (min) | MB/s per sub | "
        "x floor | x ceiling | relay CPU s | relay peak RSS MiB | verified |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        if case.rate:
            continue
        r = case.result
        if not r.get("verified"):
            lines.append(
                f"| {case.relay} | {case.domain} | {case.audited} | {case.size} | "
                f"{case.subscribers} | FAILED {r.get('error', '')} | | | | | | no |"
            )
            continue
        lines.append(
            f"| {case.relay} | {case.domain} | {case.audited} | {case.size} | {case.subscribers} | "
            f"{r['msg_per_s']:,.0f} | {r['mb_per_s']:.1f} | {ratio(case, 'floor')} | "
            f"{ratio(case, 'ceiling')} | {r['relay_cpu_s']:.2f} | "
            f"{r['relay_peak_rss_mib']:.0f} | yes |"
        )
    latency = [c for c in cases if c.rate]
    if latency:
        lines += [
            "",
            "| relay | domain | frame | subs | rate msg/s | p50 µs | p99 µs | p99.9 µs | max µs | verified |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for case in latency:
            r = case.result
            if not r.get("verified"):
                lines.append(
                    f"| {case.relay} | {case.domain} | {case.size} | {case.subscribers} | "
                    f"{case.rate:,} | FAILED | | | | no |"
                )
                continue
            lat = r["latency_us"]
            lines.append(
                f"| {case.relay} | {case.domain} | {case.size} | {case.subscribers} | "
                f"{case.rate:,} | {lat['p50']:.0f} | {lat['p99']:.0f} | {lat['p99.9']:.0f} | "
                f"{lat['max']:.0f} | yes |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one case per kind")
    parser.add_argument("--only", action="append", default=[],
                        help="DOMAIN[:SIZE[:SUBS]] or 'latency'; repeatable")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is kept")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cases = [case for case in matrix(args.smoke) if selected(case, args.only)]
    workdir = tempfile.mkdtemp(prefix="trb-", dir="/tmp")
    try:
        for case in cases:
            print(f"running {case.name} ({case.count:,} frames)", file=sys.stderr, flush=True)
            case.result = median_of(case, workdir, 1 if args.smoke else args.repeat)
            print(f"  {json.dumps(case.result)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    scans = {case.result["scan"] for case in cases if "scan" in case.result}
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Twisted {twisted.__version__}; relay scan: "
        f"{', '.join(sorted(scans)) or 'unknown'}"
    )
    print(report(cases))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**case.__dict__} for case in cases], f, indent=1)
    return 0 if all(case.result.get("verified") for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
