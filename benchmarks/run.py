"""
Run the relay benchmark: the real relay (C{twistd -n relay}), the baselines
and the peers, each in its own process, with one publisher process and N
subscriber processes. Every subscriber verifies every frame; a case that
loses, reorders or corrupts anything is reported as FAILED, not as a number.

 - C{floor}, C{ceiling} (L{benchmarks.baselines}): a naive Twisted relay,
   and a Twisted forwarder that reads and writes as the relay does without
   looking at the bytes;
 - C{direct}: no relay at all: the publisher writes to each subscriber's own
   socket (L{benchmarks.peers});
 - C{nats}, C{zeromq}, C{redis}: message brokers, with peers of their own
   under the same checks (L{benchmarks.brokers}); a broker that is not
   installed is skipped, with a note.

A relay faster than the ceiling or than direct of its case is a fault of the
harness, and said so in a warning.

    python -m benchmarks.run                 # the full matrix (several minutes)
    python -m benchmarks.run --smoke         # seconds: checks the harness works
    python -m benchmarks.run --only market:64:4 --only latency --only bridge
    python -m benchmarks.run --only market:64:4 --no-peers

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
from benchmarks import brokers
from twisted_relay.domains import find_domain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120.0
TICKS = os.sysconf("SC_CLK_TCK")

#: Frames per run by frame size: about 1-3 s of work for the relay.
COUNTS = {64: 2_000_000, 128: 1_500_000, 1024: 300_000}
#: The rows each relay row is measured against: the baselines, then the peers.
BASELINES = ("floor", "ceiling", "direct")
PEERS = brokers.KINDS
#: The rows a relay row must not be faster than.
BOUNDS = ("ceiling", "direct")
#: What marks a relay row faster than one of its BOUNDS.
OVER = "⚠"


@dataclass
class Case:
    relay: str  # "relay", "bridge", one of BASELINES or one of PEERS
    domain: str
    size: int
    subscribers: int
    count: int
    rate: int | None = None
    #: The audit log: None for the domain's default, "off", or an --audit-fsync value.
    audit: str | None = None
    #: The relay on its pure-Python loops (TWISTED_RELAY_PURE_PYTHON=1).
    python: bool = False
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
    def label(self) -> str:
        """The relay column of the report."""
        return f"{self.relay} (pure Python)" if self.python else self.relay

    @property
    def name(self) -> str:
        kind = f"latency@{self.rate}/s" if self.rate else "throughput"
        audit = f" audit {self.audit}" if self.audit else ""
        return f"{self.label} {self.domain} {self.size}B x{self.subscribers}{audit} {kind}"


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
        python = ["env", "TWISTED_RELAY_PURE_PYTHON=1"] if case.python else []
        return [
            *python, twistd, "-n", "--pidfile=", "relay", "--domain", case.domain,
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


def wait_connectable(address: str, server: subprocess.Popen) -> None:
    """Until C{server} accepts at C{address}: a Unix socket path or C{tcp:HOST:PORT}."""
    if address.startswith("tcp:"):
        _, host, port = address.split(":")
        family, target = socket.AF_INET, (host, int(port))
    else:
        family, target = socket.AF_UNIX, address
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[0]} exited with {server.returncode}")
        probe = socket.socket(family)
        try:
            probe.connect(target)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    raise RuntimeError(f"{server.args[0]} did not listen within 30s")


def peer_command(module: str, case: Case, role: str, *arguments: str) -> list[str]:
    """The command of a publisher or a subscriber of C{case}, in C{module}."""
    return [
        sys.executable, "-m", module, role, *arguments,
        "--domain-name", case.domain, "--size", str(case.size), "--count", str(case.count),
    ]


def start_peer(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def start_relay(command: list[str], address: str, workdir: str, name: str) -> subprocess.Popen:
    """Start a relay, a baseline or a broker, logging to C{name}.log, and wait until it listens."""
    log = open(os.path.join(workdir, f"{name}.log"), "wb")
    relay = subprocess.Popen(
        command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    log.close()
    try:
        wait_connectable(address, relay)
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


@dataclass
class Setup:
    """One run of a case: its servers (what CPU and RSS are measured of), and its peers."""

    servers: list[subprocess.Popen]
    subscribers: list[list[str]]
    publisher: list[str]
    #: The log that says the relay's scan and reactor, if it runs on Twisted.
    log: str | None = None


def set_up(case: Case, workdir: str, cluster) -> Setup:
    """Start the servers of C{case}; the commands of its peers."""
    latency = ["--latency"] if case.rate else []
    rate = ["--rate", str(case.rate)] if case.rate else []
    count = case.subscribers
    if case.relay in PEERS:
        broker = brokers.broker(case.relay, workdir)
        server = start_relay(broker.command, broker.probe, workdir, case.relay)
        return Setup(
            [server],
            [peer_command("benchmarks.brokers", case, "subscribe", case.relay, broker.address)]
            * count,
            peer_command("benchmarks.brokers", case, "publish", case.relay, broker.address),
        )
    if case.relay == "direct":
        paths = [os.path.join(workdir, f"direct-{i}.sock") for i in range(count)]
        return Setup(
            [],
            [
                peer_command("benchmarks.peers", case, "subscribe", path, "--listen", *latency)
                for path in paths
            ],
            peer_command("benchmarks.peers", case, "publish", *paths, "--direct", *rate),
        )
    publish_path, subscribe_path, relays = start_relays(case, workdir, cluster)
    return Setup(
        relays,
        [peer_command("benchmarks.peers", case, "subscribe", subscribe_path, *latency)] * count,
        peer_command("benchmarks.peers", case, "publish", publish_path, *rate),
        os.path.join(workdir, "benchA.log" if case.relay == "bridge" else f"{case.relay}.log"),
    )


def run_case(case: Case, workdir: str) -> dict:
    cluster = None
    if case.relay == "bridge":
        from twisted_relay.testing import NatsCluster

        cluster = NatsCluster(tempfile.mkdtemp(prefix="nats-", dir=workdir)).start()
    processes: list[subprocess.Popen] = []
    try:
        setup = set_up(case, workdir, cluster)
        servers = setup.servers
        processes += servers
        subscribers = [start_peer(command) for command in setup.subscribers]
        processes += subscribers
        for subscriber in subscribers:
            read_json(subscriber)
        publisher = start_peer(setup.publisher)
        processes.append(publisher)
        read_json(publisher)
        time.sleep(0.2)  # let the relay accept every connection before data flows
        cpu_before = sum(cpu_seconds(server.pid) for server in servers)
        publisher.stdin.write(b"go\n")
        publisher.stdin.flush()
        published = read_json(publisher)
        received = [read_json(subscriber) for subscriber in subscribers]
        cpu = sum(cpu_seconds(server.pid) for server in servers) - cpu_before
        rss = max((peak_rss_mib(server.pid) for server in servers), default=None)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        if cluster is not None:
            cluster.stop()
        for name in os.listdir(workdir):
            if name.startswith(("audit-", "nats-", "zmq", "direct-")):
                path = os.path.join(workdir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
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
        "relay_cpu_s": cpu if servers else None,
        "relay_peak_rss_mib": rss,
    }
    if setup.log is not None:
        with open(setup.log, errors="replace") as f:
            log = f.read()
        if scan := re.search(r"scan (native|pure Python)", log):
            result["scan"] = scan[1]
        if reactor := re.search(r"reactor class: \S*?(\w+)\.$", log, re.MULTILINE):
            result["reactor"] = reactor[1]
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
            # The brokers do not look at the domain: they carry market frames.
            for relay in (*BASELINES, *PEERS):
                cases.append(Case(relay, "market", size, subscribers, count))
            for domain in ("market", "signal", "execution"):
                cases.append(Case("relay", domain, size, subscribers, count))
    # The execution relay's throughput under each audit log setting.
    count = COUNTS[128] // scale
    for audit in ("off", "10", "always"):
        cases.append(Case("relay", "execution", 128, 4, count, audit=audit))
    # The pure-Python fallback, at an eighth of the frames: it is that much slower.
    for size in sizes[:2]:
        for domain in ("market", "signal", "execution"):
            cases.append(Case("relay", domain, size, 4, COUNTS[size] // scale // 8, python=True))
    rate, seconds = 100_000, (0.2 if smoke else 5)
    # "bridge": host to host, two relays bridged through a 3-node NATS cluster.
    for relay in ("relay", *BASELINES, "bridge"):
        cases.append(Case(relay, "market", 64, 4, int(rate * seconds), rate=rate))
    # The execution relay with its default log (fsync always), paced.
    cases.append(Case("relay", "execution", 128, 4, int(rate * seconds), rate=rate))
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


def same_case(case: Case, other: Case) -> bool:
    """Whether C{other} measures what C{case} does: the same size, fan-out and rate."""
    return (other.size, other.subscribers, other.rate) == (case.size, case.subscribers, case.rate)


def row(cases: list[Case], case: Case, relay: str) -> Case | None:
    """The verified row of C{relay} for the case of C{case}."""
    for other in cases:
        if other.relay == relay and same_case(case, other) and other.result.get("verified"):
            return other
    return None


def best_peer(cases: list[Case], case: Case) -> Case | None:
    """The fastest verified broker row for the case of C{case}."""
    peers = [p for p in (row(cases, case, kind) for kind in PEERS) if p is not None]
    return max(peers, key=lambda p: p.result["msg_per_s"], default=None)


def over_bounds(cases: list[Case], case: Case) -> list[str]:
    """The C{BOUNDS} that the relay row C{case} is faster than (paced rows are never)."""
    if case.relay != "relay" or case.rate or not case.result.get("verified"):
        return []
    speed = case.result["msg_per_s"]
    return [
        bound for bound in BOUNDS
        if (other := row(cases, case, bound)) is not None and speed > other.result["msg_per_s"]
    ]


def warnings(cases: list[Case]) -> list[str]:
    """A line for each relay row faster than one of its bounds: they are not bounds then."""
    lines = []
    for case in cases:
        for bound in over_bounds(cases, case):
            other = row(cases, case, bound)
            assert other is not None
            lines.append(
                f"WARNING: {case.name} ({case.result['msg_per_s']:,.0f} msg/s) is faster than "
                f"{bound} ({other.result['msg_per_s']:,.0f} msg/s): {bound} is no bound here"
            )
    return lines


def report(cases: list[Case]) -> str:
    def ratio(case: Case, other: Case | None, mark: bool = False) -> str:
        if other is None:
            return "-"
        text = f"{case.result['msg_per_s'] / other.result['msg_per_s']:.2f}"
        return f"{text} {OVER}" if mark else text

    def measured(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        "| relay | domain | audit log | frame | subs | msg/s per sub (min) | MB/s per sub | "
        "x floor | x ceiling | x direct | x best peer | relay CPU s | relay peak RSS MiB | "
        "verified |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case in cases:
        if case.rate:
            continue
        r = case.result
        if not r.get("verified"):
            lines.append(
                f"| {case.label} | {case.domain} | {case.audited} | {case.size} | "
                f"{case.subscribers} | FAILED {r.get('error', '')} | | | | | | | | no |"
            )
            continue
        over = over_bounds(cases, case)
        best = best_peer(cases, case)
        lines.append(
            f"| {case.label} | {case.domain} | {case.audited} | {case.size} | {case.subscribers} | "
            f"{r['msg_per_s']:,.0f} | {r['mb_per_s']:.1f} | "
            f"{ratio(case, row(cases, case, 'floor'))} | "
            f"{ratio(case, row(cases, case, 'ceiling'), 'ceiling' in over)} | "
            f"{ratio(case, row(cases, case, 'direct'), 'direct' in over)} | "
            f"{ratio(case, best)}{f' ({best.relay})' if best is not None else ''} | "
            f"{measured(r['relay_cpu_s'], '.2f')} | {measured(r['relay_peak_rss_mib'], '.0f')} | "
            "yes |"
        )
    if any(over_bounds(cases, case) for case in cases):
        lines += ["", f"{OVER}: the relay is faster than that bound (see the warnings)."]
    latency = [c for c in cases if c.rate]
    if latency:
        lines += [
            "",
            "| relay | domain | audit log | frame | subs | rate msg/s | p50 µs | p99 µs | p99.9 µs "
            "| max µs | verified |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for case in latency:
            r = case.result
            if not r.get("verified"):
                lines.append(
                    f"| {case.relay} | {case.domain} | {case.audited} | {case.size} | "
                    f"{case.subscribers} | {case.rate:,} | FAILED | | | | | no |"
                )
                continue
            lat = r["latency_us"]
            lines.append(
                f"| {case.relay} | {case.domain} | {case.audited} | {case.size} | {case.subscribers} | "
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
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out the brokers (nats, zeromq, redis)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is kept")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    cases = [case for case in matrix(args.smoke) if selected(case, args.only)]
    notes = []
    for kind in PEERS:
        reason = "--no-peers" if args.no_peers else brokers.missing(kind)
        if reason and any(case.relay == kind for case in cases):
            notes.append(f"{kind} skipped: {reason}")
            cases = [case for case in cases if case.relay != kind]
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    workdir = tempfile.mkdtemp(prefix="trb-", dir="/tmp")
    try:
        for case in cases:
            print(f"running {case.name} ({case.count:,} frames)", file=sys.stderr, flush=True)
            case.result = median_of(case, workdir, 1 if args.smoke else args.repeat)
            print(f"  {json.dumps(case.result)}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    scans = {case.result["scan"] for case in cases if "scan" in case.result}
    reactors: dict[str, set[str]] = {}
    for case in cases:
        if "reactor" in case.result:
            reactors.setdefault(case.result["reactor"], set()).add(case.relay)
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Twisted {twisted.__version__}; relay scan: "
        f"{', '.join(sorted(scans)) or 'unknown'}; reactor: "
        + (", ".join(f"{r} ({', '.join(sorted(k))})" for r, k in sorted(reactors.items()))
           or "unknown")
    )
    if args.smoke:
        print("Smoke run: the counts are too small for the numbers to mean anything.")
    for note in notes:
        print(f"Note: {note}")
    print(report(cases))
    for warning in warnings(cases):
        print(warning)
        print(warning, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**case.__dict__} for case in cases], f, indent=1)
    return 0 if all(case.result.get("verified") for case in cases) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
