"""
The shipped relay domains, and finding a domain by the name given to --domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from .interfaces import DELIVERY_POLICIES, IRelayLogic
from .wire import (
    EXECUTION_TLVS,
    PORTFOLIO_RISK_TLVS,
    SIGNAL_TLVS,
    VENDOR_TLVS,
    Domain,
    Header,
    KiB,
    MiB,
)

__all__ = [
    "BUILTIN_DOMAINS",
    "EXECUTION",
    "MARKET",
    "RelayDomain",
    "SIGNAL",
    "UnknownDomain",
    "available_domains",
    "find_domain",
]


@implementer(IRelayLogic, IPlugin)
@dataclass(frozen=True)
class RelayDomain:
    """
    A domain defined entirely by its settings: it carries the frames whose
    relay_domain is its own number.

    It also provides L{IPlugin}, so a third party can declare a domain with
    one instance in a C{twisted/plugins/} module.
    """

    domain: int
    name: str
    socket_path: str
    max_frame_size: int
    verify_checksum: bool
    strict_tlv: bool
    delivery: str
    allowed_tlv_types: frozenset[int] = frozenset()
    aliases: tuple[str, ...] = field(default=())
    audit: bool = False
    restrict_publishers: bool = False

    def __post_init__(self) -> None:
        if self.delivery not in DELIVERY_POLICIES:
            raise ValueError(
                f"domain {self.name!r}: delivery {self.delivery!r} is not one of "
                f"{', '.join(DELIVERY_POLICIES)}"
            )

    def should_forward(self, header: Header) -> bool:
        return header.relay_domain == self.domain

    def initialize(self) -> None:
        """These domains are stateless: nothing to acquire."""

    def cleanup(self) -> None:
        """These domains are stateless: nothing to release."""


def _tlv_types(*families: range) -> frozenset[int]:
    return frozenset(t for family in families for t in family)


MARKET = RelayDomain(
    domain=Domain.MARKET_DATA,
    name="market",
    aliases=("market_data",),
    socket_path="/tmp/torq/market_data.sock",
    max_frame_size=16 * MiB,
    verify_checksum=False,
    strict_tlv=False,
    delivery="drop",
)

SIGNAL = RelayDomain(
    domain=Domain.SIGNAL,
    name="signal",
    aliases=("signals",),
    socket_path="/tmp/torq/signals.sock",
    max_frame_size=32 * KiB,
    verify_checksum=True,
    strict_tlv=True,
    allowed_tlv_types=_tlv_types(SIGNAL_TLVS, PORTFOLIO_RISK_TLVS, VENDOR_TLVS),
    delivery="disconnect",
)

EXECUTION = RelayDomain(
    domain=Domain.EXECUTION,
    name="execution",
    socket_path="/tmp/torq/execution.sock",
    max_frame_size=1 * MiB,
    verify_checksum=True,
    strict_tlv=True,
    allowed_tlv_types=_tlv_types(EXECUTION_TLVS, PORTFOLIO_RISK_TLVS, VENDOR_TLVS),
    delivery="block",
    audit=True,
    restrict_publishers=True,
)

BUILTIN_DOMAINS: tuple[RelayDomain, ...] = (MARKET, SIGNAL, EXECUTION)


class UnknownDomain(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown domain {name!r}; available: {', '.join(sorted(known))}"
        )


def available_domains(package: ModuleType | None = None) -> list[IRelayLogic]:
    """
    The shipped domains, then every L{IRelayLogic} plugin found in
    C{package} (default: C{twisted.plugins}).
    """
    if package is None:
        import twisted.plugins as package
    return [*BUILTIN_DOMAINS, *getPlugins(IRelayLogic, package)]


def find_domain(name: str, package: ModuleType | None = None) -> IRelayLogic:
    """The domain called C{name} (or one of its aliases)."""
    domains = available_domains(package)
    for logic in domains:
        if name == logic.name or name in getattr(logic, "aliases", ()):
            return logic
    raise UnknownDomain(name, [logic.name for logic in domains])
