"""
Tests that keep the package's shape: every module in its layer, imports only
downward (C{TYPE_CHECKING} and function-level imports included), no Twisted
in the format layer or the audit log, nats-py only in the bridge, and the
public surface of the modules the docs name pinned.
"""

from __future__ import annotations

import ast
import importlib
import os

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "twisted_relay")

#: The layers, lowest first; within a layer, a module may import the ones before it.
LAYERS: list[tuple[str, list[str]]] = [
    ("format", ["_cscan", "wire", "framing", "scan", "control", "ratelimit"]),
    ("policy", ["interfaces", "domains", "validation", "access", "paths"]),
    ("audit", ["audit.format", "audit.reader", "audit.writer", "audit"]),
    (
        "engine",
        [
            "engine.logger",
            "engine.accounting",
            "engine.delivery",
            "engine.writeahead",
            "engine.recovery",
            "engine.heartbeat",
            "engine.ingest",
            "engine.protocol",
            "engine.relay",
            "engine",
        ],
    ),
    ("client", ["client"]),
    (
        "bridge",
        [
            "bridge.messages",
            "bridge.connection",
            "bridge.outbound",
            "bridge.inbound",
            "bridge.service",
            "bridge",
        ],
    ),
    (
        "app",
        ["app.endpoints", "app.logs", "app.systemd", "app.status", "app.services", "app.tap", "app"],
    ),
    ("tools", ["testing", "live", "cli"]),
]
RANK = {
    module: (layer, position)
    for layer, (_, modules) in enumerate(LAYERS)
    for position, module in enumerate(modules)
}
#: Layers that must not import Twisted: the offline tools read the audit log.
NO_TWISTED = {"format", "audit"}


def modules() -> dict[str, str]:
    """Every module of the package by dotted name (without C{twisted_relay.}), and its path."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, PACKAGE)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts) or "twisted_relay"] = path
    return found


def imports(module: str, path: str) -> set[str]:
    """Everything C{module} imports, anywhere in it, as absolute dotted names."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(["twisted_relay", *base])
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            names.add(target)
            # from . import x: x may be a module
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def inside(name: str) -> str | None:
    """The package module C{name} refers to, or None if it is outside the package."""
    if name != "twisted_relay" and not name.startswith("twisted_relay."):
        return None
    rest = name[len("twisted_relay.") :] if "." in name else "twisted_relay"
    known = modules()
    while rest and rest not in known and rest not in RANK:
        rest = rest.rpartition(".")[0]
    return rest or None


class LayerTests(SynchronousTestCase):
    def test_everyModuleHasALayer(self) -> None:
        """Each module of the package is placed in exactly one layer."""
        placed = [m for _, group in LAYERS for m in group if m != "_cscan"]
        self.assertEqual(len(placed), len(set(placed)))
        self.assertEqual(sorted(set(modules()) - {"twisted_relay"}), sorted(placed))

    def test_importsGoDown(self) -> None:
        """No module imports a higher layer or a later module of its own layer."""
        wrong = []
        for module, path in sorted(modules().items()):
            if module == "twisted_relay":
                continue
            for name in imports(module, path):
                target = inside(name)
                if target is None or target == "twisted_relay" or target == module:
                    continue
                if RANK[target] >= RANK[module]:
                    wrong.append(f"{module} imports {target}")
        self.assertEqual(wrong, [])

    def test_noTwistedBelowTheEngine(self) -> None:
        """The format layer and the audit log import nothing of Twisted."""
        known = modules()
        for layer, group in LAYERS:
            if layer not in NO_TWISTED:
                continue
            for module in group:
                if module in known:
                    names = imports(module, known[module])
                    self.assertEqual(
                        sorted(n for n in names if n.split(".")[0] == "twisted"), [], module
                    )

    def test_natsOnlyInTheBridge(self) -> None:
        """nats-py is imported by the bridge package alone."""
        for module, path in modules().items():
            if module.startswith("bridge"):
                continue
            names = imports(module, path)
            self.assertEqual(sorted(n for n in names if n.split(".")[0] == "nats"), [], module)

    def test_seesTypeCheckingAndFunctionImports(self) -> None:
        """The import scan finds imports under TYPE_CHECKING and inside functions."""
        names = imports("app.tap", modules()["app.tap"])
        self.assertIn("twisted_relay.bridge.service", names)  # inside makeService
        names = imports("app.status", modules()["app.status"])
        self.assertIn("twisted_relay.bridge.service", names)  # under TYPE_CHECKING


