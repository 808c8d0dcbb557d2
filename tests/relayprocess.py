"""
A real C{twistd -n relay} in a subprocess, and a Twisted client that collects
what the relay sends, for the integration tests. Every wait is bounded.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol

from twisted_relay.client import RelayClientProtocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
RECEIVE_TIMEOUT = 10.0


def script(name: str = "twistd") -> str:
    """The command C{name} (twistd, twist) of the environment running the tests."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else shutil.which(name)


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
    ) -> None:
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
        # The relay runs this checkout's code, not a copy installed earlier.
        self.env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.preexec_fn = preexec_fn

    def start(self) -> RelayProcess:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.args,
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        return self

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_listening(self, count: int = 1) -> RelayProcess:
        """Block until the relay logged C{count} 'listening on' lines."""
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
        if self.process.poll() is None:
            self.process.send_signal(sig)
        result = self.wait_exit(timeout)
        self._log.close()
        return result


class Collector(RelayClientProtocol):
    """A relay client (the package's) that keeps every frame it receives, in order."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def frameReceived(self, header, frame: bytes) -> None:
        self.received += frame
        ready = [(n, d) for n, d in self._waiting if len(self.received) >= n]
        self._waiting = [(n, d) for n, d in self._waiting if len(self.received) < n]
        for _, d in ready:
            d.callback(bytes(self.received))

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        """Write C{data} as it is, whole frames or not."""
        self.transport.write(data)

    def receive(self, size: int, timeout: float = RECEIVE_TIMEOUT) -> Deferred[bytes]:
        """Fires with all frames received once they hold at least C{size} bytes."""
        if len(self.received) >= size:
            return succeed(bytes(self.received))
        d: Deferred[bytes] = Deferred()
        self._waiting.append((size, d))
        return d.addTimeout(timeout, reactor)

    def wait_closed(self, timeout: float = RECEIVE_TIMEOUT) -> Deferred[None]:
        return self.closed.addTimeout(timeout, reactor)


def dial(endpoint: str) -> Deferred[Collector]:
    """A L{Collector} connected to the relay at the client endpoint string."""
    return connectProtocol(clientFromString(reactor, endpoint), Collector())
