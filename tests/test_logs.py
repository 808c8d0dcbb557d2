"""
Tests for L{twisted_relay.app.logs} and L{twisted_relay.engine.logger}: the
relay's short log tags, and what twistd writes of Twisted's own lines.
"""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText
from twisted.python import log as legacy
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from twisted_relay.app import logs
from twisted_relay.app.logs import REFUSED_INTERVAL, RelayLogObserver, twistd_observer
from twisted_relay.app.tap import Options
from twisted_relay.engine.logger import RelayLogger
from twisted_relay.engine.relay import RelayFactory


class Tagged:
    log = RelayLogger(namespace="relay.test")


class RelayLoggerTests(SynchronousTestCase):
    def test_namespaceKept(self) -> None:
        """As a class attribute the logger keeps its short namespace, and its source."""
        thing = Tagged()
        self.assertEqual((thing.log.namespace, thing.log.source), ("relay.test", thing))
        self.assertEqual(Tagged.log.source, Tagged)

    def test_relayTags(self) -> None:
        """The relay's classes log as relay, relay.audit, relay.nats: a short tag under twistd."""
        self.assertEqual(RelayFactory.log.namespace, "relay")
        events: list[dict] = []
        RelayLogger(namespace="relay", observer=events.append).info("hello")
        self.assertIn(" [relay#info] hello", formatEventAsClassicLogText(events[0]))


class RelayLogObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.passed: list[dict] = []
        self.observer = RelayLogObserver(self.passed.append, self.clock)
        self.patch(RelayLogObserver, "log", RelayLogger(namespace="relay", observer=self.observer))

    def twisted(self, format: str, **fields: object) -> None:
        """An event as a Twisted port logs it."""
        Logger(namespace="twisted.internet.unix.Port", observer=self.observer).info(
            format, **fields
        )

    def legacy(self, text: str) -> None:
        """An event as C{twisted.python.log.msg} logs it."""
        publisher = legacy.LogPublisher(self.observer, self.observer)
        publisher.msg(text)

    def texts(self) -> list[str]:
        return [formatEventAsClassicLogText(e).partition(" ")[2].strip() for e in self.passed]

    def test_portAndFactoryLinesGone(self) -> None:
        """Twisted's lines for ports and factories starting and stopping are left out."""
        self.legacy("RelayFactory starting on '/tmp/torq/market_data.sock'")
        self.legacy("_QuietSite starting on 9100")
        self.legacy("(UNIX Port /tmp/torq/market_data.sock Closed)")
        self.legacy("(TCP Port 9100 Closed)")
        self.twisted("Starting factory {factory!r}", factory=object())
        self.assertEqual(self.passed, [])

    def test_othersPass(self) -> None:
        """The relay's events pass as they are, Twisted's others tagged [twisted#...]."""
        RelayLogger(namespace="relay", observer=self.observer).info("listening on {x}", x=1)
        Logger(namespace="twisted.scripts._twistd_unix.UnixAppLogger", observer=self.observer).info(
            "Server Shut Down."
        )
        self.legacy("something else")
        self.assertEqual(
            self.texts(),
            ["[relay#info] listening on 1", "[twisted#info] Server Shut Down.", "[-] something else"],
        )

    def test_refusalsCounted(self) -> None:
        """
        The first connection refused at the descriptor limit is a warning;
        the next ones are one count per interval, and none when none came.
        """

        def refuse(count: int) -> None:
            for _ in range(count):
                self.twisted("EMFILE encountered; releasing reserved file descriptor.")
                self.twisted("EMFILE recovery: Closed socket from {address}", address="x")
                self.twisted("Re-reserving EMFILE recovery file descriptor.")

        refuse(1)
        self.assertEqual(len(self.passed), 1)
        self.assertIn("refused a connection", self.texts()[0])
        refuse(30)
        self.assertEqual(len(self.passed), 1)
        self.clock.advance(REFUSED_INTERVAL)
        self.assertEqual(
            self.texts()[1],
            "[relay#warn] refused 30 connections in 10s at the limit of open files "
            "(31 since start)",
        )
        self.assertEqual(self.passed[1]["log_level"], LogLevel.warn)
        self.clock.advance(REFUSED_INTERVAL)
        self.assertEqual(len(self.passed), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        refuse(1)
        self.assertIn("refused a connection", self.texts()[2])


class TwistdObserverTests(SynchronousTestCase):
    def options(self, *twistd: str) -> Options:
        """The relay's options as twistd parses them after C{twistd}'s own."""
        server = ServerOptions()
        server.parseOptions([*twistd, "relay", "--listen", "tcp:0:interface=127.0.0.1"])
        return server.subOptions

    def test_foregroundStdout(self) -> None:
        """twistd -n logging to standard output gets the relay's observer, writing there."""
        stdout = io.StringIO()
        self.patch(logs.sys, "stdout", stdout)
        observer = twistd_observer(self.options("-n"), Clock())
        assert observer is not None
        RelayLogger(namespace="relay", observer=observer).info("hello")
        self.assertIn("[relay#info] hello", stdout.getvalue())

    def test_elsewhere(self) -> None:
        """A log file, syslog, --logger or no twistd at all: the relay leaves logging alone."""
        for twistd in (["-n", "-l", "relay.log"], ["-n", "--logger", "twisted.logger.textFileLogObserver"], ["-n", "--syslog"]):
            self.assertIsNone(twistd_observer(self.options(*twistd), Clock()), twistd)
        self.assertIsNone(twistd_observer(usage.Options(), Clock()))