#: The public surface of the modules the docs name.
SURFACE = {
    "wire": [
        "BadChecksum", "BadMagic", "BadTLV", "CHECKED_HEADER_SIZE", "CHECKSUM_OFFSET", "COMPLIANCE_TLVS",
        "Domain", "EXECUTION_TLVS", "EXTENDED_TLV", "FrameError", "FrameRejected",
        "FrameTooLarge", "FramingLost", "HEADER", "HEADER_SIZE", "Header", "IncompleteFrame",
        "IncompleteFrameTimeout",
        "KiB", "MAGIC", "MAGIC_BYTES", "MARKET_DATA_TLVS", "MAX_EXTENDED_TLV", "MAX_STANDARD_TLV",
        "MiB", "NotForwarded", "PAYLOAD_SIZE_OFFSET", "PORTFOLIO_RISK_TLVS",
        "PartialFramesOverLimit", "REJECT_REASONS",
        "ROUTING", "SIGNAL_TLVS", "SOURCE_SEQUENCE", "SYSTEM_TLVS", "Source", "TLV_NAMES",
        "TruncatedTLV", "UINT32", "UnknownTLVType", "UnsupportedVersion", "VENDOR_TLVS",
        "VERSION", "build_frame", "encode_tlvs", "frame_checksum", "frame_spans", "iter_tlvs",
        "tlv_spans", "unpack_header",
    ],
    "control": [
        "ACCOUNT", "Account", "BUSY", "BadControlFrame", "CONTROL_TLVS", "Control", "ControlFlood", "ERROR", "EVERYTHING",
        "HEARTBEAT",
        "NOTHING", "NOT_SUBSCRIBED", "NO_AUDIT_LOG", "RECOVERY_REQUEST", "RECOVERY_RESPONSE",
        "RELAY_INFO", "RELAY_ROLE", "RELAY_SOURCES", "REPLAYING", "ROLE_BOTH",
        "ROLE_PUBLISH_ONLY", "SUBSCRIBE_SOURCES", "SUBSCRIBE_TLV_TYPES", "Subscription",
        "account_answer_frame", "account_frame",
        "control_frame", "error_frame", "heartbeat_frame", "is_control", "parse_account",
        "parse_control", "parse_error", "parse_heartbeat",
        "parse_recovery_response", "parse_relay_info", "recovery_frame",
        "recovery_response_frame", "relay_info_frame",
    ],
    "domains": [
        "BUILTIN_DOMAINS", "EXECUTION", "MARKET", "SIGNAL", "RelayDomain", "UnknownDomain",
        "available_domains", "find_domain",
    ],
    "interfaces": ["DELIVERY_POLICIES", "IRelayLogic"],
    "client": [
        "Account", "BlockingClient", "DEFAULT_MAX_FRAME", "Incoming", "MISSED_HEARTBEATS",
        "PublishRefused", "RelayClientProtocol", "RelayClosed", "RelayDead", "relay_service",
    ],
    "audit": [
        "RECORD_OVERHEAD", "ROTATE_SIZE", "AuditDamage", "AuditFile", "AuditLog", "LogFollower",
        "LogReader",
        "Position", "Record", "VerifyReport", "audit_files", "audit_paths", "audit_records",
        "audit_records_python", "verify",
    ],
    "testing": [
        "NatsCluster", "RecordingTransport", "RelayProcess", "bridged_relay", "connect",
        "frames_for", "frames_in", "free_ports", "limit_file_size", "make_relay", "orders",
        "published", "start_bridged", "synthetic",
    ],
}


class SurfaceTests(SynchronousTestCase):
    def test_pinned(self) -> None:
        """Each public module's __all__ is what the docs may name, and every name exists."""
        for name, expected in SURFACE.items():
            module = importlib.import_module(f"twisted_relay.{name}")
            self.assertEqual(sorted(module.__all__), sorted(expected), name)
            missing = [n for n in module.__all__ if not hasattr(module, n)]
            self.assertEqual(missing, [], name)
