"""
The NATS bridge against a real 3-node NATS cluster on loopback and real
relay processes: relay A uses node 1, relay B node 3; and against single
nats-server processes that ask for a password or TLS client certificates.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from twisted_relay.audit import LogReader, audit_paths
from twisted_relay.client import BlockingClient
from twisted_relay.testing import (
    NatsCluster,
    bridged_relay,
    free_ports,
    nats_server,
    start_bridged,
)
from twisted_relay.wire import build_frame

from .helpers import health_of, orders
from .relayprocess import RelayProcess, limit_file_size
from .test_tls import pki  # noqa: F401 (a fixture)

TIMEOUT = 30.0
PROBE_SOURCE = 99


@pytest.fixture
def cluster():
    workdir = tempfile.mkdtemp(prefix="tr-nats-", dir="/tmp")
    started = NatsCluster(workdir).start()
    yield started
    started.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def relays(cluster):
    """Start relays of a domain bridged to the cluster: name -> (socket, status URL)."""
    workdir = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    running: list[RelayProcess] = []

    def start(
        name: str, node: int, domain: str, *args: str, preexec_fn=None
    ) -> tuple[str, str, RelayProcess]:
        if domain == "execution":
            args = (*args, "--audit-dir", os.path.join(workdir, f"{name}-audit"))
        path, url, relay = bridged_relay(
            cluster, workdir, name, node, domain, *args, preexec_fn=preexec_fn
        )
        running.append(relay)
        start_bridged(relay)
        return path, url, relay

    yield start
    try:
        for relay in running:
            if relay.process.poll() is None:
                relay.process.terminate()
        for relay in running:
            # a bridged relay gives NATS a few seconds before its own drain
            relay.wait_exit(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def market(count: int, source: int = 1, size: int = 40) -> list[bytes]:
    return [build_frame(1, source, seq, [(1, bytes([seq % 251]) * size)]) for seq in range(1, count + 1)]


def wait_for_interest(publisher: BlockingClient, subscribers: list[BlockingClient]) -> None:
    """
    Publish probe frames until every subscriber got one: a subscription made
    through one node reaches the others asynchronously.
    """
    deadline = time.monotonic() + TIMEOUT
    sequence = 0
    waiting = list(subscribers)
    while waiting:
        assert time.monotonic() < deadline, "no interest across the cluster"
        sequence += 1
        publisher.publish(market(sequence, source=PROBE_SOURCE)[-1])
        waiting = [s for s in waiting if not s.receive(1, timeout=0.2)]
    for subscriber in subscribers:
        while subscriber.receive(1, timeout=0.3):
            pass


def test_frames_cross_hosts(relays) -> None:
    """
    Frames published on relay A reach relay B's subscribers byte-identical,
    in order; A's own subscriber gets each once (nothing comes back).
    """
    path_a, url_a, _ = relays("hostA", 0, "market")
    path_b, url_b, _ = relays("hostB", 2, "market")
    frames = market(50_000)
    with BlockingClient(path_a) as publisher, BlockingClient(path_b) as far, BlockingClient(
        path_a
    ) as near:
        publisher.introduce(publish_only=True)
        far.introduce()
        near.introduce()
        wait_for_interest(publisher, [far, near])
        for start in range(0, len(frames), 500):
            publisher.publish(b"".join(frames[start : start + 500]))
        got_far = [f for _, f in far.receive(len(frames), TIMEOUT)]
        got_near = [f for _, f in near.receive(len(frames), TIMEOUT)]
        assert got_far == frames
        assert got_near == frames
        assert near.receive(1, timeout=0.5) == []
    bridge_a, bridge_b = health_of(url_a)["nats"], health_of(url_b)["nats"]
    assert bridge_a["frames_in"] == 0 and bridge_a["echoes"] == 0
    assert bridge_b["frames_in"] >= len(frames) and bridge_b["frames_out"] == 0
    assert bridge_a["chunks_out"] < bridge_a["frames_out"] / 10  # runs, not frames


def test_drops_when_nats_stalls(relays, cluster) -> None:
    """
    With its NATS node stopped, the market relay's bridge drops whole chunks
    over its high-water mark and counts them; local subscribers lose nothing.
    """
    path_a, url_a, relay_a = relays("hostA", 0, "market", "--nats-high-water", "65536")
    frames = market(200_000)
    node = cluster.nodes[0]
    with BlockingClient(path_a) as publisher, BlockingClient(path_a) as near:
        publisher.introduce(publish_only=True)
        near.introduce()
        got_near: list[bytes] = []
        reading = threading.Thread(
            target=lambda: got_near.extend(f for _, f in near.receive(len(frames), TIMEOUT))
        )
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            reading.start()
            for start in range(0, len(frames), 500):
                publisher.publish(b"".join(frames[start : start + 500]))
                time.sleep(0.005)  # a pace the local subscriber keeps up with
            reading.join(TIMEOUT)
            assert health_of(url_a)["nats"]["frames_dropped"] > 0
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
        assert got_near == frames
    deadline = time.monotonic() + TIMEOUT
    while (bridge := health_of(url_a)["nats"])["queued_bytes"]:
        assert time.monotonic() < deadline, bridge
        time.sleep(0.1)
    # every frame was either sent to NATS or dropped, and counted
    assert bridge["frames_out"] + bridge["frames_dropped"] == len(frames)
    assert re.search(r"NATS bridge: dropped \d+ frames", relay_a.log())


def test_execution_survives_node_kill(relays, cluster) -> None:
    """
    Execution goes through JetStream: kill -9 the NATS node relay A publishes
    through, mid-stream; relay B's subscriber still gets every order once, in
    order (A fails over, publishes unacknowledged messages again with the same
    id, and the stream drops the copies).
    """
    path_a, url_a, relay_a = relays("hostA", 0, "execution")
    path_b, url_b, _ = relays("hostB", 2, "execution")
    frames = orders(20_000)
    with BlockingClient(path_a) as publisher, BlockingClient(path_b) as far:
        publisher.introduce(publish_only=True)
        far.introduce()
        got: list[bytes] = []
        reading = threading.Thread(
            target=lambda: got.extend(f for _, f in far.receive(len(frames), 90))
        )
        reading.start()
        for start in range(0, len(frames), 100):
            if start == 8_000:
                cluster.nodes[0].kill()
            publisher.publish(b"".join(frames[start : start + 100]))
            time.sleep(0.02)
        reading.join(100)
        assert len(got) == len(frames)
        assert got == frames
        assert far.receive(1, timeout=1.0) == []
    assert "NATS bridge reconnected" in relay_a.log()
    assert health_of(url_b)["nats"]["frames_in"] == len(frames)


def audited_from_nats(directory: str) -> list[bytes]:
    """The frames a relay's audit log holds from its NATS bridge (client id 0)."""
    return [r.frame for r in LogReader(audit_paths(directory)) if r.client_id == 0]


