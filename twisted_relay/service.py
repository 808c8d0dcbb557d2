"""
C{twistd relay}: its command line and the services it runs.
"""

from __future__ import annotations

import re

from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from .domains import UnknownDomain, available_domains, find_domain
from .relay import RelayFactory
from .unixsocket import UnixSocketEndpoint
from .validation import FramePolicy


def _onOff(flag: bool) -> str:
    return "on" if flag else "off"


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
    ]
    optFlags = [
        ["echo", None, "Also send each client the frames it publishes."],
        ["checksum", None, "Verify CRC-32 checksums [default: the domain's]."],
        ["no-checksum", None, "Do not verify CRC-32 checksums."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint (any Twisted server endpoint string, e.g. unix:/tmp/torq/market_data.sock or tcp:7001:interface=127.0.0.1); repeatable [default: the domain's Unix socket]."""
        self["listen"].append(description)

    def postOptions(self) -> None:
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
        try:
            self["stats-interval"] = float(self["stats-interval"])
            if self["stats-interval"] < 0:
                raise ValueError
        except ValueError:
            raise usage.UsageError("--stats-interval takes a number of seconds >= 0") from None
        try:
            self["policy"] = FramePolicy.for_logic(
                logic,
                max_frame_size=None if self["max-frame"] is None else int(self["max-frame"]),
                verify_checksum=(
                    True if self["checksum"] else False if self["no-checksum"] else None
                ),
            )
        except ValueError as e:
            raise usage.UsageError(f"--max-frame: {e}") from None
        if not self["listen"]:
            self["listen"] = [f"unix:{logic.socket_path}"]
        self["endpoints"] = [self._endpoint(d) for d in self["listen"]]

    def _endpoint(self, description: str) -> IStreamServerEndpoint:
        """The endpoint for one --listen value; Unix sockets get the safe one."""
        from twisted.internet import reactor

        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"--listen {description!r}: {e}") from None
        if isinstance(endpoint, UNIXServerEndpoint):
            if re.search(r"(^|:)mode=", description):
                raise usage.UsageError(
                    f"--listen {description!r}: give the socket mode with --mode"
                )
            return UnixSocketEndpoint(
                reactor, endpoint._address, self["mode"], endpoint._backlog
            )
        return endpoint

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
        self.log.info("listening on {endpoint}", endpoint=self.endpoint)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class RelayService(Service):
    """Runs the domain's life-cycle hooks and the periodic stats line."""

    log = Logger()

    def __init__(self, factory: RelayFactory, stats_interval: float) -> None:
        self.factory = factory
        self.stats_interval = stats_interval
        self._stats = LoopingCall(self._report)
        self._stats.clock = factory.clock
        self._last = (0.0, 0, 0, 0, 0, 0)

    def privilegedStartService(self) -> None:
        """Initialise the domain before any listener binds."""
        factory = self.factory
        logic, policy = factory.logic, factory.policy
        logic.initialize()
        super().privilegedStartService()
        self.log.info(
            "{name} relay (domain {domain}) starting: max frame {max_frame} bytes, "
            "checksum {checksum}, strict TLV {strict_tlv}, delivery {delivery}, "
            "echo {echo}",
            name=logic.name,
            domain=logic.domain,
            max_frame=policy.max_frame_size,
            checksum=_onOff(policy.verify_checksum),
            strict_tlv=_onOff(policy.strict_tlv),
            delivery=logic.delivery,
            echo=_onOff(factory.echo),
        )

    def startService(self) -> None:
        super().startService()
        if self.stats_interval:
            self._last = self._snapshot()
            self._stats.start(self.stats_interval, now=False)

    def stopService(self) -> None:
        if self._stats.running:
            self._stats.stop()
        super().stopService()
        self.factory.logic.cleanup()

    def _snapshot(self) -> tuple[float, int, int, int, int, int]:
        totals = self.factory.totals
        return (
            self.factory.clock.seconds(),
            totals.frames_in,
            totals.bytes_in,
            totals.frames_out,
            totals.bytes_out,
            sum(totals.rejects.values()),
        )

    def _report(self) -> None:
        now = self._snapshot()
        elapsed = (now[0] - self._last[0]) or 1e-9
        rates = [(n - p) / elapsed for n, p in zip(now[1:5], self._last[1:5])]
        self.log.info(
            "stats: {clients} clients; in {in_fps:.0f} frames/s {in_mbps:.2f} MB/s; "
            "out {out_fps:.0f} frames/s {out_mbps:.2f} MB/s; {new_rejects} rejects "
            "({rejects} since start)",
            clients=len(self.factory.clients),
            in_fps=rates[0],
            in_mbps=rates[1] / 1e6,
            out_fps=rates[2],
            out_mbps=rates[3] / 1e6,
            new_rejects=now[5] - self._last[5],
            rejects=now[5],
            reject_reasons=dict(self.factory.totals.rejects),
        )
        self._last = now


def makeService(options: Options) -> IService:
    factory = RelayFactory(options["logic"], options["policy"], echo=options["echo"])
    top = MultiService()
    RelayService(factory, options["stats-interval"]).setServiceParent(top)
    for description, endpoint in zip(options["listen"], options["endpoints"]):
        ListeningService(description, endpoint, factory).setServiceParent(top)
    return top
