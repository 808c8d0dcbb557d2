"""
A Unix socket endpoint that takes care of the socket file.

Twisted's own Unix endpoint binds with the process umask and chmods
afterwards, fails on a stale file left by a crashed relay, and gives no clear
answer when another relay already serves the path. This one creates the
directory, refuses a live relay or a path that is not a socket, removes a
stale socket, and binds with the final mode from the first instant. Two
relays starting at the same instant serialise on a lock of the directory, so
exactly one of them binds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorUNIX,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

#: How long a probe waits for a busy relay to accept before giving up.
PROBE_TIMEOUT = 1.0


class SocketPathUnavailable(Exception):
    """The socket path is taken, or cannot be inspected."""


@implementer(IStreamServerEndpoint)
class UnixSocketEndpoint:
    log = Logger()

    def __init__(
        self, reactor: IReactorUNIX, path: str, mode: int = 0o660, backlog: int = 50
    ) -> None:
        self._reactor = reactor
        self.path = os.path.abspath(path)
        self.mode = mode
        self.backlog = backlog

    def __repr__(self) -> str:
        return f"unix:{self.path} (mode {self.mode:04o})"

    def listen(self, protocolFactory: Factory) -> Deferred[IListeningPort]:
        return execute(self._listen, protocolFactory)

    def _listen(self, protocolFactory: Factory) -> IListeningPort:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._clearPath()
            previous = os.umask(0o777 & ~self.mode)
            try:
                return self._reactor.listenUNIX(
                    self.path, protocolFactory, backlog=self.backlog, mode=self.mode
                )
            finally:
                os.umask(previous)
        finally:
            os.close(lock)

    def _clearPath(self) -> None:
        """Make the path free to bind, or say why it must not be touched."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise SocketPathUnavailable(
                f"{self.path} exists and is not a socket; not touching it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            self.log.warn("removed stale socket {path}", path=self.path)
        except OSError as e:
            raise SocketPathUnavailable(
                f"cannot tell whether {self.path} is in use: {e.strerror or e}"
            ) from e
        else:
            raise SocketPathUnavailable(f"a relay is already listening on {self.path}")
        finally:
            probe.close()
