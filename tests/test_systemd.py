"""
Tests for L{twisted_relay.app.systemd} and the adopted Unix sockets of
L{twisted_relay.app.endpoints}: unit tests first, then real relay processes
that talk to a notification socket and a listening socket owned by the test,
as they would to systemd's.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time

from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app.systemd import (
    JournalObserver,
    Notifier,
    SystemdService,
    watchdog_interval,
)
from twisted_relay.client import BlockingClient
from twisted_relay.testing import RelayProcess, frames_for, script
from twisted_relay.wire import Domain

#: Seconds any one wait of these tests may last.
WAIT = 10.0


def tempdir(test: SynchronousTestCase | None = None) -> str:
    """A fresh directory with a short path (Unix socket paths max out at 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    if test is not None:
        test.addCleanup(shutil.rmtree, path, True)
    return path


def listener(path: str, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket bound at C{path}: a notification socket, or (SOCK_STREAM) a listening one."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(path)
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    sock.settimeout(WAIT)
    return sock


def messages(sock: socket.socket, until: str, timeout: float = WAIT) -> list[str]:
    """Every notification received up to and including one that holds C{until}."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while not received or until not in received[-1].split("\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            raise AssertionError(f"no {until} within {timeout}s; got {received}") from None
    return received


class NotifierTests(SynchronousTestCase):
    def test_pathSocket(self) -> None:
        """A message is one datagram of newline-separated assignments."""
        path = os.path.join(tempdir(self), "notify")
        sock = listener(path)
        self.addCleanup(sock.close)
        notifier = Notifier.fromEnvironment({"NOTIFY_SOCKET": path})
        assert notifier is not None
        self.addCleanup(notifier.close)
        notifier.notify("READY=1", "STATUS=serving")
        self.assertEqual(sock.recv(100), b"READY=1\nSTATUS=serving")

    def test_abstractSocket(self) -> None:
        """An address starting with '@' names a socket in the abstract namespace."""
        name = f"twisted-relay-test-{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind("\0" + name)
        notifier = Notifier(f"@{name}")
        self.addCleanup(notifier.close)
        notifier.notify("WATCHDOG=1")
        self.assertEqual(sock.recv(100), b"WATCHDOG=1")

    def test_notUnderSystemd(self) -> None:
        """Without a usable NOTIFY_SOCKET there is no notifier."""
        self.assertIsNone(Notifier.fromEnvironment({}))
        self.assertIsNone(Notifier.fromEnvironment({"NOTIFY_SOCKET": "vsock:2:1"}))

    def test_failureLoggedOnce(self) -> None:
        """A notification socket that is gone is logged once, and the relay goes on."""
        notifier = Notifier(os.path.join(tempdir(self), "absent"))
        self.addCleanup(notifier.close)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        notifier.notify("WATCHDOG=1")
        notifier.notify("WATCHDOG=1")
        warnings = [e for e in events if e.get("log_namespace", "").endswith("Notifier")]
        self.assertEqual([e["log_level"] for e in warnings], [LogLevel.warn])


class WatchdogIntervalTests(SynchronousTestCase):
    def test_interval(self) -> None:
        """WATCHDOG_USEC is in microseconds; WATCHDOG_PID, if set, must be this process."""
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "3000000"}, 42), 3.0)
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "42"}, 42), 0.5
        )

    def test_none(self) -> None:
        """No watchdog when it is unset, malformed, zero or meant for another process."""
        for environ in (
            {},
            {"WATCHDOG_USEC": "soon"},
            {"WATCHDOG_USEC": "0"},
            {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "41"},
        ):
            self.assertIsNone(watchdog_interval(environ, 42), environ)


class SystemdServiceTests(SynchronousTestCase):
    def service(self, **environ: str) -> tuple[SystemdService, socket.socket, Clock]:
        """A service notifying a socket of this test's, on a L{Clock}."""
        path = os.path.join(tempdir(self), "notify")
        sock = listener(path)
        self.addCleanup(sock.close)
        notifier = Notifier(path)
        self.addCleanup(notifier.close)
        clock = Clock()
        service = SystemdService(notifier, clock, "relaying market frames on unix:x", environ)
        return service, sock, clock

    def received(self, sock: socket.socket) -> list[str]:
        """The notifications waiting on C{sock}."""
        sock.setblocking(False)
        found = []
        while True:
            try:
                found.append(sock.recv(4096).decode())
            except BlockingIOError:
                return found

    def test_readyThenStopping(self) -> None:
        """READY=1 with a status at start, STOPPING=1 at stop."""
        service, sock, _ = self.service()
        service.startService()
        self.assertEqual(
            self.received(sock), ["READY=1\nSTATUS=relaying market frames on unix:x"]
        )
        service.stopService()
        self.assertEqual(
            self.received(sock), ["STOPPING=1\nSTATUS=stopping: draining the clients"]
        )

    def test_watchdogAtHalfTheInterval(self) -> None:
        """Pings at half of WATCHDOG_USEC as the reactor's clock runs, none after the stop."""
        service, sock, clock = self.service(WATCHDOG_USEC="2000000")
        service.startService()
        self.assertEqual(self.received(sock)[1:], ["WATCHDOG=1"])  # at once, after READY=1
        clock.advance(0.9)
        self.assertEqual(self.received(sock), [])
        clock.pump([0.1] + [1.0] * 3)
        self.assertEqual(self.received(sock), ["WATCHDOG=1"] * 4)
        service.stopService()
        clock.pump([1.0] * 4)
        self.assertEqual([m.split("\n")[0] for m in self.received(sock)], ["STOPPING=1"])

    def test_noWatchdogForAnotherProcess(self) -> None:
        """A WATCHDOG_PID naming another process turns the pings off."""
        service, sock, clock = self.service(WATCHDOG_USEC="2000000", WATCHDOG_PID="1")
        service.startService()
        clock.pump([1.0] * 4)
        self.assertEqual([m.split("\n")[0] for m in self.received(sock)], ["READY=1"])


class JournalObserverTests(SynchronousTestCase):
    def test_priorities(self) -> None:
        """Each line starts with its sd-daemon priority and has no timestamp."""
        stream = io.StringIO()
        observer = JournalObserver(stream)
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error):
            observer(
                {"log_level": level, "log_format": "n={n}", "n": 1, "log_namespace": "x",
                 "log_time": 0.0}
            )
        self.assertEqual(
            stream.getvalue().splitlines(),
            ["<7>[x#debug] n=1", "<6>[x#info] n=1", "<4>[x#warn] n=1", "<3>[x#error] n=1"],
        )

    def test_tracebackLines(self) -> None:
        """Every line of a traceback carries the priority of its event."""
        stream = io.StringIO()
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        JournalObserver(stream)(
            {"log_level": LogLevel.critical, "log_format": "boom", "log_failure": failure,
             "log_time": 0.0}
        )
        lines = stream.getvalue().splitlines()
        self.assertGreater(len(lines), 2)
        self.assertTrue(all(line.startswith("<2>") for line in lines), lines)
        self.assertIn("ZeroDivisionError", lines[-1])


# Real relay processes.


def activated(workdir: str, sock: socket.socket, *args: str, name: str = "market") -> RelayProcess:
    """
    A relay given C{sock} as systemd gives a socket: descriptor 3, with
    LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to the relay's own pid by
    a shell that then becomes the relay.
    """
    fd = sock.fileno()

    def descriptor3() -> None:
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    relay = RelayProcess(
        workdir,
        "--listen", f"systemd:domain=UNIX:name={name}",
        *args,
        env={"LISTEN_FDS": "1", "LISTEN_FDNAMES": name},
        preexec_fn=descriptor3,
        pass_fds=(3,),
    )
    relay.args = ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *relay.args]
    return relay


