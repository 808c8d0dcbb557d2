"""
C{twistd relay} and C{twist relay}: the command line (L{Options}, which
parses and checks it) and L{makeService}, which assembles the relay's
services from it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket
import sys
from typing import cast

from twisted.application.service import IService
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.python import usage

from ..access import Access, AccessList
from ..audit import ROTATE_SIZE, AuditLog
from ..domains import UnknownDomain, available_domains, find_domain
from ..engine.delivery import HIGH_WATER, DeliverySettings
from ..engine.ingest import PARTIAL_LIMIT, PARTIAL_TIMEOUT
from ..engine.relay import RelayFactory
from ..engine.writeahead import WriterThread
from ..interfaces import IRelayLogic
from ..validation import FramePolicy
from .endpoints import server_endpoint
from .logs import twistd_observer
from .services import ListeningService, RelayService, RelayServices
from .status import status_site
from .systemd import Notifier, SystemdService, error_line


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


#: The options that only mean something with --nats.
_NATS_ONLY = (
    "nats-user-file",
    "nats-token-file",
    "nats-creds",
    "nats-tls-ca",
    "nats-tls-cert",
    "nats-tls-key",
)


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
            "partial-limit",
            None,
            str(PARTIAL_LIMIT),
            "Bytes all clients together may hold of frames begun and not finished; "
            "the client that goes past it is closed [default: 134217728, 128 MiB].",
        ],
        [
            "partial-timeout",
            None,
            f"{PARTIAL_TIMEOUT:g}",
            "Seconds a client may take to finish a frame it began before it is closed.",
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
            "nats-user-file",
            None,
            None,
            "A file whose first line is USER:PASSWORD for NATS [default: NATS_USER and "
            "NATS_PASSWORD from the environment, if set].",
        ],
        [
            "nats-token-file",
            None,
            None,
            "A file whose first line is the NATS token [default: NATS_TOKEN from the "
            "environment, if set].",
        ],
        ["nats-creds", None, None, "A NATS .creds file (user JWT and NKEY seed)."],
        ["nats-tls-ca", None, None, "CA certificates (PEM) that NATS servers are checked against."],
        ["nats-tls-cert", None, None, "Client certificate (PEM) presented to NATS servers."],
        ["nats-tls-key", None, None, "Private key (PEM) of --nats-tls-cert."],
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
        ["http-access-log", None, "Log every request to --http [default: none is logged]."],
        [
            "no-strict-dirs",
            None,
            "Use socket and audit directories that other users could change (DANGEROUS: "
            "they could put their own socket in the relay's place, or lock its audit log).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-publish"] = []
        self["allow-subscribe"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint (any Twisted server endpoint string, e.g. unix:/tmp/torq/market_data.sock or tcp:7001:interface=127.0.0.1, or a socket path); repeatable [default: the domain's Unix socket]."""
        if description.startswith(("/", "./", "../")):  # a socket path, short for unix:PATH
            description = "unix:" + description.replace("\\", "\\\\").replace(":", "\\:")
        self["listen"].append(description)

    def opt_allow_publish(self, entry: str) -> None:
        """Who may publish: uid:NAME, gid:NAME (the group and its members), cn:NAME (TLS client certificate) or any; repeatable [default: anyone who can connect; on execution only the relay's own user and the entries given]."""
        self["allow-publish"].append(entry)

    def opt_allow_subscribe(self, entry: str) -> None:
        """Who may subscribe, as --allow-publish; repeatable [default: anyone who can connect]."""
        self["allow-subscribe"].append(entry)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Under twistd or twist, a mistake is one line on standard error and
        exit status 1, not the whole usage text (which C{--help} prints).
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:  # not run as a twistd/twist plugin
                raise
            runner = f"{os.path.basename(sys.argv[0])} relay"
            raise SystemExit(error_line(f"{runner}: {e} (see {runner} --help)")) from None

    def postOptions(self) -> None:
        if self["nats"]:
            self._natsOptions()
        else:
            for name in _NATS_ONLY:
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} needs --nats")
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
        self["partial-limit"] = _number(int, "partial-limit", self["partial-limit"])
        if self["partial-limit"] < self["policy"].max_frame_size:
            raise usage.UsageError(
                f"--partial-limit {self['partial-limit']} is below the largest frame "
                f"({self['policy'].max_frame_size} bytes): no such frame could arrive"
            )
        self["partial-timeout"] = _number(float, "partial-timeout", self["partial-timeout"])
        if not self["partial-timeout"]:
            raise usage.UsageError("--partial-timeout must be above 0")
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
        for description in self["listen"] + ([self["http"]] if self["http"] else []):
            self._endpoint(description)

    def _natsOptions(self) -> None:
        """
        The NATS servers and the bridge's settings. nats-py runs on asyncio,
        so the relay runs on Twisted's asyncio reactor, installed here unless
        another one was chosen (twistd -r).
        """
        if importlib.util.find_spec("nats") is None:  # imported by the bridge alone
            raise usage.UsageError(
                "--nats needs the NATS client: pip install 'twisted_relay[nats]'"
            )
        from ..bridge.connection import NatsConnection

        try:
            self["nats"] = NatsConnection.from_options(
                [url.strip() for url in self["nats"].split(",") if url.strip()],
                user_file=self["nats-user-file"],
                token_file=self["nats-token-file"],
                creds=self["nats-creds"],
                tls_ca=self["nats-tls-ca"],
                tls_cert=self["nats-tls-cert"],
                tls_key=self["nats-tls-key"],
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
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

    def _endpoint(self, description: str) -> None:
        """Check one --listen (or --http) value: makeService builds its endpoint."""
        from twisted.internet import reactor

        try:
            server_endpoint(reactor, description, self["mode"])
        except ValueError as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None

    def getUsage(self, width: int | None = None) -> str:
        names = ", ".join(
            " or ".join((logic.name, *getattr(logic, "aliases", ())))
            for logic in available_domains()
        )
        return f"{super().getUsage(width)}\nDomains: {names}\n\n{self.examples}"


def makeService(options: Options, reactor: IReactorCore | None = None) -> IService:
    """The relay's services, as C{options} say, on C{reactor} (default: the global one)."""
    if reactor is None:
        from twisted.internet import reactor
    assert reactor is not None

    def listening(description: str, factory: IProtocolFactory) -> ListeningService:
        endpoint = server_endpoint(
            reactor, description, options["mode"], not options["no-strict-dirs"]
        )
        return ListeningService(description, endpoint, factory)

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
        audit_writer=None if audit is None else WriterThread(cast(IReactorFromThreads, reactor)),
        partial_limit=options["partial-limit"],
        partial_timeout=options["partial-timeout"],
        clock=cast(IReactorTime, reactor),
    )
    top = RelayServices(getattr(options, "parent", None))
    top.log_observer = twistd_observer(options, cast(IReactorTime, reactor))
    RelayService(
        factory,
        options["stats-interval"],
        options["drain-timeout"],
        strict_dirs=not options["no-strict-dirs"],
    ).setServiceParent(top)
    for description in options["listen"]:
        listening(description, factory).setServiceParent(top)
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
    if options["http"]:
        site = status_site(
            factory, options["listen"], bridge, access_log=options["http-access-log"]
        )
        top.status_page = listening(options["http"], site)
        top.status_page.setServiceParent(top)
    notifier = Notifier.fromEnvironment()
    if notifier is not None:  # last: READY=1 once everything above has started
        SystemdService(
            notifier,
            cast(IReactorTime, reactor),
            f"relaying {options['logic'].name} frames on {', '.join(options['listen'])}",
        ).setServiceParent(top)
    if _daemonizing(options):
        top.preflight()
    return top


def _daemonizing(options: Options) -> bool:
    """
    Whether twistd will fork before the relay starts (not under -n, nor
    under twist, which never does). Not under --chroot: the paths the start
    will use are not yet the ones the preflight would see.
    """
    runner = getattr(options, "parent", None) or {}
    return "nodaemon" in runner and not runner["nodaemon"] and not runner.get("chroot")
