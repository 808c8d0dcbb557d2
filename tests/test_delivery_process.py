"""
Delivery guarantees end to end: a real relay process, publisher and
subscriber processes on real sockets, every frame accounted for.

Where a policy may drop or cut a lagging client, the publisher is paced so
that the subscribers meant to keep up do so even on a busy 2-core machine; a
"fast" subscriber is one that keeps up with the publish rate.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from twisted_relay.testing import free_ports

from .relayprocess import RelayProcess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1024 * 1024
TIMEOUT = 60.0


class Peer:
    """A tests.peers process; its JSON lines are read with a bounded wait."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def result(self, timeout: float = TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.process.kill()
                raise AssertionError(f"peer {self.process.args} gave no result in {timeout}s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                line = self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"peer {self.process.args} exited without a result")
                return json.loads(line)

    def go(self) -> None:
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=TIMEOUT)


@pytest.fixture
def env():
    """A work directory, a relay starter and a peer starter; all cleaned up."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    relays: list[RelayProcess] = []
    peers: list[Peer] = []
    path = os.path.join(workdir, "r.sock")
    address = path

    def relay(*args: str, tcp: bool = False) -> RelayProcess:
        """A relay on a Unix socket, or on a TCP port of the loopback if C{tcp}."""
        nonlocal address
        if tcp:
            [port] = free_ports(1)
            listen, address = f"tcp:{port}:interface=127.0.0.1", f"tcp:127.0.0.1:{port}"
        else:
            listen, address = f"unix:{path}", path
        process = RelayProcess(workdir, "--listen", listen, *args).start()
        relays.append(process)
        return process.wait_listening()

    def peer(command: str, *args: str) -> Peer:
        started = Peer(command, address, *args)
        peers.append(started)
        return started

    yield relay, peer
    for started in peers:
        started.close()
    for process in relays:
        if process.process.poll() is None:
            process.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def subscribers(peer, count: int, *args: str) -> list[Peer]:
    started = [peer("subscribe", *args) for _ in range(count)]
    for subscriber in started:
        assert subscriber.result() == {"ready": True}
    return started


def wait_for_log(relay: RelayProcess, pattern: str, timeout: float = TIMEOUT) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, relay.log())
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not logged within {timeout}s:\n{relay.log()}")


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_drop_bounded_memory_and_exact_accounting(env):
    """
    Drop policy, 250 MiB published while one subscriber reads nothing: the
    fast subscribers get every frame; the slow one a frame-aligned, ordered
    stream whose count plus its drop counter is the published count; relay
    memory grows by less than the high-water mark + 32 MiB.
    """
    relay, peer = env
    high_water = 16 * MiB
    relay_process = relay("--domain", "market", "--high-water", str(high_water))
    baseline = memory_kib(relay_process.process.pid, "VmRSS")
    count, size = 16_000, 16 * 1024
    fast = subscribers(peer, 2, "--frames", str(count))
    [slow] = subscribers(peer, 1, "--wait-stdin", "--idle", "2")
    # 60 MB/s: fast enough to fill the slow one's 16 MiB in a blink, slow
    # enough that the fast ones (Python) keep up on a busy 2-core machine.
    published = peer(
        "publish", "--count", str(count), "--size", str(size), "--rate", "60"
    ).result()
    assert published["bytes"] == count * size
    for subscriber in fast:
        got = subscriber.result()
        assert (got["frames"], got["bytes"], got["crc"]) == (count, count * size, published["crc"])
        assert got["in_order"] and got["aligned"]
    peak = memory_kib(relay_process.process.pid, "VmHWM")
    slow.go()
    got = slow.result()
    assert got["in_order"] and got["aligned"]
    client = 3  # the slow subscriber was the third to connect
    match = wait_for_log(
        relay_process, rf"client {client} disconnected .*?: 0 frames in, (\d+) out, (\d+) dropped"
    )
    delivered, dropped = int(match[1]), int(match[2])
    assert delivered == got["frames"]
    assert got["frames"] + dropped == count
    assert dropped > 0
    assert (peak - baseline) * 1024 < high_water + 32 * MiB, (peak, baseline)


def test_disconnect_slow_consumer(env):
    """Disconnect policy: the client that stops reading is cut; the others get everything."""
    relay, peer = env
    relay_process = relay("--domain", "signal", "--high-water", str(16 * MiB))
    count = 40_000
    fast = subscribers(peer, 2, "--frames", str(count))
    [slow] = subscribers(peer, 1, "--wait-stdin", "--idle", "2")
    published = peer(
        "publish", "--domain", "2", "--count", str(count), "--size", "1024", "--rate", "40"
    ).result()
    for subscriber in fast:
        got = subscriber.result()
        assert (got["frames"], got["crc"]) == (count, published["crc"])
    wait_for_log(relay_process, r"disconnecting client 3 \(slow consumer\)")
    slow.go()
    got = slow.result()
    assert got["frames"] < count and got["aligned"] and got["in_order"]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize(
    "domain, args",
    [("signal", ()), ("execution", ("--stall-timeout", "0.5", "--allow-publish", "any"))],
    ids=["slow", "stalled"],
)
def test_cut_off_counts_exactly(env, tcp, domain, args):
    """
    A client cut off while it does not read receives exactly the frames the
    relay counted out to it, whole: the client library discards the start of
    the one the relay took back.
    """
    relay, peer = env
    relay_process = relay("--domain", domain, "--high-water", str(1 * MiB), *args, tcp=tcp)
    [stuck] = subscribers(peer, 1, "--wait-stdin", "--idle", "2")
    number = {"signal": "2", "execution": "3"}[domain]
    peer("publish", "--domain", number, "--count", "20000", "--size", "1024").result()
    match = wait_for_log(
        relay_process,
        r"client 1 disconnected after [\d.]+s \((?:slow|stalled) consumer\): "
        r"\d+ frames in, (\d+) out, \d+ dropped, (\d+) lost",
    )
    stuck.go()
    got = stuck.result()
    out, lost = map(int, match.groups())
    assert lost > 0
    assert got["frames"] == out
    assert got["torn"] < 1024


def test_block_is_lossless_and_pauses_publishers(env):
    """
    Block policy: a subscriber that stops reading for a while, then resumes,
    receives every frame in order; publishers were paused meanwhile.
    """
    relay, peer = env
    relay_process = relay(
        "--domain", "execution", "--high-water", str(1 * MiB), "--stall-timeout", "30"
    )
    count = 20_000
    [fast] = subscribers(peer, 1, "--frames", str(count))
    [slow] = subscribers(peer, 1, "--wait-stdin", "--frames", str(count))
    publisher = peer("publish", "--domain", "3", "--count", str(count), "--size", "512")
    # The slow subscriber (client 2) holds the publishers back, possibly along
    # with the other one for a moment.
    wait_for_log(relay_process, r"client 2 is (also )?over the high-water mark")
    time.sleep(1)
    slow.go()
    published = publisher.result()
    for subscriber in (fast, slow):
        got = subscriber.result()
        assert (got["frames"], got["crc"]) == (count, published["crc"])
        assert got["in_order"] and got["aligned"]
    wait_for_log(relay_process, r"publishers resumed after \d+\.\d+s")
    assert "dropped" not in relay_process.log().split("publishers paused")[1].split("\n")[0]


def test_block_stall_timeout_cuts_the_stuck_client(env):
    """Block policy: a client that never reads is cut after the stall timeout; the rest proceed."""
    relay, peer = env
    relay_process = relay(
        "--domain", "execution", "--high-water", str(1 * MiB), "--stall-timeout", "1"
    )
    count = 20_000
    [fast] = subscribers(peer, 1, "--frames", str(count))
    [stuck] = subscribers(peer, 1, "--wait-stdin", "--idle", "2")
    published = peer("publish", "--domain", "3", "--count", str(count), "--size", "512").result()
    got = fast.result()
    assert (got["frames"], got["crc"]) == (count, published["crc"])
    match = wait_for_log(
        relay_process,
        r"disconnecting client 2 \(stalled consumer\): over the high-water mark for 1s",
    )
    assert match
    paused = [float(p) for p in re.findall(r"publishers resumed after (\d+\.\d+)s", relay_process.log())]
    assert paused and max(paused) < 1.5


def test_publish_only_client_is_never_a_slow_consumer(env):
    """
    A publisher that declared itself publish-only and never reads is not cut
    off; a client that never reads without saying so is.
    """
    relay, peer = env
    relay_process = relay("--domain", "signal", "--high-water", str(8 * MiB))
    count = 40_000
    idle = peer("publish", "--domain", "2", "--count", "0", "--linger", "60")
    wait_for_log(relay_process, "client 1 connected")
    [subscriber] = subscribers(peer, 1, "--frames", str(count))
    published = peer(
        "publish", "--domain", "2", "--count", str(count), "--size", "1024", "--rate", "40",
        "--publish-only",
    ).result()
    got = subscriber.result()
    assert (got["frames"], got["crc"]) == (count, published["crc"])
    wait_for_log(relay_process, r"disconnecting client 1 \(slow consumer\)")
    assert "client 3 is now a publisher" in relay_process.log()
    assert "disconnecting client 3" not in relay_process.log()
    idle.close()


def test_filtered_subscription(env):
    """A subscriber asking for one source receives that source's frames only."""
    relay, peer = env
    relay("--domain", "market")
    [picky] = subscribers(peer, 1, "--sources", "2", "--frames", "100")
    peer("publish", "--source", "1", "--count", "100", "--size", "100").result()
    peer("publish", "--source", "2", "--count", "100", "--size", "100").result()
    got = picky.result()
    assert got["frames"] == 100 and got["last"] == {"2": 100} and got["in_order"]


def test_sigterm_drains_execution_without_loss(env):
    """SIGTERM with data in flight: a reading client gets every frame the relay accepted."""
    relay, peer = env
    relay_process = relay(
        "--domain", "execution", "--high-water", str(1 * MiB), "--drain-timeout", "20"
    )
    [reader] = subscribers(peer, 1, "--throttle", "0.005", "--read-size", "65536", "--idle", "20")
    publisher = peer("publish", "--domain", "3", "--count", "200000", "--size", "256")
    wait_for_log(relay_process, r"publishers paused")
    relay_process.process.send_signal(signal.SIGTERM)
    got = reader.result()
    publisher.close()
    assert relay_process.wait_exit() == -signal.SIGTERM
    accepted = int(wait_for_log(relay_process, r"stopped: (\d+) frames accepted")[1])
    assert 0 < accepted < 200_000
    assert got["frames"] == accepted
    assert got["aligned"] and got["in_order"]
    assert got["last"] == {"1": accepted}