def exchange(path: str) -> None:
    """Frames published by one client of the relay on C{path} reach another."""
    frames = frames_for(Domain.MARKET_DATA, 3)
    with BlockingClient(path) as subscriber, BlockingClient(path) as publisher:
        subscriber.introduce(timeout=WAIT)
        publisher.introduce(timeout=WAIT)
        publisher.publish(b"".join(frames))
        got = [frame for _, frame in subscriber.receive(3, timeout=WAIT)]
    assert got == frames


def test_readyWatchdogStopping(workdir):
    """READY=1 comes once the socket accepts; pings at half WATCHDOG_USEC; STOPPING=1 at SIGTERM."""
    notify = listener(os.path.join(workdir, "notify"))
    path = os.path.join(workdir, "r.sock")
    relay = RelayProcess(
        workdir, "--listen", f"unix:{path}",
        env={"NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "400000"},
    ).start()
    try:
        ready = messages(notify, "READY=1")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)  # no retry: listening before READY=1
        assert f"STATUS=relaying market frames on unix:{path}" in ready[-1].split("\n")
        start = time.monotonic()
        pings = messages(notify, "WATCHDOG=1")
        while len(pings) < 6:
            pings += messages(notify, "WATCHDOG=1")
        elapsed = time.monotonic() - start
        # Six pings 0.2s apart, the first at once: one second, give or take a busy machine.
        assert 0.8 <= elapsed <= 3.0, (elapsed, pings)
        relay.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert messages(notify, "STOPPING=1")[-1].startswith("STOPPING=1")
        assert relay.wait_exit() == -signal.SIGTERM  # twistd ends by the signal
    finally:
        relay.stop()
        notify.close()


def test_adoptedSocketSurvives(workdir):
    """A socket passed by systemd serves clients, outlives the relay, and serves the next one."""
    path = os.path.join(workdir, "market.sock")
    sock = listener(path, socket.SOCK_STREAM)
    os.chmod(path, 0o600)  # systemd's SocketMode=, which the relay keeps
    try:
        for _ in range(2):
            relay = activated(workdir, sock).start()
            try:
                relay.wait_listening()
                assert f"listening on systemd socket 3 (unix:{path})" in relay.log()
                exchange(path)
            finally:
                assert relay.stop() == -signal.SIGTERM, relay.log()
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, relay.log()
    finally:
        sock.close()


def test_adoptedSocketMissing(workdir):
    """A --listen naming a socket systemd did not pass is refused in one line."""
    run = subprocess.run(
        [script("twistd"), "-n", "--pidfile=", "relay", "--listen",
         "systemd:domain=UNIX:name=market"],
        cwd=workdir, capture_output=True, text=True, timeout=WAIT,
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        "twistd relay: --listen 'systemd:domain=UNIX:name=market': systemd passed this "
        "process no such socket (see LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID) "
        "(see twistd relay --help)"
    ]


def test_journalLogFormat(workdir):
    """twistd --logger journal_observer: every line of the relay's log starts with its priority."""
    path = os.path.join(workdir, "r.sock")
    relay = RelayProcess(workdir, "--listen", f"unix:{path}", "--allow-publish", "uid:nobody")
    relay.args.insert(1, "--logger=twisted_relay.app.systemd.journal_observer")
    relay.start().wait_listening()
    assert relay.stop() == -signal.SIGTERM
    lines = relay.log().splitlines()
    assert f"<6>[relay#info] listening on unix:{path} (mode 0660)" in lines
    assert all(line[:3] in {"<2>", "<3>", "<4>", "<6>", "<7>"} for line in lines), lines
