"""
C{twistd relay}: its command line and the services it runs.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import NamedTuple

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ..access import Access, AccessList
from ..audit import ROTATE_SIZE, AuditDamage, AuditLog
from ..domains import UnknownDomain, available_domains, find_domain
from ..engine.delivery import HIGH_WATER, DeliverySettings
from ..engine.relay import RelayFactory
from ..interfaces import IRelayLogic
from ..scan import NATIVE as NATIVE_SCAN
from ..validation import FramePolicy
from .endpoints import UnixSocketEndpoint, server_endpoint
from .status import status_site


def _onOff(flag: bool) -> str:
    return "on" if flag else "off"


def _number(kind: type, option: str, value: str | None):
    """C{value} of C{--option} as C{kind}, which must not be negative."""
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = -1
    if not 0 <= number < math.inf:
        raise usage.UsageError(f"--{option} takes a number >= 0, not {value!r}")
    return number


#: The smallest --audit-rotate: below it the log would start a file per write.
MIN_AUDIT_FILE = 65536


def _accessList(option: str, entries: list[str], own_uid: bool = False) -> AccessList | None:
    """The list given by --option (None: anyone), with the relay's own user if C{own_uid}."""
    try:
        if own_uid:
            return AccessList.own_uid_and(entries)
        return AccessList(entries) if entries else None
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None


