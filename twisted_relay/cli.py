"""
The C{twisted-relay} command: watch a relay (tap), feed it (publish), and read
its status endpoint (status), without writing socket code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from .client import BlockingClient
from .domains import UnknownDomain, find_domain
from .wire import (
    HEADER_SIZE,
    Domain,
    FrameError,
    Header,
    Source,
    build_frame,
    tlv_spans,
)

#: Names of the TLV types the tools print, from protocol-v2.md.
TLV_NAMES = {
    1: "Trade", 2: "Quote", 3: "OrderBook", 11: "PoolSwap", 16: "PoolSync", 18: "GasPrice",
    20: "SignalIdentity", 22: "Economics", 32: "ArbitrageSignal",
    40: "OrderRequest", 41: "OrderStatus", 42: "Fill", 43: "OrderCancel", 44: "OrderModify",
    45: "ExecutionReport", 60: "RiskDecision", 61: "PositionUpdate", 71: "CircuitBreaker",
    100: "Heartbeat", 101: "Snapshot", 102: "Error", 110: "RecoveryRequest",
    111: "RecoveryResponse", 112: "SequenceSync",
}

#: What the synthetic publisher sends per domain: its source and its TLVs.
SYNTHETIC = {
    Domain.MARKET_DATA: (Source.BINANCE, [(1, 40), (2, 52)]),
    Domain.SIGNAL: (Source.ARBITRAGE_STRATEGY, [(20, 16), (22, 32)]),
    Domain.EXECUTION: (Source.EXECUTION_ENGINE, [(40, 48)]),
}

EXAMPLES = {
    "tap": """examples:
  twisted-relay tap                                   # every frame on the market relay
  twisted-relay tap --domain execution --json         # orders and fills as JSON lines
  twisted-relay tap --source 1 --tlv-type 2 --count 10
  twisted-relay tap --stats                           # a live rate display
  twisted-relay tap unix:/tmp/x/e.sock --domain execution""",
    "publish": """examples:
  twisted-relay publish --count 100000                # trades and quotes, as fast as possible
  twisted-relay publish --domain execution --rate 1000 --count 5000
  twisted-relay publish tcp:10.0.0.5:7001 --source 2""",
    "status": """examples:
  twisted-relay status                                # http://127.0.0.1:9100
  twisted-relay status http://10.0.0.5:9100""",
}


class Failed(Exception):
    """A one-line reason to stop with a non-zero exit."""


def _source_name(source: int) -> str:
    try:
        return f"{Source(source).name}({source})"
    except ValueError:
        return str(source)


def _tlv_types(frame: bytes) -> list[int] | None:
    try:
        return [tlv_type for tlv_type, _, _ in tlv_spans(frame, HEADER_SIZE, len(frame))]
    except FrameError:
        return None


def describe(header: Header, frame: bytes, as_json: bool) -> str:
    """One line for one frame."""
    types = _tlv_types(frame)
    if as_json:
        return json.dumps(
            {
                "timestamp_ns": header.timestamp,
                "relay_domain": header.relay_domain,
                "source": header.source,
                "sequence": header.sequence,
                "tlv_types": types,
                "size": len(frame),
            }
        )
    stamp = time.strftime("%H:%M:%S", time.gmtime(header.timestamp / 1e9))
    micros = header.timestamp // 1000 % 1_000_000
    names = "?" if types is None else " ".join(
        f"{TLV_NAMES.get(t, 'TLV')}({t})" for t in types
    )
    try:
        domain = Domain(header.relay_domain).name.lower()
    except ValueError:
        domain = str(header.relay_domain)
    return (
        f"{stamp}.{micros:06d}  {domain:<11} {_source_name(header.source):<26} "
        f"seq {header.sequence:<10} {names}  {len(frame)} B"
    )


