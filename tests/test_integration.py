"""
Integration tests: a real C{twistd -n relay} process on a temporary socket,
real clients on the real reactor (pytest-twisted).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import tempfile

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from twisted_relay.wire import Domain, build_frame

from .helpers import frames_for, free_ports
from .relayprocess import REPO, RelayProcess, dial


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relays(workdir):
    """Start relays in C{workdir}; every one still running is stopped afterwards."""
    started: list[RelayProcess] = []

    def start(*args: str, wait: bool = True, env=None, runner: str = "twistd") -> RelayProcess:
        relay = RelayProcess(workdir, *args, env=env, runner=runner).start()
        started.append(relay)
        return relay.wait_listening() if wait else relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.stop()


def sock(workdir: str, name: str = "r.sock") -> str:
    return os.path.join(workdir, name)


def pause(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def assert_relays(path: str, subscriber=None) -> None:
    """The relay at C{path} carries a frame from a new publisher to a subscriber."""
    if subscriber is None:
        subscriber = await dial(f"unix:{path}")
    publisher = await dial(f"unix:{path}")
    frame = frames_for(Domain.MARKET_DATA, 1)[0]
    publisher.send(frame)
    assert (await subscriber.receive(len(subscriber.received) + len(frame)))[-len(frame) :] == frame


@pytest_twisted.ensureDeferred
async def test_fan_out_without_echo(workdir, relays):
    """One publisher, three subscribers: each gets the byte-identical stream; no echo."""
    path = sock(workdir, "e.sock")
    relays("--domain", "execution", "--listen", f"unix:{path}")
    subscribers = [(await dial(f"unix:{path}")) for _ in range(3)]
    publisher = await dial(f"unix:{path}")
    frames = b"".join(frames_for(Domain.EXECUTION, 500, size=60))
    for i in range(0, len(frames), 1000):
        publisher.send(frames[i : i + 1000])
    for subscriber in subscribers:
        assert (await subscriber.receive(len(frames))) == frames
    marker = frames_for(Domain.EXECUTION, 1, source=99)[0]
    subscribers[0].send(marker)
    assert (await publisher.receive(len(marker))) == marker
    await pause(0.2)
    assert bytes(publisher.received) == marker
    assert bytes(subscribers[0].received) == frames


@pytest_twisted.ensureDeferred
async def test_mixed_domains_filtered(workdir, relays):
    """The market relay forwards market frames only, in their order."""
    path = sock(workdir)
    relays("--domain", "market", "--listen", f"unix:{path}")
    subscriber = await dial(f"unix:{path}")
    publisher = await dial(f"unix:{path}")
    market = frames_for(Domain.MARKET_DATA, 30)
    other = frames_for(Domain.SIGNAL, 30) + frames_for(Domain.EXECUTION, 30)
    publisher.send(b"".join(m + o for m, o in zip(market, other)))
    expected = b"".join(market)
    assert (await subscriber.receive(len(expected))) == expected
    await pause(0.2)
    assert bytes(subscriber.received) == expected


@pytest_twisted.ensureDeferred
async def test_garbage_sender_closed_others_served(workdir, relays):
    """A client sending garbage is cut off with a logged reason; the others carry on."""
    path = sock(workdir)
    relay = relays("--domain", "signal", "--listen", f"unix:{path}")
    subscriber = await dial(f"unix:{path}")
    publisher = await dial(f"unix:{path}")
    vandal = await dial(f"unix:{path}")
    first, second = frames_for(Domain.SIGNAL, 2)
    publisher.send(first)
    assert (await subscriber.receive(len(first))) == first
    vandal.send(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    await vandal.wait_closed()
    publisher.send(second)
    assert (await subscriber.receive(len(first + second))) == first + second
    assert "closing client 3: bad magic 0x20544547 at offset 0 from client 3" in relay.log()


@pytest_twisted.ensureDeferred
async def test_stale_socket_removed(workdir, relays):
    """A socket file left by a dead relay is removed and the relay serves."""
    path = sock(workdir)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    relay = relays("--listen", f"unix:{path}")
    assert f"removed stale socket {path}" in relay.log()
    await assert_relays(path)


@pytest_twisted.ensureDeferred
async def test_second_relay_refused(workdir, relays):
    """A relay on a live path exits with one clear line; the first keeps serving."""
    path = sock(workdir)
    relays("--listen", f"unix:{path}")
    subscriber = await dial(f"unix:{path}")
    second = relays("--listen", f"unix:{path}", wait=False)
    assert second.wait_exit() != 0
    assert (
        f"twistd relay: cannot listen on unix:{path}: a relay is already listening on {path}\n"
    ) in second.log()
    await assert_relays(path, subscriber)


@pytest_twisted.ensureDeferred
async def test_simultaneous_start_one_wins(workdir, relays):
    """Of two relays started at the same instant on one path, exactly one serves."""
    path = sock(workdir)
    pair = [relays("--listen", f"unix:{path}", wait=False) for _ in range(2)]
    loser = None
    for _ in range(400):
        exited = [r for r in pair if r.process.poll() is not None]
        if exited:
            [loser] = exited
            break
        await pause(0.05)
    assert loser is not None, "neither relay refused the path"
    assert loser.wait_exit() != 0
    assert f"a relay is already listening on {path}" in loser.log()
    [winner] = [r for r in pair if r is not loser]
    winner.wait_listening()
    await assert_relays(path)


def test_path_not_a_socket_refused(workdir, relays):
    """A regular file at the socket path is left untouched and the relay refuses."""
    path = sock(workdir)
    with open(path, "w") as f:
        f.write("keep me")
    relay = relays("--listen", f"unix:{path}", wait=False)
    assert relay.wait_exit() != 0
    assert f"{path} exists and is not a socket; not touching it" in relay.log()
    with open(path) as f:
        assert f.read() == "keep me"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_socket_removed_on_signal(workdir, relays, sig):
    """SIGTERM and SIGINT stop the relay cleanly and remove its socket file."""
    path = sock(workdir, "deep/er/r.sock")
    relay = relays("--listen", f"unix:{path}")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    # After a clean shutdown twistd re-raises the signal, as Unix tools do.
    assert relay.stop(sig) == -sig
    assert not os.path.exists(path)
    assert "Server Shut Down." in relay.log()


@pytest_twisted.ensureDeferred
async def test_twist_runner(workdir, relays):
    """C{twist relay} serves, as C{twistd relay} does, and removes its socket on SIGTERM."""
    path = sock(workdir)
    relay = relays("--listen", f"unix:{path}", runner="twist")
    await assert_relays(path)
    relay.stop()
    assert not os.path.exists(path)
    assert "stopped: 1 frames accepted" in relay.log()


@pytest.mark.parametrize("args, mode", [((), 0o660), (("--mode", "600"), 0o600)])
def test_mode_applied(workdir, relays, args, mode):
    """The socket file has the configured mode, 0660 by default."""
    path = sock(workdir)
    relays("--listen", f"unix:{path}", *args)
    assert stat.S_IMODE(os.lstat(path).st_mode) == mode


@pytest_twisted.ensureDeferred
async def test_third_party_domain_plugin(workdir, relays):
    """A domain added by a plugin file on the Python path runs with no engine change."""
    plugins = os.path.join(workdir, "site", "twisted", "plugins")
    os.makedirs(plugins)
    with open(os.path.join(plugins, "acme_relay_domain.py"), "w") as f:
        f.write("from tests.plugins.acme_domain import acme\n")
    path = sock(workdir)
    env = {"PYTHONPATH": os.pathsep.join([os.path.join(workdir, "site"), REPO])}
    relay = relays("--domain", "acme_fx", "--listen", f"unix:{path}", env=env)
    assert "acme relay (domain 9) starting" in relay.log()
    subscriber = await dial(f"unix:{path}")
    publisher = await dial(f"unix:{path}")
    acme = [build_frame(9, 5, seq, [(200, b"fx")]) for seq in range(3)]
    publisher.send(acme[0] + frames_for(Domain.MARKET_DATA, 1)[0] + acme[1] + acme[2])
    expected = b"".join(acme)
    assert (await subscriber.receive(len(expected))) == expected


@pytest_twisted.ensureDeferred
async def test_tcp_and_unix_together(workdir, relays):
    """One relay listening on TCP and a Unix socket joins clients of both."""
    (port,) = free_ports(1)
    path = sock(workdir)
    relays(
        "--domain", "execution", "--listen", f"unix:{path}",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
    ).wait_listening(2)
    remote = await dial(f"tcp:127.0.0.1:{port}")
    local = await dial(f"unix:{path}")
    orders = b"".join(frames_for(Domain.EXECUTION, 10))
    local.send(orders)
    assert (await remote.receive(len(orders))) == orders


def test_failed_start_leaves_no_socket(workdir, relays):
    """A start-up that fails on its second socket removes the first one it bound."""
    busy = sock(workdir, "busy.sock")
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(busy)
    holder.listen(1)
    first = sock(workdir, "first.sock")
    relay = relays("--listen", f"unix:{first}", "--listen", f"unix:{busy}", wait=False)
    try:
        assert relay.wait_exit() != 0
    finally:
        holder.close()
    assert f"a relay is already listening on {busy}" in relay.log()
    assert not os.path.exists(first)