def test_execution_backlog_and_restart(relays, cluster) -> None:
    """
    A backlog built while the publishing relay's NATS node is frozen goes out
    in large messages within the server's limit; a receiving relay restarted
    mid-stream stops cleanly and picks up where it stopped: its audit log
    holds every order from the other host once, in order.
    """
    path_a, url_a, _ = relays("hostA", 0, "execution")
    path_b, url_b, relay_b = relays("hostB", 2, "execution")
    frames = [build_frame(3, 42, seq, [(255 - 1, bytes(1000))]) for seq in range(1, 3001)]
    node = cluster.nodes[0]
    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            for start in range(0, 1500, 50):
                publisher.publish(b"".join(frames[start : start + 50]))
            time.sleep(3)  # over a megabyte waits for the stream
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + TIMEOUT
        while health_of(url_b)["nats"]["frames_in"] == 0:
            assert time.monotonic() < deadline, relay_b.log()
            time.sleep(0.01)
        # Stopped while orders stream in (stop() fails if it hangs): the
        # bridge stops before the audit log closes.
        relay_b.stop()
        assert "audit log write failed" not in relay_b.log(), relay_b.log()
        audit = os.path.join(os.path.dirname(path_b), "hostB-audit")
        before = len(audited_from_nats(audit))
        for start in range(1500, 3000, 50):
            publisher.publish(b"".join(frames[start : start + 50]))
            time.sleep(0.01)
        relay_b.start().wait_listening(2)
        deadline = time.monotonic() + 60
        # frames_in counts from the restart: the rest of the orders
        while health_of(url_b)["nats"]["frames_in"] < len(frames) - before:
            assert time.monotonic() < deadline, relay_b.log()
            time.sleep(0.2)
    bridge_a = health_of(url_a)["nats"]
    assert bridge_a["retries"] > 0 and bridge_a["frames_dropped"] == 0
    assert audited_from_nats(audit) == frames