def connect(args: argparse.Namespace) -> BlockingClient:
    endpoint = args.endpoint or f"unix:{args.logic.socket_path}"
    try:
        return BlockingClient(endpoint)
    except FileNotFoundError:
        raise Failed(f"no relay at {endpoint}: the socket does not exist") from None
    except ConnectionRefusedError:
        raise Failed(f"no relay at {endpoint}: nothing is listening there") from None
    except PermissionError:
        raise Failed(f"permission denied connecting to {endpoint}") from None
    except (OSError, ValueError) as e:
        raise Failed(f"cannot connect to {endpoint}: {e}") from None


def introduce(relay: BlockingClient, args: argparse.Namespace, **declaration) -> None:
    """Declare the connection's role and check that the relay is of --domain."""
    where = args.endpoint or args.logic.socket_path
    try:
        domain, name = relay.introduce(**declaration)
    except TimeoutError:
        raise Failed(f"the relay at {where} did not answer: is it a twisted_relay relay?") from None
    if domain != args.logic.domain:
        raise Failed(
            f"the relay at {where} is the {name} relay (domain {domain}), not "
            f"{args.logic.name}: use --domain {name}"
        )


def tap(args: argparse.Namespace) -> None:
    with connect(args) as relay:
        introduce(relay, args, sources=args.source or None, tlv_types=args.tlv_type or None)
        shown, frames, size, gaps = 0, 0, 0, 0
        last: dict[int, int] = {}
        window_start, window_frames, window_bytes = time.monotonic(), 0, 0
        for header, frame in relay.frames(timeout=args.timeout):
            previous = last.get(header.source)
            if previous is not None and header.sequence > previous + 1:
                gaps += header.sequence - previous - 1
            last[header.source] = header.sequence
            frames, size = frames + 1, size + len(frame)
            if args.stats:
                window_frames, window_bytes = window_frames + 1, window_bytes + len(frame)
                elapsed = time.monotonic() - window_start
                if elapsed >= 1:
                    sys.stdout.write(
                        f"\r{window_frames / elapsed:12,.0f} frames/s {window_bytes / elapsed / 1e6:9.2f}"
                        f" MB/s  {frames:,} frames  {gaps:,} gaps   "
                    )
                    sys.stdout.flush()
                    window_start, window_frames, window_bytes = time.monotonic(), 0, 0
            else:
                print(describe(header, frame, args.json), flush=True)
            shown += 1
            if args.count and shown >= args.count:
                break
        if args.stats:
            print(f"\n{frames:,} frames, {size:,} bytes, {gaps:,} sequence gaps")


