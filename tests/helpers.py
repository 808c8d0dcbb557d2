"""Frames and in-memory connections shared by the unit tests."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet.address import UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.audit import AuditLog
from twisted_relay.domains import EXECUTION, MARKET, SIGNAL
from twisted_relay.engine.relay import RelayFactory
from twisted_relay.validation import FramePolicy
from twisted_relay.wire import Domain, build_frame, unpack_header

TLV_FOR_DOMAIN = {Domain.MARKET_DATA: 1, Domain.SIGNAL: 20, Domain.EXECUTION: 40}
DOMAINS = {MARKET.domain: MARKET, SIGNAL.domain: SIGNAL, EXECUTION.domain: EXECUTION}


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
    **overrides,
) -> RelayFactory:
    """A relay factory of the shipped domain C{domain}, on a fake clock."""
    logic = DOMAINS[domain]
    return RelayFactory(
        logic,
        FramePolicy.for_logic(logic, **overrides),
        delivery=delivery,
        echo=echo,
        audit=audit,
        clock=Clock(),
    )


def connect(factory: RelayFactory, transport: StringTransport | None = None):
    """A client connected to C{factory} over an in-memory transport."""
    protocol = factory.buildProtocol(UNIXAddress(None))
    protocol.makeConnection(transport or RecordingTransport())
    return protocol


def audited_relay(testcase: SynchronousTestCase, rotate: int = 64 * 1024, **kw):
    """An execution relay on a fake clock with an audit log in a temporary directory."""
    relay = make_relay(Domain.EXECUTION, audit=AuditLog(temp_dir(testcase), rotate), **kw)
    relay.writeahead.start()
    testcase.addCleanup(relay.writeahead.stop)
    return relay


class DiskFull:
    """
    The audit log's file swapped for /dev/full (every write fails with
    ENOSPC) until L{free}: a real full disk, without filling one.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.kept = os.dup(audit._fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, audit._fd)
        os.close(full)

    def free(self) -> None:
        if self.kept >= 0:
            os.dup2(self.kept, self.audit._fd)
            os.close(self.kept)
            self.kept = -1


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """C{data} cut into chunks at the positions C{cuts} (taken modulo its length)."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def temp_dir(testcase) -> str:
    """A fresh directory outside the checkout, removed after C{testcase}."""
    path = tempfile.mkdtemp(prefix="twisted-relay-test-")
    testcase.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def orders(count: int, source: int = 42) -> list[bytes]:
    """C{count} valid execution frames (OrderRequest) of C{source}, sequences 1..count."""
    return [
        build_frame(Domain.EXECUTION, source, seq, [(40, seq.to_bytes(8, "little") * 4)])
        for seq in range(1, count + 1)
    ]


def free_ports(count: int) -> list[int]:
    """C{count} loopback TCP ports nothing listens on right now."""
    probes = [socket.socket() for _ in range(count)]
    for probe in probes:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in probes]
    for probe in probes:
        probe.close()
    return ports
