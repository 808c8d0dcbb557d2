"""Tests for L{twisted_relay.app.tap} and L{twisted_relay.app.endpoints}."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import threading

from twisted.application.service import Service
from twisted.internet.defer import succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from twisted_relay import scan
from twisted_relay.app.endpoints import SocketPathUnavailable, UnixSocketEndpoint
from twisted_relay.app.services import ListeningService, RelayService, RelayServices
from twisted_relay.app.tap import Options, makeService
from twisted_relay.audit import AuditLog
from twisted_relay.domains import EXECUTION, MARKET, SIGNAL
from twisted_relay.paths import UntrustedDirectory, check_directory, make_directories
from twisted_relay.wire import Domain

from .helpers import connect, frames_for, make_relay


def short_tempdir(test: SynchronousTestCase) -> str:
    """A fresh directory with a short path (Unix socket paths max out at 107 bytes)."""
    path = tempfile.mkdtemp(prefix="tr-", dir="/tmp")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """By default: market, its Unix socket, mode 0660, the domain's policy, no echo."""
        options = parse()
        self.assertIs(options["logic"], MARKET)
        self.assertEqual(options["listen"], ["unix:/tmp/torq/market_data.sock"])
        self.assertEqual(options["mode"], 0o660)
        self.assertFalse(options["echo"])
        policy = options["policy"]
        self.assertEqual(
            (policy.max_frame_size, policy.verify_checksum, policy.strict_tlv),
            (16 * 1024 * 1024, False, False),
        )
        [listener] = list(makeService(options, MemoryReactorClock()))[1:]
        endpoint = listener.endpoint
        self.assertIsInstance(endpoint, UnixSocketEndpoint)
        self.assertEqual((endpoint.path, endpoint.mode), ("/tmp/torq/market_data.sock", 0o660))

    def test_domainSocket(self) -> None:
        """Each domain listens on its own socket unless told otherwise."""
        self.assertEqual(parse("--domain", "signals")["listen"], ["unix:/tmp/torq/signals.sock"])
        self.assertIs(parse("-d", "execution")["logic"], EXECUTION)

    def test_repeatableListen(self) -> None:
        """--listen repeats, takes any endpoint, and Unix ones get the safe endpoint."""
        options = parse(
            "--domain", "signal", "--listen", "unix:/tmp/a/s.sock", "--listen", "tcp:7002",
            "--mode", "600",
        )
        unix, tcp = [listener.endpoint for listener in list(makeService(options))[1:]]
        self.assertEqual((unix.path, unix.mode), ("/tmp/a/s.sock", 0o600))
        self.assertIsInstance(tcp, TCP4ServerEndpoint)

    def test_overrides(self) -> None:
        """--max-frame, --checksum / --no-checksum and --echo override the domain."""
        options = parse("--max-frame", "4096", "--checksum", "--echo")
        self.assertEqual(options["policy"].max_frame_size, 4096)
        self.assertTrue(options["policy"].verify_checksum)
        self.assertTrue(options["echo"])
        self.assertFalse(parse("-d", "execution", "--no-checksum")["policy"].verify_checksum)
        self.assertIs(parse("-d", "signal")["policy"].strict_tlv, SIGNAL.strict_tlv)

    def test_delivery(self) -> None:
        """The slow-consumer policy and its marks come from the domain unless overridden."""
        self.assertEqual(parse("-d", "execution")["delivery"].policy, "block")
        options = parse(
            "--slow-consumer", "disconnect", "--high-water", "1000000", "--low-water", "1000",
            "--stall-timeout", "0.5", "--drain-timeout", "1",
        )
        delivery = options["delivery"]
        self.assertEqual(
            (delivery.policy, delivery.high_water, delivery.low_water, delivery.stall_timeout),
            ("disconnect", 1_000_000, 1000, 0.5),
        )
        self.assertEqual(options["drain-timeout"], 1.0)

    def assertUsage(self, fragment: str, *argv: str) -> None:
        error = self.assertRaises(UsageError, parse, *argv)
        self.assertIn(fragment, str(error))

    def test_errors(self) -> None:
        """Bad values are refused with a message naming the option."""
        self.assertUsage("unknown domain 'fx'", "--domain", "fx")
        self.assertUsage("--mode '0999' is not an octal number", "--mode", "0999")
        self.assertUsage("--mode 1777 is not a file permission mode", "--mode", "1777")
        self.assertUsage("contradict", "--checksum", "--no-checksum")
        self.assertUsage("smaller than the 32-byte header", "--max-frame", "16")
        self.assertUsage("--max-frame", "--max-frame", "lots")
        self.assertUsage("--listen 'bogus:1'", "--listen", "bogus:1")
        self.assertUsage("give the socket mode with --mode", "--listen", "unix:/tmp/a.sock:mode=666")
        self.assertUsage("--stats-interval takes a number >= 0, not '-1'", "--stats-interval", "-1")
        self.assertUsage("'lossy' is not one of drop, disconnect, block", "--slow-consumer", "lossy")
        self.assertUsage("must be below the high-water", "--high-water", "100", "--low-water", "100")
        self.assertUsage("--drain-timeout takes a number", "--drain-timeout", "soon")
        self.assertUsage("--stats-interval takes a number >= 0, not 'nan'", "--stats-interval", "nan")
        self.assertUsage("--stall-timeout takes a number >= 0, not 'inf'", "--stall-timeout", "inf")

    def test_helpListsDomainsAndExamples(self) -> None:
        """--help names every domain with its aliases, and shows examples."""
        text = Options().getUsage()
        self.assertIn("Domains: market or market_data, signal or signals, execution", text)
        self.assertIn("twistd -n relay --domain execution --listen unix:/tmp/x/e.sock", text)


