"""
Execution integrity end to end, with real relay processes on real sockets:
kill -9 during a run, replay after a reconnect, a write error on the audit
log, and a peer refused by its uid. Every wait is bounded.
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from twisted_relay.audit import AuditDamage, LogReader, audit_paths, verify
from twisted_relay.client import BlockingClient, RelayDead
from twisted_relay.control import control_frame

from .helpers import free_ports, health_of, orders
from .relayprocess import RelayProcess, limit_file_size

SOURCE = 42
TIMEOUT = 60.0


def logged(directory: str) -> list[bytes]:
    return [record.frame for record in LogReader(audit_paths(directory))]


def readable(directory: str) -> set[bytes]:
    """The frames of the log up to its first damaged record (a torn tail after a kill)."""
    frames: set[bytes] = set()
    try:
        for record in LogReader(audit_paths(directory)):
            frames.add(record.frame)
    except AuditDamage:
        pass
    return frames


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect(path: str, deadline: float) -> BlockingClient:
    """A client of the relay at C{path}, retrying until it is back up."""
    while True:
        try:
            return BlockingClient(path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Publisher(threading.Thread):
    """
    Publishes C{frames} in order; after every reconnect it asks the relay's
    heartbeat where its source got to and resumes from the next sequence,
    then waits for a heartbeat that shows the last one. Paced while
    C{paced} is set.
    """

    def __init__(self, path: str, frames: list[bytes], rate: float) -> None:
        super().__init__(daemon=True)
        self.path, self.frames, self.rate = path, frames, rate
        self.paced = threading.Event()
        self.paced.set()
        self.done = threading.Event()
        self.reconnects = 0

    def run(self) -> None:
        deadline = time.monotonic() + 4 * TIMEOUT
        while time.monotonic() < deadline:
            try:
                client = connect(self.path, deadline)
            except OSError:
                return
            self.reconnects += 1
            try:
                client.introduce(timeout=5)
                # Only on a fresh connection is a heartbeat where to resume:
                # later ones may predate frames still on their way.
                last = client.next_heartbeat(5).get(SOURCE, 0)
                for start in range(last, len(self.frames), 32):
                    client.publish(b"".join(self.frames[start : start + 32]))
                    if self.paced.is_set():
                        time.sleep(32 / self.rate)
                while client.next_heartbeat(5).get(SOURCE, 0) < len(self.frames):
                    if time.monotonic() > deadline:
                        return
                self.done.set()
                return
            except (OSError, TimeoutError, RelayDead):
                pass
            finally:
                client.close()


class Subscriber(threading.Thread):
    """Keeps every frame it receives, reconnecting whenever the relay goes away."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.received: list[bytes] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 4 * TIMEOUT
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                client = connect(self.path, deadline)
            except OSError:
                return
            try:
                client.introduce(timeout=5)
                while client.connected and not self.stop.is_set():
                    for _, frame in client.frames(timeout=0.2):
                        self.received.append(frame)
            except (OSError, TimeoutError, RelayDead):
                pass
            finally:
                client.close()


def start_relay(workdir: str, path: str, audit: str, *args: str, **kw) -> RelayProcess:
    return RelayProcess(
        workdir,
        "--domain", "execution",
        "--listen", f"unix:{path}",
        "--audit-dir", audit,
        "--heartbeat", "0.2",
        *args,
        **kw,
    ).start().wait_listening()


def test_killNineAtRandom(workdir) -> None:
    """
    kill -9 the execution relay 20 times at random points of a 50,000-frame
    run: after each kill at most a torn last record is wrong, and the
    restarted relay cuts exactly that; at the end the log verifies, holds
    every sequence of the source once, in order, and every frame any
    subscriber received is in it.
    """
    path, audit = os.path.join(workdir, "e.sock"), os.path.join(workdir, "audit")
    frames = orders(50_000)
    publisher = Publisher(path, frames, rate=4000)
    subscriber = Subscriber(path)
    rng = random.Random(6)
    relay = start_relay(workdir, path, audit, "--audit-rotate", "262144")
    publisher.start()
    subscriber.start()
    try:
        for _ in range(20):
            time.sleep(rng.uniform(0.1, 0.6))
            relay.process.kill()
            relay.wait_exit()
            # Everything any subscriber got from the dead relay is in its log.
            assert set(subscriber.received) <= readable(audit)
            report = verify(audit)
            if report.damage is not None:
                assert report.damage.torn, report.damage
                assert report.damage.path == audit_paths(audit)[-1]
            relay = start_relay(workdir, path, audit, "--audit-rotate", "262144")
            opened = re.search(r"audit log \S+: (\d+) records", relay.log())
            assert int(opened.group(1)) == report.records
        publisher.paced.clear()
        assert publisher.done.wait(TIMEOUT), relay.log()
    finally:
        subscriber.stop.set()
        relay.stop()
        publisher.join(TIMEOUT)
        subscriber.join(TIMEOUT)
    report = verify(audit)
    assert report.damage is None
    assert report.sequence_holes == []
    assert logged(audit) == frames
    assert report.files > 1
    assert set(subscriber.received) <= set(frames)
    assert len(subscriber.received) > 0
    assert publisher.reconnects >= 21