def synthetic(domain: int, count: int, source: int | None) -> Iterator[bytes]:
    """Well-formed frames of C{domain}, sequences 1..count, CRC-32 filled in."""
    default_source, kinds = SYNTHETIC[Domain(domain)]
    source = default_source if source is None else source
    for sequence in range(1, count + 1):
        tlv_type, length = kinds[sequence % len(kinds)]
        value = sequence.to_bytes(8, "little") * (length // 8)
        yield build_frame(domain, source, sequence, [(tlv_type, value)])


def publish(args: argparse.Namespace) -> None:
    if args.logic.domain not in SYNTHETIC:
        raise Failed(f"no synthetic frames for domain {args.logic.name}")
    progress = sys.stderr.isatty()
    with connect(args) as relay:
        introduce(relay, args, publish_only=True)
        started = time.monotonic()
        sent = size = 0
        batch: list[bytes] = []
        for frame in synthetic(args.logic.domain, args.count, args.source):
            batch.append(frame)
            sent += 1
            if len(batch) < 256 and sent < args.count and not args.rate:
                continue
            data = b"".join(batch)
            relay.publish(data)
            size += len(data)
            batch = []
            if args.rate:
                delay = started + sent / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            if progress and (sent % 4096 < len(data) // 32 or sent == args.count):
                done = sent / args.count
                sys.stderr.write(f"\r[{'#' * int(done * 30):<30}] {done:4.0%} {sent:,} frames")
                sys.stderr.flush()
        elapsed = time.monotonic() - started
    if progress:
        sys.stderr.write("\n")
    print(
        f"published {sent:,} {args.logic.name} frames ({size:,} bytes) in {elapsed:.2f}s: "
        f"{sent / elapsed if elapsed else 0:,.0f} frames/s"
    )


def status(args: argparse.Namespace) -> None:
    url = args.url.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            health = json.load(response)
    except (urllib.error.URLError, OSError) as e:
        raise Failed(f"cannot read {url}: {getattr(e, 'reason', e)}") from None
    totals = health["totals"]
    print(f"status     {health['status']}")
    print(f"domain     {health['domain']} ({health['relay_domain']}), delivery {health['delivery']}")
    print(f"version    {health['version']}, up {health['uptime_s']:.0f}s")
    print(f"listening  {', '.join(health['listening'])}")
    print(
        f"frames     {totals['frames_in']:,} in, {totals['frames_out']:,} out, "
        f"{totals['frames_dropped']:,} dropped, {totals['frames_lost']:,} lost"
    )
    print(f"rejects    {totals['rejects'] or 'none'}; cut off {totals['cut_offs'] or 'none'}")
    print(
        f"pauses     {totals['publisher_pauses']}, {totals['publishers_paused_s']}s in all, "
        f"longest {totals['longest_pause_s']}s"
    )
    print()
    print(f"{'id':>4}  {'role':<20} {'peer':<26} {'in':>12} {'out':>12} {'dropped':>9} {'buffered':>10}")
    for client in health["clients"]:
        print(
            f"{client['id']:>4}  {client['role']:<20} {client['peer']:<26} "
            f"{client['frames_in']:>12,} {client['frames_out']:>12,} "
            f"{client['frames_dropped']:>9,} {client['buffered_bytes']:>10,}"
        )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="twisted-relay", description="Tools for Protocol V2 relays."
    )
    commands = top.add_subparsers(dest="command", required=True)

    def relay_command(name: str, help: str) -> argparse.ArgumentParser:
        command = commands.add_parser(
            name, help=help, description=help, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument(
            "endpoint", nargs="?",
            help="unix:PATH, a socket path or tcp:HOST:PORT [default: the domain's socket]",
        )
        command.add_argument("--domain", default="market", help="relay domain [default: market]")
        return command

    tap_command = relay_command("tap", "Print the frames a relay carries.")
    tap_command.add_argument("--json", action="store_true", help="one JSON object per frame")
    tap_command.add_argument("--source", type=int, action="append", help="only this source; repeatable")
    tap_command.add_argument("--tlv-type", type=int, action="append", help="only frames with this TLV type; repeatable")
    tap_command.add_argument("--count", type=int, help="stop after this many frames")
    tap_command.add_argument("--stats", action="store_true", help="a live rate line instead of frames")
    tap_command.add_argument("--timeout", type=float, help="stop after this many quiet seconds")
    tap_command.set_defaults(run=tap)

    publish_command = relay_command("publish", "Publish well-formed synthetic frames.")
    publish_command.add_argument("--count", type=int, default=1000, help="frames to send [default: 1000]")
    publish_command.add_argument("--rate", type=float, help="frames per second [default: as fast as possible]")
    publish_command.add_argument("--source", type=int, help="source type [default: one of the domain]")
    publish_command.set_defaults(run=publish)

    status_command = commands.add_parser(
        "status", help="Show a relay's health endpoint.", description="Show a relay's health endpoint.",
        epilog=EXAMPLES["status"], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status_command.add_argument("url", nargs="?", default="http://127.0.0.1:9100")
    status_command.add_argument("--timeout", type=float, default=5.0)
    status_command.set_defaults(run=status)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "domain"):
            args.logic = find_domain(args.domain)
        args.run(args)
    except (Failed, UnknownDomain) as e:
        print(f"twisted-relay: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