class MakeServiceTests(SynchronousTestCase):
    def test_httpService(self) -> None:
        """--http adds one more listener, serving the status site."""
        top = makeService(parse("--http", "tcp:9100:interface=127.0.0.1"))
        *_, http = list(top)
        self.assertIs(top.status_page, http)
        self.assertEqual(http.description, "tcp:9100:interface=127.0.0.1")
        self.assertIsNotNone(http.factory.resource.getStaticEntity(b"metrics"))

    def test_services(self) -> None:
        """The relay service comes first, then one listener per --listen, in order."""
        reactor = MemoryReactorClock()
        top = makeService(parse("--listen", "unix:/tmp/a/1.sock", "--listen", "tcp:7001"), reactor)
        relay, *listeners = list(top)
        self.assertIsInstance(relay, RelayService)
        self.assertIs(relay.factory.clock, reactor)
        self.assertEqual([s.description for s in listeners], ["unix:/tmp/a/1.sock", "tcp:7001"])
        self.assertTrue(all(s.factory is relay.factory for s in listeners))


class UmaskReactor(MemoryReactor):
    """Records the process umask in force when a Unix socket is bound."""

    def __init__(self) -> None:
        super().__init__()
        self.umasks: list[int] = []

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        current = os.umask(0)
        os.umask(current)
        self.umasks.append(current)
        return super().listenUNIX(address, factory, backlog, mode, wantPID)


class UnixSocketEndpointTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = short_tempdir(self)
        self.path = os.path.join(self.dir, "sub", "r.sock")
        self.reactor = UmaskReactor()

    def listen(self, mode: int = 0o660):
        endpoint = UnixSocketEndpoint(self.reactor, self.path, mode)
        return self.successResultOf(endpoint.listen(Factory()))

    def failure(self) -> str:
        endpoint = UnixSocketEndpoint(self.reactor, self.path)
        return self.failureResultOf(endpoint.listen(Factory()), SocketPathUnavailable).getErrorMessage()

    def socket_file(self, listening: bool) -> socket.socket:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(self.path)
        if listening:
            sock.listen(1)
        else:
            sock.close()
        return sock

    def test_bindsUnderTheFinalMode(self) -> None:
        """The socket is bound under a umask that yields the mode, then the umask is restored."""
        before = os.umask(0o022)
        self.addCleanup(os.umask, before)
        self.listen(0o640)
        self.assertEqual(self.reactor.umasks, [0o137])
        self.assertEqual(os.umask(0o022), 0o022)
        [(path, _, backlog, mode, _)] = self.reactor.unixServers
        self.assertEqual((path, mode), (self.path, 0o640))

    def test_createsDirectory(self) -> None:
        """A missing directory is created."""
        self.listen()
        self.assertTrue(os.path.isdir(os.path.dirname(self.path)))

    def test_removesStaleSocket(self) -> None:
        """A socket file nobody listens on is removed before binding."""
        self.socket_file(listening=False)
        self.listen()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(len(self.reactor.unixServers), 1)

    def test_refusesLiveSocket(self) -> None:
        """A socket somebody listens on is left alone and reported."""
        self.socket_file(listening=True)
        self.assertEqual(self.failure(), f"a relay is already listening on {self.path}")
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.path).st_mode))
        self.assertEqual(self.reactor.unixServers, [])

    def test_refusesNonSocket(self) -> None:
        """A regular file at the path is not touched."""
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("precious")
        self.assertEqual(self.failure(), f"{self.path} exists and is not a socket; not touching it")
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")