def test_replayAfterReconnect(workdir) -> None:
    """
    A subscriber cut off mid-stream reconnects, asks for its next sequence,
    and ends with the complete stream, in order, each frame once.
    """
    path, audit = os.path.join(workdir, "e.sock"), os.path.join(workdir, "audit")
    frames = orders(20_000)
    relay = start_relay(workdir, path, audit)
    try:
        first = BlockingClient(path)
        first.introduce()
        publisher = BlockingClient(path)
        publisher.introduce(publish_only=True)

        def publish() -> None:
            for start in range(0, len(frames), 40):
                publisher.publish(b"".join(frames[start : start + 40]))
                time.sleep(0.002)

        feeding = threading.Thread(target=publish, daemon=True)
        feeding.start()
        before = [frame for _, frame in first.receive(3000, timeout=TIMEOUT)]
        first.close()
        time.sleep(0.3)  # frames go on without it
        second = BlockingClient(path)
        second.recover({SOURCE: len(before) + 1})
        after = [frame for _, frame in second.receive(len(frames) - len(before), TIMEOUT)]
        feeding.join(TIMEOUT)
        assert len(before) == 3000
        assert before + after == frames
        assert second.incoming.answers == [(SOURCE, 3001, 0)]
        assert second.receive(1, timeout=0.5) == []
        second.close()
        publisher.close()
    finally:
        relay.stop()
    assert "caught up" in relay.log()


def test_auditWriteFailure(workdir) -> None:
    """
    When the audit log cannot be written (here: the file size limit, EFBIG),
    publishers are held back, nothing unlogged is forwarded, /health says
    so; once it can be written again every frame is logged and forwarded.
    """
    path, audit = os.path.join(workdir, "e.sock"), os.path.join(workdir, "audit")
    (port,) = free_ports(1)
    frames = orders(10_000)
    relay = start_relay(
        workdir, path, audit,
        "--audit-rotate", "10000000",
        "--http", f"tcp:{port}:interface=127.0.0.1",
        preexec_fn=limit_file_size,
    )
    try:
        subscriber = BlockingClient(path)
        subscriber.introduce()
        publisher = BlockingClient(path)
        publisher.introduce(publish_only=True)
        feeding = threading.Thread(target=publisher.publish, args=(b"".join(frames),), daemon=True)
        feeding.start()
        deadline = time.monotonic() + TIMEOUT
        while "audit log write failed" not in relay.log():
            assert time.monotonic() < deadline, relay.log()
            time.sleep(0.05)
        received = [f for _, f in subscriber.receive(len(frames), timeout=1.0)]
        in_log = logged(audit)
        assert 0 < len(received) == len(in_log) < len(frames)
        assert received == frames[: len(received)]
        late = BlockingClient(path)
        late.recover({SOURCE: 1})
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
        assert unavailable.value.code == 503
        health = health_of(f"http://127.0.0.1:{port}")
        assert health["status"] == "degraded"
        assert "File too large" in health["audit"]["failing"]
        assert health["totals"]["publishers_paused_now"] is True
        resource.prlimit(
            relay.process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2
        )
        received += [f for _, f in subscriber.receive(len(frames) - len(received), TIMEOUT)]
        feeding.join(TIMEOUT)
        assert received == frames
        # a replay asked for during the outage: every frame once, in order
        assert [f for _, f in late.receive(len(frames) + 1, timeout=2.0)] == frames
        assert "audit log writable again" in relay.log()
    finally:
        relay.stop()
    report = verify(audit)
    assert (report.damage, report.records) == (None, len(frames))


NOBODY = 65534


def _publish_as_nobody(path: str, frame: bytes) -> bytes:
    """
    Publish C{frame}, as a publish-only client, from a child process running
    as uid and gid 65534; the child reports whether the relay closed it
    within 3 seconds.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            peer = socket.socket(socket.AF_UNIX)
            peer.connect(path)
            peer.sendall(control_frame(publish_only=True) + frame)
            peer.settimeout(3)
            while peer.recv(65536):
                pass
            os.write(write_end, b"closed by the relay")
        except TimeoutError:
            os.write(write_end, b"still connected")
        except BaseException as e:
            os.write(write_end, repr(e).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        result = report.read()
    os.waitpid(pid, 0)
    return result


@pytest.mark.skipif(os.getuid() != 0, reason="running a client as another user needs root")
@pytest.mark.parametrize("allowed", [False, True])
def test_uidAllowedToPublish(workdir, allowed: bool) -> None:
    """
    On execution only the relay's own user and the --allow-publish entries
    publish: another uid is closed with its pid, uid and gid logged, unless
    it is listed.
    """
    os.chmod(workdir, 0o755)
    path, audit = os.path.join(workdir, "e.sock"), os.path.join(workdir, "audit")
    extra = ("--allow-publish", f"uid:{NOBODY}") if allowed else ()
    relay = start_relay(workdir, path, audit, "--mode", "0666", *extra)
    frame = orders(1)[0]
    try:
        subscriber = BlockingClient(path)
        subscriber.introduce()
        result = _publish_as_nobody(path, frame)
        got = [f for _, f in subscriber.receive(1, timeout=1.0)]
        subscriber.close()
    finally:
        relay.stop()
    log = relay.log()
    if allowed:
        assert result == b"still connected", result
        assert got == [frame]
        assert "not allowed" not in log
    else:
        assert result == b"closed by the relay", result
        assert got == []
        assert re.search(
            rf"closing client \d+: pid \d+ uid {NOBODY} gid {NOBODY} is not allowed to publish",
            log,
        ), log
