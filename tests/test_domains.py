"""Tests for L{twisted_relay.domains} and L{twisted_relay.interfaces}."""

from __future__ import annotations

from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_relay.domains import (
    BUILTIN_DOMAINS,
    EXECUTION,
    MARKET,
    SIGNAL,
    RelayDomain,
    UnknownDomain,
    available_domains,
    find_domain,
)
from twisted_relay.interfaces import IRelayLogic
from twisted_relay.wire import MAGIC, Domain, Header

from . import plugins
from .plugins.acme_domain import acme


def header(domain: int) -> Header:
    return Header(MAGIC, domain, 1, 1, 0, 1, 0, 0, 0)


class InterfaceTests(SynchronousTestCase):
    def test_builtinsProvideIRelayLogic(self) -> None:
        """Every shipped domain, and the test plugin domain, provides IRelayLogic."""
        for logic in (*BUILTIN_DOMAINS, acme):
            self.assertTrue(verifyObject(IRelayLogic, logic))
            self.assertTrue(verifyObject(IPlugin, logic))

    def test_values(self) -> None:
        """The shipped domains carry the numbers and limits of protocol-v2.md."""
        self.assertEqual(
            [(d.name, d.domain, d.socket_path, d.max_frame_size) for d in BUILTIN_DOMAINS],
            [
                ("market", 1, "/tmp/torq/market_data.sock", 16 * 1024 * 1024),
                ("signal", 2, "/tmp/torq/signals.sock", 32 * 1024),
                ("execution", 3, "/tmp/torq/execution.sock", 1024 * 1024),
            ],
        )
        self.assertEqual(
            [(d.verify_checksum, d.strict_tlv, d.delivery) for d in BUILTIN_DOMAINS],
            [(False, False, "drop"), (True, True, "disconnect"), (True, True, "block")],
        )

    def test_tlvFamilies(self) -> None:
        """Signal allows 20-39 and 60-79, execution 40-79; both allow vendor types."""
        self.assertEqual(
            SIGNAL.allowed_tlv_types, {*range(20, 40), *range(60, 80), *range(200, 255)}
        )
        self.assertEqual(EXECUTION.allowed_tlv_types, {*range(40, 80), *range(200, 255)})

    def test_shouldForwardOwnDomainOnly(self) -> None:
        """Each domain forwards frames of its own relay_domain and no other."""
        for logic in BUILTIN_DOMAINS:
            self.assertEqual(
                [d for d in Domain if logic.should_forward(header(d))], [logic.domain]
            )

    def test_badDelivery(self) -> None:
        """A domain asking for an unknown delivery policy is refused at once."""
        error = self.assertRaises(
            ValueError, RelayDomain, 5, "x", "/tmp/x", 64, False, False, "lossy"
        )
        self.assertIn("'lossy' is not one of drop, disconnect, block", str(error))


class LookupTests(SynchronousTestCase):
    def test_namesAndAliases(self) -> None:
        """--domain takes the names and their aliases."""
        for name, logic in [
            ("market", MARKET),
            ("market_data", MARKET),
            ("signal", SIGNAL),
            ("signals", SIGNAL),
            ("execution", EXECUTION),
        ]:
            self.assertIs(find_domain(name), logic)

    def test_pluginDomain(self) -> None:
        """A domain declared in a plugin package is found by name and alias."""
        self.assertIs(find_domain("acme", plugins), acme)
        self.assertIs(find_domain("acme_fx", plugins), acme)
        self.assertIn(acme, available_domains(plugins))

    def test_unknown(self) -> None:
        """An unknown name lists the domains that exist."""
        error = self.assertRaises(UnknownDomain, find_domain, "forex", plugins)
        self.assertEqual(
            str(error), "unknown domain 'forex'; available: acme, execution, market, signal"
        )