class ListeningServiceTests(SynchronousTestCase):
    def busy_socket(self) -> str:
        """The path of a Unix socket something listens on, for this test."""
        path = os.path.join(short_tempdir(self), "busy.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen(1)
        return path

    def test_failureIsOneLine(self) -> None:
        """A listener that cannot listen ends start-up with a one-line reason."""
        path = self.busy_socket()
        service = ListeningService(
            f"unix:{path}", UnixSocketEndpoint(MemoryReactor(), path), Factory()
        )
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(
            str(error),
            f"twistd relay: cannot listen on unix:{path}: a relay is already listening on {path}",
        )

    def test_failedStartLetsGo(self) -> None:
        """
        A start-up that fails after the audit log opened closes it and stops
        its writer thread, which would otherwise keep the process alive.
        """
        path = self.busy_socket()
        audit = os.path.join(os.path.dirname(path), "audit")
        options = Options()
        options.parseOptions(
            ["--domain", "execution", "--audit-dir", audit, "--listen", f"unix:{path}"]
        )
        services = makeService(options, MemoryReactorClock())
        self.assertRaises(SystemExit, services.privilegedStartService)
        writers = [t for t in threading.enumerate() if "audit log writer" in t.name]
        self.assertEqual(writers, [])
        again = AuditLog(audit)
        again.open()
        again.close()

    def test_untrustedSocketDirectory(self) -> None:
        """
        A socket directory others could change is refused with one line,
        unless strict checks are turned off.
        """
        directory = os.path.join(short_tempdir(self), "shared")
        os.mkdir(directory)
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "r.sock")
        endpoint = UnixSocketEndpoint(MemoryReactor(), path)
        failure = self.failureResultOf(endpoint.listen(Factory()), SocketPathUnavailable)
        self.assertEqual(
            str(failure.value),
            f"{directory} is writable by its group (mode 0777): they could replace what the "
            f"relay puts there (--no-strict-dirs overrides this, dangerously)",
        )
        lax = UnixSocketEndpoint(MemoryReactor(), path, strict=False)
        self.successResultOf(lax.listen(Factory()))

    def test_foreignOwner(self) -> None:
        """A directory of another user, on the way to the socket or the audit log, is refused."""
        if os.geteuid() != 0:
            raise SkipTest("giving a directory to another user needs root")
        directory = os.path.join(short_tempdir(self), "theirs")
        os.mkdir(directory, 0o755)
        os.chown(directory, 65534, 65534)
        with self.assertRaises(UntrustedDirectory) as raised:
            check_directory(os.path.join(directory, "sub", "dir"))
        self.assertIn(f"{directory} belongs to ", str(raised.exception))
        relay = make_relay(Domain.EXECUTION, audit=AuditLog(os.path.join(directory, "audit")))
        error = self.assertRaises(SystemExit, RelayService(relay, 0).privilegedStartService)
        self.assertIn("will not use the audit directory", str(error))
        self.assertFalse(os.path.exists(os.path.join(directory, "audit")))
        RelayService(relay, 0, strict_dirs=False).privilegedStartService()
        self.addCleanup(relay.writeahead.stop)
        self.assertTrue(relay.writeahead.opened)

    def test_stickyTmpTrusted(self) -> None:
        """/tmp itself (root's, sticky) is on the way to the default sockets, and trusted."""
        check_directory("/tmp/torq-never-made/market_data.sock")

    def test_stopsListening(self) -> None:
        """Stopping the service closes its port, and only once."""
        stopped: list[bool] = []

        class Port:
            def stopListening(self):
                stopped.append(True)
                return succeed(None)

        @implementer(IStreamServerEndpoint)
        class Endpoint:
            def listen(self, factory):
                return succeed(Port())

        service = ListeningService("x", Endpoint(), Factory())
        service.privilegedStartService()
        service.startService()
        self.successResultOf(service.stopService())
        service.stopService()
        self.assertEqual(stopped, [True])

    def test_listensOnceUnderEitherRunner(self) -> None:
        """twistd's privileged step listens and startService does not again; twist's startService listens."""
        listened: list[Factory] = []

        @implementer(IStreamServerEndpoint)
        class Endpoint:
            def listen(self, factory):
                listened.append(factory)
                return succeed(MemoryReactor().listenTCP(0, factory))

        twistd = ListeningService("x", Endpoint(), Factory())
        twistd.privilegedStartService()
        twistd.startService()
        twist = ListeningService("y", Endpoint(), Factory())
        twist.startService()
        self.assertEqual(listened, [twistd.factory, twist.factory])


