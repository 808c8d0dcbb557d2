"""
Hostile and careless clients against a real relay process, each beside an
honest publisher-subscriber pair (tests.peers, paced so that it keeps up):
the corpus of bad inputs, partial frames, a slowloris, a connection storm,
the file-descriptor limit, stuck and filtered subscribers, the
control-answer stall, a hostile socket directory. Each checks the documented
outcome, that the relay lives, that the pair loses nothing, and where memory
or descriptors are at stake the relay's RSS and open descriptors after.
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import tempfile
import time

import pytest

from twisted_relay.control import control_frame, recovery_frame
from twisted_relay.wire import HEADER, MAGIC, VERSION

from .corpus.make_corpus import DOMAINS
from .relayprocess import RelayProcess
from .test_adversarial import corpus, read
from .test_delivery_process import Peer, memory_kib, wait_for_log

MiB = 1024 * 1024
#: Frames of the honest pair, 256 bytes each, at 0.5 MB/s: about 2 seconds.
PAIR = ("--count", "4000", "--size", "256", "--rate", "0.5")


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle(measure, target: int, timeout: float = 10.0) -> int:
    """C{measure()} once it is at most C{target}, or its last value after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if value <= target or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


class Hostile:
    """A relay in its own directory, an honest pair beside it, and sockets to it."""

    def __init__(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
        self.path = os.path.join(self.workdir, "r.sock")
        self.relay: RelayProcess | None = None
        self.peers: list[Peer] = []
        self.sockets: list[socket.socket] = []

    def start(self, *args: str, preexec_fn=None) -> RelayProcess:
        relay = RelayProcess(
            self.workdir, "--listen", f"unix:{self.path}", *args, preexec_fn=preexec_fn
        )
        self.relay = relay.start().wait_listening()
        return self.relay

    @property
    def pid(self) -> int:
        assert self.relay is not None and self.relay.process is not None
        return self.relay.process.pid

    def pair(self, domain: str) -> tuple[Peer, Peer]:
        """An honest subscriber, ready, and its publisher, started."""
        subscriber = Peer(
            "subscribe", self.path, "--frames", PAIR[1], "--idle", "20", "--sources", "200"
        )
        self.peers.append(subscriber)
        assert subscriber.result() == {"ready": True}
        publisher = Peer(
            "publish", self.path, "--domain", str(DOMAINS[domain]), "--source", "200", *PAIR
        )
        self.peers.append(publisher)
        return subscriber, publisher

    def intact(self, subscriber: Peer, publisher: Peer) -> None:
        """The pair got everything, in order, and the relay still runs."""
        published = publisher.result()
        got = subscriber.result()
        assert (got["frames"], got["crc"], got["in_order"]) == (
            published["frames"],
            published["crc"],
            True,
        )
        assert self.relay is not None and self.relay.process.poll() is None, self.relay.log()

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sockets.append(sock)
        return sock

    def close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def cleanup(self) -> None:
        self.close_sockets()
        for peer in self.peers:
            peer.close()
        if self.relay is not None and self.relay.process.poll() is None:
            self.relay.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def hostile():
    scene = Hostile()
    yield scene
    scene.cleanup()


def closed_by_relay(sock: socket.socket, timeout: float) -> bool:
    """Whether the relay closes C{sock} within C{timeout} seconds (what it sends is read)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except (TimeoutError, ConnectionResetError):
        pass
    return False


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_corpus_against_a_live_relay(hostile, domain):
    """Every corpus file of the domain on its own connection: counted, and nobody else hurt."""
    hostile.start("--domain", domain)
    baseline = descriptors(hostile.pid)
    subscriber, publisher = hostile.pair(domain)
    names = [name for name, e in corpus().items() if e["domain"] == domain]
    for name in names:
        sock = hostile.connect()
        sock.sendall(read(name))
        sock.close()
    hostile.sockets.clear()
    hostile.intact(subscriber, publisher)
    assert settle(lambda: descriptors(hostile.pid), baseline) <= baseline
    closed = [e["outcome"] for e in corpus().values() if e["domain"] == domain]
    log = hostile.relay.log()
    for outcome in closed:
        kind, _, reason = outcome.partition(":")
        if kind in ("closed", "rejected"):
            assert reason in log, (reason, log[-3000:])


def test_partial_frames_are_capped_and_freed(hostile):
    """Connections that each begin a 16 MiB frame pin at most the cap, and nothing once gone."""
    hostile.start("--domain", "market", "--partial-limit", str(32 * MiB))
    subscriber, publisher = hostile.pair("market")
    baseline = memory_kib(hostile.pid, "VmRSS")
    header = HEADER.pack(MAGIC, 1, VERSION, 9, 0, 1, 0, 16 * MiB - 64, 0)
    body = b"\x00" * (16 * MiB - 65)
    for _ in range(12):
        sock = hostile.connect()
        try:
            sock.sendall(header + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off over the cap, as it should be
    wait_for_log(hostile.relay, "partial_frames_over_limit")
    peak = memory_kib(hostile.pid, "VmHWM")
    hostile.close_sockets()
    hostile.intact(subscriber, publisher)
    assert (peak - baseline) * 1024 < 32 * MiB + 48 * MiB, (baseline, peak)
    after = settle(lambda: memory_kib(hostile.pid, "VmRSS"), baseline + 16 * 1024)
    assert (after - baseline) * 1024 < 16 * MiB, (baseline, after)


def test_slowloris_is_timed_out(hostile):
    """Clients trickling a header a byte at a time are closed after the partial-frame timeout."""
    hostile.start("--domain", "signal", "--partial-timeout", "1")
    baseline = descriptors(hostile.pid)
    subscriber, publisher = hostile.pair("signal")
    trickling = [hostile.connect() for _ in range(100)]
    header = HEADER.pack(MAGIC, 2, VERSION, 9, 0, 1, 0, 100, 0)
    for position in range(3):
        for sock in trickling:
            sock.send(header[position : position + 1])
        time.sleep(0.3)
    assert all(closed_by_relay(sock, 5.0) for sock in trickling)
    hostile.intact(subscriber, publisher)
    assert "incomplete_frame_timeout" in hostile.relay.log()
    hostile.close_sockets()
    assert settle(lambda: descriptors(hostile.pid), baseline) <= baseline


def test_connection_storm(hostile):
    """Thousands of connections opened and dropped, some held: the relay ends where it began."""
    hostile.start("--domain", "market")
    baseline = descriptors(hostile.pid)
    subscriber, publisher = hostile.pair("market")
    held = [hostile.connect() for _ in range(300)]
    for _ in range(2000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(hostile.path)
        sock.close()
    hostile.intact(subscriber, publisher)
    assert len(held) == 300
    hostile.close_sockets()
    assert settle(lambda: descriptors(hostile.pid), baseline) <= baseline


def test_file_descriptor_limit(hostile):
    """
    At its descriptor limit the relay serves the clients it has, closes the
    ones it cannot take at once (Twisted's reserved descriptor), and takes
    new ones once descriptors are free again.
    """

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    hostile.start("--domain", "market", preexec_fn=limit)
    baseline = descriptors(hostile.pid)
    subscriber, publisher = hostile.pair("market")
    wait_for_log(hostile.relay, "client 2 connected")
    for _ in range(100):
        try:
            hostile.connect()
        except OSError:
            break  # the backlog is full too
    hostile.intact(subscriber, publisher)
    wait_for_log(hostile.relay, "refused a connection: the relay is at its limit of open files")
    hostile.close_sockets()
    assert settle(lambda: descriptors(hostile.pid), baseline) <= baseline
    subscriber, publisher = hostile.pair("market")
    hostile.intact(subscriber, publisher)
    # The refusals after the first are one counted line, not a line each.
    wait_for_log(hostile.relay, "connections in 10s at the limit of open files", timeout=15)
    log = hostile.relay.log()
    assert "EMFILE" not in log, log
    assert log.count("refused a connection") == 1, log


def test_stuck_and_filtered_subscribers(hostile):
    """Subscribers that never read and filtered ones cost the pair nothing, within bounds."""
    hostile.start("--domain", "market", "--high-water", str(1 * MiB))
    baseline = memory_kib(hostile.pid, "VmRSS")
    stuck = [hostile.connect() for _ in range(300)]
    for n, sock in enumerate(hostile.connect() for _ in range(5)):
        sock.sendall(control_frame(tlv_types=[100 + n]))
    subscriber, publisher = hostile.pair("market")
    hostile.intact(subscriber, publisher)
    assert len(stuck) == 300
    peak = memory_kib(hostile.pid, "VmHWM")
    # The pair's 1 MB, queued once and shared by every stuck subscriber.
    assert (peak - baseline) * 1024 < 64 * MiB, (baseline, peak)


def test_control_answers_never_hold_the_publishers(hostile):
    """
    A publish-only client that asks for replays and never reads its answers
    is cut off on its own, again and again; the execution publishers are
    never held back.
    """
    hostile.start("--domain", "execution", "--allow-publish", "any")
    subscriber, publisher = hostile.pair("execution")
    ask = control_frame(publish_only=True) + recovery_frame({s: 1 for s in range(255)}) * 50
    for _ in range(3):
        sock = hostile.connect()
        try:
            for _ in range(100):
                sock.sendall(ask)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.close()
    hostile.sockets.clear()
    hostile.intact(subscriber, publisher)
    log = hostile.relay.log()
    assert "unread answers" in log or "control_flood" in log, log[-3000:]
    assert "publishers paused" not in log, log[-3000:]


def test_hostile_socket_directory(hostile):
    """A socket directory others may write to is refused with one line, before binding."""
    shared = os.path.join(hostile.workdir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o757)
    relay = RelayProcess(hostile.workdir, "--listen", f"unix:{shared}/r.sock").start()
    assert relay.wait_exit() != 0
    assert f"{shared} is writable by others (mode 0757)" in relay.log(), relay.log()
    assert not os.path.exists(os.path.join(shared, "r.sock"))
