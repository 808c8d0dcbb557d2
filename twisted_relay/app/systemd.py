"""
systemd's side of a service, spoken directly (sd_notify(3): one datagram per
message to C{$NOTIFY_SOCKET}), so the relay needs no library for it: READY=1
once the relay serves, STOPPING=1 when its stop begins, and WATCHDOG=1 from
the reactor, so a relay whose reactor is blocked stops pinging and systemd
restarts it (C{WatchdogSec=}). And the journal's priorities, which journald
reads off the start of each line: a log observer (L{journal_observer}) and
the one line of a failed start (L{error_line}).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from typing import TextIO

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, eventAsText
from zope.interface import implementer


class Notifier:
    """Sends sd_notify messages to one notification socket, never blocking."""

    log = Logger()

    def __init__(self, address: str) -> None:
        """
        @param address: C{$NOTIFY_SOCKET}: a socket path, or C{@NAME} for a
            name in the abstract namespace.
        """
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._failing = False

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str] = os.environ) -> Notifier | None:
        """The notifier systemd asked for, or None when not started by it (or Type=notify)."""
        address = environ.get("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def notify(self, *assignments: str) -> None:
        """
        Send C{assignments} (C{"READY=1"}, C{"STATUS=..."}) as one message.
        A failure is logged once until a message goes through again: the
        relay serves on whether or not systemd listens.
        """
        try:
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as e:
            if not self._failing:
                self.log.warn(
                    "cannot notify systemd at {address}: {error}",
                    address=self.address.replace("\0", "@"),
                    error=e.strerror or e,
                )
            self._failing = True
        else:
            self._failing = False

    def close(self) -> None:
        self._socket.close()


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds systemd waits for a ping (C{$WATCHDOG_USEC}), or None: no
    watchdog, a malformed value, or one meant for another process
    (C{$WATCHDOG_PID}), as sd_watchdog_enabled(3) decides.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        meant_for = int(environ.get("WATCHDOG_PID") or pid)
    except ValueError:
        return None
    if usec <= 0 or meant_for != pid:
        return None
    return usec / 1e6


class SystemdService(Service):
    """
    Tells systemd how the relay is: the last service of the relay's, so
    READY=1 goes out when every listener is bound and the audit log is open
    (a start-up that fails never gets here); the first stopped, so
    STOPPING=1 goes out as the stop begins.

    The watchdog pings at half systemd's interval (sd_watchdog_enabled(3)'s
    advice), from a C{LoopingCall} on the reactor: a reactor that is stuck
    sends none. systemd only watches a running service, so the pings end
    with STOPPING=1 and C{TimeoutStopSec=} bounds the stop.
    """

    def __init__(
        self,
        notifier: Notifier,
        clock: IReactorTime,
        serving: str,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        """
        @param serving: what the relay serves, for systemd's STATUS line.
        @param environ: where C{$WATCHDOG_USEC} is read, at start: the
            process may have forked (twistd without -n) since it was made.
        """
        self.notifier = notifier
        self.serving = serving
        self.environ = environ
        self._watchdog = LoopingCall(notifier.notify, "WATCHDOG=1")
        self._watchdog.clock = clock

    def startService(self) -> None:
        super().startService()
        self.notifier.notify("READY=1", f"STATUS={self.serving}")
        interval = watchdog_interval(self.environ, os.getpid())
        if interval is not None:
            self._watchdog.start(interval / 2, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog.running:
            self._watchdog.stop()
        self.notifier.notify("STOPPING=1", "STATUS=stopping: draining the clients")


#: sd-daemon(3) priority prefixes, which journald reads off each line of a stream.
_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


@implementer(ILogObserver)
class JournalObserver:
    """
    Log events for journald on a stream: each line starts with its
    priority (C{<3>} an error ... C{<7>} debug), so C{journalctl -p warning}
    finds the warnings, and carries no timestamp, which the journal adds.
    A traceback's lines carry its event's priority.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        text = eventAsText(event, includeTimestamp=False)
        if not text:
            return
        prefix = f"<{_PRIORITIES.get(event.get('log_level', LogLevel.info), 6)}>"
        self.stream.write("".join(f"{prefix}{line}\n" for line in text.splitlines()))
        self.stream.flush()


def error_line(text: str, environ: Mapping[str, str] = os.environ) -> str:
    """
    C{text} as a line for standard error, marked as an error (C{<3>}) when
    standard error is the journal: C{$JOURNAL_STREAM} names its device and
    inode (systemd.exec(5)).
    """
    try:
        stderr = os.fstat(2)
    except OSError:
        return text
    journal = environ.get("JOURNAL_STREAM") == f"{stderr.st_dev}:{stderr.st_ino}"
    return f"<3>{text}" if journal else text


def journal_observer() -> JournalObserver:
    """For C{twistd --logger twisted_relay.app.systemd.journal_observer}: standard output."""
    return JournalObserver(sys.stdout)