class RecordingDomain:
    """The market domain, recording calls to its life-cycle hooks."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(MARKET, name)

    def initialize(self) -> None:
        self.calls.append("initialize")

    def cleanup(self) -> None:
        self.calls.append("cleanup")


class RelayServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_lifecycleHooks(self) -> None:
        """The domain is initialised before listening and cleaned up at stop."""
        relay = make_relay()
        relay.logic = domain = RecordingDomain()
        services = RelayServices()
        RelayService(relay, 0).setServiceParent(services)
        services.privilegedStartService()
        self.assertEqual(domain.calls, ["initialize"])
        services.startService()
        self.successResultOf(services.stopService())
        self.assertEqual(domain.calls, ["initialize", "cleanup"])
        [summary] = [e for e in self.events if "starting" in e.get("log_format", "")]
        [consumers] = [e for e in self.events if "slow consumers" in e.get("log_format", "")]
        self.assertEqual(
            (summary["name"], summary["checksum"], consumers["delivery"]), ("market", "off", "drop")
        )

    def test_statusPageOutlivesTheDrain(self) -> None:
        """The status page stops after the relay has drained its clients, before the log closes."""
        relay = make_relay()
        services = RelayServices()
        RelayService(relay, 0, drain_timeout=5).setServiceParent(services)
        page = Service()
        page.setServiceParent(services)
        services.status_page = page
        services.startService()
        client = connect(relay)
        stopped = services.stopService()
        self.assertTrue(relay.draining)
        self.assertTrue(page.running)
        client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertFalse(page.running)

    def test_startupSummaryShort(self) -> None:
        """The start-up summary is a few lines of at most 120 characters, not one of 400."""
        self.patch(scan, "NATIVE", True)
        RelayService(make_relay(), 0).privilegedStartService()
        lines = [formatEvent(e) for e in self.events]
        self.assertEqual(len(lines), 3)
        self.assertLessEqual(max(map(len, lines)), 120, lines)

    def test_pythonScanWarned(self) -> None:
        """Without the native scan, the start says so, and why, in a warning of its own."""
        for native, why in ((True, None), (False, "no C compiler")):
            self.events.clear()
            self.patch(scan, "NATIVE", native)
            self.patch(scan, "FALLBACK_REASON", why)
            RelayService(make_relay(), 0).privilegedStartService()
            [summary] = [e for e in self.events if "starting" in e.get("log_format", "")]
            self.assertEqual(summary["scan"], "native" if native else "pure Python")
            warned = [e.get("why") for e in self.events if e["log_level"] is LogLevel.warn]
            self.assertEqual(warned, [why] if why else [])

    def test_partialFramesExpire(self) -> None:
        """The running relay closes a client whose frame is not finished in time."""
        relay = make_relay()
        service = RelayService(relay, 0)
        service.startService()
        client = connect(relay)
        client.dataReceived(frames_for(Domain.MARKET_DATA, 1)[0][:20])
        relay.clock.advance(relay.partials.timeout - 1)
        self.assertEqual(dict(client.stats.rejects), {})
        relay.clock.advance(1)
        self.assertEqual(dict(client.stats.rejects), {"incomplete_frame_timeout": 1})
        service._partials.stop()

    def test_statsLine(self) -> None:
        """Every interval, one event gives the rates over that interval."""
        relay = make_relay()
        clock: Clock = relay.clock
        service = RelayService(relay, 10)
        service.startService()
        publisher, _ = connect(relay), connect(relay)
        frames = frames_for(Domain.MARKET_DATA, 50)
        publisher.dataReceived(b"".join(frames) + frames_for(Domain.SIGNAL, 1)[0])
        clock.advance(10)
        [stats] = [e for e in self.events if e.get("log_format", "").startswith("stats:")]
        self.assertEqual((stats["clients"], stats["in_fps"], stats["out_fps"]), (2, 5.0, 5.0))
        self.assertEqual((stats["new_rejects"], stats["rejects"]), (1, 1))
        self.assertEqual(stats["reject_reasons"], {"filtered": 1})
        clock.advance(10)
        second = [e for e in self.events if e.get("log_format", "").startswith("stats:")][1]
        self.assertEqual((second["in_fps"], second["new_rejects"]), (0.0, 0))
        stopped = service.stopService()
        for client in tuple(relay.clients.values()):
            client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])


class MakeDirectoriesTests(SynchronousTestCase):
    def test_modeWhateverTheUmask(self) -> None:
        """The directories made get their mode exactly, under a umask of 0077 or 0002."""
        for umask in (0o077, 0o002):
            top = os.path.join(short_tempdir(self), "a")
            previous = os.umask(umask)
            try:
                make_directories(os.path.join(top, "b"), 0o755)
            finally:
                os.umask(previous)
            for path in (top, os.path.join(top, "b")):
                self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o755)
