"""
Helpers for testing with the relay, shipped for plugin-domain and client
authors (and used by the relay's own tests and benchmarks):

 - frame builders per domain: L{frames_for}, L{orders}, L{synthetic};
   L{frames_in} and L{published} cut what a client received back into frames;
 - an in-memory relay: L{make_relay} on a L{Clock}, L{connect} a client to
   it over a L{RecordingTransport}, which remembers each write;
 - real processes: L{RelayProcess} (a relay run by C{twistd -n} or C{twist})
   and L{NatsCluster} (three routed C{nats-server} with JetStream), every
   wait bounded.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import cast

from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from .audit import AuditLog
from .domains import EXECUTION, MARKET, SIGNAL
from .engine.protocol import RelayProtocol
from .engine.relay import RelayFactory
from .engine.writeahead import Offload
from .interfaces import IRelayLogic
from .validation import FramePolicy
from .wire import (
    HEADER_SIZE,
    MAX_EXTENDED_TLV,
    MAX_STANDARD_TLV,
    Domain,
    Source,
    build_frame,
    unpack_header,
)

__all__ = [
    "NatsCluster",
    "RecordingTransport",
    "RelayProcess",
    "connect",
    "frames_for",
    "frames_in",
    "free_ports",
    "make_relay",
    "bridged_relay",
    "limit_file_size",
    "orders",
    "published",
    "start_bridged",
    "synthetic",
]

TLV_FOR_DOMAIN: dict[int, int] = {Domain.MARKET_DATA: 1, Domain.SIGNAL: 20, Domain.EXECUTION: 40}
DOMAINS = {MARKET.domain: MARKET, SIGNAL.domain: SIGNAL, EXECUTION.domain: EXECUTION}
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def frames_for(domain: int, count: int, source: int = 7, size: int = 20) -> list[bytes]:
    """C{count} valid frames of C{domain}, sequences 1.., values of C{size} bytes."""
    tlv = TLV_FOR_DOMAIN[domain]
    return [
        build_frame(domain, source, seq, [(tlv, bytes([seq % 251]) * size)], timestamp=seq)
        for seq in range(1, count + 1)
    ]


def frames_in(data: bytes) -> list[bytes]:
    """The whole frames in C{data}, which must be frame-aligned."""
    out, offset = [], 0
    while offset < len(data):
        end = offset + 32 + unpack_header(data, offset).payload_size
        out.append(data[offset:end])
        offset = end
    assert offset == len(data), "not frame-aligned"
    return out


def published(data: bytes) -> list[bytes]:
    """The frames of C{data} that are not the relay's own (system domain)."""
    return [f for f in frames_in(data) if f[4] != Domain.SYSTEM]


def orders(count: int, source: int = 42) -> list[bytes]:
    """C{count} valid execution frames (OrderRequest) of C{source}, sequences 1..count."""
    return [
        build_frame(Domain.EXECUTION, source, seq, [(40, seq.to_bytes(8, "little") * 4)])
        for seq in range(1, count + 1)
    ]


#: What the synthetic publisher sends per domain: its source and its TLVs.
SYNTHETIC = {
    Domain.MARKET_DATA: (Source.BINANCE, [(1, 40), (2, 52)]),
    Domain.SIGNAL: (Source.ARBITRAGE_STRATEGY, [(20, 16), (22, 32)]),
    Domain.EXECUTION: (Source.EXECUTION_ENGINE, [(40, 48)]),
}
#: The vendor TLV type of a domain that allows any (not strict).
VENDOR_TLV = 200


def synthetic_kinds(logic: IRelayLogic) -> tuple[int, list[tuple[int, int]]]:
    """
    The source and C{(TLV type, value length)} kinds of the synthetic frames
    of C{logic}'s domain: the shipped ones, or for any other domain the
    lowest TLV type it allows (a vendor type if it allows any), source 0.
    """
    if logic.domain in SYNTHETIC:
        return SYNTHETIC[Domain(logic.domain)]
    allowed = sorted(logic.allowed_tlv_types) if logic.strict_tlv else [VENDOR_TLV]
    return 0, [(allowed[0] if allowed else VENDOR_TLV, 8)]


def synthetic(
    logic: IRelayLogic | int,
    count: int,
    source: int | None = None,
    *,
    size: int | None = None,
    tlvs: list[tuple[int, bytes]] | None = None,
) -> Iterator[bytes]:
    """
    Frames for C{logic}'s relay (a domain, or a shipped domain's number),
    sequences 1..count, CRC-32 filled in: of
    C{tlvs} if given, else of the domain's kinds (L{synthetic_kinds}), or
    of as few TLVs of its first kind as make each frame C{size} bytes.

    @raise ValueError: no frame is C{size} bytes.
    """
    if isinstance(logic, int):  # a shipped domain by its number
        logic = next(shipped for shipped in (MARKET, SIGNAL, EXECUTION) if shipped.domain == logic)
    default_source, kinds = synthetic_kinds(logic)
    shapes = [[(tlv_type, [length])] for tlv_type, length in kinds]
    if size is not None:
        shapes = [[(kinds[0][0], _value_sizes(size))]]
    return _synthetic(logic.domain, count, default_source if source is None else source, shapes, tlvs)