class Options(usage.Options):
    synopsis = "[--domain NAME] [--listen ENDPOINT]... [options]"
    longdesc = (
        "Relay Protocol V2 frames between the clients of one domain: every frame "
        "a client writes is checked, filtered by the domain and sent to every "
        "other client."
    )
    examples = """\
Examples:
  twistd -n relay --domain market
  twistd -n relay --domain execution --listen unix:/tmp/x/e.sock
  twistd -n relay --domain signal --listen unix:/tmp/torq/signals.sock \\
      --listen tcp:7002:interface=10.0.0.5
"""

    optParameters = [
        ["domain", "d", "market", "The relay domain (see the list below)."],
        ["mode", None, "0660", "File mode (octal) of Unix sockets, set at bind time."],
        [
            "max-frame",
            None,
            None,
            "Largest frame accepted, in bytes, header included [default: the domain's].",
        ],
        ["stats-interval", None, "10", "Seconds between stats log lines; 0 turns them off."],
        [
            "slow-consumer",
            None,
            None,
            "What to do with a client that does not keep up: drop, disconnect or "
            "block [default: the domain's].",
        ],
        [
            "high-water",
            None,
            None,
            "Bytes queued for one client before its slow-consumer policy applies "
            "[default: 8388608, 8 MiB].",
        ],
        [
            "low-water",
            None,
            None,
            "Bytes below which a blocking client releases the publishers "
            "[default: 2 MiB, at most a quarter of --high-water].",
        ],
        [
            "stall-timeout",
            None,
            None,
            "Seconds a client may hold the publishers back (block) before it is cut "
            "off [default: 2].",
        ],
        [
            "drain-timeout",
            None,
            "5",
            "Seconds given to queued data to reach clients on shutdown.",
        ],
        [
            "http",
            None,
            None,
            "Serve /health (JSON) and /metrics (Prometheus) on this endpoint, "
            "e.g. tcp:9100:interface=127.0.0.1 [default: off].",
        ],
        [
            "audit-dir",
            None,
            None,
            "Write every accepted frame to an audit log in this directory before "
            "forwarding it [default: /tmp/torq/audit/NAME for domains that audit "
            "(execution), off for the others].",
        ],
        [
            "audit-fsync",
            None,
            None,
            "When the audit log reaches the disk: 'always' (before each forward) or "
            "every INTERVAL_MS milliseconds [default: always for execution, 100 for "
            "the others].",
        ],
        [
            "audit-rotate",
            None,
            str(ROTATE_SIZE),
            "Bytes after which the audit log starts a new file.",
        ],
        [
            "heartbeat",
            None,
            "1",
            "Seconds of silence after which a subscriber is sent a heartbeat; 0 turns "
            "them off.",
        ],
        [
            "nats",
            None,
            None,
            "Share the broadcast with the relays of other hosts through these NATS "
            "servers (nats://HOST:PORT, comma-separated) [default: off].",
        ],
        [
            "relay-id",
            None,
            re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()),
            "This relay's origin token in NATS subjects (torq.DOMAIN.ID), unique per relay; "
            "the default is the host name, dots as dashes.",
        ],
        [
            "nats-high-water",
            None,
            str(HIGH_WATER),
            "Bytes of frames waiting for NATS before whole chunks are dropped (core "
            "NATS) or the publishers are held back (JetStream, lossless domains).",
        ],
        [
            "nats-replicas",
            None,
            "0",
            "Replicas of a lossless domain's JetStream stream; 0: 3 when 3 or more "
            "NATS servers are known, else 1.",
        ],
    ]
    optFlags = [
        ["echo", None, "Also send each client the frames it publishes."],
        ["checksum", None, "Verify CRC-32 checksums [default: the domain's]."],
        ["no-checksum", None, "Do not verify CRC-32 checksums."],
        ["no-audit", None, "Keep no audit log, even for a domain that audits by default."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-publish"] = []
        self["allow-subscribe"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint (any Twisted server endpoint string, e.g. unix:/tmp/torq/market_data.sock or tcp:7001:interface=127.0.0.1); repeatable [default: the domain's Unix socket]."""
        self["listen"].append(description)

    def opt_allow_publish(self, entry: str) -> None:
        """Who may publish: uid:NAME, gid:NAME (the group and its members), cn:NAME (TLS client certificate) or any; repeatable [default: anyone who can connect; on execution only the relay's own user and the entries given]."""
        self["allow-publish"].append(entry)

    def opt_allow_subscribe(self, entry: str) -> None:
        """Who may subscribe, as --allow-publish; repeatable [default: anyone who can connect]."""
        self["allow-subscribe"].append(entry)

    def postOptions(self) -> None:
        if self["nats"]:
            self._natsOptions()
        try:
            self["logic"] = logic = find_domain(self["domain"])
        except UnknownDomain as e:
            raise usage.UsageError(str(e)) from None
        try:
            self["mode"] = int(self["mode"], 8)
        except ValueError:
            raise usage.UsageError(f"--mode {self['mode']!r} is not an octal number") from None
        if not 0 <= self["mode"] <= 0o777:
            raise usage.UsageError(f"--mode {self['mode']:o} is not a file permission mode")
        if self["checksum"] and self["no-checksum"]:
            raise usage.UsageError("--checksum and --no-checksum contradict each other")
        self["stats-interval"] = _number(float, "stats-interval", self["stats-interval"])
        try:
            self["policy"] = FramePolicy.for_logic(
                logic,
                max_frame_size=_number(int, "max-frame", self["max-frame"]),
                verify_checksum=(
                    True if self["checksum"] else False if self["no-checksum"] else None
                ),
            )
        except ValueError as e:
            raise usage.UsageError(f"--max-frame: {e}") from None
        try:
            self["delivery"] = DeliverySettings.for_logic(
                logic,
                policy=self["slow-consumer"],
                high_water=_number(int, "high-water", self["high-water"]),
                low_water=_number(int, "low-water", self["low-water"]),
                stall_timeout=_number(float, "stall-timeout", self["stall-timeout"]),
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["drain-timeout"] = _number(float, "drain-timeout", self["drain-timeout"])
        self["heartbeat"] = _number(float, "heartbeat", self["heartbeat"])
        self._auditOptions(logic)
        self["access"] = Access(
            publish=_accessList(
                "allow-publish", self["allow-publish"], own_uid=logic.restrict_publishers
            ),
            subscribe=_accessList("allow-subscribe", self["allow-subscribe"]),
        )
        if not self["listen"]:
            self["listen"] = [f"unix:{logic.socket_path}"]
        self["endpoints"] = [self._endpoint(d) for d in self["listen"]]
        self["http-endpoint"] = self._endpoint(self["http"]) if self["http"] else None

    def _natsOptions(self) -> None:
        """
        The NATS servers and the bridge's settings. nats-py runs on asyncio,
        so the relay runs on Twisted's asyncio reactor, installed here unless
        another one was chosen (twistd -r).
        """
        self["nats"] = [url.strip() for url in self["nats"].split(",") if url.strip()]
        try:
            import nats  # noqa: F401
        except ImportError:
            raise usage.UsageError(
                "--nats needs the NATS client: pip install 'twisted_relay[nats]'"
            ) from None
        if "twisted.internet.reactor" not in sys.modules:
            from twisted.internet import asyncioreactor

            asyncioreactor.install()
        from twisted.internet import reactor

        if type(reactor).__name__ != "AsyncioSelectorReactor":
            raise usage.UsageError(
                "--nats needs the asyncio reactor: leave out twistd's -r, or give -r asyncio"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self["relay-id"]):
            raise usage.UsageError(
                f"--relay-id {self['relay-id']!r}: use letters, digits, '-' and '_' only "
                f"(it is a NATS subject token)"
            )
        self["nats-high-water"] = _number(int, "nats-high-water", self["nats-high-water"])
        self["nats-replicas"] = _number(int, "nats-replicas", self["nats-replicas"])

    def _auditOptions(self, logic: IRelayLogic) -> None:
        """The audit directory (None: no audit log), fsync interval and file size."""
        if self["no-audit"] and self["audit-dir"]:
            raise usage.UsageError("--audit-dir and --no-audit contradict each other")
        if self["no-audit"] or not (self["audit-dir"] or logic.audit):
            self["audit-dir"] = None
        elif not self["audit-dir"]:
            self["audit-dir"] = f"/tmp/torq/audit/{logic.name}"
        fsync = self["audit-fsync"] or ("always" if logic.audit else "100")
        if fsync == "always":
            self["audit-fsync"] = None
        else:
            try:
                interval = float(fsync)
            except ValueError:
                interval = 0
            if not 0 < interval < math.inf:
                raise usage.UsageError(
                    f"--audit-fsync takes 'always' or a number of milliseconds > 0, not {fsync!r}"
                )
            self["audit-fsync"] = interval / 1000
        self["audit-rotate"] = _number(int, "audit-rotate", self["audit-rotate"])
        if self["audit-rotate"] < MIN_AUDIT_FILE:
            raise usage.UsageError(
                f"--audit-rotate {self['audit-rotate']} is below the smallest audit file "
                f"size, {MIN_AUDIT_FILE} bytes"
            )

    def _endpoint(self, description: str) -> IStreamServerEndpoint:
        """The endpoint for one --listen value."""
        from twisted.internet import reactor

        try:
            return server_endpoint(reactor, description, self["mode"])
        except ValueError as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None

    def getUsage(self, width: int | None = None) -> str:
        names = ", ".join(
            " or ".join((logic.name, *getattr(logic, "aliases", ())))
            for logic in available_domains()
        )
        return f"{super().getUsage(width)}\nDomains: {names}\n\n{self.examples}"


class ListeningService(Service):
    """
    Listens on one endpoint. Failing to listen at start-up ends the process
    with a one-line reason instead of a traceback.
    """

    log = Logger()

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory) -> None:
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise SystemExit(f"twistd relay: {self.description} did not listen at once")
        if isinstance(outcome[0], Failure):
            raise SystemExit(
                f"twistd relay: cannot listen on {self.description}: "
                f"{outcome[0].getErrorMessage()}"
            )
        self.port = outcome[0]
        self.log.info(
            "listening on {endpoint}",
            endpoint=(
                repr(self.endpoint)
                if isinstance(self.endpoint, UnixSocketEndpoint)
                else self.description
            ),
        )
        if not isinstance(self.endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            return
        host = self.port.getHost()
        if not ipaddress.ip_address(host.host).is_loopback:
            self.log.warn(
                "{description} is plain TCP on {host}, reachable from other hosts with "
                "neither encryption nor a way to tell who connects: listen on "
                "interface=127.0.0.1, or use ssl: with client certificates "
                "(docs/execution.md)",
                description=self.description,
                host=host.host,
            )

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
    behind, and a stop closes the audit log only once nothing can add a
    frame to it.
    """

    log = Logger()
    #: The NATS bridge, if the relay has one: its stop has two steps of the order.
    bridge: IService | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except SystemExit:
            for service in self:
                if isinstance(service, ListeningService):
                    service.abandon()
            raise

    def stopService(self) -> Deferred[None]:
        """
        Stop in the order that loses nothing: the listeners and the status
        page; the NATS bridge stops receiving; the relay drains its clients;
        the bridge sends what they published; the audit log closes. A step
        that fails is logged and the next one still runs.
        """
        Service.stopService(self)
        relay = next(service for service in self if isinstance(service, RelayService))
        bridge = self.bridge
        first = [service for service in reversed(self.services) if service not in (relay, bridge)]
        steps = [relay.stopService, relay.close]
        if bridge is not None:
            steps = [bridge.stopReceiving, relay.stopService, bridge.stopService, relay.close]
        stopping = DeferredList([maybeDeferred(service.stopService) for service in first])
        for step in steps:
            stopping.addBoth(self._next, step)
        return stopping

    def _next(self, result: object, step: Callable[[], object]) -> Deferred[object]:
        if isinstance(result, Failure):
            self.log.failure("a step of the stop failed; going on with the next", result)
        return maybeDeferred(step)


class RelayService(Service):
    """Runs the domain's life-cycle hooks and the periodic stats line."""

    log = Logger()

    def __init__(
        self, factory: RelayFactory, stats_interval: float, drain_timeout: float = 5.0
    ) -> None:
        self.factory = factory
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self._stats = LoopingCall(self._report)
        self._stats.clock = factory.clock
        self._heartbeat = LoopingCall(factory.heartbeat)
        self._heartbeat.clock = factory.clock
        self._last = self._snapshot()

    def privilegedStartService(self) -> None:
        """Initialise the domain and open the audit log before any listener binds."""
        factory = self.factory
        logic, policy = factory.logic, factory.policy
        logic.initialize()
        if factory.writeahead is not None:
            audit = factory.writeahead.audit
            try:
                factory.writeahead.start()
            except AuditDamage as e:
                raise SystemExit(
                    f"twistd relay: the audit log is damaged ({e}); run 'twisted-relay "
                    f"audit verify {audit.directory}' and move the damaged file away"
                ) from None
            except OSError as e:
                raise SystemExit(
                    f"twistd relay: cannot use the audit directory {audit.directory}: "
                    f"{e.strerror or e}"
                ) from None
            if audit.directory.startswith("/tmp/"):
                self.log.warn(
                    "the audit log is under /tmp, which may not survive a reboot: give "
                    "--audit-dir on persistent storage in production"
                )
        super().privilegedStartService()
        self.log.info(
            "{name} relay (domain {domain}) starting: max frame {max_frame} bytes, "
            "checksum {checksum}, strict TLV {strict_tlv}, slow consumers: {delivery} "
            "(high-water {high_water} bytes, low-water {low_water}, stall timeout "
            "{stall_timeout}s), echo {echo}, scan {scan}, audit log {audit}, heartbeat "
            "{heartbeat}, may publish: {publishers}, may subscribe: {subscribers}",
            name=logic.name,
            domain=logic.domain,
            max_frame=policy.max_frame_size,
            checksum=_onOff(policy.verify_checksum),
            strict_tlv=_onOff(policy.strict_tlv),
            delivery=factory.delivery.policy,
            high_water=factory.delivery.high_water,
            low_water=factory.delivery.low_water,
            stall_timeout=factory.delivery.stall_timeout,
            echo=_onOff(factory.echo),
            scan="native" if NATIVE_SCAN else "pure Python",
            audit=(
                f"{factory.writeahead.audit.directory} (fsync "
                f"{factory.writeahead.fsync_description})"
                if factory.writeahead is not None
                else "off"
            ),
            heartbeat=f"{factory.heartbeat_interval:g}s" if factory.heartbeat_interval else "off",
            publishers=factory.access.publish or "anyone",
            subscribers=factory.access.subscribe or "anyone",
        )

    def startService(self) -> None:
        super().startService()
        if self.stats_interval:
            self._last = self._snapshot()
            self._stats.start(self.stats_interval, now=False)
        if self.factory.heartbeat_interval:
            self._heartbeat.start(self.factory.heartbeat_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Drain the clients, bounded by the drain timeout."""
        for loop in (self._stats, self._heartbeat):
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
            gate.paused_seconds + (now - gate.paused_since if gate.paused else 0.0),
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


def makeService(options: Options) -> IService:
    audit = (
        None
        if options["audit-dir"] is None
        else AuditLog(options["audit-dir"], options["audit-rotate"])
    )
    factory = RelayFactory(
        options["logic"],
        options["policy"],
        delivery=options["delivery"],
        echo=options["echo"],
        access=options["access"],
        heartbeat=options["heartbeat"],
        audit=audit,
        fsync_interval=options["audit-fsync"],
    )
    top = RelayServices()
    RelayService(factory, options["stats-interval"], options["drain-timeout"]).setServiceParent(top)
    for description, endpoint in zip(options["listen"], options["endpoints"]):
        ListeningService(description, endpoint, factory).setServiceParent(top)
    bridge = None
    if options["nats"]:
        from ..bridge.service import NatsBridge

        bridge = NatsBridge(
            factory,
            options["nats"],
            options["relay-id"],
            options["nats-high-water"],
            options["nats-replicas"],
        )
        factory.outlet = top.bridge = bridge
        bridge.setServiceParent(top)
    if options["http-endpoint"] is not None:
        site = status_site(factory, options["listen"], bridge)
        ListeningService(options["http"], options["http-endpoint"], site).setServiceParent(top)
    return top