def test_execution_stop_while_receiving(relays) -> None:
    """
    A receiving relay stopped while orders stream in from another host gives
    its subscriber everything it logged from NATS, in order, and leaves the
    rest to the stream: restarted, its log holds every order once, in order.
    """
    path_a, _, _ = relays("hostA", 0, "execution")
    # However long the slow subscriber takes, it is neither cut off nor drained short.
    path_b, url_b, relay_b = relays(
        "hostB", 2, "execution", "--stall-timeout", "60", "--drain-timeout", "60"
    )
    audit = os.path.join(os.path.dirname(path_b), "hostB-audit")
    frames = [build_frame(3, 42, seq, [(255 - 1, bytes(1000))]) for seq in range(1, 20_001)]
    subscriber = BlockingClient(path_b)
    subscriber.introduce()
    received: list[bytes] = []

    def read() -> None:
        # Slower than the orders come: the relay still has some queued for
        # this subscriber when it stops, and drains them.
        for _, frame in subscriber.frames(timeout=TIMEOUT):
            received.append(frame)
            if len(received) % 100 == 0:
                time.sleep(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def feed() -> None:
        for start in range(0, len(frames), 100):
            publisher.publish(b"".join(frames[start : start + 100]))
            time.sleep(0.01)

    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        feeding = threading.Thread(target=feed, daemon=True)
        feeding.start()
        deadline = time.monotonic() + TIMEOUT
        while health_of(url_b)["nats"]["frames_in"] < 2000:
            assert time.monotonic() < deadline, relay_b.log()
            time.sleep(0.01)
        relay_b.stop(timeout=90)  # it drains to the slow subscriber first
        reader.join(TIMEOUT)
        assert not reader.is_alive()
        logged = audited_from_nats(audit)
        assert received == logged == frames[: len(logged)]
        feeding.join(TIMEOUT)
    subscriber.close()
    relay_b.start().wait_listening(2)
    deadline = time.monotonic() + 60
    while health_of(url_b)["nats"]["frames_in"] < len(frames) - len(logged):
        assert time.monotonic() < deadline, relay_b.log()
        time.sleep(0.2)
    assert audited_from_nats(audit) == frames


def test_execution_receiver_audit_failure(relays) -> None:
    """
    A receiving relay whose audit log cannot be written (the file size limit:
    EFBIG) acknowledges to the stream nothing it has not logged: stopped in
    that state and started again with room, its audit log holds every order
    from the other host once, in order.
    """
    path_a, _, _ = relays("hostA", 0, "execution")
    path_b, url_b, relay_b = relays(
        "hostB", 2, "execution", "--audit-rotate", "10000000", preexec_fn=limit_file_size
    )
    audit = os.path.join(os.path.dirname(path_b), "hostB-audit")
    frames = orders(10_000)
    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        publisher.publish(b"".join(frames))
    deadline = time.monotonic() + TIMEOUT
    while "audit log write failed" not in relay_b.log():
        assert time.monotonic() < deadline, relay_b.log()
        time.sleep(0.05)
    relay_b.stop()
    assert "left to the stream, which delivers them again" in relay_b.log(), relay_b.log()
    before = len(audited_from_nats(audit))
    assert 0 < before < len(frames)
    relay_b.preexec_fn = None
    relay_b.start().wait_listening(2)
    deadline = time.monotonic() + 60
    while health_of(url_b)["nats"]["frames_in"] < len(frames) - before:
        assert time.monotonic() < deadline, relay_b.log()
        time.sleep(0.2)
    assert audited_from_nats(audit) == frames


def test_duplicate_relay_id(relays) -> None:
    """Two relays with one --relay-id ignore each other's frames: that is logged."""
    path_a, _, _ = relays("first", 0, "market", "--relay-id", "same")
    _, url_b, relay_b = relays("second", 2, "market", "--relay-id", "same")
    frames = market(100)
    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        deadline = time.monotonic() + TIMEOUT
        while "another relay publishes as same" not in relay_b.log():
            assert time.monotonic() < deadline, relay_b.log()
            publisher.publish(b"".join(frames))
            time.sleep(0.1)
    assert health_of(url_b)["nats"]["frames_in"] == 0


def test_execution_gap_of_expired_messages(relays, cluster) -> None:
    """
    Orders that expired from the stream while the receiving relay was down
    are a gap it logs and counts, then it carries on with the next ones; it
    never waits for them for ever nor delivers anything twice.
    """
    import asyncio

    import nats
    from nats.js.api import StorageType

    async def short_lived_stream() -> None:
        connection = await nats.connect(cluster.nodes[0].url)
        await connection.jetstream().add_stream(
            name="TORQ_EXECUTION", subjects=["torq.execution.>"], storage=StorageType.FILE,
            max_age=5.0,
        )
        await connection.close()

    asyncio.run(short_lived_stream())
    path_a, _, _ = relays("hostA", 0, "execution")
    path_b, url_b, relay_b = relays("hostB", 2, "execution")
    frames = orders(250)
    audit = os.path.join(os.path.dirname(path_b), "hostB-audit")
    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        publisher.publish(b"".join(frames[:100]))
        deadline = time.monotonic() + TIMEOUT
        while health_of(url_b)["nats"]["frames_in"] < 100:
            assert time.monotonic() < deadline, relay_b.log()
            time.sleep(0.1)
        relay_b.stop()
        publisher.publish(b"".join(frames[100:200]))
        time.sleep(6)  # those expire from the stream
        publisher.publish(b"".join(frames[200:]))
        relay_b.start().wait_listening(2)
        while health_of(url_b)["nats"]["frames_in"] < 50:
            assert time.monotonic() < deadline, relay_b.log()
            time.sleep(0.1)
    assert "expired before this relay read them" in relay_b.log()
    assert health_of(url_b)["nats"]["stream_gaps"] >= 1
    assert audited_from_nats(audit) == frames[:100] + frames[200:]


def test_execution_stop_with_nats_down(relays, cluster) -> None:
    """
    An execution relay stopped while every NATS node is down says in one
    warning how many orders never reached the stream, with no traceback.
    """
    path_a, _, relay_a = relays("hostA", 0, "execution")
    cluster.stop()
    with BlockingClient(path_a) as publisher:
        publisher.introduce(publish_only=True)
        publisher.publish(b"".join(orders(100)))
        deadline = time.monotonic() + TIMEOUT
        while "client 1 disconnected" not in relay_a.log():
            assert time.monotonic() < deadline, relay_a.log()
            publisher.close()
            time.sleep(0.05)
    relay_a.stop()
    log = relay_a.log()
    assert "Server Shut Down" in log, log
    assert "NATS bridge stopping with 100 frames not published" in log, log
    assert "Traceback" not in log and "#critical" not in log, log


@pytest.fixture
def nats_node():
    """Start one nats-server with the given arguments: its client port, once it answers."""
    workdir = tempfile.mkdtemp(prefix="tr-nats-", dir="/tmp")
    processes: list[subprocess.Popen] = []

    def start(*args: str) -> int:
        port, monitor = free_ports(2)
        log = open(os.path.join(workdir, f"nats-{port}.log"), "wb")
        processes.append(
            subprocess.Popen(
                [nats_server(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=2):
                    return port
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.1)

    yield start, workdir
    for process in processes:
        process.terminate()
        process.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def bridged(
    workdir: str, name: str, nats: str, *args: str, domain: str = "market", env=None
) -> tuple[str, RelayProcess]:
    """A relay bridged to C{nats} with C{args}, started: its status URL and process."""
    (port,) = free_ports(1)
    relay = RelayProcess(
        workdir, "--domain", domain, "--listen", f"unix:{workdir}/{name}.sock",
        "--http", f"tcp:{port}:interface=127.0.0.1", "--nats", nats, "--relay-id", name,
        *args, env=env,
    )
    return f"http://127.0.0.1:{port}", relay.start()


def logged(relay: RelayProcess, text: str) -> str:
    """The relay's log once it holds C{text} (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while text not in (log := relay.log()):
        assert relay.process.poll() is None and time.monotonic() < deadline, log
        time.sleep(0.05)
    return log


def shown(url: str, relay: RelayProcess) -> dict[str, str]:
    """What the relay shows of itself: its log, /health, status and its process arguments."""
    status = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "twisted-relay"), "status", url],
        capture_output=True, text=True, timeout=30, check=True,
    )
    with open(f"/proc/{relay.process.pid}/cmdline", "rb") as f:
        arguments = f.read().replace(b"\0", b" ").decode()
    return {
        "log": relay.log(),
        "health": json.dumps(health_of(url)),
        "status": status.stdout,
        "arguments": arguments,
    }


def test_password_never_shown(nats_node) -> None:
    """
    A password from a file or from the environment gets the bridge into a
    server that asks for one, and is in none of the relay's log, /health,
    status or process arguments; one in the URL (warned against) is in the
    arguments alone, and shown as *** everywhere else.
    """
    start, workdir = nats_node
    secret = "s3cret-Pa55word"
    port = start("--user", "relay", "--pass", secret)
    user_file = os.path.join(workdir, "nats-user")
    with open(user_file, "w") as f:
        f.write(f"relay:{secret}\n")
    server = f"nats://127.0.0.1:{port}"
    relays = {
        "file": bridged(workdir, "fromfile", server, "--nats-user-file", user_file),
        "environment": bridged(
            workdir, "fromenv", server, env={"NATS_USER": "relay", "NATS_PASSWORD": secret}
        ),
        "url": bridged(workdir, "inurl", f"nats://relay:{secret}@127.0.0.1:{port}"),
    }
    try:
        for how, (url, relay) in relays.items():
            logged(relay, "NATS bridge connected")
            seen = shown(url, relay)
            if how == "url":
                assert secret in seen.pop("arguments")
                assert "show in the process arguments" in seen["log"], seen["log"]
                assert json.loads(seen["health"])["nats"]["servers"] == [
                    f"nats://***@127.0.0.1:{port}"
                ]
            for where, text in seen.items():
                assert secret not in text, (how, where, text)
    finally:
        for _, relay in relays.values():
            relay.stop()


def test_wrong_password_retried(nats_node) -> None:
    """A refused password is a retry line that says what failed, and the relay carries on."""
    start, workdir = nats_node
    port = start("--user", "relay", "--pass", "right")
    url, relay = bridged(
        workdir, "wrong", f"nats://127.0.0.1:{port}",
        env={"NATS_USER": "relay", "NATS_PASSWORD": "wrong"},
    )
    try:
        log = logged(relay, "; retrying")
        assert re.search(
            rf"cannot connect to NATS at nats://127.0.0.1:{port} yet: .*[Aa]uthorization", log
        ), log
        assert health_of(url)["nats"]["connected"] is False
    finally:
        relay.stop()


def test_tls_client_certificate(nats_node, pki) -> None:  # noqa: F811
    """
    A server that requires TLS client certificates takes the bridge given
    --nats-tls-ca/--nats-tls-cert/--nats-tls-key; without them the bridge
    says it cannot connect and retries.
    """
    start, workdir = nats_node
    _, files = pki
    (ca, _), (cert, key) = files["ca"], files["localhost"]
    port = start("--tls", "--tlscert", cert, "--tlskey", key, "--tlscacert", ca, "--tlsverify")
    server = f"nats://localhost:{port}"
    gateway_cert, gateway_key = files["gateway"]
    url, relay = bridged(
        workdir, "tls", server,
        "--nats-tls-ca", ca, "--nats-tls-cert", gateway_cert, "--nats-tls-key", gateway_key,
    )
    _, refused = bridged(workdir, "plain", server)
    try:
        logged(relay, "NATS bridge connected")
        assert health_of(url)["nats"]["connected"] is True
        assert "NATS bridge connected" not in logged(refused, "; retrying")
    finally:
        relay.stop()
        refused.stop()


def test_jetstream_waits_said(nats_node) -> None:
    """
    An execution relay that cannot set up its stream yet says what it waits
    for: a server without JetStream, or a stream it cannot create (three
    replicas asked of a single server, as of a cluster still forming).
    """
    start, workdir = nats_node
    plain, single = start(), start("-js", "-sd", os.path.join(workdir, "js"))
    _, no_jetstream = bridged(
        workdir, "nojs", f"nats://127.0.0.1:{plain}",
        "--audit-dir", os.path.join(workdir, "audit-nojs"), domain="execution",
    )
    _, no_stream = bridged(
        workdir, "nostream", f"nats://127.0.0.1:{single}", "--nats-replicas", "3",
        "--audit-dir", os.path.join(workdir, "audit-nostream"), domain="execution",
    )
    try:
        log = logged(no_jetstream, "; retrying")
        assert re.search(
            r"JetStream does not answer for stream TORQ_EXECUTION yet: .+; retrying in 0.5s", log
        ), log
        log = logged(no_stream, "; retrying")
        assert re.search(
            r"JetStream stream TORQ_EXECUTION not found yet, nor created: .+; retrying in 0.5s",
            log,
        ), log
    finally:
        no_jetstream.stop()
        no_stream.stop()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _jwt(subject: str, name: str, nats: dict, signer) -> str:
    """A NATS JWT (ed25519-nkey) for C{subject}, signed by the key pair C{signer}."""
    claims = {
        "iat": int(time.time()), "iss": signer.public_key.decode(), "name": name,
        "sub": subject, "nats": {"version": 2, **nats},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode()
    signed = _b64(b'{"typ":"JWT","alg":"ed25519-nkey"}') + "." + _b64(json.dumps(claims).encode())
    return signed + "." + _b64(signer.sign(signed.encode()))


def operator_mode(directory: str) -> tuple[str, str, str]:
    """
    An operator, an account and a user, as nsc would make them: the server's
    configuration (operator JWT, the account preloaded), the user's .creds
    file, and the user's NKEY seed.
    """
    import nkeys

    def keys(prefix: int):
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return nkeys.from_seed(bytearray(seed)), seed.decode()

    (operator, _), (account, _), (user, seed) = (
        keys(nkeys.PREFIX_BYTE_OPERATOR), keys(nkeys.PREFIX_BYTE_ACCOUNT), keys(nkeys.PREFIX_BYTE_USER)
    )
    unlimited = dict.fromkeys(["subs", "data", "payload", "imports", "exports", "conn", "leaf"], -1)
    account_id = account.public_key.decode()
    config, creds = os.path.join(directory, "operator.conf"), os.path.join(directory, "relay.creds")
    with open(config, "w") as f:
        f.write(
            f"operator: {_jwt(operator.public_key.decode(), 'op', {'type': 'operator'}, operator)}\n"
            f"resolver: MEMORY\nresolver_preload: {{\n  {account_id}: "
            f"{_jwt(account_id, 'torq', {'type': 'account', 'limits': unlimited}, operator)}\n}}\n"
        )
    user_jwt = _jwt(
        user.public_key.decode(), "relay",
        {"type": "user", "subs": -1, "data": -1, "payload": -1}, account,
    )
    with open(creds, "w") as f:
        f.write(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
    os.chmod(creds, 0o600)
    return config, creds, seed


def test_creds_file(nats_node) -> None:
    """
    A server in operator mode (JWT accounts) takes the bridge given the
    user's .creds file; the user's NKEY seed is shown nowhere, and a relay
    without credentials is refused.
    """
    start, workdir = nats_node
    config, creds, seed = operator_mode(workdir)
    port = start("-c", config)
    url, relay = bridged(workdir, "creds", f"nats://127.0.0.1:{port}", "--nats-creds", creds)
    _, refused = bridged(workdir, "nocreds", f"nats://127.0.0.1:{port}")
    try:
        log = logged(relay, "NATS bridge connected")
        assert f"(credentials file {creds})" in log, log
        for where, text in shown(url, relay).items():
            assert seed not in text, (where, text)
        assert "NATS bridge connected" not in logged(refused, "; retrying")
    finally:
        relay.stop()
        refused.stop()