def _synthetic(
    domain: int,
    count: int,
    source: int,
    shapes: list[list[tuple[int, list[int]]]],
    tlvs: list[tuple[int, bytes]] | None,
) -> Iterator[bytes]:
    for sequence in range(1, count + 1):
        if tlvs is not None:
            payload = tlvs
        else:
            filler = sequence.to_bytes(8, "little")
            payload = [
                (tlv_type, (filler * (length // 8 + 1))[:length])
                for tlv_type, lengths in shapes[sequence % len(shapes)]
                for length in lengths
            ]
        yield build_frame(domain, source, sequence, payload)


#: The bytes one TLV takes, by form: standard (2 + up to 255), extended (5 + 256 up to 65,535).
_STANDARD = range(2, 2 + MAX_STANDARD_TLV + 1)
_EXTENDED = range(5 + MAX_STANDARD_TLV + 1, 5 + MAX_EXTENDED_TLV + 1)


def _value_sizes(size: int) -> list[int]:
    """The value lengths of the TLVs, as few as may be, that make a frame C{size} bytes."""
    payload = size - HEADER_SIZE
    if payload < 0 or payload == 1:
        raise ValueError(
            f"no frame is {size} bytes: a frame is 32 bytes of header, then TLVs of 2 bytes or more"
        )
    lengths = []
    while payload:
        if payload in _STANDARD or payload in _EXTENDED:
            take = payload
        elif payload < _EXTENDED.start:  # 258 to 260: two standard TLVs
            take = payload // 2
        else:  # the most one TLV takes, leaving a rest that TLVs can make
            take = _EXTENDED.stop - 1
            if payload - take == 1 or payload - take in range(_STANDARD.stop, _EXTENDED.start):
                take -= _EXTENDED.start
        lengths.append(take - (2 if take in _STANDARD else 5))
        payload -= take
    return lengths


class RecordingTransport(StringTransport):
    """A StringTransport that remembers each write call, to check batching."""

    def __init__(self) -> None:
        super().__init__(peerAddress=UNIXAddress(None))
        self.calls: list[list[bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append([data])
        super().write(data)

    def writeSequence(self, seq) -> None:
        seq = list(seq)
        self.calls.append(seq)
        StringTransport.write(self, b"".join(seq))


def make_relay(
    domain: int = Domain.MARKET_DATA,
    *,
    echo: bool = False,
    delivery=None,
    audit: AuditLog | None = None,
    audit_writer: Offload | None = None,
    **overrides,
) -> RelayFactory:
    """
    A relay factory of the shipped domain C{domain}, on a fake clock;
    C{overrides} go to its L{FramePolicy}.
    """
    logic = DOMAINS[domain]
    return RelayFactory(
        logic,
        FramePolicy.for_logic(logic, **overrides),
        delivery=delivery,
        echo=echo,
        audit=audit,
        audit_writer=audit_writer,
        clock=Clock(),
    )


def connect(factory: RelayFactory, transport: StringTransport | None = None) -> RelayProtocol:
    """A client connected to C{factory} over an in-memory transport."""
    protocol = factory.buildProtocol(UNIXAddress(None))
    assert isinstance(protocol, RelayProtocol)
    protocol.makeConnection(transport or RecordingTransport())
    return protocol


def free_ports(count: int) -> list[int]:
    """C{count} loopback TCP ports nothing listens on right now."""
    probes = [socket.socket() for _ in range(count)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports


def script(name: str = "twistd") -> str:
    """The command C{name} (twistd, twist) of the environment running the tests."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else cast(str, shutil.which(name))


def limit_file_size() -> None:
    """In a relay process before it starts: no file over 256 KiB (EFBIG past that)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))


class RelayProcess:
    """
    One relay process, started in C{workdir}, logging to a file there, run
    by C{twistd -n} or, with C{runner="twist"}, by Twisted's modern runner.
    """

    def __init__(
        self,
        workdir: str,
        *args: str,
        env: dict[str, str] | None = None,
        preexec_fn=None,
        runner: str = "twistd",
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        """
        @param pass_fds: descriptors the relay inherits (as C{subprocess}
            takes them), e.g. a socket passed as systemd would.
        """
        self.workdir = workdir
        if "execution" in args and not {"--no-audit", "--audit-dir"} & {
            a.partition("=")[0] for a in args
        }:
            # Each test's execution relay audits into its own directory.
            args = (*args, "--audit-dir", os.path.join(workdir, "audit"))
        command = (
            [script("twistd"), "-n", "--pidfile="]
            if runner == "twistd"
            else [script(runner), "--log-format", "text"]
        )
        self.args = [*command, "relay", "--stats-interval", "0", *args]
        self.log_path = os.path.join(workdir, f"relay-{id(self)}.log")
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.preexec_fn = preexec_fn
        self.pass_fds = pass_fds

    def start(self) -> RelayProcess:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args,
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self._prepare,
            pass_fds=self.pass_fds,
        )
        return self

    def _prepare(self) -> None:
        """
        In the relay's process before it starts: SIGINT as a terminal gives
        it, whatever the tests inherited (a shell starts background jobs
        with SIGINT ignored, and Python keeps ignoring it), then C{preexec_fn}.
        """
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.preexec_fn is not None:
            self.preexec_fn()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, count: int = 1) -> RelayProcess:
        """Block until the relay logged C{count} 'listening on' lines."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while self.log().count("listening on ") < count:
            if self.process.poll() is not None:
                raise AssertionError(f"relay exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"relay not listening after {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit code, once the process has ended."""
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"relay still running after {timeout}s:\n{self.log()}"
            ) from None
        return self.process.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        result = self.wait_exit(timeout)
        self._log.close()
        return result


READY_TIMEOUT = 30.0


def nats_server() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "nats-server")
    return beside if os.path.exists(beside) else cast(str, shutil.which("nats-server"))


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
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        assert self.process is not None
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
