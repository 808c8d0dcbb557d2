"""
The relay's services: one per listening endpoint, the relay's own (the
domain's life cycle, the audit log, heartbeats and the stats line), and the
L{RelayServices} that holds them and stops them in the order that loses
nothing.

Each service starts under C{twistd} (C{privilegedStartService}, before
privileges are dropped, then C{startService}) and under C{twist}, which
calls C{startService} alone: what the privileged step did not do yet is
done there.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from .. import scan
from ..audit import AuditDamage, AuditLog, audit_paths
from ..engine.logger import RelayLogger
from ..engine.relay import RelayFactory
from ..paths import UntrustedDirectory, check_directory
from .endpoints import AdoptedUnixEndpoint, UnixSocketEndpoint, check_endpoint
from .systemd import error_line

if TYPE_CHECKING:
    from ..bridge.service import NatsBridge


def _onOff(flag: bool) -> str:
    return "on" if flag else "off"


class ListeningService(Service):
    """
    Listens on one endpoint. Failing to listen at start-up ends the process
    with a one-line reason instead of a traceback.
    """

    log = RelayLogger(namespace="relay")

    def __init__(
        self, description: str, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:  # twist: no privileged step came first
            self._listen()

    def _listen(self) -> None:
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"twistd relay: {self.description} did not listen at once")
        if isinstance(outcome[0], Failure):
            raise self._refusal(outcome[0].getErrorMessage())
        self.port = outcome[0]
        self.log.info(
            "listening on {endpoint}",
            endpoint=(
                repr(self.endpoint)
                if isinstance(self.endpoint, (UnixSocketEndpoint, AdoptedUnixEndpoint))
                else self.description
            ),
        )
        if not isinstance(self.endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            return
        host = cast("IPv4Address | IPv6Address", self.port.getHost())
        if not ipaddress.ip_address(host.host).is_loopback:
            self.log.warn(
                "{description} is plain TCP on {host}, reachable from other hosts with "
                "neither encryption nor a way to tell who connects: listen on "
                "interface=127.0.0.1, or use ssl: with client certificates "
                "(docs/execution.md)",
                description=self.description,
                host=host.host,
            )

    def preflight(self) -> None:
        """What L{_listen} would refuse, refused the same way without listening."""
        try:
            check_endpoint(self.endpoint)
        except Exception as e:
            raise self._refusal(str(e)) from None

    def _refusal(self, reason: str) -> SystemExit:
        return SystemExit(f"twistd relay: cannot listen on {self.description}: {reason}")

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()

    def abandon(self) -> None:
        """
        Give the port up at once, for a start-up that failed: the reactor
        will not run, so the socket file is removed here, not by the port.
        """
        if self.port is None:
            return
        self.port.stopListening()
        self.port = None
        if isinstance(self.endpoint, UnixSocketEndpoint):
            try:
                os.unlink(self.endpoint.path)
            except FileNotFoundError:
                pass


class RelayServices(MultiService):
    """
    The relay's services; a start-up that fails part-way leaves no socket
    behind and says why in one line (exit status 1), and a stop closes the
    audit log only once nothing can add a frame to it.
    """

    log = RelayLogger(namespace="relay")
    #: The NATS bridge, if the relay has one: its stop has two steps of the order.
    bridge: NatsBridge | None = None
    #: The status page's listener, if any: it stops after the drain, so that
    #: meanwhile C{/health} answers 503 "stopping".
    status_page: Service | None = None
    #: The observer twistd is to log to, if not its own (L{logs.twistd_observer}).
    log_observer: ILogObserver | None = None

    def __init__(self, runner: MutableMapping[str, Any] | None = None) -> None:
        """
        @param runner: the options of the twistd that runs the relay, if
            one does: where it keeps its status pipe once it has daemonized.
        """
        super().__init__()
        self.runner = runner

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """
        Under twistd the parent is the application, whose L{ILogObserver}
        component twistd logs to if there is one.
        """
        super().setServiceParent(parent)
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)

    def privilegedStartService(self) -> None:
        self._start(super().privilegedStartService)

    def startService(self) -> None:
        self._start(super().startService)

    def _start(self, start: Callable[[], None]) -> None:
        try:
            start()
        except SystemExit as e:
            for service in self:
                if isinstance(service, (ListeningService, RelayService)):
                    try:
                        service.abandon()
                    except Exception:
                        # The start-up's own reason is the one to report.
                        self.log.failure("while undoing a failed start-up")
            if not isinstance(e.code, str):
                raise
            self._report(e.code)
            raise SystemExit(1) from None

    def preflight(self) -> None:
        """
        Before twistd daemonizes: refuse now, in one line on the launching
        process's standard error, what the start would refuse after the
        fork, where twistd could only pass on the first 100 bytes of it.
        The checks run in the order of the start; each leaves nothing
        behind.
        """
        for service in self:
            if isinstance(service, (ListeningService, RelayService)):
                try:
                    service.preflight()
                except SystemExit as e:
                    raise SystemExit(error_line(str(e.code))) from None

    def _report(self, reason: str) -> None:
        """
        Say why the start-up failed, in one line, where the one who started
        the relay sees it. Daemonized by twistd (no -n), the relay's
        standard error is /dev/null and the launching process waits on
        twistd's status pipe: the reason goes there (twistd prints what
        fits in its 100 bytes and exits 1) and to the log. Otherwise it
        goes to the process's real standard error (twistd has pointed
        C{sys.stderr} at the log).
        """
        runner = self.runner if self.runner is not None else {}
        if runner.get("pidfile"):  # as twistd does for a start-up that raised
            try:
                os.unlink(runner["pidfile"])
            except FileNotFoundError:
                pass
        pipe = runner.get("statusPipe")
        if pipe is None:
            print(error_line(reason), file=sys.__stderr__, flush=True)
            return
        self.log.critical("{reason}", reason=reason)
        short = reason.removeprefix("twistd relay: ").encode("ascii", "backslashreplace")
        os.write(pipe, b"1 " + (short if len(short) <= 98 else short[:95] + b"..."))
        os.close(pipe)
        runner["statusPipe"] = None

    def stopService(self) -> Deferred[None]:
        """
        Stop in the order that loses nothing: the listeners; the NATS bridge
        stops receiving; the relay drains its clients; the bridge sends what
        they published; the status page; the audit log closes. A step that
        fails is logged and the next one still runs.
        """
        Service.stopService(self)
        relay = next(service for service in self if isinstance(service, RelayService))
        bridge, page = self.bridge, self.status_page
        first = [
            service for service in reversed(self.services) if service not in (relay, bridge, page)
        ]
        steps: list[Callable[[], object]] = [relay.stopService]
        if bridge is not None:
            steps = [bridge.stopReceiving, relay.stopService, bridge.stopService]
        if page is not None:
            steps.append(page.stopService)
        steps.append(relay.close)
        stopping = DeferredList([maybeDeferred(service.stopService) for service in first])
        for step in steps:
            stopping.addBoth(self._next, step)
        # Fires with what the last step, relay.close, returns: None.
        return cast("Deferred[None]", stopping)

    def _next(self, result: object, step: Callable[[], object]) -> Deferred[object]:
        if isinstance(result, Failure):
            self.log.failure("a step of the stop failed; going on with the next", result)
        return maybeDeferred(step)


class RelayService(Service):
    """Runs the domain's life-cycle hooks and the periodic stats line."""

    log = RelayLogger(namespace="relay")
    #: Where the write-ahead log's own lines go, for the preflight's.
    audit_log = RelayLogger(namespace="relay.audit")
    #: Whether the domain and the audit log are set up.
    prepared = False

    def __init__(
        self,
        factory: RelayFactory,
        stats_interval: float,
        drain_timeout: float = 5.0,
        *,
        strict_dirs: bool = True,
    ) -> None:
        """
        @param strict_dirs: refuse an audit directory that another user could
            change (L{check_directory}).
        """
        self.factory = factory
        self.strict_dirs = strict_dirs
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self._stats = LoopingCall(self._report)
        self._stats.clock = factory.clock
        self._heartbeat = LoopingCall(factory.heartbeat)
        self._heartbeat.clock = factory.clock
        self._partials = LoopingCall(factory.expirePartials)
        self._partials.clock = factory.clock
        self._last = self._snapshot()

    def privilegedStartService(self) -> None:
        self._prepare()
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.prepared:  # twist: no privileged step came first
            self._prepare()
        super().startService()
        if self.stats_interval:
            self._last = self._snapshot()
            self._stats.start(self.stats_interval, now=False)
        if self.factory.heartbeat_interval:
            self._heartbeat.start(self.factory.heartbeat_interval, now=False)
        self._partials.start(min(1.0, self.factory.partials.timeout), now=False)

    def _prepare(self) -> None:
        """Initialise the domain and open the audit log before any listener binds."""
        self.prepared = True
        factory = self.factory
        logic, policy = factory.logic, factory.policy
        logic.initialize()
        if factory.writeahead is not None:
            audit = factory.writeahead.audit
            with self._auditRefusals(audit.directory):
                factory.writeahead.start()
            if audit.directory.startswith("/tmp/"):
                self.log.warn(
                    "the audit log is under /tmp, which may not survive a reboot: give "
                    "--audit-dir on persistent storage in production"
                )
        if not scan.NATIVE:
            self.log.warn(
                "frames are framed, checked and logged in pure Python, 10-50 times "
                "slower: {why}",
                why=scan.FALLBACK_REASON,
            )
        # A few short lines rather than one of 400 characters.
        self.log.info(
            "{name} relay (domain {domain}) starting: max frame {max_frame} bytes, checksum "
            "{checksum}, strict TLV {strict_tlv}, scan {scan}",
            name=logic.name,
            domain=logic.domain,
            max_frame=policy.max_frame_size,
            checksum=_onOff(policy.verify_checksum),
            strict_tlv=_onOff(policy.strict_tlv),
            scan="native" if scan.NATIVE else "pure Python",
        )
        self.log.info(
            "slow consumers: {delivery} (high-water {high_water} bytes, low-water "
            "{low_water}, stall timeout {stall_timeout}s); echo {echo}; heartbeat {heartbeat}",
            delivery=factory.delivery.policy,
            high_water=factory.delivery.high_water,
            low_water=factory.delivery.low_water,
            stall_timeout=factory.delivery.stall_timeout,
            echo=_onOff(factory.echo),
            heartbeat=f"{factory.heartbeat_interval:g}s" if factory.heartbeat_interval else "off",
        )
        self.log.info(
            "audit log {audit}; may publish: {publishers}; may subscribe: {subscribers}",
            audit=(
                f"{factory.writeahead.audit.directory} (fsync "
                f"{factory.writeahead.fsync_description})"
                if factory.writeahead is not None
                else "off"
            ),
            publishers=factory.access.publish or "anyone",
            subscribers=factory.access.subscribe or "anyone",
        )

    def preflight(self) -> None:
        """
        What L{_prepare} would refuse of the audit log, refused the same way
        before twistd daemonizes: the log is opened (its directory checked
        and locked, its tail read) and closed again, and a first file the
        opening made is removed: only the directory stays, as the start
        would make it. A torn last record is cut off here rather than at the
        start, with the same warning.
        """
        if self.factory.writeahead is None:
            return
        audit = self.factory.writeahead.audit
        trial = AuditLog(audit.directory, audit.rotate_size)
        with self._auditRefusals(audit.directory):
            existed = os.path.isdir(audit.directory) and bool(audit_paths(audit.directory))
            try:
                for warning in trial.open():
                    self.audit_log.warn("audit log: {warning}", warning=warning)
                if not existed:
                    for made in trial.files:
                        os.unlink(made.path)
            finally:
                trial.close()

    @contextmanager
    def _auditRefusals(self, directory: str) -> Iterator[None]:
        """
        Check the audit directory, then run the block that opens the log;
        what makes the log unusable ends the start with a one-line reason.
        """
        try:
            if self.strict_dirs:
                check_directory(directory)
            yield
        except AuditDamage as e:
            raise SystemExit(
                f"twistd relay: the audit log is damaged ({e}); run 'twisted-relay "
                f"audit verify {directory}' and move the damaged file away"
            ) from None
        except OSError as e:
            raise SystemExit(
                f"twistd relay: cannot use the audit directory {directory}: {e.strerror or e}"
            ) from None
        except UntrustedDirectory as e:
            raise SystemExit(
                f"twistd relay: will not use the audit directory {directory}: {e} "
                f"(--no-strict-dirs overrides this, dangerously)"
            ) from None

    def stopService(self) -> Deferred[None]:
        """Drain the clients, bounded by the drain timeout."""
        for loop in (self._stats, self._heartbeat, self._partials):
            if loop.running:
                loop.stop()
        super().stopService()
        factory = self.factory
        self.log.info(
            "stopping: draining {clients} clients for up to {timeout}s",
            clients=len(factory.clients),
            timeout=self.drain_timeout,
        )
        return factory.drain(self.drain_timeout).addCallback(self._stopped)

    def _stopped(self, _: None) -> None:
        totals, gate = self.factory.totals, self.factory.gate
        self.log.info(
            "stopped: {frames_in} frames accepted, {frames_out} delivered, "
            "{frames_dropped} dropped, {frames_lost} lost, {rejected} rejected; "
            "publishers paused {pauses} times, longest {longest_pause:.3f}s",
            frames_in=totals.frames_in,
            frames_out=totals.frames_out,
            frames_dropped=totals.frames_dropped,
            frames_lost=totals.frames_lost,
            rejected=sum(totals.rejects.values()),
            pauses=gate.pauses,
            longest_pause=gate.longest_pause,
        )

    def close(self) -> None:
        """Close the audit log and clean up the domain, once no frame can arrive."""
        if self.factory.writeahead is not None:
            self.factory.writeahead.stop()
        self.factory.logic.cleanup()

    def abandon(self) -> None:
        """
        For a start-up that failed: let go of what was set up (the audit
        log, its writer thread, which would keep the process from exiting,
        and the domain).
        """
        if self.prepared:
            self.close()

    def _snapshot(self) -> _Snapshot:
        factory = self.factory
        totals, gate, now = factory.totals, factory.gate, factory.clock.seconds()
        return _Snapshot(
            now,
            totals.frames_in,
            totals.bytes_in,
            totals.frames_out,
            totals.bytes_out,
            sum(totals.rejects.values()),
            totals.frames_dropped,
            totals.sequence_gaps,
            gate.paused_seconds + (now - cast(float, gate.paused_since) if gate.paused else 0.0),
        )

    def _report(self) -> None:
        now, last = self._snapshot(), self._last
        elapsed = (now.time - last.time) or 1e-9
        self.log.info(
            "stats: {clients} clients; in {in_fps:.1f} frames/s {in_mbps:.2f} MB/s; "
            "out {out_fps:.1f} frames/s {out_mbps:.2f} MB/s; {new_rejects} rejects "
            "({rejects} since start); {new_dropped} frames dropped, {new_gaps} sequence "
            "gaps, publishers paused {paused:.3f}s",
            clients=len(self.factory.clients),
            in_fps=(now.frames_in - last.frames_in) / elapsed,
            in_mbps=(now.bytes_in - last.bytes_in) / elapsed / 1e6,
            out_fps=(now.frames_out - last.frames_out) / elapsed,
            out_mbps=(now.bytes_out - last.bytes_out) / elapsed / 1e6,
            new_rejects=now.rejects - last.rejects,
            rejects=now.rejects,
            reject_reasons=dict(self.factory.totals.rejects),
            new_dropped=now.dropped - last.dropped,
            new_gaps=now.gaps - last.gaps,
            paused=now.paused - last.paused,
        )
        self._last = now


class _Snapshot(NamedTuple):
    """Totals at one instant, so the stats line can report differences."""

    time: float
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    rejects: int
    dropped: int
    gaps: int
    paused: float
