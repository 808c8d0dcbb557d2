"""
The relay's log under C{twistd -n}: the relay's own events as they are,
without Twisted's lines for every port that starts or stops and every
factory (the relay says "listening on" and "stopping" itself), and the
connections Twisted refuses at the descriptor limit as one counted line
every few seconds rather than a line each, which a connection storm would
turn into thousands.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, textFileLogObserver
from twisted.python import usage
from zope.interface import implementer

from ..engine.logger import RelayLogger

#: Twisted's lines for one connection refused at the descriptor limit
#: (C{twisted.internet.tcp._accept}): the second one is counted.
_REFUSED = "EMFILE recovery: Closed socket from {address}"
_REFUSAL = frozenset(
    {
        "EMFILE encountered; releasing reserved file descriptor.",
        _REFUSED,
        "Re-reserving EMFILE recovery file descriptor.",
    }
)
#: Twisted's lines as a factory or a port starts or stops.
_FACTORY = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})
_PORT = re.compile(r"\w+ starting on .+|\((?:\w+ )?Port .+ Closed\)")
#: Seconds between two counts of refused connections.
REFUSED_INTERVAL = 10.0


@implementer(ILogObserver)
class RelayLogObserver:
    """Passes events on to C{observer}, less Twisted's noise; counts refusals."""

    log = RelayLogger(namespace="relay")

    def __init__(self, observer: ILogObserver, clock: IReactorTime) -> None:
        self.observer = observer
        self.clock = clock
        #: Connections refused at the descriptor limit: since start, and not reported yet.
        self.refused = 0
        self._unreported = 0
        self._report: IDelayedCall | None = None

    def __call__(self, event: LogEvent) -> None:
        namespace, text = event.get("log_namespace", ""), event.get("log_format")
        if namespace.startswith("twisted."):
            if text in _REFUSAL:
                if text == _REFUSED:
                    self._refusedOne()
                return
            if text in _FACTORY:
                return
            # twistd's own lines (starting up, shut down) stay, tagged [twisted#info].
            event = {**event, "log_namespace": "twisted"}
        elif namespace == "log_legacy" and _PORT.fullmatch(event.get("log_text") or ""):
            return
        self.observer(event)

    def _refusedOne(self) -> None:
        """The first refusal is told at once, the next ones counted every interval."""
        self.refused += 1
        if self._report is None:
            self.log.warn(
                "refused a connection: the relay is at its limit of open files "
                "(RLIMIT_NOFILE); the next ones are counted every {interval:g}s",
                interval=REFUSED_INTERVAL,
            )
            self._report = self.clock.callLater(REFUSED_INTERVAL, self._count)
        else:
            self._unreported += 1

    def _count(self) -> None:
        if not self._unreported:
            self._report = None
            return
        self.log.warn(
            "refused {count} connections in {interval:g}s at the limit of open files "
            "({refused} since start)",
            count=self._unreported,
            interval=REFUSED_INTERVAL,
            refused=self.refused,
        )
        self._unreported = 0
        self._report = self.clock.callLater(REFUSED_INTERVAL, self._count)


def twistd_observer(options: usage.Options, clock: IReactorTime) -> RelayLogObserver | None:
    """
    The observer for C{twistd -n} logging to standard output (the common
    case, and systemd's), as twistd would make it but quieter; C{None}
    when twistd logs elsewhere (C{-l}, C{--syslog}, C{--logger}) or when
    another runner (C{twist}) set up logging itself.
    """
    from twisted.application.app import ServerOptions

    twistd: Any = getattr(options, "parent", None)
    if not isinstance(twistd, ServerOptions):
        return None
    to_stdout = twistd.get("nodaemon") and twistd.get("logfile") in (None, "", "-")
    if not to_stdout or twistd.get("syslog") or twistd.get("logger"):
        return None
    return RelayLogObserver(textFileLogObserver(sys.stdout), clock)
