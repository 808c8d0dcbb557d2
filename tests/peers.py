"""
Publisher and subscriber processes for the delivery tests, on the package's
blocking client, so each runs as its own process at its own pace. Each prints one
JSON line describing exactly what it sent or received.

    python -m tests.peers publish PATH --domain 1 --count 1000 --size 1024
    python -m tests.peers subscribe PATH --frames 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib

from twisted_relay.client import BlockingClient
from twisted_relay.wire import HEADER_SIZE, Domain, build_frame

TLV_FOR_DOMAIN = {1: 1, 2: 20, 3: 40}


def publish(args: argparse.Namespace) -> dict:
    relay = BlockingClient(args.path)
    if args.publish_only:
        relay.declare(publish_only=True)
    # One TLV fills the frame: standard (2-byte header) up to 255 bytes, else extended (5).
    room = args.size - HEADER_SIZE
    value = b"v" * (room - 2 if room - 2 <= 255 else room - 5)
    tlv = TLV_FOR_DOMAIN[args.domain]
    crc, sent, batch = 0, 0, []
    started = time.monotonic()
    for sequence in range(1, args.count + 1):
        frame = build_frame(args.domain, args.source, sequence, [(tlv, value)])
        batch.append(frame)
        if len(batch) == 64 or sequence == args.count:
            data = b"".join(batch)
            relay.publish(data)
            crc = zlib.crc32(data, crc)
            sent += len(data)
            batch = []
            if args.rate:
                ahead = sent / (args.rate * 1e6) - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    if args.linger:
        time.sleep(args.linger)
    relay.close()
    return {"frames": args.count, "bytes": sent, "crc": crc}


def subscribe(args: argparse.Namespace) -> dict:
    relay = BlockingClient(args.path)
    if args.sources:
        relay.declare(sources=args.sources)
    print(json.dumps({"ready": True}), flush=True)
    if args.wait_stdin:
        sys.stdin.readline()
    crc, total, frames, unpaced = 0, 0, 0, 0
    last: dict[int, int] = {}
    in_order = True
    for header, frame in relay.frames(timeout=args.idle):
        if header.relay_domain == Domain.SYSTEM:  # the relay's answer to a control frame
            continue
        crc = zlib.crc32(frame, crc)
        total += len(frame)
        frames += 1
        if header.source in last and header.sequence <= last[header.source]:
            in_order = False
        last[header.source] = header.sequence
        if args.throttle:
            unpaced += len(frame)
            if unpaced >= args.read_size:
                time.sleep(args.throttle)
                unpaced = 0
        if args.frames is not None and frames >= args.frames:
            break
    result = {
        "frames": frames,
        "bytes": total,
        "crc": crc,
        "in_order": in_order,
        "aligned": not relay.buffered,
        "torn": relay.incoming.torn,
        "last": {str(k): v for k, v in last.items()},
    }
    relay.close()
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers")
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish")
    pub.add_argument("path")
    pub.add_argument("--domain", type=int, default=1)
    pub.add_argument("--source", type=int, default=1)
    pub.add_argument("--count", type=int, required=True)
    pub.add_argument("--size", type=int, default=1024, help="bytes per frame")
    pub.add_argument("--rate", type=float, help="MB/s to publish at [default: as fast as possible]")
    pub.add_argument("--publish-only", action="store_true")
    pub.add_argument("--linger", type=float, default=0, help="seconds to stay connected")
    sub = commands.add_parser("subscribe")
    sub.add_argument("path")
    sub.add_argument("--frames", type=int, help="stop after this many frames")
    sub.add_argument("--idle", type=float, default=10, help="stop after this long without data")
    sub.add_argument(
        "--wait-stdin", action="store_true", help="read nothing until a line arrives on stdin"
    )
    sub.add_argument("--throttle", type=float, default=0, help="seconds to sleep per read")
    sub.add_argument(
        "--read-size", type=int, default=256 * 1024, help="bytes taken per --throttle pause"
    )
    sub.add_argument("--sources", type=int, nargs="*")
    args = parser.parse_args(argv)
    result = publish(args) if args.command == "publish" else subscribe(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
